"""Orders of a stream: the permutations keep recurrences after first appearances, and the mean and spread of the
metrics over orders, on hand-built results."""

from __future__ import annotations

from collections import Counter

import pytest

from dylora_moe.data.stream import StreamSpec
from dylora_moe.evaluation.benchmark import results_from
from dylora_moe.evaluation.benchmark_report import coverage, render_orders, spread_cell
from dylora_moe.evaluation.orders import ORDER_METRICS, aggregate, order_metrics, permutation, permuted, spread

LONG = ["py", "sql", "js", "sh", "v", "mbpp", "cpp", "sql", "gen", "java", "sh", "py", "mbpp"]  # long-code's labels


def test_order_zero_is_the_files_order():
    assert permutation(LONG, 0) == list(range(len(LONG)))


@pytest.mark.parametrize("order", range(1, 30))
def test_every_order_is_a_permutation_that_keeps_each_skills_steps_in_file_order(order):
    steps = permutation(LONG, order)
    assert sorted(steps) == list(range(len(LONG)))
    for label in set(LONG):
        mine = [s for s in steps if LONG[s] == label]
        assert mine == sorted(mine), (label, steps)  # a recurrence never comes before its skill's first step


def test_orders_are_seeded_and_differ():
    assert permutation(LONG, 3) == permutation(LONG, 3)
    drawn = {tuple(permutation(LONG, k)) for k in range(1, 6)}
    assert len(drawn) == 5 and tuple(range(len(LONG))) not in drawn


def test_valid_orders_are_drawn_uniformly():
    # with labels a, b, a the valid orders are (0,1,2), (0,2,1), (1,0,2): a third each
    counts = Counter(tuple(permutation(["a", "b", "a"], k)) for k in range(1, 3001))
    assert set(counts) == {(0, 1, 2), (0, 2, 1), (1, 0, 2)}
    assert all(900 <= c <= 1100 for c in counts.values()), counts


def test_permuted_stream_reorders_the_skills_and_names_the_order():
    stream = StreamSpec("s", [{"name": "a", "source": {"type": "file", "path": "a.jsonl"}},
                              {"name": "b", "source": {"type": "file", "path": "b.jsonl"}},
                              {"name": "a2", "label": "a", "source": {"type": "file", "path": "a2.jsonl"}}])
    assert permuted(stream, 0) is stream
    orders = [permuted(stream, k) for k in range(1, 20)]
    assert all(o.name.startswith("s-order") for o in orders)
    names = {tuple(s.name for s in o.skills) for o in orders}
    assert names <= {("a", "b", "a2"), ("a", "a2", "b"), ("b", "a", "a2")} and len(names) > 1
    assert [s.name for s in stream.skills] == ["a", "b", "a2"]  # the original is left alone


def entry(acc, *, transient=0.0, seconds=10.0, novelty=None, routing=None, fwt=None):
    return {"acc": acc, "bwt": -0.01, "forgetting": 0.01, "fwt": fwt, "max_transient_forgetting": transient,
            "routing_accuracy": routing, "experts": 3, "trainable_params": 100, "train_seconds": seconds,
            "stream_seconds": 2 * seconds, **({"novelty": novelty} if novelty else {})}


def test_aggregate_gives_mean_and_spread_over_the_orders_that_ran_each_method():
    per_order = [
        {"dylora": entry(1.0, transient=0.02, novelty={"precision": 1.0, "recall": 0.5}, routing=0.9),
         "base": entry(2.0)},
        {"dylora": entry(1.2, transient=0.10, novelty={"precision": 0.5, "recall": 1.0}, routing=1.0)},
        {"dylora": entry(1.4, transient=0.06, novelty={"precision": 1.0, "recall": 1.0}, routing=0.95),
         "base": entry(2.0)},
    ]
    out = aggregate(per_order)
    assert list(out) == ["dylora", "base"] and set(out["dylora"]) == set(ORDER_METRICS)
    acc = out["dylora"]["acc"]
    assert acc["mean"] == pytest.approx(1.2) and acc["std"] == pytest.approx(0.2)
    assert (acc["min"], acc["max"], acc["n"]) == (1.0, 1.4, 3)
    assert out["dylora"]["max_transient_forgetting"]["max"] == pytest.approx(0.10)
    assert out["dylora"]["novelty_precision"]["mean"] == pytest.approx(2.5 / 3)
    assert out["dylora"]["stream_seconds"]["mean"] == pytest.approx(20.0)
    assert out["dylora"]["fwt"] is None  # never measured
    assert out["base"]["acc"] == {"mean": 2.0, "std": 0.0, "min": 2.0, "max": 2.0, "n": 2}
    assert out["base"]["routing_accuracy"] is None and out["base"]["novelty_recall"] is None


def test_spread_skips_unmeasured_values():
    assert spread([None, 1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "min": 1.0, "max": 3.0, "n": 2}
    assert spread([None]) is None and spread([]) is None


def test_a_diverged_order_shows_as_nan_and_a_cell_measured_in_fewer_orders_says_so():
    import math

    for bad in (float("nan"), float("inf")):
        s = spread([1.0, bad, 3.0])
        assert s["n"] == 3 and all(math.isnan(s[k]) for k in ("mean", "std", "min", "max"))
    assert spread_cell(spread([0.3]), "+.4f", orders=3) == "+0.3000 [1 of 3 orders]"
    assert spread_cell(spread([0.3, 0.3, 0.3]), "+.4f", orders=3) == "+0.3000"


def test_results_from_feeds_the_order_metrics():
    m = [[1.0, 2.0, 2.0], [1.5, 1.0, 2.0], [1.1, 1.2, 1.0]]  # skill 0 rose 0.5 after step 1, then fell back
    raw = {"skills": ["a", "b", "c"], "labels": ["a", "b", "a"], "matrix": m, "experts": 2, "trainable_params": 10,
           "train_seconds": 4.0, "stream_seconds": 9.0, "novel": [True, True, False], "uses_router": True,
           "expert_of_step": [0, 1, 0], "final_routing": [{"0": 1.0}, {"1": 1.0}, {"0": 1.0}]}
    metrics = order_metrics(results_from({"dylora": raw}, stream="s", model="m")["methods"]["dylora"])
    assert metrics["max_transient_forgetting"] == pytest.approx(0.5)
    assert (metrics["train_seconds"], metrics["stream_seconds"]) == (4.0, 9.0)
    assert (metrics["novelty_precision"], metrics["novelty_recall"], metrics["routing_accuracy"]) == (1.0, 1.0, 1.0)
    # measurements written before training and evaluation were timed apart: their one time is the whole pass
    old = {k: v for k, v in raw.items() if k != "stream_seconds"}
    metrics = order_metrics(results_from({"dylora": old}, stream="s", model="m")["methods"]["dylora"])
    assert metrics["train_seconds"] is None and metrics["stream_seconds"] == 4.0


def test_the_orders_report_shows_mean_spread_and_range():
    assert spread_cell({"mean": 1.2, "std": 0.2, "min": 1.0, "max": 1.4, "n": 3}, ".2f") == "1.20 ± 0.20 (1.00–1.40)"
    assert spread_cell({"mean": -0.01, "std": 0.0, "min": -0.01, "max": -0.01, "n": 2}, "+.3f") == "-0.010"
    assert spread_cell(None, ".2f") == "-"
    per_order = [{"dylora": entry(1.0, transient=0.02)}, {"dylora": entry(1.2, transient=0.08)}]
    results = {"stream": "s", "model": "m", "orders_requested": 3, "total_seconds": 60.0,
               "orders": [{"order": k, "skills": ["a", "b"], "methods": {n: order_metrics(e) for n, e in o.items()}}
                          for k, o in enumerate(per_order)],
               "methods": aggregate(per_order)}
    text = render_orders(results, command="python benchmarks/continual.py --orders 3")
    assert "2 of 3 orders started, every method finished in each" in text
    assert "| dylora | 2 | 1.1000 ± 0.1414 (1.0000–1.2000) |" in text
    assert "| dylora | 0.0200 | 0.0800 |" in text  # max transient forgetting per order


def test_the_orders_report_names_the_orders_a_method_did_not_finish():
    ran = {"dylora": [0, 1], "oracle_experts": [0]}
    assert coverage(ran, [0, 1], 3) == ("2 of 3 orders started; every method ran in order(s) 0, the others in part "
                                        "(order 1: dylora)")
    assert coverage({"dylora": [0, 1, 2]}, [0, 1, 2], 3) == "all 3 orders finished for every method"
    assert coverage({"dylora": [1], "base": [2]}, [1, 2], 2).endswith("in no order, the others in part "
                                                                        "(order 1: dylora; order 2: base)")
