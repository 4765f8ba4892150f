"""A tiny served system: a tiny Llama saved to a folder, a run folder whose first skill (digits) was learned
through ``POST /skills``, and functions to upload skills and wait for their jobs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig, NoveltyConfig
from dylora_moe.serving import ServerConfig, create_app
from dylora_moe.training.config import TrainingConfig
from dylora_moe.training.progress import MEMORY
from tests.conftest import char_tokenizer, randomise_experts, tiny_llama

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MODEL = "dylora-moe"


def digits(n: int = 30, spaced: bool = False) -> list[dict]:
    fmt = "{i} + {i} =" if spaced else "{i}+{i}="
    return [{"prompt": fmt.format(i=i), "response": f"{2 * i}"} for i in range(n)]


def letters(n: int = 30) -> list[dict]:
    return [{"prompt": f"up {chr(97 + i % 26)}{chr(97 + i // 26)}:",
             "response": f"{chr(65 + i % 26)}{chr(65 + i // 26)}!"} for i in range(n)]


def server_config(**overrides) -> ServerConfig:
    training = TrainingConfig(seed_steps=2, consolidation_steps=2, batch_size=4, max_length=32, router_fit_steps=50,
                              report_to=["none"])
    return ServerConfig(**{"api_key": KEY, "training": training, "max_upload_examples": 100, **overrides})


def empty_run(root: Path) -> Path:
    """A tiny model folder and a run folder holding a system with no expert yet."""
    tiny_llama().save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    config = DyLoRAConfig(model=str(root / "model"), expert=ExpertConfig(rank=4, dropout=0.0),
                          novelty=NoveltyConfig(similarity_threshold=0.9), device="cpu")
    DyLoRAMoE.from_config(config).save_pretrained(root / "run" / "system")
    return root / "run"


def upload(client: TestClient, name: str, examples: list[dict], **params) -> dict:
    response = client.post("/skills", json={"name": name, "examples": examples, "chat": False, **params},
                           headers=AUTH)
    assert response.status_code == 202, response.text
    return response.json()


def wait(client: TestClient, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/jobs/{job_id}", headers=AUTH).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def learned_run(root: Path) -> Path:
    """A run folder whose system learned digits through the server (expert 0)."""
    run = empty_run(root)
    with TestClient(create_app(run, server_config())) as client:
        job = wait(client, upload(client, "digits", digits())["id"])
        assert job["status"] == "succeeded", job
    return run


def two_skill_run(root: Path) -> Path:
    """A run folder whose system learned digits (expert 0) and letters (expert 1) through the server, its
    experts' weights then randomised so that each one changes the greedy output visibly."""
    run = learned_run(root)
    with TestClient(create_app(run, server_config())) as client:
        job = wait(client, upload(client, "letters", letters())["id"])
        assert job["status"] == "succeeded" and job["result"]["expert_id"] == 1, job
    system = run / "system"
    model = DyLoRAMoE.from_pretrained(system)
    randomise_experts(model, seed=1)
    memory = (system / MEMORY).read_bytes()
    model.save_pretrained(system, extra=lambda folder: (folder / MEMORY).write_bytes(memory))
    return run


@pytest.fixture(scope="package")
def run_dir(tmp_path_factory) -> Path:
    return learned_run(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="package")
def client(run_dir):
    """Read-only tests share this server; tests that learn skills build their own."""
    with TestClient(create_app(run_dir, server_config())) as c:
        yield c
