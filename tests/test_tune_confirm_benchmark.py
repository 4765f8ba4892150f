"""``benchmarks/tune_confirm.py``: the baseline and the tuned values run under one training seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dylora_moe.tuning.params import apply_params, build_configs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import tune_confirm

ROOT = Path(__file__).resolve().parents[1]


def test_seed_is_the_seed_of_both_runs_even_when_the_params_hold_one(tmp_path, monkeypatch):
    seeds = {}

    def run(stream, params, out, **kwargs):  # no training: which configuration each run gets is what is tested
        _, training = build_configs(*apply_params(stream.system, stream.training, params))
        seeds[out.name] = training.seed
        return {"loss": 1.0, "forgetting": 0.0, "seconds": 0.0}

    monkeypatch.setattr(tune_confirm, "run_configuration", run)
    (tmp_path / "best.yaml").write_text("params:\n  training.seed: 7\n  training.seed_lr: 0.003\n")
    argv = ["--stream", str(ROOT / "configs" / "streams" / "tune-confirm.yaml"), "--params",
            str(tmp_path / "best.yaml"), "--out", str(tmp_path / "confirm.json")]
    tune_confirm.main([*argv, "--seed", "1"])
    assert seeds == {"baseline": 1, "tuned": 1}  # the seed the search picked would make it another check
    assert json.loads((tmp_path / "confirm.json").read_text())["seed"] == 1
    tune_confirm.main(argv)
    assert seeds == {"baseline": 0, "tuned": 0}  # the stream's own seed
