"""Metric functions on hand-built matrices with hand-computed answers."""

from __future__ import annotations

import math

import pytest

from dylora_moe.evaluation.metrics import (
    average_accuracy,
    backward_transfer,
    bwt_loss,
    forgetting,
    forward_transfer,
    max_transient_forgetting,
    novelty_scores,
    routing_accuracy,
)

# accuracy after step i on skill j; the upper triangle is the score before the skill is trained
ACC = [[0.8, 0.1, 0.2],
       [0.6, 0.9, 0.3],
       [0.7, 0.5, 0.9]]
LOSS = [[1.0, None, None], [1.2, 2.0, None], [1.5, 1.9, 0.5]]


def test_accuracy_metrics_by_hand():
    assert average_accuracy(ACC) == pytest.approx((0.7 + 0.5 + 0.9) / 3)
    # BWT: ((0.7 - 0.8) + (0.5 - 0.9)) / 2
    assert backward_transfer(ACC) == pytest.approx(-0.25)
    # FWT with base scores b = (0.0, 0.05, 0.1): ((0.1 - 0.05) + (0.3 - 0.1)) / 2
    assert forward_transfer(ACC, [0.0, 0.05, 0.1]) == pytest.approx(0.125)
    # forgetting: skill 0 best 0.8 (steps 0-1), final 0.7 -> 0.1; skill 1 best 0.9, final 0.5 -> 0.4
    assert forgetting(ACC) == pytest.approx(0.25)


def test_average_accuracy_of_an_empty_or_unmeasured_last_row_is_a_clear_error():
    """It was an IndexError (no step), a ZeroDivisionError (no skill) or a TypeError (an unmeasured cell)."""
    for matrix in ([], [[]]):
        with pytest.raises(ValueError, match="at least one step: the score matrix is empty"):
            average_accuracy(matrix)
    with pytest.raises(ValueError, match=r"skill\(s\) \[1\] of the last row were not measured"):
        average_accuracy([[1.0, None], [1.0, None]])


def test_forward_transfer_without_a_base_score_or_a_cell_above_the_diagonal_is_a_clear_error():
    """It was an IndexError (a base row shorter than the matrix) or a TypeError (an unmeasured cell)."""
    with pytest.raises(ValueError, match="the base model's score on every skill: 2 base scores for 3 skills"):
        forward_transfer(ACC, [0.0, 0.05])
    with pytest.raises(ValueError, match=r"skill\(s\) \[1, 2\] were not measured: evaluate the skills ahead"):
        forward_transfer(LOSS, [1.0, 2.0, 3.0], higher_is_better=False)
    with pytest.raises(ValueError, match=r"skill\(s\) \[2\] were not measured"):
        forward_transfer(ACC, [0.0, 0.05, None])


def test_loss_metrics_share_the_sign_convention():
    # skill 0: 1.5 - 1.0 = +0.5 nats worse; skill 1: 1.9 - 2.0 = -0.1 (better) -> mean +0.2 nats of forgetting
    assert bwt_loss(LOSS) == pytest.approx(0.2)
    assert backward_transfer(LOSS, higher_is_better=False) == pytest.approx(-0.2)
    # forgetting on loss: skill 0 best (lowest) 1.0 then 1.5 -> 0.5; skill 1 best 2.0, final 1.9 -> -0.1
    assert forgetting(LOSS, higher_is_better=False) == pytest.approx(0.2)
    assert bwt_loss([[3.0]]) == 0.0 and forgetting([[3.0]]) == 0.0


def test_forward_transfer_on_loss():
    matrix = [[1.0, 3.0], [1.0, 2.0]]
    # base loss on skill 1 is 3.5; after step 0 it is 3.0: 0.5 nats better -> positive transfer
    assert forward_transfer(matrix, [2.0, 3.5], higher_is_better=False) == pytest.approx(0.5)


def test_a_returning_skill_is_neither_backward_nor_forward_transfer():
    """Stream A, B, A again, each skill its own expert and no interaction: base loss 2.0 everywhere, a skill's
    loss 1.0 once learned and 0.9 once learned twice; B's loss never moves."""
    loss = [[1.0, 2.0, 1.0],
            [1.0, 1.0, 1.0],
            [0.9, 1.0, 0.9]]
    labels = ["a", "b", "a"]
    # without labels the return step is read as transfer: FWT (0 + 1.0) / 2, BWT (0.1 + 0) / 2
    assert forward_transfer(loss, [2.0] * 3, higher_is_better=False) == pytest.approx(0.5)
    assert backward_transfer(loss, higher_is_better=False) == pytest.approx(0.05)
    # with them: FWT only on B's first step (2.0 - 2.0 = 0), BWT and forgetting on B alone (settled), A's first
    # column left out (its gain is relearning)
    assert forward_transfer(loss, [2.0] * 3, higher_is_better=False, labels=labels) == 0.0
    assert backward_transfer(loss, higher_is_better=False, labels=labels) == 0.0
    assert forgetting(loss, higher_is_better=False, labels=labels) == 0.0
    assert bwt_loss(loss, labels) == 0.0
    with pytest.raises(ValueError, match="one label per stream step"):
        bwt_loss(loss, ["a", "b"])


def test_a_diverged_loss_shows_as_nan():
    nan = float("nan")
    assert math.isnan(max_transient_forgetting([[1.0, None], [nan, 0.8]]))
    assert math.isnan(forgetting([[1.0, None, None], [nan, 1.0, None], [1.1, 1.0, 1.0]], higher_is_better=False))


def test_routing_accuracy_pools_examples():
    assert routing_accuracy([9, 1], [10, 10]) == pytest.approx(0.5)
    assert routing_accuracy([], []) == 0.0


def test_novelty_scores():
    labels = ["py", "js", "sql", "py"]  # truly novel: T T T F
    assert novelty_scores([True, True, True, False], labels) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    # a missed JS (merged into py) and a spurious new expert for the repeat
    scores = novelty_scores([True, False, True, True], labels)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3)


def test_purity_ari_and_novelty_delay_of_a_sorting():
    from dylora_moe.evaluation.metrics import adjusted_rand_index, novelty_delay, purity

    perfect = {0: {"py": 10}, 1: {"sql": 5}}
    assert purity(perfect) == 1.0 and adjusted_rand_index(perfect) == pytest.approx(1.0)
    merged = {0: {"py": 10, "sql": 5}}
    assert purity(merged) == pytest.approx(10 / 15) and adjusted_rand_index(merged) == pytest.approx(0.0)
    # a textbook case: clusters {a,a,b}, {b,b,c} -> ARI computed by hand
    table = {0: {"a": 2, "b": 1}, 1: {"b": 2, "c": 1}}
    pairs = lambda n: n * (n - 1) / 2  # noqa: E731
    index, rows, cols = pairs(2) * 2, pairs(3) * 2, pairs(2) + pairs(3)
    expected = rows * cols / pairs(6)
    assert adjusted_rand_index(table) == pytest.approx((index - expected) / ((rows + cols) / 2 - expected))
    drawn = [{"py": 10}, {"py": 8, "sql": 2}, {"py": 5, "sql": 5}]
    table = {0: {"py": 23, "sql": 1}, 1: {"sql": 6}}
    assert novelty_delay(drawn, [[0], [], [1]], table) == {"py": 0, "sql": 2}
    assert novelty_delay(drawn, [[0], [], []], {0: {"py": 23, "sql": 7}}) == {"py": 0, "sql": 7}


def test_max_transient_forgetting_sees_a_rise_that_recovers_by_the_end():
    # skill 0 rises to 1.6 after step 1 and recovers to 1.05: BWT sees 0.05, a user saw 0.6
    transient = [[1.0, None, None], [1.6, 2.0, None], [1.05, 2.1, 0.5]]
    assert max_transient_forgetting(transient) == pytest.approx(0.6)
    assert bwt_loss(transient) == pytest.approx((0.05 + 0.1) / 2)
    assert max_transient_forgetting(LOSS) == pytest.approx(0.5)
    assert max_transient_forgetting([[1.0, None], [0.9, 2.0]]) == 0.0  # losses that only fall


def test_papers_metrics_on_a_rouge_matrix_with_unmeasured_cells():
    # ROUGE-L points; cells beyond the next step are not measured (None), as the score matrix leaves them
    scores = [[40.0, 10.0, None],
              [30.0, 60.0, 20.0],
              [35.0, 50.0, 70.0]]
    assert average_accuracy(scores) == pytest.approx(155 / 3)  # AP: mean after the last step
    # BWT: ((35 - 40) + (50 - 60)) / 2
    assert backward_transfer(scores) == pytest.approx(-7.5)
    # forgetting: task 0 best 40 -> 35, task 1 best 60 -> 50
    assert forgetting(scores) == pytest.approx(7.5)
    # FWT against base scores (5, 8, 12): ((10 - 8) + (20 - 12)) / 2
    assert forward_transfer(scores, [5.0, 8.0, 12.0]) == pytest.approx(5.0)
    # forgetting is from the best earlier score, not the score right after learning: it can exceed -BWT
    late_peak = [[40.0, None, None], [55.0, 60.0, None], [35.0, 60.0, 70.0]]
    assert forgetting(late_peak) == pytest.approx((55 - 35 + 0) / 2)
    assert backward_transfer(late_peak) == pytest.approx((35 - 40 + 0) / 2)
