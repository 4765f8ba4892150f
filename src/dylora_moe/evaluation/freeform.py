"""Free-form evaluation: requests of a skill's domain written the way a user writes them, not in the training
format, answered with the chat template and as a raw completion, by the routed system and by the frozen model.

The loss matrix measures a skill in its training format only. An expert can fit that format and still answer
an ordinary request of its own domain with a run of newlines; this evaluation catches that. Each skill gets
requests from another source of its domain (``requests_for``):

- VerilogEval (Human split) -> VerilogEval's Machine descriptions of problems the skill did not train on,
  as "Write a Verilog module that ..." (no module header);
- HumanEval -> MBPP tasks with their first test ("Write a function to ..."), scored by execution; without a
  data directory, HumanEval problems the stream never trains on, rephrased as a request;
- MBPP -> HumanEval problems the stream does not train on, rephrased as requests, scored by execution;
- HumanEval-X JavaScript (C++, Java) -> MBPP tasks asked in that language;
- Spider -> questions outside the stream's slice with the schema in words, scored by execution match;
- NL2Bash -> descriptions outside the stream's slice asked as "How do I ... in bash?" (exact match of the
  command as a reference score);
- general ability (with a data directory) -> CodeAlpaca instructions; and the README's example requests.

Every answer is checked by the degenerate-output detector (``degenerate.py``); execution scores run only in
the sandbox of ``execution.py``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import write_text_atomic
from ..data.sources import Example, codealpaca, humaneval, mbpp, nl2bash, package_file, read_jsonl, spider
from ..data.stream import SkillSpec, load_examples, split_examples
from ..generation import prompt_batch, prompt_positions
from ..model import DyLoRAMoE
from .degenerate import degenerate_kind, is_degenerate, paired_excess
from .execution import check_python
from .generation import extract_code, normalise, sql_checker, trim_python
from .redact import CopyFilter

# What a user of the README's demo asks; the real-model test checks these get code, not whitespace.
EXAMPLE_REQUESTS = (
    "Write a Verilog module for a 2-input AND gate.",
    "Write a Verilog module that implements a 4-bit counter with synchronous reset.",
    "Write a Python function that returns the factorial of n.",
    "Write a Python function that checks whether a string is a palindrome.",
)
FORMS = ("chat", "raw")
# How a request names a HumanEval-X language other than Python (whose skills get MBPP's own tasks).
LANGUAGE_NAMES = {"js": "JavaScript", "cpp": "C++", "java": "Java"}
# Shorter generation lengths at which answers are also judged (the sets' own lengths are 96 and 64 tokens).
PREFIX_TOKENS = (64, 96, 128)


@dataclass
class FreeformSet:
    """Requests of one skill's domain: ``examples`` hold the request as ``prompt`` (and what a checker needs
    in ``response``/``meta``); ``check(example, completion) -> passed`` where the domain allows a score."""

    skill: str
    source: str  # where the requests come from, for the report
    examples: list[Example]
    check: Callable[[Example, str], bool] | None = None
    metric: str | None = None  # pass@1, execution_match or exact_match
    max_new_tokens: int = 96
    quotable: bool = False  # the requests are the project's own text: results quote them; others by position


@dataclass
class FreeformResult:
    """One set in one form, answered by the routed system and by the frozen model."""

    skill: str
    source: str
    form: str
    n: int
    degenerate: float
    degenerate_frozen: float
    kinds: dict[str, int] = field(default_factory=dict)
    metric: str | None = None
    score: float | None = None
    score_frozen: float | None = None
    samples: list[dict[str, str | int | None]] = field(default_factory=list)  # answers and their kinds (``sample``)
    experts: dict[str, int] = field(default_factory=dict)  # top-1 expert id -> requests routed to it
    max_new_tokens: int | None = None  # the answers' generation length
    # shorter lengths (str) -> [system, frozen] degenerate rates of the answers cut there (``truncated``)
    degenerate_at: dict[str, list[float]] = field(default_factory=dict)
    # generation length and each shorter one (str) -> the paired comparison with the frozen model on the same
    # requests: {"worse", "better", "p"} (``degenerate.paired_excess``)
    paired: dict[str, dict[str, float | int]] = field(default_factory=dict)


# ---------------------------------------------------------------- request sets
def verilog_requests(split: str = "Machine", *, exclude_tasks: set[str] = frozenset(),
                     limit: int = 16) -> list[Example]:
    """VerilogEval descriptions as requests without the module header: the Machine split's one-line summaries
    ("This module ...") or the Human split's problem statements."""
    pip_name = "nvidia-bigcode-eval==26.3"
    path = f"tasks/datasets/verilog/VerilogDescription_{split}.jsonl"
    rows = read_jsonl(package_file("bigcode_eval", path, pip_name))
    out = []
    for r in rows:
        if r["task_id"] in exclude_tasks:
            continue
        text = (r.get("simple_description") or r["detail_description"]).strip()
        if text.startswith("This module "):
            request = "Write a Verilog module that " + text[len("This module "):]
        else:
            request = f"Write a Verilog module named top_module for this task.\n{text}"
        out.append(Example(request, "", {"task_id": r["task_id"]}))
    return out[:limit]


def humaneval_request(example: Example) -> Example:
    """A HumanEval problem as a user request: the docstring's text and the signature, no code to continue."""
    prompt, entry = example.prompt, example.meta["entry_point"]
    signature = next((line.strip() for line in prompt.splitlines() if line.startswith(f"def {entry}(")), entry)
    doc = re.search(r'("""|\'\'\')(.*?)(\1|\Z)', prompt.split(f"def {entry}(", 1)[-1], re.DOTALL)
    text = " ".join((doc.group(2) if doc else "").split())
    text = re.split(r"\s(?:>>>|For example|Example)", text)[0].strip()
    lines = prompt.splitlines()
    # what the prompt defines before the asked function: imports and helpers its tests call (``encode_shift``)
    start = next((i for i, line in enumerate(lines) if line.startswith(f"def {entry}(")), len(lines))
    request = f"Write a Python function `{signature.removeprefix('def ').rstrip(':')}`. {text}"
    return Example(request, "", {**example.meta, "preamble": "\n".join(lines[:start]), "problem": prompt,
                                 "solution": example.response})


def check_humaneval_request(example: Example, completion: str) -> bool:
    """The answer's program after the problem's imports and helper functions (the request names only the asked
    function, so an answer does not repeat them, and some tests call them), run with the problem's tests."""
    program = example.meta["preamble"] + "\n" + trim_python(extract_code(completion, "python"))
    return check_python(program, f"{example.meta['test']}\ncheck({example.meta['entry_point']})").passed


def mbpp_request(example: Example, language: str = "Python") -> Example:
    text = example.prompt.strip().strip('"').strip().splitlines()[0]
    if language == "Python":
        return Example(f"{text}\nYour code should pass this test:\n{example.meta['test_list'][0]}", "", example.meta)
    return Example(f"{text.replace('Write a function', f'Write a {language} function')}", "", example.meta)


def check_mbpp_request(example: Example, completion: str) -> bool:
    tests = example.meta.get("test_setup_code", "") + "\n" + "\n".join(example.meta["test_list"])
    return check_python(trim_python(extract_code(completion, "python")), tests).passed


def spider_request(example: Example) -> Example:
    tables = "; ".join(line.removeprefix("-- ") for line in example.prompt.splitlines()
                       if line.startswith("-- ") and "(" in line and not line.startswith("-- question"))
    question = example.prompt.split("-- question:", 1)[-1].strip()
    request = f"The database {example.meta['db']} has the tables {tables}. Write an SQL query: {question}"
    return Example(request, example.response, example.meta)


def nl2bash_request(example: Example) -> Example:
    text = example.prompt.removeprefix("# ").strip().rstrip(".")
    return Example(f"How do I {text[:1].lower() + text[1:]} in bash?", example.response, example.meta)


def check_exact(example: Example, completion: str) -> bool:
    return normalise(completion, example.meta.get("language")) == normalise(example.response)


def _outside(examples: Sequence[Example], seen: set[str], limit: int, *, from_end: bool = True) -> list[Example]:
    """Examples of a source the stream does not use, taken from the end of the source."""
    ordered = reversed(examples) if from_end else examples
    return [e for e in ordered if e.text not in seen][:limit]


def requests_for(skill: SkillSpec, *, seen: set[str], seen_tasks: set[str], data_dir: str | Path | None,
                 limit: int, spider_cache: str | Path | None = None) -> FreeformSet | None:
    """The free-form set of one skill, or ``None`` when its domain has none here (e.g. no data directory)."""
    src = skill.source
    if src.type != "builtin":
        return None
    if src.name == "verilogeval":
        other = "Machine" if (src.split or "Human") == "Human" else "Human"
        return FreeformSet(skill.label, f"VerilogEval {other} descriptions",
                           verilog_requests(other, exclude_tasks=seen_tasks, limit=limit))
    if src.name == "humaneval" or (src.name == "humaneval-x" and src.language == "python"):
        if data_dir is not None:
            tasks = [mbpp_request(e) for e in _outside(mbpp(data_dir), seen, limit, from_end=False)]
            return FreeformSet(skill.label, "MBPP tasks", tasks, check_mbpp_request, "pass@1")
        problems = [humaneval_request(e) for e in humaneval() if e.text not in seen][:limit]
        return FreeformSet(skill.label, "HumanEval problems not trained on, as requests", problems,
                           check_humaneval_request, "pass@1") if problems else None
    if data_dir is None:
        return None
    if src.name == "mbpp":  # a stream that also trains on HumanEval is not asked the problems it trained on
        problems = [humaneval_request(e) for e in humaneval() if e.text not in seen][:limit]
        return FreeformSet(skill.label, "HumanEval problems as requests", problems, check_humaneval_request,
                           "pass@1")
    if src.name == "humaneval-x":  # the skill's own language (JavaScript when none is named)
        language = LANGUAGE_NAMES[src.language or "js"]
        return FreeformSet(skill.label, f"MBPP tasks asked in {language}",
                           [mbpp_request(e, language)
                            for e in _outside(mbpp(data_dir), seen, limit, from_end=False)])
    if src.name == "spider":
        checker = sql_checker(data_dir, spider_cache) if spider_cache else sql_checker(data_dir, _cache())
        return FreeformSet(skill.label, "Spider questions outside the stream, schema in words",
                           [spider_request(e) for e in _outside(spider(data_dir), seen, limit)],
                           lambda e, c: checker.check(e, c), "execution_match", max_new_tokens=96)
    if src.name == "nl2bash":
        return FreeformSet(skill.label, "NL2Bash descriptions outside the stream, as questions",
                           [nl2bash_request(e) for e in _outside(nl2bash(data_dir), seen, limit)],
                           check_exact, "exact_match", max_new_tokens=64)
    return None


def _cache() -> Path:
    from ..backbone import cache_dir

    return cache_dir() / "spider-sqlite"


def general_sets(data_dir: str | Path | None, limit: int) -> list[FreeformSet]:
    """General ability: the README's example requests, and CodeAlpaca instructions with a data directory."""
    sets = [FreeformSet("examples", "README example requests", [Example(r, "") for r in EXAMPLE_REQUESTS],
                        quotable=True)]
    if data_dir is not None:
        instructions = [Example(e.prompt.strip(), e.response) for e in codealpaca(data_dir)[:limit]]
        sets.append(FreeformSet("general", "CodeAlpaca instructions", instructions))
    return sets


# ---------------------------------------------------------------- evaluation
def as_asked(prompts: Sequence[str], form: str) -> list[str]:
    """Requests as the evaluation asks them: as they are for the chat template, raw with one final newline."""
    return list(prompts) if form == "chat" else [p.rstrip() + "\n" for p in prompts]


@torch.no_grad()
def routed_to(model: DyLoRAMoE, prompts: Sequence[str], form: str) -> list[int]:
    """The top-1 expert each request goes to when ``answer`` asks it in ``form``: the same tokens, routed as
    generation routes its prompt (under per-token routing, the expert with the most weight over the prompt)."""
    if not model.num_experts:
        return []
    input_ids, mask = prompt_batch(model, as_asked(prompts, form), chat=form == "chat")
    mask = mask.to(model.device)
    # numbered as generation numbers a left-padded prompt, so a short prompt is routed as it is alone
    weights = model.route(input_ids.to(model.device), mask, prompt_positions(mask)).weights  # [B, E] or [B, T, E]
    if weights.dim() == 3:
        weights = (weights * mask.unsqueeze(-1).to(weights.dtype)).sum(1)
    return [model.experts.expert_ids[c] for c in weights.argmax(-1).tolist()]


def answer(model: DyLoRAMoE, prompts: Sequence[str], *, form: str, frozen: bool, max_new_tokens: int,
           batch_size: int) -> list[str]:
    """Greedy answers of the routed system, or of the frozen model (no expert and, with ``trainable_lm_head``, the
    backbone's own head: ``frozen_head``) through the same path."""
    chat = form == "chat"
    texts = as_asked(prompts, form)
    if frozen:
        with model.force_expert(None), model.frozen_head():
            return model.complete(texts, chat=chat, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return model.complete(texts, chat=chat, max_new_tokens=max_new_tokens, batch_size=batch_size)


class FrozenAnswers:
    """The frozen model's free-form answers kept on disk, so that every method of a benchmark (each in its own
    process) and every rerun asks the frozen model once: one JSON file per (model, form, generation length,
    prompts), written atomically; a dict-like ``get``/``[]=`` on ``evaluate_set``'s keys."""

    def __init__(self, folder: str | Path, model: str) -> None:
        self.folder, self.model = Path(folder), model

    def _file(self, key: tuple) -> Path:
        digest = hashlib.blake2b(json.dumps([self.model, *key]).encode("utf-8"), digest_size=12).hexdigest()
        return self.folder / f"{digest}.json"

    def get(self, key: tuple) -> list[str] | None:
        try:
            return json.loads(self._file(key).read_text(encoding="utf-8"))["answers"]
        except (OSError, ValueError, KeyError):  # absent, or a torn file of a killed writer: ask the model again
            return None

    def __setitem__(self, key: tuple, answers: list[str]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self._file(key), json.dumps({"model": self.model, "key": list(key), "answers": answers}))


def evaluate_set(model: DyLoRAMoE, fset: FreeformSet, *, forms: Sequence[str] = FORMS, batch_size: int = 16,
                 samples: int | None = None, frozen_answers: dict | FrozenAnswers | None = None
                 ) -> list[FreeformResult]:
    """Each form of ``fset`` answered by the routed system and the frozen model; the first ``samples`` answers of
    each (all by default, so that another detector or checker can be applied later) are kept, redacted, with
    their degenerate kinds (``sample``). ``frozen_answers`` caches the
    frozen model's answers across calls (they do not change while experts train), by set, form, generation
    length and prompts; a system without experts is the frozen model and answers once (unless its head trains:
    ``trainable_lm_head``)."""
    results = []
    prompts = [e.prompt for e in fset.examples]
    for form in forms:
        routed = answer(model, prompts, form=form, frozen=False, max_new_tokens=fset.max_new_tokens,
                        batch_size=batch_size)
        key = (fset.skill, fset.source, form, fset.max_new_tokens, tuple(prompts))
        frozen = frozen_answers.get(key) if frozen_answers is not None else None
        if frozen is None:
            unchanged = not model.num_experts and not model.config.trainable_lm_head  # the frozen model itself
            frozen = routed if unchanged else answer(
                model, prompts, form=form, frozen=True, max_new_tokens=fset.max_new_tokens, batch_size=batch_size)
            if frozen_answers is not None:
                frozen_answers[key] = frozen
        kinds, kinds_frozen = [degenerate_kind(t) for t in routed], [degenerate_kind(t) for t in frozen]
        result = FreeformResult(
            fset.skill, fset.source, form, len(prompts),
            degenerate=sum(k is not None for k in kinds) / len(kinds),
            degenerate_frozen=sum(k is not None for k in kinds_frozen) / len(kinds_frozen),
            kinds={k: kinds.count(k) for k in sorted({k for k in kinds if k})}, metric=fset.metric,
            samples=[sample(fset, k, r, f, kind=kr, kind_frozen=kf) for k, (r, f, kr, kf)
                     in enumerate(zip(routed, frozen, kinds, kinds_frozen, strict=True))][:samples])
        result.max_new_tokens = fset.max_new_tokens
        result.paired[str(fset.max_new_tokens)] = paired_excess([k is not None for k in kinds],
                                                                [k is not None for k in kinds_frozen])
        for n in PREFIX_TOKENS:
            if n < fset.max_new_tokens:
                cut = [[is_degenerate(t) for t in truncated(model.tokenizer, texts, n)] for texts in (routed, frozen)]
                result.degenerate_at[str(n)] = [sum(c) / len(c) for c in cut]
                result.paired[str(n)] = paired_excess(*cut)
        picks = routed_to(model, prompts, form)
        result.experts = {str(e): picks.count(e) for e in sorted(set(picks))}
        if fset.check is not None:
            result.score = _score(fset, routed)
            result.score_frozen = _score(fset, frozen)
        results.append(result)
    return results


def truncated(tokenizer, texts: Sequence[str], max_tokens: int) -> list[str]:
    """Each answer cut to its first ``max_tokens`` tokens (re-tokenised), as a greedy answer of that length would
    read: a long answer shows whether a loop that a shorter budget hides had started."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [tokenizer.decode(row[:max_tokens]) if len(row) > max_tokens else text
            for row, text in zip(ids, texts, strict=True)]


def sample(fset: FreeformSet, k: int, routed: str, frozen: str, *, kind: str | None,
           kind_frozen: str | None) -> dict[str, str | int | None]:
    """The answers to request ``k`` of a set, as results keep them, with their degenerate kinds (``kind``,
    ``kind_frozen``: judged on the answers as written): datasets' text stays in the datasets, so a request is
    named by its position in the set unless it is the project's own (the README examples), and what an answer
    copies from its request, its reference or any text of the dataset record it was made from (``meta``: e.g. the
    HumanEval problem a request rephrases, whose signature an answer repeats) is redacted (``CopyFilter``)."""
    example = fset.examples[k]
    kinds = {"kind": kind, "kind_frozen": kind_frozen}
    if fset.quotable:
        return {"index": k, "request": example.prompt, "routed": routed, "frozen": frozen, **kinds}
    copies = CopyFilter.of([example.prompt, example.response, *dataset_texts(example.meta)])
    return {"index": k, "routed": copies(routed), "frozen": copies(frozen), **kinds}


def dataset_texts(value) -> list[str]:
    """Every string in a record's ``meta`` (nested lists and dicts included)."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return [text for item in items for text in dataset_texts(item)]


def _score(fset: FreeformSet, completions: Sequence[str]) -> float:
    passed = [bool(fset.check(e, c)) for e, c in zip(fset.examples, completions, strict=True)]
    return sum(passed) / len(passed)


def trained_examples(skills: Sequence[SkillSpec], data_dir: str | Path | None) -> list[Example]:
    """What a stream trains on: each step's training split, capped as the loop caps it (``ContinualLearner``)."""
    examples = []
    for skill in skills:
        train, _ = split_examples(load_examples(skill, data_dir), skill.eval_share)
        examples += train[: skill.max_train]
    return examples


def stream_sets(skills: Sequence[SkillSpec], seen_examples: Sequence[Example], *, data_dir: str | Path | None,
                limit: int, spider_cache: str | Path | None = None) -> list[FreeformSet]:
    """One free-form set per skill label of a stream (a source that returns, e.g. a skill in two
    halves, is evaluated once), then the
    general sets. ``seen_examples``: what the stream trains on (``trained_examples``), none of which is asked."""
    seen = {e.text for e in seen_examples}
    tasks = {str(e.meta["task_id"]) for e in seen_examples if "task_id" in e.meta}
    sets, sources = [], set()
    for skill in skills:
        key = (skill.source.type, skill.source.name, skill.source.language, skill.source.split)
        if key in sources:
            continue
        sources.add(key)
        fset = requests_for(skill, seen=seen, seen_tasks=tasks, data_dir=data_dir, limit=limit,
                            spider_cache=spider_cache)
        if fset is not None and fset.examples:
            sets.append(fset)
    return sets + general_sets(data_dir, limit)


def evaluate_stream(model: DyLoRAMoE, skills: Sequence[SkillSpec], seen_examples: Sequence[Example], *,
                    data_dir: str | Path | None, limit: int, batch_size: int = 16,
                    spider_cache: str | Path | None = None, max_new_tokens: int | None = None,
                    frozen_answers: dict | FrozenAnswers | None = None) -> list[FreeformResult]:
    """Every free-form set of a stream (``stream_sets``) in both forms, routed system and frozen model;
    ``max_new_tokens`` replaces every set's own generation length (a loop that starts late, or repeats a long
    unit, shows only in a longer answer)."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1 (or None for each set's own), got {max_new_tokens}")
    results = []
    for fset in stream_sets(skills, seen_examples, data_dir=data_dir, limit=limit, spider_cache=spider_cache):
        if max_new_tokens is not None:
            fset = dataclasses.replace(fset, max_new_tokens=max_new_tokens)
        results += evaluate_set(model, fset, batch_size=batch_size, frozen_answers=frozen_answers)
    return results


def markdown_table(results: Sequence[FreeformResult | dict]) -> list[str]:
    """Rows of the reports' free-form table: degenerate rate and score, routed system vs frozen model, the
    answers' generation length, the paired comparison at that length (requests where only the system
    degenerates / only the frozen model does, and the one-sided p-value of the system degenerating more), the
    degenerate rates of the answers cut to shorter lengths, and the experts the requests went to (``expert:
    count``; results written before routing, the length or the pairs were recorded show ``-``)."""
    lines = ["| skill | requests | form | n | tokens | degenerate (system / frozen) | only system / only frozen (p) "
             "| cut shorter (tokens: system / frozen) | score (system / frozen) | routed to |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---|"]
    for r in results:
        r = r if isinstance(r, dict) else dataclasses.asdict(r)
        score = "-" if r["score"] is None else f"{r['metric']} {r['score']:.3f} / {r['score_frozen']:.3f}"
        experts = ", ".join(f"{e}: {c}" for e, c in r.get("experts", {}).items()) or "-"
        shorter = "; ".join(f"{n}: {a:.3f} / {b:.3f}" for n, (a, b) in r.get("degenerate_at", {}).items()) or "-"
        pair = r.get("paired", {}).get(str(r.get("max_new_tokens")))
        paired = f"{pair['worse']} / {pair['better']} ({pair['p']:.2f})" if pair else "-"
        lines.append(f"| {r['skill']} | {r['source']} | {r['form']} | {r['n']} | {r.get('max_new_tokens') or '-'} | "
                     f"{r['degenerate']:.3f} / {r['degenerate_frozen']:.3f} | {paired} | {shorter} | {score} | "
                     f"{experts} |")
    return lines
