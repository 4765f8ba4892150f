"""Skill streams: an ordered list of skills, each with a source, a format and a train/eval split.

A stream is written in YAML (see ``configs/streams/``) or built from the same dataclasses in Python. The
stream says where data comes from; it says nothing about novelty: the detector decides whether a step
brings a new skill or more of a known one.

    name: demo
    skills:
      - name: python
        source: {type: builtin, name: humaneval, stop: 82}
      - name: sql
        source: {type: builtin, name: spider, stop: 200}
        requires_data_dir: true
      - name: my-notes
        source: {type: file, path: notes.jsonl}
        format: {prompt: "{question}", response: "{answer}"}
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import check_types, from_dict
from .composed import PAIRS, composed
from .sources import (
    Example,
    codealpaca,
    humaneval,
    humaneval_x,
    mbpp,
    nl2bash,
    read_jsonl,
    spider,
    verilogeval,
)
from .superni import CUTS, superni

SOURCE_TYPES = ("builtin", "file", "hf")
TOP_LEVEL = ("name", "skills", "system", "training", "chunks", "tune", "params")
# name -> (reader, needs a data directory)
BUILTINS: dict[str, tuple[Callable[..., list[Example]], bool]] = {
    "humaneval": (lambda data_dir, **kw: humaneval(), False),
    "verilogeval": (lambda data_dir, split="Human", **kw: verilogeval(split), False),
    "mbpp": (lambda data_dir, **kw: mbpp(data_dir), True),
    "humaneval-x": (lambda data_dir, language="js", **kw: humaneval_x(data_dir, language), True),
    "spider": (lambda data_dir, **kw: spider(data_dir), True),
    "nl2bash": (lambda data_dir, **kw: nl2bash(data_dir), True),
    "codealpaca": (lambda data_dir, **kw: codealpaca(data_dir), True),
    "superni": (lambda data_dir, task=None, cut=None, **kw: superni(data_dir, task, cut=cut), True),
    "composed": (lambda data_dir, pair=None, **kw: composed(data_dir, pair), True),
}
# The SkillSource fields each kind of source reads, besides type, start, stop and shuffle.
SOURCE_FIELDS = {"file": ("path",), "hf": ("name", "config", "split")}
BUILTIN_OPTIONS = {"verilogeval": ("split",), "humaneval-x": ("language",), "superni": ("task", "cut"),
                   "composed": ("pair",)}

logger = logging.getLogger(__name__)


@dataclass
class SkillSource:
    """Where a skill's examples come from.

    Args:
        type: ``builtin`` (a reader of this package), ``file`` (local JSON/JSONL/CSV/Parquet/text) or ``hf`` (a
            Hugging Face dataset, for machines with hub access or a local dataset cache).
        name: builtin name (humaneval, verilogeval, mbpp, humaneval-x, spider, nl2bash, codealpaca, superni,
            composed), the HF dataset name, or a folder written by ``save_to_disk`` (relative to the stream
            file's folder when it lies there).
        path: file path for ``file`` sources (relative paths resolve against the stream file's folder).
        config: HF dataset config. split: HF split, or the VerilogEval split (Human / Machine).
        language: HumanEval-X language (python, js, cpp, java).
        task: SuperNI task name (``task363_sst2_polarity_classification``; see ``data/superni.py``).
        pair: composed-task pair (sql-python, bash-python, python-js; see ``data/composed.py``).
        cut: how SuperNI inputs longer than 1,200 characters are cut: ``head`` (default, keep the beginning) or
            ``ends`` (keep the beginning and the end, where QuoRef's question is; see ``data/superni.py``).
        start, stop: the slice of the source's examples this skill uses (``0 <= start < stop``; no ``stop``: to
            the end).
        shuffle: a seed: the source's records are put in that seed's random order before ``start``/``stop``
            slice them, so disjoint slices of one seed are disjoint random samples of the whole source. For a
            sorted file (NL2Bash is sorted by description: records 400-700 are mostly ``chmod`` and ``find``),
            slices without it are different command families, and a recurrence of the skill drawn from them is
            rightly novel. ``None`` (default): the source's own order.
    """

    type: str = "builtin"
    name: str | None = None
    path: str | None = None
    config: str | None = None
    split: str | None = None
    language: str | None = None
    task: str | None = None
    pair: str | None = None
    cut: str | None = None
    start: int = 0
    stop: int | None = None
    shuffle: int | None = None

    def __post_init__(self) -> None:
        if self.shuffle is not None and (isinstance(self.shuffle, bool) or not isinstance(self.shuffle, int)):
            raise ValueError(f"source `shuffle` is a seed (an integer), got {self.shuffle!r}")
        check_types(self)
        if self.start < 0:
            raise ValueError(f"source `start` must be >= 0 (the index of the first record used), got {self.start}")
        if self.stop is not None and self.stop < 1:
            raise ValueError(f"source `stop` must be >= 1 (the index after the last record used; leave it out for "
                             f"the end), got {self.stop}")
        if self.stop is not None and self.start >= self.stop:
            raise ValueError(f"source `start` {self.start} must be below `stop` {self.stop}: the slice would be empty")
        if self.type not in SOURCE_TYPES:
            raise ValueError(f"source type {self.type!r} is not supported; choose one of {', '.join(SOURCE_TYPES)}")
        if self.type == "builtin" and self.name not in BUILTINS:
            raise ValueError(f"unknown builtin source {self.name!r}; choose one of {', '.join(BUILTINS)}")
        if self.type == "file" and not self.path:
            raise ValueError("a file source needs `path`")
        if self.type == "hf" and not self.name:
            raise ValueError("an hf source needs `name` (the dataset id)")
        if self.type == "builtin" and self.name == "superni" and not self.task:
            raise ValueError("the superni source needs `task`, e.g. task363_sst2_polarity_classification")
        if self.cut is not None and self.cut not in CUTS:
            raise ValueError(f"source `cut` is {self.cut!r}; choose one of {', '.join(CUTS)}")
        if self.type == "builtin" and self.name == "composed" and self.pair not in PAIRS:
            raise ValueError(f"the composed source needs `pair`, one of {', '.join(PAIRS)}; got {self.pair!r}")
        self.check_unread()

    def check_unread(self) -> None:
        """Refuse a field this source does not read (``language: js`` on humaneval instead of humaneval-x): it
        would be dropped, and the skill trained on other data than the stream says."""
        reads = SOURCE_FIELDS.get(self.type) or ("name", *BUILTIN_OPTIONS.get(self.name, ()))
        unread = [f for f in ("name", "path", "config", "split", "language", "task", "pair", "cut")
                  if getattr(self, f) is not None and f not in reads]
        if unread:
            what = f"the {self.name} source" if self.type == "builtin" else f"a {self.type} source"
            raise ValueError(f"{what} does not read {', '.join(f'`{f}`' for f in unread)}; it reads "
                             f"{', '.join(reads)} (with type, start, stop, shuffle): leave the others out")


@dataclass
class SkillFormat:
    """How a record becomes prompt and response: ``str.format`` templates over the record's columns.

    Builtin sources already have ``prompt`` and ``response`` columns. ``chat`` wraps the prompt in the
    model's chat template (when it has one) as a user turn.
    """

    prompt: str = "{prompt}"
    response: str = "{response}"
    chat: bool = True

    def __post_init__(self) -> None:
        check_types(self)


@dataclass
class SkillSpec:
    """One step of a stream.

    Args:
        name: label in reports.
        source, format: see ``SkillSource`` and ``SkillFormat``.
        eval_share: share of the examples held out for evaluation (chosen by content hash, so an example is
            never in both splits, even when a later step repeats the skill with other examples).
        max_train, max_eval: caps on the number of examples used.
        requires_data_dir: skip this step (with a notice) when no data directory is given.
        label: the true skill, for evaluation only (benchmarks score novelty decisions and oracle routing
            against it; the learner never reads it). Defaults to ``name``; steps that bring more of an
            earlier skill share its label.
    """

    name: str
    source: SkillSource = field(default_factory=SkillSource)
    format: SkillFormat = field(default_factory=SkillFormat)
    eval_share: float = 0.2
    max_train: int | None = None
    max_eval: int | None = None
    requires_data_dir: bool = False
    label: str | None = None

    def __post_init__(self) -> None:
        check_types(self)
        self.label = self.label or self.name
        for part, cls, example in (("source", SkillSource, "{type: file, path: data.jsonl}"),
                                   ("format", SkillFormat, "{prompt: '{question}', response: '{answer}'}")):
            value = getattr(self, part)
            if isinstance(value, dict):
                setattr(self, part, from_dict(cls, value))
            elif not isinstance(value, cls):
                raise ValueError(f"skill {self.name!r}: `{part}` must be a mapping such as {example}, "
                                 f"got {value!r}")
        if not 0.0 < self.eval_share < 1.0:
            raise ValueError(f"skill {self.name!r}: eval_share must be in (0, 1), got {self.eval_share}")
        for cap in ("max_train", "max_eval"):
            value = getattr(self, cap)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"skill {self.name!r}: {cap} must be a whole number >= 1 (or left out for no "
                                 f"cap), got {value!r}")


@dataclass
class ChunkSpec:
    """One step of a mixed stream: ``size`` examples drawn from the skills in ``mix`` (skill name -> share;
    shares are normalised), interleaved in a seeded random order. The learner is not told which skill an
    example came from; the label is kept for scoring only."""

    size: int
    mix: dict[str, float]

    def __post_init__(self) -> None:
        check_types(self)  # a whole number of examples (64.0 reads as 64); 64.5, true or text are refused
        if self.size < 1:
            raise ValueError(f"a chunk needs size >= 1, got {self.size}")
        if (not isinstance(self.mix, dict) or not self.mix
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0
                       for v in self.mix.values())):
            raise ValueError(f"a chunk's mix maps skill names to positive shares, got {self.mix!r}")

    def counts(self) -> dict[str, int]:
        """Examples per skill: ``size`` split by the shares, rounded by largest remainder."""
        total = sum(self.mix.values())
        exact = {name: self.size * share / total for name, share in self.mix.items()}
        counts = {name: int(v) for name, v in exact.items()}
        for name in sorted(exact, key=lambda n: counts[n] - exact[n])[: self.size - sum(counts.values())]:
            counts[name] += 1
        return counts


def chunk_demands(chunks: Sequence[ChunkSpec]) -> dict[str, int]:
    """Examples each skill's pool must hold for every chunk of a mixed stream to be drawn."""
    demands: dict[str, int] = {}
    for chunk in chunks:
        for name, count in chunk.counts().items():
            demands[name] = demands.get(name, 0) + count
    return demands


def poolable(examples: Sequence[Example]) -> list[Example]:
    """The examples a mixed stream's pool keeps: those with a response (nothing to embed or learn otherwise)."""
    return [e for e in examples if e.response.strip()]


def check_chunk_skills(chunks: Sequence[ChunkSpec], running: Collection[str]) -> None:
    """Refuse a mixed stream whose chunks draw from a skill that does not run (``running``: the names of those
    that do; a skill with ``requires_data_dir`` runs only with a data directory)."""
    skipped = sorted(set(chunk_demands(chunks)) - set(running))
    if skipped:
        raise ValueError(f"the chunks draw from skill(s) {', '.join(map(repr, skipped))}, which do not run: they need "
                         "a data directory (requires_data_dir): pass --data-dir, or leave them out of the chunks' mix")


def check_pools(chunks: Sequence[ChunkSpec], available: dict[str, int]) -> None:
    """Refuse a mixed stream whose chunks draw from a skill that does not run or more examples of a skill than its
    pool holds (``available``: training examples per running skill), before anything trains."""
    check_chunk_skills(chunks, available)
    short = [f"{name!r} needs {need} over all chunks but its pool holds {available.get(name, 0)}"
             for name, need in chunk_demands(chunks).items() if need > available.get(name, 0)]
    if short:
        raise ValueError("the chunks draw more examples than the pools hold: " + "; ".join(short)
                         + ". Raise those skills' max_train (or their sources' slices) or lower the chunk sizes")


def source_key(source: SkillSource) -> tuple:
    """What names a source's records, whatever slice of them a step takes."""
    return (source.type, source.name, source.path, source.config, source.split, source.language, source.task,
            source.pair, source.cut)


def check_eval_shares(stream: str, skills: Sequence[SkillSpec]) -> None:
    """Refuse steps that read one source with different ``eval_share``: the content hash that holds an example
    out at a share below the other's would train on it at the other step. SuperNI keeps its published split."""
    first: dict[tuple, SkillSpec] = {}
    for skill in skills:
        if skill.source.type == "builtin" and skill.source.name == "superni":
            continue
        other = first.setdefault(source_key(skill.source), skill)
        if other.eval_share != skill.eval_share:
            raise ValueError(f"stream {stream!r}: skills {other.name!r} and {skill.name!r} read the same source with "
                             f"eval_share {other.eval_share} and {skill.eval_share}, so examples held out by one "
                             "would be trained on by the other; give them the same eval_share")


@dataclass
class StreamSpec:
    """A named list of skills; optional ``system`` (DyLoRAConfig fields) and ``training`` (TrainingConfig
    fields) sections let one file describe a whole experiment. With ``chunks`` the stream is mixed: the skills
    are pools of examples and each step is a chunk drawn from several of them, without skill boundaries
    (``training/mixed.py``). ``tune`` is the search space of ``dylora tune`` (``tuning/space.py``); ``params``
    are tuned values by dotted name (``training.seed_lr: 0.003``), already applied to ``system`` and
    ``training`` by ``load_stream`` (``best.yaml`` files carry them)."""

    name: str
    skills: list[SkillSpec]
    system: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    chunks: list[ChunkSpec] = field(default_factory=list)
    tune: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.skills = [from_dict(SkillSpec, s) if isinstance(s, dict) else s for s in self.skills]
        if not self.skills:
            raise ValueError(f"stream {self.name!r} has no skills")
        self.chunks = [from_dict(ChunkSpec, c) if isinstance(c, dict) else c for c in self.chunks]
        names = [s.name for s in self.skills]
        for i, chunk in enumerate(self.chunks):
            unknown = sorted(set(chunk.mix) - set(names))
            if unknown:
                raise ValueError(f"stream {self.name!r}: chunk #{i} mixes unknown skill(s) {', '.join(unknown)}; "
                                 f"the skills are {', '.join(names)}")
        if self.chunks and len(set(names)) != len(names):
            raise ValueError(f"stream {self.name!r}: a mixed stream's skills need distinct names")
        check_eval_shares(self.name, self.skills)

    @property
    def mixed(self) -> bool:
        return bool(self.chunks)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def active(self, data_dir: str | Path | None) -> list[SkillSpec]:
        """The steps that run: those needing a data directory only when one is given."""
        return [s for s in self.skills if data_dir or not s.requires_data_dir]


def read_yaml(path: str | Path, what: str) -> Any:
    """The parsed content of the YAML file ``path`` (a ``what``: "stream file", "params file", ...); a missing file,
    a directory, a file that is not text and a YAML syntax error are named with the file."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a directory: give the {what} itself, a YAML file (.yaml)")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text file ({err.reason} at byte {err.start}): give the {what} "
                         "as YAML") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err


def load_stream(path: str | Path) -> StreamSpec:
    """Read and validate a stream file; every problem is reported with the file and the skill it is in."""
    path = Path(path)
    data = read_yaml(path, "stream file")
    if not isinstance(data, dict) or not isinstance(data.get("skills"), list):
        unknown = sorted(map(str, set(data) - set(TOP_LEVEL))) if isinstance(data, dict) else []
        typo = f"; it has the unknown top-level key(s) {', '.join(unknown)} (a typo?)" if unknown else ""
        raise ValueError(f"{path}: expected a mapping with a `skills` list (and optionally `name`){typo}")
    skills = []
    for i, raw in enumerate(data["skills"]):
        if not isinstance(raw, dict) or "name" not in raw:
            raise ValueError(f"{path}: skill #{i} must be a mapping with a `name`")
        try:
            skill = from_dict(SkillSpec, raw)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: skill #{i} ({raw.get('name')}): {err}") from err
        if skill.source.type == "file" and not Path(skill.source.path).is_absolute():
            skill.source.path = str(path.parent / skill.source.path)
        if skill.source.type == "hf" and skill.source.name and (path.parent / skill.source.name).exists():
            skill.source.name = str(path.parent / skill.source.name)  # a local dataset folder beside the stream
        skills.append(skill)
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; allowed: {', '.join(TOP_LEVEL)}")
    for key in ("system", "training", "tune", "params"):
        if not isinstance(data.get(key) or {}, dict):
            raise ValueError(f"{path}: `{key}` must be a mapping")
    name = path.stem if data.get("name") is None else data["name"]  # `name:` left empty reads as None
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{path}: `name` must be text (it names the run and its tuning study), got {name!r}; "
                         f"leave it out to use the file's name, {path.stem!r}")
    chunks = data.get("chunks") or []
    if not isinstance(chunks, list) or not all(isinstance(c, dict) for c in chunks):
        raise ValueError(f"{path}: `chunks` must be a list of mappings, e.g. "
                         "{size: 64, mix: {python: 0.7, sql: 0.3}}")
    try:
        stream = StreamSpec(name=name, skills=skills, system=data.get("system") or {},
                            training=data.get("training") or {}, chunks=chunks, tune=data.get("tune") or {},
                            params=data.get("params") or {})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from err
    if stream.params:
        try:
            with_params(stream, stream.params)
        except ValueError as err:
            raise ValueError(f"{path}: params: {err}") from err
    return stream


def with_params(stream: StreamSpec, params: dict[str, Any]) -> StreamSpec:
    """Set tuned values (dotted names) in the stream's ``system`` and ``training`` sections, in place; they are
    recorded in ``stream.params`` so the stream written to a run folder carries them."""
    from ..tuning.params import apply_params  # imported here: tuning reads the training configs, which import us

    stream.system, stream.training = apply_params(stream.system, stream.training, params)
    stream.params = {**stream.params, **params}
    return stream


# ---------------------------------------------------------------- examples
def load_examples(skill: SkillSpec, data_dir: str | Path | None = None) -> list[Example]:
    """The formatted examples of one skill (its slice of the source), before the train/eval split."""
    src = skill.source
    if src.type == "builtin":
        reader, needs_dir = BUILTINS[src.name]
        if needs_dir and data_dir is None:
            raise FileNotFoundError(f"skill {skill.name!r}: source {src.name} reads a data directory; pass --data-dir")
        kwargs = {k: v for k, v in (("split", src.split), ("language", src.language), ("task", src.task),
                                                         ("pair", src.pair), ("cut", src.cut)) if v}
        try:
            read = reader(data_dir, **kwargs)
        except KeyError as err:  # a file of the right name holding another dataset (sanitized MBPP as mbpp.jsonl)
            where = f"in {data_dir}" if needs_dir else "of its package"
            raise ValueError(f"skill {skill.name!r}: a record of the {src.name} data {where} has no field {err}: its "
                             "file is not the dataset as published; put the published file there") from err
        records = [{"prompt": e.prompt, "response": e.response, **e.meta} for e in read]
    elif src.type == "file":
        records = read_records(Path(src.path))
    else:
        records = read_hf(src)
    if src.shuffle is not None:
        records = [records[i] for i in random.Random(src.shuffle).sample(range(len(records)), len(records))]
    records = records[src.start : src.stop]
    examples = [format_record(skill, r, i) for i, r in enumerate(records)]
    examples = [e for e in examples if e.prompt.strip() or e.response.strip()]
    if not examples:
        raise ValueError(f"skill {skill.name!r}: the source gave no examples (check start/stop and the file)")
    return examples if src.type == "builtin" else answered_only(skill.name, examples)


def answered_only(name: str, examples: list[Example]) -> list[Example]:
    """A file's examples without those whose response is empty (trained, a prompt with no answer teaches the
    expert to stop at once; a user's file holding them is most likely a mapping mistake). Built-in datasets keep
    their records as published (SuperNI's test sets hold a few empty references)."""
    answered = [e for e in examples if e.response.strip()]
    if not answered:
        raise ValueError(f"skill {name!r}: every example's response is empty, so there is nothing to learn: check "
                         "the format's response field (plain text goes in the response, with an empty prompt)")
    if len(answered) < len(examples):
        logger.warning("skill %r: %d of %d examples are left out: their response is empty; fill it in or remove "
                       "them", name, len(examples) - len(answered), len(examples))
    return answered


def format_record(skill: SkillSpec, record: dict[str, Any], index: int) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"skill {skill.name!r}: record {index} is not an object with columns but "
                         f"{type(record).__name__} {record!r:.60}; give one JSON object (or CSV row) per example")
    values = {k: "" if v is None else v for k, v in record.items()}  # JSON null (an absent Alpaca input) is empty
    try:
        prompt = skill.format.prompt.format(**values)
        response = skill.format.response.format(**values)
    except KeyError as err:
        columns = ", ".join(sorted(record))
        raise ValueError(f"skill {skill.name!r}: record {index} has no column {err}; its columns are: {columns}. "
                         "Map them with `format: {prompt: ..., response: ...}`") from err
    except (IndexError, AttributeError, ValueError) as err:
        raise ValueError(f"skill {skill.name!r}: the format templates {skill.format.prompt!r} / "
                         f"{skill.format.response!r} cannot be filled from record {index} ({err}); name columns "
                         "as {column}, e.g. `format: {prompt: '{question}', response: '{answer}'}`") from err
    meta = {k: v for k, v in record.items() if k not in ("prompt", "response")}
    return Example(prompt, response, meta)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a local file: .jsonl/.jsonl.gz, .json (a list, or a dict holding one), .csv, .parquet, or .txt
    (one example per line, as ``response`` with an empty ``prompt``: plain text)."""
    if path.is_dir():
        saved = (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
        raise ValueError(f"data file {path} is a directory: a `type: file` source reads one file, .jsonl, .json, .csv, "
                         ".parquet or .txt; give the path of such a file"
                         + ("; this one is a dataset saved with save_to_disk: read it with `source: {type: hf, name: "
                            f"{path}}}`" if saved else ""))
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} not found")
    name = path.name.lower()
    try:
        if name.endswith((".jsonl", ".jsonl.gz")):
            return read_jsonl(path)
        if name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict):
                data = next((v for v in data.values() if isinstance(v, list)), None)
            if not isinstance(data, list):
                raise ValueError("expected a list of records")
            return data
        if name.endswith(".csv"):
            with path.open(newline="", encoding="utf-8-sig") as fh:  # Excel's "CSV UTF-8" has a BOM
                return csv_records(csv.DictReader(fh))
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq  # a dependency of ``datasets``

            return pq.read_table(path).to_pylist()
        if name.endswith(".txt"):
            lines = path.read_text(encoding="utf-8-sig").splitlines()
            return [{"prompt": "", "response": line} for line in lines if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, csv.Error, OSError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    raise ValueError(f"{path}: unsupported file type; use .jsonl, .json, .csv, .parquet or .txt")


def csv_records(reader: csv.DictReader) -> list[dict[str, Any]]:
    """The rows of a CSV file; a row with more or fewer fields than the header (an unquoted comma shifts every
    column after it) is refused with its line, instead of filling the templates from the wrong columns."""
    records, ragged = [], []
    for row in reader:
        if None in row or None in row.values():
            ragged.append(reader.line_num)
        records.append(row)
    if ragged:
        lines = ", ".join(map(str, ragged[:10])) + (" ..." if len(ragged) > 10 else "")
        raise ValueError(f"line(s) {lines} have another number of fields than the header "
                         f"({', '.join(reader.fieldnames or [])}); quote fields that hold commas, e.g. \"a, b\"")
    return records


def read_hf(src: SkillSource) -> list[dict[str, Any]]:
    import datasets

    folder = Path(src.name).expanduser()
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():  # save_to_disk's layout
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            split = src.split or "train"
            if split not in ds:
                raise ValueError(f"dataset folder {folder} has no split {split!r}; its splits are: {', '.join(ds)}")
            ds = ds[split]
        return [dict(r) for r in ds]
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split or "train")
    except Exception as err:  # datasets raises many types for unreachable or unknown datasets
        raise ValueError(f"cannot load Hugging Face dataset {src.name!r} ({src.config}, {src.split}): {err}. "
                         "without hub access use a file source or a builtin one.") from err
    return [dict(r) for r in ds]


def split_examples(examples: list[Example], eval_share: float,
                   skill: str | None = None) -> tuple[list[Example], list[Example]]:
    """Train/eval split by a hash of each example's content: stable across runs and slices, never leaking.
    Examples of a source with a published split (``meta["split"]`` train/test, e.g. SuperNI) keep it. ``skill``
    names the skill in an error."""
    if examples and all(e.meta.get("split") in ("train", "test") for e in examples):
        train = [e for e in examples if e.meta["split"] == "train"]
        held = [e for e in examples if e.meta["split"] == "test"]
        if not train or not held:
            side = "test" if train else "train"
            raise ValueError(f"the published split of {len(examples)} examples leaves no {side} side: a source "
                             "slice (`start`/`stop`) takes the train instances first, then the test ones; to use "
                             "fewer examples leave the slice out and cap the step with `max_train`/`max_eval`")
        return train, held
    train, held = [], []
    for e in examples:
        h = int(hashlib.sha256(e.text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < eval_share else train).append(e)
    if not train or not held:
        raise ValueError(f"{'' if skill is None else f'skill {skill!r}: '}{len(examples)} examples are too few to "
                         f"split with eval_share={eval_share}: give the skill more examples (a wider source slice or "
                         "another file) so that both the training and the held-out side get some")
    return train, held
