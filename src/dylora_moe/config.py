"""Configuration dataclasses for every component of DyLoRA-MoE.

Each component has one dataclass with ``help`` metadata on its fields and checks in ``__post_init__``;
the same dataclasses feed the Python API, the CLI and YAML files. ``DyLoRAConfig`` nests them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

TARGET_PRESETS = ("attention", "mlp", "all-linear")
RANK_RULES = ("fixed", "novelty")
GRANULARITIES = ("sequence", "token")
ROUTE_ON = ("prompt", "text")
ROUTE_PASSES = ("inline", "separate")
MIXING_MODES = ("fused", "reference")
DTYPES = ("float32", "bfloat16", "float16")
EMBED_ON = ("response", "text")
NOVELTY_METHODS = ("separation", "mahalanobis", "entropy", "combined", "cosine")


_NUMBERS = ("int", "float")


def check_types(config: Any) -> None:
    """Check (and where unambiguous, convert) the values of a config dataclass's plain fields (``int``,
    ``float``, ``bool``, ``str``, optionally ``| None``), so that a YAML typo fails at once with the field's
    name instead of deep inside training. A number written as text converts (PyYAML reads ``2e-3`` without a
    dot as a string); anything else of the wrong type is refused, and so is NaN."""
    for f in fields(config):
        kind = str(f.type).removesuffix(" | None")
        if kind not in ("int", "float", "bool", "str"):
            continue
        value = getattr(config, f.name)
        if value is None and str(f.type).endswith("| None"):
            continue
        where = f"{type(config).__name__}.{f.name}"
        if kind in _NUMBERS:
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise ValueError(f"{where} must be a number, got {value!r}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
            if math.isnan(value):  # would pass every range check below (each comparison is false)
                raise ValueError(f"{where} must be a number, got NaN")
            if kind == "int":
                if not float(value).is_integer():
                    raise ValueError(f"{where} must be a whole number, got {value!r}")
                value = int(value)
            setattr(config, f.name, value)
        elif kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r} ({type(value).__name__})")
        elif kind == "str" and isinstance(value, os.PathLike):  # a model folder given as a Path
            setattr(config, f.name, os.fspath(value))
        elif kind == "str" and not isinstance(value, str):
            raise ValueError(f"{where} must be text, got {value!r} ({type(value).__name__})")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(allowed)}")


@dataclass
class ExpertConfig:
    """How each LoRA expert is built.

    Args:
        rank: LoRA rank of a new expert under the ``fixed`` rule, and the base rank of the ``novelty`` rule.
        alpha: LoRA scaling numerator; the delta is scaled by ``alpha / rank``.
        dropout: LoRA dropout on the adapter input (one mask shared by all experts of a layer in the fused path).
        target_modules: a preset (``attention``, ``mlp``, ``all-linear``) resolved per architecture, or
            explicit module-name suffixes as peft accepts them.
        rank_rule: ``fixed`` gives every expert ``rank``; ``novelty`` grows the rank with how far the new skill
            lies from the nearest known one (see ``dylora_moe.experts.targets.expert_rank``).
        max_rank: upper bound of the ``novelty`` rule.
        offload_device: where the weights of experts that no sample of the current batch uses are parked
            (``"cpu"`` on an accelerator). ``None`` turns offloading off.
    """

    rank: int = field(default=8, metadata={"help": "LoRA rank (base rank of the novelty rule)"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; scaling is alpha / rank"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout probability"})
    target_modules: str | list[str] = field(
        default="attention", metadata={"help": "preset (attention, mlp, all-linear) or module-name suffixes"}
    )
    rank_rule: str = field(default="fixed", metadata={"help": "fixed | novelty"})
    max_rank: int = field(default=32, metadata={"help": "largest rank the novelty rule may give"})
    offload_device: str | None = field(
        default=None, metadata={"help": "device for unused experts' weights (e.g. cpu); None disables"}
    )

    def __post_init__(self) -> None:
        check_types(self)
        if self.rank < 1 or self.max_rank < self.rank:
            raise ValueError(f"need 1 <= rank <= max_rank, got rank={self.rank} max_rank={self.max_rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, str):
            _choice("target_modules", self.target_modules, TARGET_PRESETS)
        elif not self.target_modules:
            raise ValueError("target_modules is empty; give a preset or at least one module name")
        _choice("rank_rule", self.rank_rule, RANK_RULES)


@dataclass
class RouterConfig:
    """The dynamic hybrid router (spec 3.2).

    Args:
        top_k: experts per sample once every expert is mature (sparse delegation).
        temperature: the gate logits are divided by it before the softmax.
        granularity: ``sequence`` routes each sample once (the spec's mean over the sequence; since the gate is
            linear this is the gate of the masked mean hidden state), ``token`` routes every token.
        route_layer: which hidden states feed the gate. ``None`` is the spec's choice, the final hidden
            states of the frozen backbone, which costs a second backbone pass. An integer ``L`` routes on the
            input of decoder layer ``L`` (``0``: the token embeddings) inside the single fused pass; experts
            then adapt only layers ``>= L`` so the routed prefix does not depend on the routing (see
            ``route_pass``).
        route_pass: how an integer ``route_layer`` is read. ``inline`` routes inside the one fused pass, so the
            experts adapt only layers ``>= route_layer``; ``separate`` runs the frozen backbone up to
            ``route_layer`` in a pass of its own (``route_layer / num_layers`` of a forward per prompt, no
            experts) and the experts adapt every layer. A deep gate input (layer 6 of 30: contextual, the word
            naming a language colours every token) then costs no expert layers. ``route_layer=None`` always
            reads a pass of its own. Sequence routing only.
        route_on: what a sequence is routed on in training and evaluation. ``prompt`` pools the prompt's tokens
            only (those labelled ``-100``), as generation does, so the gate never sees the answer and the loss is
            measured under the routing generation uses; ``text`` pools prompt and response (the earlier
            behaviour). Per-token routing reads each token's prefix and is the same either way.
        dense_top_m: in the dense phase (while some expert is immature) each sample mixes every immature expert
            with only its ``dense_top_m`` highest-weighted mature ones (spec 3.4.1: the new expert and the
            *relevant* established ones), the weights renormalised over those; ``None`` mixes the whole pool.
            It keeps the dense phase's cost, in training and serving, flat as the pool grows; pools of up to
            ``dense_top_m + 1`` experts route exactly as with ``None``.
        cumulative_weight: once every expert is mature, choose the number of experts per input instead of always
            ``top_k``: the fewest experts whose gate probabilities (softmax over every expert) sum to at least this,
            at most ``top_k``. With ``top_k=2`` an input the gate is sure of keeps one expert and one it splits
            between two skills (a composed task) gets both. ``None`` (default): always ``top_k``.
    """

    top_k: int = field(default=1, metadata={"help": "experts per sample in sparse mode"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the gate"})
    granularity: str = field(default="sequence", metadata={"help": "sequence | token"})
    route_layer: int | None = field(
        default=0, metadata={"help": "decoder layer whose input feeds the gate; None = final hidden states"}
    )
    route_pass: str = field(
        default="inline", metadata={"help": "inline | separate: gate read in the routed pass or a frozen prefix pass"}
    )
    route_on: str = field(default="prompt", metadata={"help": "prompt | text: tokens a sequence is routed on"})
    dense_top_m: int | None = field(
        default=4, metadata={"help": "mature experts mixed per sample in the dense phase; None = all"}
    )
    cumulative_weight: float | None = field(
        default=None, metadata={"help": "sparse k per input: fewest experts reaching this probability; None = top_k"}
    )

    def __post_init__(self) -> None:
        check_types(self)
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.dense_top_m is not None and self.dense_top_m < 1:
            raise ValueError(f"dense_top_m must be >= 1 or None, got {self.dense_top_m}")
        if self.cumulative_weight is not None and not 0.0 < self.cumulative_weight <= 1.0:
            raise ValueError(f"cumulative_weight must be in (0, 1] or None, got {self.cumulative_weight}")
        _choice("granularity", self.granularity, GRANULARITIES)
        _choice("route_on", self.route_on, ROUTE_ON)
        _choice("route_pass", self.route_pass, ROUTE_PASSES)
        if self.route_layer is not None and self.route_layer < 0:
            raise ValueError(f"route_layer must be >= 0 or None, got {self.route_layer}")
        if self.route_layer is None and self.granularity == "token":
            raise ValueError(
                "token-level routing needs hidden states from inside the pass; set route_layer to a layer index"
            )
        if self.route_pass == "separate" and self.granularity == "token":
            raise ValueError("token-level routing reads each new token inside the pass; use route_pass='inline'")

    @property
    def separate_pass(self) -> bool:
        """The gate reads a frozen pass of its own before the routed one (always so on the final states)."""
        return self.route_layer is None or self.route_pass == "separate"

    @property
    def first_adapted_layer(self) -> int:
        """The first decoder layer the experts adapt: the routed prefix of an inline gate stays expert-free."""
        return 0 if self.separate_pass else self.route_layer


@dataclass
class NoveltyConfig:
    """When is data a new skill (spec 3.4, 3.3.1)? See ``dylora_moe.novelty.detector`` for the methods.

    Args:
        method: ``separation`` (default: calibrated two-sample decision on per-example embeddings),
            ``mahalanobis`` (the same in the gate's input space), ``entropy`` (router confidence), ``combined``
            (separation and mahalanobis must both say novel), or ``cosine`` (the spec's fixed threshold).
        granularity: how different two datasets must be to count as separate skills: the squared distance
            between their mean embeddings in units of the within-skill variance (0: the same distribution).
            Lower splits finer (e.g. two Python datasets of different style become two skills), higher merges
            more. Chosen on a selection split of the benchmark pairs and confirmed on the rest, on two
            backbones (``benchmarks/novelty.py``).
        significance: a separation beyond ``granularity`` must also be significant at this level (a
            permutation test), so that small samples of a known skill are not split off by chance.
        mixtures: data that no single known skill explains is tested against mixtures of two known skills (the
            same separation, granularity and significance; ``novelty/detector.py``), so that inputs needing two
            known skills at once (composed tasks) are recognised as their mixture and get no expert of their own.
            ``separation`` and ``mahalanobis`` methods (and so ``combined``). Off by default.
        permutations: permutations per significance test.
        entropy_margin: ``entropy`` method: how much higher (normalised entropy, 0..1) the gate's mean entropy
            on new data must be than on known skills' data.
        similarity_threshold: ``cosine`` method: novel below this cosine similarity with every known skill
            (a per-backbone constant: 0.985 was measured for SmolLM2-135M).
        embed_on: which part of an example is embedded: ``response`` (what the skill produces: code in one
            language, SQL, shell...) or ``text`` (prompt + response, the spec's choice). Prompts of different
            skills often share their language (English task statements), which pulls their embeddings together.
        layer: which hidden states the embedding reads: ``-1`` the final ones (spec), ``0`` the token
            embeddings (no decoder pass at all), ``L`` the output of decoder layer ``L``.
        max_examples: at most this many examples of a batch are embedded (chosen by content, not position).
        capacity: per-example embeddings kept per skill in the library.
        max_length: examples are truncated to this many tokens when embedded.
        batch_size: examples per forward pass while embedding.
        example_significance: mixed streams (``novelty/sorting.py``): an example is held in the novelty buffer
            when its conformal p-value against the known skills is at most this; it is also the share of a
            known skill's examples that wait there by chance.
        neighbours: mixed streams: nearest rows that score an example's novelty (``novelty/sorting.py``).
        min_group: mixed streams: a new skill needs at least this many buffered examples that belong together.
        buffer_capacity: mixed streams: the novelty buffer keeps at most this many examples (oldest go first).
        sort_weight_decay: mixed streams: L2 penalty of the classifier that refines a new group (on features
            scaled to unit mean square).
    """

    method: str = field(default="separation",
                        metadata={"help": "separation | mahalanobis | entropy | combined | cosine"})
    granularity: float = field(default=0.25, metadata={"help": "separation (within-skill variance) above = novel"})
    significance: float = field(default=0.01, metadata={"help": "permutation-test level of a novel decision"})
    mixtures: bool = field(default=False, metadata={"help": "recognise mixtures of two known skills (composed data)"})
    permutations: int = field(default=200, metadata={"help": "permutations per significance test"})
    entropy_margin: float = field(default=0.2, metadata={"help": "entropy method: mean entropy rise = novel"})
    similarity_threshold: float = field(default=0.985, metadata={"help": "cosine method: similarity below = novel"})
    embed_on: str = field(default="response", metadata={"help": "response | text"})
    layer: int = field(default=-1, metadata={"help": "hidden states embedded: -1 final, else a layer index"})
    max_examples: int = field(default=128, metadata={"help": "examples embedded per batch"})
    capacity: int = field(default=128, metadata={"help": "per-example embeddings kept per skill"})
    max_length: int = field(default=256, metadata={"help": "tokens per embedded example"})
    batch_size: int = field(default=8, metadata={"help": "examples per embedding batch"})
    example_significance: float = field(default=0.05, metadata={"help": "mixed streams: per-example novelty level"})
    neighbours: int = field(default=10, metadata={"help": "mixed streams: neighbours scoring an example"})
    min_group: int = field(default=8, metadata={"help": "mixed streams: examples needed to found a skill"})
    buffer_capacity: int = field(default=512, metadata={"help": "mixed streams: novelty buffer size"})
    sort_weight_decay: float = field(default=1e-2, metadata={"help": "mixed streams: classifier L2 penalty"})

    def __post_init__(self) -> None:
        check_types(self)
        _choice("method", self.method, NOVELTY_METHODS)
        if not -1.0 <= self.similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be in [-1, 1], got {self.similarity_threshold}")
        if self.granularity < 0:
            raise ValueError(f"granularity must be >= 0, got {self.granularity}")
        if not 0.0 < self.significance < 1.0:
            raise ValueError(f"significance must be in (0, 1), got {self.significance}")
        if not 0.0 <= self.entropy_margin < 1.0:
            raise ValueError(f"entropy_margin must be in [0, 1), got {self.entropy_margin}")
        if self.layer < -1:
            raise ValueError(f"layer must be -1 (final hidden states) or a layer index >= 0, got {self.layer}")
        _choice("embed_on", self.embed_on, EMBED_ON)
        if not 0.0 < self.example_significance < 1.0:
            raise ValueError(f"example_significance must be in (0, 1), got {self.example_significance}")
        if self.sort_weight_decay < 0:
            raise ValueError(f"sort_weight_decay must be >= 0, got {self.sort_weight_decay}")
        for name in ("max_examples", "max_length", "batch_size", "permutations", "min_group", "buffer_capacity",
                     "neighbours"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if (self.permutations + 1) * self.significance < 1:
            raise ValueError(f"permutations={self.permutations} cannot give a p-value below significance="
                             f"{self.significance}: use at least {math.ceil(1 / self.significance) - 1} permutations")
        if self.capacity < 2:
            raise ValueError(f"capacity must be >= 2 (a skill's spread needs two examples), got {self.capacity}")


@dataclass
class DyLoRAConfig:
    """The whole system.

    Args:
        model: a Hugging Face model id, a local folder, or ``default`` for the embedded SmolLM2-135M-Instruct.
        mixing: ``fused`` runs the backbone once and adds the routed experts' deltas in every adapted layer;
            ``reference`` is the spec's output-level mixing (one full pass per expert), kept as a check.
        trainable_lm_head: untie and train the output head as the spec's prototype does. Off by default: one
            head shared by every skill is trained on each new skill in turn and so re-opens forgetting.
        dtype: weights' dtype of the backbone.
        device: ``auto`` picks CUDA or MPS when present, else CPU.
        max_experts: bound on the pool. When a new skill would make it larger, the two established experts
            whose skills are closest (library embeddings) are merged first (``experts/pool.py``: peft ``cat``
            merge, skills and routing memory moved, the gate refitted), then the new expert is created.
            ``None``: unbounded.
    """

    model: str = field(default="default", metadata={"help": "HF model id, local path, or 'default'"})
    expert: ExpertConfig = field(default_factory=ExpertConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    novelty: NoveltyConfig = field(default_factory=NoveltyConfig)
    mixing: str = field(default="fused", metadata={"help": "fused | reference"})
    trainable_lm_head: bool = field(default=False, metadata={"help": "untie and train lm_head (spec)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N | mps"})
    max_experts: int | None = field(default=None, metadata={"help": "bound on the pool; None = unbounded"})

    def __post_init__(self) -> None:
        check_types(self)
        _choice("mixing", self.mixing, MIXING_MODES)
        if self.max_experts is not None and self.max_experts < 2:
            raise ValueError(f"max_experts must be >= 2 (a merge needs two established experts), got "
                             f"{self.max_experts}")
        _choice("dtype", self.dtype, DTYPES)
        if self.device != "auto":
            import torch

            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device={self.device!r} is not a device; use auto, cpu, cuda, cuda:N or "
                                 "mps") from None
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, from_dict(cls, value))
            elif not isinstance(value, cls):
                raise ValueError(f"DyLoRAConfig.{name} must be a mapping of {cls.__name__} fields (or a "
                                 f"{cls.__name__}), got {value!r} ({type(value).__name__}); leave the section "
                                 "out for its defaults")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json_string(self) -> str:
        """JSON text of the config (trackers such as the Trainer's TensorBoard callback record it)."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DyLoRAConfig:
        return from_dict(cls, data)


def from_dict(cls: type, data: dict[str, Any]):
    """Build dataclass ``cls`` from a dict, naming unknown keys instead of silently dropping them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**data)


SECTIONS = {"expert": ExpertConfig, "router": RouterConfig, "novelty": NoveltyConfig}


def unknown_fields(data: dict[str, Any]) -> list[str]:
    """The keys of a ``DyLoRAConfig`` dict (its sections' included, dotted) that no field of this version has."""
    known = {f.name for f in fields(DyLoRAConfig)}
    unknown = [key for key in data if key not in known]
    for name, cls in SECTIONS.items():
        if isinstance(data.get(name), dict):
            section = {f.name for f in fields(cls)}
            unknown += [f"{name}.{key}" for key in data[name] if key not in section]
    return sorted(unknown)
