"""The README's example requests after a demo-like training on the default model: the routed system answers
them with code, not whitespace.

Sized down through parameters only (32 training examples per skill, 4 consolidation steps); the seeding phase
is the demo's, at the demo's rate, which is where an expert learned to answer with newlines. The recipe is
``TrainingConfig``'s default (instruction views, trained with the chat template and raw): the chat-only recipe
failed the routing and Verilog tests below. The system is the demo's (``configs/streams/default.yaml``'s
``system`` section: the gate on layer 6 from a routing pass of its own).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.data.stream import SkillSpec, StreamSpec, load_stream
from dylora_moe.evaluation.degenerate import degenerate_kind
from dylora_moe.evaluation.freeform import EXAMPLE_REQUESTS
from dylora_moe.training import ContinualLearner, TrainingConfig
from dylora_moe.training.measure import routed_experts

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

# A keyword of the language as a statement: a whole module or a body (the experts learned bodies) both count.
CODE = {"Verilog": re.compile(r"^\s*(module\s+\w+|assign\s+\w+|always\s*@|reg\s|wire\s)", re.MULTILINE),
        "Python": re.compile(r"^\s*(def\s+\w+\s*\(|return\b|if\s.*:|for\s.*:)", re.MULTILINE)}


@pytest.fixture(scope="module")
def answered(tmp_path_factory):
    """Train the demo-like stream once; route and answer the README's example requests."""
    stream = StreamSpec("demo-small", [
        SkillSpec("humaneval-python", {"type": "builtin", "name": "humaneval", "stop": 82}, max_train=32, max_eval=8),
        SkillSpec("verilogeval", {"type": "builtin", "name": "verilogeval"}, max_train=32, max_eval=8),
    ])
    training = TrainingConfig(consolidation_steps=4, report_to=["none"], router_fit_steps=50)
    demo = load_stream(Path(__file__).parents[1] / "configs" / "streams" / "default.yaml")
    model = DyLoRAMoE.from_config(DyLoRAConfig.from_dict({**demo.system, "device": "cpu"})).eval()
    records = ContinualLearner(model, stream, training, tmp_path_factory.mktemp("run")).run()
    requests = list(EXAMPLE_REQUESTS)
    features = model.routing_features_for(
        [model.tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                             add_generation_prompt=True) for r in requests])
    answers = model.complete(requests, max_new_tokens=64, batch_size=len(requests))
    rows = [("Verilog" if "Verilog" in r else "Python", r, e, a)
            for r, e, a in zip(requests, routed_experts(model, features), answers, strict=True)]
    return {"experts": {"Python": records[0].novelty.expert_id, "Verilog": records[1].novelty.expert_id},
            "rows": rows}


def test_readme_requests_route_to_their_skill(answered):
    assert answered["experts"]["Python"] != answered["experts"]["Verilog"]
    for language, request, expert, _ in answered["rows"]:
        assert expert == answered["experts"][language], request


def test_readme_python_requests_get_python(answered):
    for language, request, _, answer in answered["rows"]:
        if language == "Python":
            assert degenerate_kind(answer) is None, (request, answer)
            assert CODE[language].search(answer), (request, answer)


def test_readme_verilog_requests_get_verilog(answered):
    for language, request, _, answer in answered["rows"]:
        if language == "Verilog":
            assert degenerate_kind(answer) is None, (request, answer)
            assert CODE[language].search(answer), (request, answer)
