"""Free-form requests: each source phrased as a request (no training format), scored where it can be, and the
evaluation of a set on a tiny model against its frozen backbone."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from tokenizers import decoders

from dylora_moe.data.sources import Example, humaneval, verilogeval
from dylora_moe.data.stream import load_stream
from dylora_moe.evaluation.degenerate import degenerate_kind
from dylora_moe.evaluation.freeform import (
    EXAMPLE_REQUESTS,
    FreeformSet,
    FrozenAnswers,
    as_asked,
    check_exact,
    check_humaneval_request,
    check_mbpp_request,
    evaluate_set,
    humaneval_request,
    markdown_table,
    mbpp_request,
    nl2bash_request,
    requests_for,
    routed_to,
    spider_request,
    stream_sets,
    trained_examples,
    truncated,
    verilog_requests,
)
from dylora_moe.generation import prompt_batch
from tests.conftest import build, char_tokenizer, randomise_experts, tiny_gpt2

MBPP = Example('"""Write a function to square a number.\nassert square(3) == 9\n"""\n',
               "def square(x):\n    return x * x\n",
               {"task_id": 1, "test_setup_code": "", "test_list": ["assert square(3) == 9", "assert square(-2) == 4"]})


def test_humaneval_problem_as_a_request_is_scored_by_its_tests():
    problem = humaneval()[0]
    request = humaneval_request(problem)
    assert request.prompt.startswith("Write a Python function `has_close_elements(")
    assert '"""' not in request.prompt and ">>>" not in request.prompt
    solution = "```python\n" + problem.prompt + problem.response + "```\nThis works because..."
    assert check_humaneval_request(request, solution)
    assert not check_humaneval_request(request, "\n" * 40)


def test_a_humaneval_request_is_checked_with_the_helpers_its_prompt_defines():
    # a made-up problem in HumanEval's shape: a helper before the asked function, and tests that call the helper
    prompt = ('import string\n\n\ndef shift(s: str) -> str:\n    """Shift each letter by one."""\n'
              '    return "".join(chr(ord(c) + 1) for c in s)\n\n\ndef unshift(s: str) -> str:\n'
              '    """Undo shift.\n    >>> unshift("bc")\n    \'ab\'\n    """\n')
    problem = Example(prompt, '    return "".join(chr(ord(c) - 1) for c in s)\n',
                      {"entry_point": "unshift", "test": "def check(candidate):\n"
                                                         "    assert candidate(shift('hal')) == 'hal'\n"})
    request = humaneval_request(problem)
    assert request.prompt == "Write a Python function `unshift(s: str) -> str`. Undo shift."
    answer = "```python\ndef unshift(s: str) -> str:\n    return ''.join(chr(ord(c) - 1) for c in s)\n```"
    assert check_humaneval_request(request, answer)
    assert not check_humaneval_request(request, "```python\ndef unshift(s):\n    return s\n```")


def test_mbpp_request_and_check():
    request = mbpp_request(MBPP)
    assert request.prompt == ("Write a function to square a number.\nYour code should pass this test:\n"
                              "assert square(3) == 9")
    assert mbpp_request(MBPP, "JavaScript").prompt == "Write a JavaScript function to square a number."
    assert check_mbpp_request(request, "Sure:\n```python\ndef square(x):\n    return x ** 2\n```")
    assert not check_mbpp_request(request, "def square(x):\n    return x + x\n")


def test_verilog_requests_have_no_module_header_and_skip_trained_problems():
    requests = verilog_requests("Machine", limit=200)
    assert requests and all(r.prompt.startswith("Write a Verilog module") for r in requests)
    assert not any("module top_module" in r.prompt for r in requests)
    trained = {e.meta["task_id"] for e in verilogeval()[:50]}
    assert not {r.meta["task_id"] for r in verilog_requests("Machine", exclude_tasks=trained, limit=200)} & trained


def test_mbpp_requests_skip_the_humaneval_problems_the_stream_trains_on(tmp_path):
    stream = load_stream("configs/streams/default.yaml")
    skill = next(s for s in stream.skills if s.source.name == "mbpp")
    trained = humaneval()[:5]
    fset = requests_for(skill, seen={e.text for e in trained}, seen_tasks=set(), data_dir=tmp_path, limit=8)
    asked = [e.meta["task_id"] for e in fset.examples]
    assert len(asked) == 8 and not set(asked) & {e.meta["task_id"] for e in trained}
    assert asked == [e.meta["task_id"] for e in humaneval()[5:13]]


def test_humaneval_x_requests_are_asked_in_the_skills_language(tmp_path):
    (tmp_path / "mbpp").mkdir()
    task = {"text": "Write a function to square a number.", "code": "", "task_id": 1, "test_setup_code": "",
            "test_list": ["assert square(3) == 9"], "challenge_test_list": []}
    (tmp_path / "mbpp" / "mbpp.jsonl").write_text(json.dumps(task) + "\n")
    stream = load_stream("configs/streams/long-code.yaml")
    asked = {}
    for skill in stream.skills:
        if skill.source.name == "humaneval-x" and skill.source.language != "python":
            fset = requests_for(skill, seen=set(), seen_tasks=set(), data_dir=tmp_path, limit=1)
            asked[skill.source.language] = (fset.source, fset.examples[0].prompt)
    assert asked == {"js": ("MBPP tasks asked in JavaScript", "Write a JavaScript function to square a number."),
                     "cpp": ("MBPP tasks asked in C++", "Write a C++ function to square a number."),
                     "java": ("MBPP tasks asked in Java", "Write a Java function to square a number.")}


def test_nl2bash_and_spider_requests():
    request = nl2bash_request(Example("# Lists all files.\n", "ls -a\n", {"language": "bash"}))
    assert request.prompt == "How do I lists all files in bash?"
    assert check_exact(request, "```python\nimport os\n```\nIn bash:\n```bash\nls -a\n```")  # the bash block
    spider = Example("-- database: pets\n-- Pets(id, name)\n-- question: How many pets are there?\n",
                     "SELECT count(*) FROM Pets;\n", {"db": "pets"})
    assert spider_request(spider).prompt == ("The database pets has the tables Pets(id, name). Write an SQL query: "
                                             "How many pets are there?")


def test_default_stream_sets_without_a_data_directory():
    stream = load_stream("configs/streams/default.yaml")
    skills = stream.active(None)
    seen = trained_examples(skills, None)
    sets = stream_sets(skills, seen, data_dir=None, limit=5)
    assert [s.skill for s in sets] == ["humaneval-python-a", "verilogeval", "examples"]  # the second half: once
    python = sets[0]
    assert len(python.examples) == 5 and python.metric == "pass@1"
    assert not {e.meta["task_id"] for e in python.examples} & {e.meta["task_id"] for e in seen}
    assert len({e.meta["task_id"] for e in seen if "HumanEval" in str(e.meta["task_id"])}) < 164  # held-out ones
    assert [e.prompt for e in sets[-1].examples] == list(EXAMPLE_REQUESTS)
    assert sets[-1].quotable and not any(s.quotable for s in sets[:-1])  # only the README's own are quoted


def test_evaluate_set_compares_the_system_with_its_frozen_backbone():
    model = build()
    fset = FreeformSet("digits", "hand-written", [Example("1+1=", "2"), Example("2+2=", "4")],
                       check=lambda e, c: c.strip().startswith(e.response), metric="exact_match", max_new_tokens=6)
    cache: dict = {}
    untrained = evaluate_set(model, fset, frozen_answers=cache)
    assert [r.form for r in untrained] == ["chat", "raw"] and len(cache) == 2
    for r in untrained:  # no expert yet: the system is the frozen model
        assert r.degenerate == r.degenerate_frozen and r.score == r.score_frozen
        assert r.samples[0]["routed"] == r.samples[0]["frozen"]
    model.create_expert()
    randomise_experts(model)
    trained = evaluate_set(model, fset, forms=("raw",), frozen_answers=cache)
    assert trained[0].samples[0]["frozen"] == untrained[1].samples[0]["frozen"]
    assert trained[0].samples[0]["routed"] != trained[0].samples[0]["frozen"]
    assert untrained[0].experts == {} and trained[0].experts == {"0": 2}  # where the requests went: one expert
    model.create_expert()
    two = evaluate_set(model, fset, forms=("raw",), frozen_answers=cache)[0]
    assert sum(two.experts.values()) == 2 and set(two.experts) <= {"0", "1"}
    table = markdown_table([dataclasses.asdict(r) for r in untrained])
    assert len(table) == 4 and "exact_match" in table[2]
    # a dataset's requests stay in the dataset: samples name them by position; the project's own are quoted
    # every answer by default, each with its degenerate kinds, from which the rates follow
    assert [set(s) for s in untrained[0].samples] == [{"index", "routed", "frozen", "kind", "kind_frozen"}] * 2
    assert [s["index"] for s in untrained[0].samples] == [0, 1]
    for r in trained:
        assert r.degenerate == sum(s["kind"] is not None for s in r.samples) / r.n
        assert r.degenerate_frozen == sum(s["kind_frozen"] is not None for s in r.samples) / r.n
        assert all(s["kind"] == degenerate_kind(s["routed"]) for s in r.samples)  # nothing here is redacted
        # the pairs at the generation length: requests where only one of the two degenerates
        pair = r.paired[str(r.max_new_tokens)]
        assert pair["worse"] == sum(s["kind"] is not None and s["kind_frozen"] is None for s in r.samples)
        assert pair["better"] == sum(s["kind_frozen"] is not None and s["kind"] is None for s in r.samples)
    own = evaluate_set(model, dataclasses.replace(fset, quotable=True), forms=("raw",), samples=1)
    routed, frozen = own[0].samples[0]["routed"], trained[0].samples[0]["frozen"]
    assert own[0].samples == [{"index": 0, "request": "1+1=", "routed": routed, "frozen": frozen,
                               "kind": degenerate_kind(routed), "kind_frozen": degenerate_kind(frozen)}]


def test_a_stream_can_be_asked_at_another_generation_length(monkeypatch):
    from dylora_moe.evaluation import freeform

    model = build()
    fset = FreeformSet("digits", "hand-written", [Example("1+1=", "2")], max_new_tokens=6)
    monkeypatch.setattr(freeform, "stream_sets", lambda *a, **kw: [fset])
    lengths = []
    complete = model.complete
    monkeypatch.setattr(model, "complete", lambda texts, **kw: (lengths.append(kw["max_new_tokens"]),
                                                                complete(texts, **kw))[1])
    own = freeform.evaluate_stream(model, [], [], data_dir=None, limit=1)
    longer = freeform.evaluate_stream(model, [], [], data_dir=None, limit=1, max_new_tokens=9)
    assert [r.max_new_tokens for r in own] == [6, 6] and [r.max_new_tokens for r in longer] == [9, 9]
    assert lengths == [6, 6, 9, 9]
    with pytest.raises(ValueError, match="max_new_tokens"):
        freeform.evaluate_stream(model, [], [], data_dir=None, limit=1, max_new_tokens=0)


def test_frozen_answers_persist_across_processes_and_a_system_without_experts_answers_once(tmp_path, monkeypatch):
    model = build()
    fset = FreeformSet("digits", "hand-written", [Example("1+1=", "2"), Example("2+2=", "4")], max_new_tokens=6)
    calls = []
    complete = model.complete
    monkeypatch.setattr(model, "complete", lambda texts, **kw: (calls.append(len(texts)), complete(texts, **kw))[1])
    first = evaluate_set(model, fset, forms=("raw",), frozen_answers=FrozenAnswers(tmp_path, "tiny:float32"))
    assert len(calls) == 1  # no expert: the routed answers are the frozen model's
    model.create_expert()
    randomise_experts(model)
    calls.clear()
    again = FrozenAnswers(tmp_path, "tiny:float32")  # another method's process, same folder
    second = evaluate_set(model, fset, forms=("raw",), frozen_answers=again)
    assert len(calls) == 1  # only the routed system generated
    assert second[0].samples[0]["frozen"] == first[0].samples[0]["frozen"]
    calls.clear()
    evaluate_set(model, fset, forms=("raw",), frozen_answers=FrozenAnswers(tmp_path, "other-model:float32"))
    assert len(calls) == 2  # another backbone's answers are not reused
    longer = dataclasses.replace(fset, max_new_tokens=8)
    calls.clear()
    evaluate_set(model, longer, forms=("raw",), frozen_answers=again)
    assert len(calls) == 2  # nor those of another generation length
    key = ("digits", "hand-written", "raw", 6, ("1+1=", "2+2="))
    assert again.get(key) == [sample["frozen"] for sample in first[0].samples]
    again._file(key).write_text("{torn", encoding="utf-8")  # a writer killed mid-file (no atomic rename)
    assert again.get(key) is None
    calls.clear()
    evaluate_set(model, fset, forms=("raw",), frozen_answers=again)
    assert len(calls) == 2 and again.get(key) is not None  # asked again and rewritten


def test_answers_are_also_judged_cut_to_shorter_lengths():
    """A loop that starts late shows only in a long answer: ``truncated`` cuts answers to their first tokens,
    and ``evaluate_set`` records the degenerate rates at the shorter lengths of ``PREFIX_TOKENS``."""
    tok = char_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()  # one character per token, joined back without spaces
    late = "def f(x): return x + 1; " + "ab" * 40  # the char tokenizer has no newline
    assert truncated(tok, [late, "short"], 22) == ["def f(x): return x + 1", "short"]
    assert degenerate_kind(late) == "loop" and degenerate_kind(truncated(tok, [late], 30)[0]) is None
    model = build()
    fset = FreeformSet("digits", "hand-written", [Example("1+1=", "2")], max_new_tokens=100)
    result = evaluate_set(model, fset, forms=("raw",))[0]
    assert set(result.degenerate_at) == {"64", "96"}  # the lengths below the set's own
    assert all(len(v) == 2 and all(0.0 <= x <= 1.0 for x in v) for v in result.degenerate_at.values())
    short = evaluate_set(model, dataclasses.replace(fset, max_new_tokens=8), forms=("raw",))[0]
    assert short.degenerate_at == {}
    assert set(result.paired) == {"64", "96", "100"} and set(short.paired) == {"8"}  # and the pairs at each


def test_an_answer_repeating_the_dataset_record_behind_a_request_is_redacted():
    """A HumanEval request names the signature without ``def``; an answer that writes the problem's own
    signature line repeats five words of the dataset's prompt, not of the request: the record's texts (``meta``)
    are redaction sources too."""
    from dylora_moe.evaluation.freeform import sample

    problem = humaneval()[1]
    request = humaneval_request(problem)
    signature = next(line for line in problem.prompt.splitlines() if line.startswith("def "))
    fset = FreeformSet("humaneval", "HumanEval problems as requests", [request])
    kept = sample(fset, 0, f"```python\n{signature}\n    return []\n```", "", kind=None, kind_frozen=None)
    assert signature not in kept["routed"] and "[...]" in kept["routed"] and "return []" in kept["routed"]


@pytest.mark.parametrize("router", [dict(), dict(route_layer=1, route_pass="separate")])
def test_routed_to_routes_a_left_padded_request_as_generation_does(router):
    """GPT-2's positions are absolute: a short request padded on the left goes to the expert it is generated
    with, the one it goes to alone."""
    model = build(tiny_gpt2(), top_k=1, **router)
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    for e in model.experts.expert_ids:
        model.mark_mature(e)
    torch.manual_seed(0)
    with torch.no_grad():
        model.router.gate.weight.normal_(0, 5.0)
    prompts = ["a much longer prompt than the other one", "hi", "xyz", "hello there"]
    with torch.no_grad():
        alone = [int(model.route(*prompt_batch(model, as_asked([p], "raw"), chat=False)).weights.argmax())
                 for p in prompts]
    assert routed_to(model, prompts, "raw") == [model.experts.expert_ids[c] for c in alone]


def test_with_a_trained_output_head_the_frozen_answers_are_the_backbones():
    """With ``trainable_lm_head`` the head trains with the experts: the frozen model's answers are still the
    backbone's, its own head included, with or without experts in the pool."""
    from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig
    from tests.conftest import tiny_llama

    fset = FreeformSet("digits", "hand-written", [Example("1+1=", "2"), Example("2+2=", "4")], max_new_tokens=6,
                       quotable=True)  # answers as written: none redacted
    backbone = evaluate_set(build(), fset, forms=("chat",))[0]  # no expert: the system is the frozen model
    config = DyLoRAConfig(model="tiny", expert=ExpertConfig(rank=4, alpha=8, dropout=0.0), trainable_lm_head=True)
    model = DyLoRAMoE(tiny_llama(), char_tokenizer(), config)
    head = model.backbone.get_output_embeddings()
    with torch.no_grad():  # as training moves it
        head.weight.add_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(1)))
    frozen = [s["frozen"] for s in backbone.samples]
    alone = evaluate_set(model, fset, forms=("chat",))[0]
    assert [s["routed"] for s in alone.samples] != frozen  # the trained head answers otherwise
    assert [s["frozen"] for s in alone.samples] == frozen
    model.create_expert()
    randomise_experts(model)
    assert [s["frozen"] for s in evaluate_set(model, fset, forms=("chat",))[0].samples] == frozen
