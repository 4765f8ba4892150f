"""The continual loop on a mixed stream: chunks of unlabelled examples of several skills, no skill boundaries.

Each chunk (``ChunkSpec``: a size and the skills' shares) is drawn from the skills' training pools and
shuffled. The learner embeds every example and the ``SkillSorter`` (``novelty/sorting.py``) assigns it to a
known skill, holds it in the novelty buffer, or founds a new skill (and expert) from a coherent buffered group.
Then every expert with examples in the chunk trains on them, one pass over its examples
(``ceil(n / (batch_size * grad_accum * processes))`` optimizer steps, the first ``seed_steps`` of them at the
seeding rate when the expert was created in this chunk), the gate rehearsing as in the boundary-given loop.
Buffered examples are not trained on until they are sorted. A new expert that takes the pool past
``max_experts`` first has the two closest established experts merged, as in the boundary-given loop.

The skills' labels are never read by the learner: they only name the evaluation columns. After each chunk
every skill seen so far is evaluated on its held-out examples (loss and routing), and the record keeps how
the chunk was sorted (expert -> examples per true skill), which ``evaluation/metrics.py`` scores (purity,
adjusted Rand index, novelty delay).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import datasets

from ..data.preprocess import render_prompt
from ..data.sources import Example
from ..data.stream import SkillSpec, StreamSpec, check_chunk_skills, check_pools, chunk_demands, poolable
from ..model import DyLoRAMoE
from ..novelty import NoveltyResult, content_key
from ..novelty.sorting import ChunkSort, SkillSorter
from .config import TrainingConfig
from .distill import Anchors, anchor_texts, build_anchors
from .loop import ContinualLearner, StepData, StepRecord, launched_processes, prompted
from .measure import routed_experts, routing_entropy

logger = logging.getLogger(__name__)


@dataclass
class ChunkRecord(StepRecord):
    """A ``StepRecord`` of a chunk (``skill`` is ``chunk <i>``, ``novelty`` the founding decision or, when no
    skill was founded, a not-novel result) with how the chunk was sorted.

    drawn: true skill -> examples of it in the chunk (for scoring only).
    sorted: expert id -> true skill -> examples assigned to it in this chunk (for scoring only).
    waiting: examples in the novelty buffer after the chunk, by true skill (for scoring only).
    founded: the experts created in this chunk; candidates / screened / tail: the buffer's count test.
    """

    drawn: dict[str, int] = field(default_factory=dict)
    sorted: dict[int, dict[str, int]] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    founded: list[int] = field(default_factory=list)
    candidates: int = 0
    screened: int = 0
    tail: float = 1.0


class MixedLearner(ContinualLearner):
    """Runs a mixed stream (``stream.chunks``) through a ``DyLoRAMoE``; ``run_step(i)`` runs chunk ``i``.

    ``self.skills`` are the stream's skills (the pools and evaluation columns), ``self.steps[j]`` their data;
    a skill is "seen" once a chunk has drawn from it.
    """

    def __init__(self, model: DyLoRAMoE, stream: StreamSpec, training: TrainingConfig, out_dir, *,
                 data_dir=None, after_skill: Callable | None = None) -> None:
        if not stream.mixed:
            raise ValueError(f"stream {stream.name!r} has no `chunks`: run it with ContinualLearner")
        super().__init__(model, stream, training, out_dir, data_dir=data_dir, after_skill=after_skill)
        check_chunk_skills(stream.chunks, [s.name for s in self.skills])
        self.chunks = stream.chunks
        self.pools: dict[str, StepData] = {}
        self.used: dict[str, int] = {}
        self.seen: list[str] = []  # skills in order of first appearance (evaluation columns)
        self.sorter = SkillSorter(model.library, model.config.novelty, self.found)
        self.history: dict[int, list[Example]] = {}  # expert -> examples sorted to it so far (anchor prompts)

    @property
    def total(self) -> int:
        return len(self.chunks)

    # ------------------------------------------------------------------ data
    def pool(self, name: str) -> StepData:
        if name not in self.pools:
            skill = next(s for s in self.skills if s.name == name)
            data = self.prepare(skill)
            data.train = poolable(data.train)
            self.pools[name], self.used[name] = data, 0
        return self.pools[name]

    def draw(self, i: int) -> list[tuple[str, Example]]:
        """Chunk ``i``'s examples as (true skill, example), in a seeded random order."""
        drawn = []
        for name, count in self.chunks[i].counts().items():
            data, start = self.pool(name), self.used.get(name, 0)
            if start + count > len(data.train):
                raise ValueError(f"chunk #{i} needs {count} more examples of {name!r} but its pool has "
                                 f"{len(data.train) - start} left of {len(data.train)}: raise the skill's max_train "
                                 "(or its source's slice) or lower the chunk sizes")
            drawn += [(name, e) for e in data.train[start : start + count]]
            self.used[name] = start + count
            if count and name not in self.seen:  # a share rounded to no example draws nothing
                self.seen.append(name)
        random.Random(self.training.seed + i).shuffle(drawn)
        return drawn

    # ------------------------------------------------------------------ loop
    def run(self, progress: Callable[[str], None] | None = None) -> list[ChunkRecord]:
        # every pool is read first: a chunk that cannot be drawn fails now, not after the chunks before it trained
        check_pools(self.chunks, {name: len(self.pool(name).train) for name in chunk_demands(self.chunks)})
        for i in range(len(self.records), self.total):
            self.run_step(i, progress)
        return self.records

    def run_step(self, i: int, progress: Callable[[str], None] | None = None) -> ChunkRecord:
        say = progress or (lambda msg: logger.info(msg))
        tag = f"[{i + 1}/{self.total}]"
        drawn = self.draw(i)
        say(f"{tag} chunk of {len(drawn)} examples: embedding and sorting")
        examples = [e for _, e in drawn]
        sample = self.model.embed_sample(examples, limit=len(examples))
        by_key = {content_key(e.text): (name, e) for name, e in drawn}
        keys = list(by_key)  # identical examples are one item
        result = self.sort_chunk(i, [by_key[k] for k in keys], sample, keys)
        founded = [self.model.library.skills[s].expert_id for s in result.founded]
        say(f"{tag} " + describe(result, self.model))
        start = time.perf_counter()
        log = []
        for skill_id, items in sorted(result.assigned.items()):
            if not items:
                continue
            expert_id = self.model.library.skills[skill_id].expert_id
            data = self.step_data(i, [e for _, e in items])
            novelty = self.novelty_of(skill_id, is_novel=expert_id in founded)
            self.remember(data, novelty)
            self.fit_router()
            total = math.ceil(len(items) / self.optimizer_batch())
            seed = min(self.training.seed_steps, total) if novelty.is_novel else 0
            log += self.train_expert(i, data, novelty, steps=(seed, total - seed))
            self.history.setdefault(expert_id, []).extend(data.train)
            self.fit_router()
            self.model.mark_mature(expert_id)
        seconds = time.perf_counter() - start
        say(f"{tag} evaluating {len(self.seen)} skill(s)")
        record = self.measure_chunk(i, result, drawn, founded, seconds)
        record.train_log = log
        self.records.append(record)
        if self.after_skill:
            self.after_skill(i, record)
        return record

    def optimizer_batch(self) -> int:
        """Sequences one optimizer step takes: ``batch_size`` per micro-batch and process, ``grad_accum``
        micro-batches, every process of a data-parallel run (torchrun/accelerate set ``WORLD_SIZE``)."""
        return self.training.batch_size * self.training.grad_accum * launched_processes()

    def sort_chunk(self, i: int, items: list, sample, keys: list[int]) -> ChunkSort:
        """Which skill each item of chunk ``i`` goes to (overridable by baselines)."""
        return self.sorter.sort(i, items, sample, keys, name=f"chunk{i}")

    def found(self, sample, name: str) -> NoveltyResult:
        """Found a skill (and its expert) from a buffered group; a pool that grows past ``max_experts`` has its
        closest established experts merged, as in the boundary loop (``bound_pool``)."""
        result = self.model.add_skill_sample(sample, name)
        self.bound_pool(result)
        return result

    def merged(self, a: int, b: int, into: int) -> None:
        """The examples sorted to ``a`` and ``b`` so far are ``into``'s (its anchor and retained prompts)."""
        super().merged(a, b, into)
        self.history[into] = self.history.pop(a, []) + self.history.pop(b, [])

    def novelty_of(self, skill_id: int, *, is_novel: bool) -> NoveltyResult:
        skill = self.model.library.skills[skill_id]
        return NoveltyResult(is_novel, skill_id, skill.expert_id, None, None, self.model.experts.ranks[skill.expert_id],
                             method="sorting")

    def anchors(self, i: int, data: StepData, expert_id: int) -> Anchors | None:
        """Anchor prompts of the KL to the frozen model: the expert's requests in this chunk without their code,
        and requests sorted to the other experts so far (the sorting's labels, not the stream's)."""
        per = self.training.anchors_per_skill
        earlier = [self.prompts(data, prompted(examples[:per])) for e, examples in sorted(self.history.items())
                   if e != expert_id]
        texts = anchor_texts(self.model.tokenizer, [e.prompt for e in data.train], [p for ps in earlier for p in ps],
                             with_prose=self.training.prose_anchors)
        return build_anchors(self.model.tokenizer, texts, expert_id, max_length=self.training.max_length)

    def retained(self, i: int, expert_id: int) -> Anchors | None:
        """Requests sorted to this expert in earlier chunks: it keeps what it answered them with."""
        earlier = prompted(self.history.get(expert_id, [])[: self.training.anchors_per_skill])
        texts = [render_prompt(self.model.tokenizer, e.prompt, self.chat) for e in earlier]
        return build_anchors(self.model.tokenizer, texts, expert_id, max_length=self.training.max_length)

    def step_data(self, i: int, examples: list[Example]) -> StepData:
        """The examples one expert trains on in chunk ``i``, built like a step's training set."""
        spec = SkillSpec(f"chunk{i}", source=self.skills[0].source,
                         format=dataclasses.replace(self.skills[0].format, chat=self.chat))
        return StepData(spec, examples, [], self.train_dataset(examples, self.chat), datasets.Dataset.from_dict({}))

    @property
    def chat(self) -> bool:
        chats = {s.format.chat for s in self.skills}
        if len(chats) > 1:
            raise ValueError("a mixed stream's skills must agree on format.chat (the learner cannot tell which "
                             "skill an example belongs to, so it renders all of them alike)")
        return chats.pop()

    def measure_chunk(self, i: int, result: ChunkSort, drawn, founded: list[int], seconds: float) -> ChunkRecord:
        """Evaluate every skill seen so far (columns in the stream's skill order, ``None`` for unseen ones)."""
        self.steps = [self.pool(s.name) for s in self.skills]
        losses: list[float | None] = [None] * len(self.skills)
        routing: list[dict[int, float]] = [{} for _ in self.skills]
        entropy: list[float] = [0.0] * len(self.skills)
        for j, step in enumerate(self.steps):
            if self.skills[j].name not in self.seen:
                continue
            losses[j] = self.evaluate(j, step)
            chosen = routed_experts(self.model, self.held_out_features(step))
            routing[j] = {e: chosen.count(e) / len(chosen) for e in sorted(set(chosen))}
            entropy[j] = routing_entropy(list(routing[j].values()))
        counts: dict[str, int] = {}
        for name, _ in drawn:
            counts[name] = counts.get(name, 0) + 1
        by_expert = {}
        for skill_id, items in result.assigned.items():
            expert = self.model.library.skills[skill_id].expert_id
            row = by_expert.setdefault(expert, {})
            for name, _ in items:
                row[name] = row.get(name, 0) + 1
        waiting: dict[str, int] = {}
        for w in self.sorter.buffer:
            waiting[w.item[0]] = waiting.get(w.item[0], 0) + 1
        novelty = (self.novelty_of(result.founded[-1], is_novel=True) if result.founded
                   else NoveltyResult(False, -1, -1, None, None, 0, method="sorting"))
        return ChunkRecord(i, f"chunk {i}", novelty, sum(counts.values()), 0, seconds, losses, routing, entropy,
                           self.model.num_experts, drawn=counts, sorted=by_expert, waiting=waiting,
                           dropped=result.dropped, founded=founded, candidates=result.candidates,
                           screened=result.screened, tail=result.tail)


def describe(result: ChunkSort, model: DyLoRAMoE) -> str:
    """One line on how a chunk was sorted, e.g. ``expert 0: 40, expert 1: 24 (new); 2 waiting``."""
    parts = []
    for skill_id, items in sorted(result.assigned.items()):
        expert = model.library.skills[skill_id].expert_id
        parts.append(f"expert {expert}: {len(items)}" + (" (new)" if skill_id in result.founded else ""))
    text = ", ".join(parts) or "nothing sorted yet"
    text += f"; {result.waiting} waiting"
    if result.dropped:
        text += f", {result.dropped} dropped from the full buffer"
    return text + f" (novel {result.candidates}/{result.screened}, tail p={result.tail:.2g})"
