"""The README's example requests after a demo-like training on the default model: the routed system answers
them with code, not whitespace.

Sized down through parameters only (32 training examples per skill, 4 consolidation steps); the seeding phase
is the demo's, at the demo's rate, which is where an expert learned to answer with newlines.
"""

from __future__ import annotations

import re

import pytest
from dylora_moe.training.measure import routed_experts

from dylora_moe import DyLoRAConfig, DyLoRAMoE
from dylora_moe.data.stream import SkillSpec, StreamSpec
from dylora_moe.evaluation.degenerate import degenerate_kind
from dylora_moe.evaluation.freeform import EXAMPLE_REQUESTS
from dylora_moe.training import ContinualLearner, TrainingConfig

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

# A keyword of the language as a statement: a whole module or a body (the experts learned bodies) both count.
CODE = {"Verilog": re.compile(r"^\s*(module\s+\w+|assign\s+\w+|always\s*@|reg\s|wire\s)", re.MULTILINE),
        "Python": re.compile(r"^\s*(def\s+\w+\s*\(|return\b|if\s.*:|for\s.*:)", re.MULTILINE)}


def test_readme_requests_get_code_after_demo_like_training(tmp_path):
    stream = StreamSpec("demo-small", [
        SkillSpec("humaneval-python", {"type": "builtin", "name": "humaneval", "stop": 82}, max_train=32, max_eval=8),
        SkillSpec("verilogeval", {"type": "builtin", "name": "verilogeval"}, max_train=32, max_eval=8),
    ])
    training = TrainingConfig(consolidation_steps=4, report_to=["none"], router_fit_steps=50)
    model = DyLoRAMoE.from_config(DyLoRAConfig(device="cpu")).eval()
    records = ContinualLearner(model, stream, training, tmp_path).run()
    python_expert, verilog_expert = (r.novelty.expert_id for r in records)
    assert python_expert != verilog_expert

    requests = list(EXAMPLE_REQUESTS)
    features = model.routing_features_for(
        [model.tokenizer.apply_chat_template([{"role": "user", "content": r}], tokenize=False,
                                             add_generation_prompt=True) for r in requests])
    experts = routed_experts(model, features)
    answers = model.complete(requests, max_new_tokens=64, batch_size=len(requests))
    for request, expert, answer in zip(requests, experts, answers, strict=True):
        language = "Verilog" if "Verilog" in request else "Python"
        assert expert == (verilog_expert if language == "Verilog" else python_expert), request
        assert degenerate_kind(answer) is None, (request, answer)
        assert CODE[language].search(answer), (request, answer)
