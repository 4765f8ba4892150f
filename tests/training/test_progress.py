"""Progress of a continual run: what a resumed learner is given back from its checkpoint."""

from __future__ import annotations

import pytest

from dylora_moe import DyLoRAMoE
from dylora_moe.data.stream import StreamSpec
from dylora_moe.training import ContinualLearner
from dylora_moe.training.progress import restore_progress, save_progress
from tests.conftest import char_tokenizer, tiny_llama
from tests.training.test_loop import build, digits, letters, skill_file, small_config


def test_a_stream_shorter_than_the_completed_steps_is_refused(tmp_path):
    """The stream may grow after a checkpoint (more skills to come), but one cut below the completed steps would
    leave records of steps that are no longer in it (and a report of more steps than skills)."""
    one, two = skill_file(tmp_path, "digits", digits), skill_file(tmp_path, "letters", letters)
    learner = ContinualLearner(build(), StreamSpec("s", [one, two]), small_config(), tmp_path / "out")
    learner.run()
    save_progress(learner, tmp_path / "system")
    model = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    resumed = ContinualLearner(model, StreamSpec("s", [one]), small_config(), tmp_path / "out")
    with pytest.raises(ValueError, match=r"2 completed steps.*1 skill"):
        restore_progress(resumed, tmp_path / "system")


def test_a_resumed_run_counts_the_examples_evaluated_from_where_it_stopped(tmp_path):
    """The count of examples the loss matrix ran (a cost figure) goes on from the checkpoint instead of starting
    from zero. The reusable scores are not kept (an expert of the folder may be trained under its id while the
    run is paused), so the first evaluation after a resume runs every example, with the losses an uninterrupted
    run reports."""
    stream = StreamSpec("s", [skill_file(tmp_path, "digits", digits), skill_file(tmp_path, "letters", letters)])
    whole = ContinualLearner(build(), stream, small_config(), tmp_path / "whole")
    whole.run()
    first = ContinualLearner(build(), stream, small_config(), tmp_path / "out")
    first.run_step(0)
    save_progress(first, tmp_path / "system")
    model = DyLoRAMoE.from_pretrained(tmp_path / "system", backbone=tiny_llama(), tokenizer=char_tokenizer())
    resumed = ContinualLearner(model, stream, small_config(), tmp_path / "out")
    assert restore_progress(resumed, tmp_path / "system") == 1
    assert resumed.examples_evaluated == first.examples_evaluated > 0
    resumed.run()
    assert resumed.examples_evaluated == first.examples_evaluated + sum(len(s.eval_set) for s in resumed.steps)
    for a, b in zip(resumed.records, whole.records, strict=True):
        assert a.losses == pytest.approx(b.losses, abs=1e-5)
