"""Options of the Ray deployment: checks, Ray Serve's deployment options, the command line."""

from __future__ import annotations

import pytest

from dylora_moe.cli import main
from dylora_moe.serving import logs
from dylora_moe.serving.ray_config import RayServeConfig


def test_fixed_replicas_or_autoscaling():
    fixed = RayServeConfig(replicas=3, replica_gpus=1).generator_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    scaled = RayServeConfig(min_replicas=2, max_replicas=8, target_ongoing_requests=4).generator_options()
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 2, "max_replicas": 8, "target_ongoing_requests": 4}


@pytest.mark.parametrize(("fields", "message"), [
    ({"experts_per_replica": 0}, "experts_per_replica must be >= 1"),
    ({"min_replicas": 4, "max_replicas": 2}, "below min_replicas"),
    ({"target_ongoing_requests": 0}, "target_ongoing_requests must be > 0"),
    ({"replica_gpus": -1}, "must be >= 0"),
    ({"route_prefix": "v1"}, "must start with '/'"),
])
def test_bad_options_are_refused_with_the_reason(fields, message):
    with pytest.raises(ValueError, match=message):
        RayServeConfig(**fields)


@pytest.mark.parametrize("fields", [{"target_ongoing_requests": float("nan")}, {"replica_cpus": float("nan")},
                                    {"replica_gpus": float("inf")}, {"ingress_cpus": float("nan")}])
def test_numbers_that_are_not_finite_are_refused_before_ray_starts(fields):
    # argparse's float takes "nan" and "inf"; Ray would refuse them only once the cluster is up, by a
    # conversion error (or an OverflowError) that names no option
    name = next(iter(fields))
    with pytest.raises(ValueError, match=name):
        RayServeConfig(**fields)


def test_serve_ray_passes_the_layout_and_ray_flags_need_ray(run_dir, monkeypatch, capsys):
    seen = {}

    def fake_run(path, config, layout, **kwargs):
        seen.update(kwargs, path=path, layout=layout, config=config)
        return 0

    monkeypatch.setattr("dylora_moe.serving.ray_app.run", fake_run)
    monkeypatch.setattr(logs, "configure", lambda level: None)
    argv = ["serve", str(run_dir), "--ray", "--replicas", "3", "--experts-per-replica", "4", "--address", "auto",
            "--max-replicas", "6", "--api-key", "k"]
    assert main(argv) == 0
    layout = seen["layout"]
    assert (layout.replicas, layout.experts_per_replica, layout.address, layout.max_replicas) == (3, 4, "auto", 6)
    assert seen["config"].api_key == "k" and seen["host"] == "127.0.0.1"
    assert main(["serve", str(run_dir), "--replicas", "3"]) == 2
    assert "--replicas only apply to a Ray deployment: add --ray" in " ".join(capsys.readouterr().err.split())
