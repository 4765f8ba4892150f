"""Live skill acquisition: an upload becomes a background job; a novel skill gets a new expert that later
requests route to, a known one continues its expert; serving goes on meanwhile; everything is persisted."""

from __future__ import annotations

import json
import threading

from fastapi.testclient import TestClient

from dylora_moe import DyLoRAMoE
from dylora_moe.serving import ServedSystem, create_app
from dylora_moe.store import SkillStore
from tests.serving.conftest import AUTH, MODEL, digits, empty_run, learned_run, letters, server_config, upload, wait


def top_expert(client, prompt: str) -> int:
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert json.loads(r.headers["X-DyLoRA-Routing"]) == r.json()["routing"]
    return r.json()["routing"]["experts"][0]["expert_id"]


def test_a_novel_skill_gets_an_expert_that_later_requests_route_to(tmp_path):
    run = learned_run(tmp_path)
    with TestClient(create_app(run, server_config())) as client:
        assert [e["expert_id"] for e in client.get("/experts").json()["data"]] == [0]
        served, stop = [], threading.Event()

        def keep_serving() -> None:  # requests while the job trains: all answered, by the old or the new system
            while not stop.is_set():
                served.append(client.post("/v1/completions", json={"model": MODEL, "prompt": "2+2=",
                                                                   "max_tokens": 2}).status_code)

        thread = threading.Thread(target=keep_serving)
        thread.start()
        try:
            job = upload(client, "letters", letters())
            assert job["status"] in ("queued", "running") and job["progress"]["steps_done"] == 0
            job = wait(client, job["id"])
        finally:
            stop.set()
            thread.join()
        assert job["status"] == "succeeded", job
        assert job["result"]["novel"] is True and job["result"]["expert_id"] == 1
        assert job["progress"] == {"steps_done": 4, "steps_total": 4}  # 2 seeding + 2 consolidation steps
        assert served and set(served) == {200}
        assert [e["expert_id"] for e in client.get("/experts").json()["data"]] == [0, 1]
        assert top_expert(client, "up cd:") == 1
        assert top_expert(client, "12+12=") == 0

        # more of a known skill: no new expert, its expert continues (consolidation only)
        again = wait(client, upload(client, "digits-again", digits(30, spaced=True))["id"])
        assert again["status"] == "succeeded"
        assert again["result"]["novel"] is False and again["result"]["expert_id"] == 0
        assert again["progress"]["steps_total"] == 2
        assert len(client.get("/experts").json()["data"]) == 2
        assert [s["name"] for s in client.get("/skills").json()["data"]] == ["digits", "letters"]
        metrics = client.get("/metrics").text
        assert 'dylora_skill_acquisitions_total{outcome="novel"} 1.0' in metrics
        assert 'dylora_skill_acquisitions_total{outcome="recognised"} 1.0' in metrics
        assert "dylora_experts 2.0" in metrics

    # persisted: the system folder, its routing memory and the store all know both experts
    reloaded = ServedSystem(run)
    assert reloaded.model.experts.expert_ids == [0, 1] and not reloaded.unrehearsable()
    store = SkillStore(run / "store.db")
    assert [e.expert_id for e in store.experts()] == [0, 1]
    assert store.expert(0).version == 2  # trained by two uploads
    assert [h["version"] for h in store.history(0)] == [1, 2]
    assert {"expert_created", "skill_recognised"} <= {e.event for e in store.events()}
    events = [json.loads(line)["event"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert events.count("expert_created") == 2


def test_a_jsonl_upload_to_a_system_folder_without_a_store(tmp_path):
    system = empty_run(tmp_path) / "system"
    lines = "\n".join(json.dumps(e) for e in digits(12)).encode()
    with TestClient(create_app(system, server_config())) as client:
        r = client.post("/skills", params={"name": "digits", "chat": "false"}, content=lines,
                        headers={**AUTH, "Content-Type": "application/x-ndjson"})
        assert r.status_code == 202 and r.headers["Location"] == f"/jobs/{r.json()['id']}"
        done = wait(client, r.json()["id"])
        assert done["status"] == "succeeded" and done["examples"] == 12
        assert client.get("/jobs", headers=AUTH).json()["data"][0]["skill"] == "digits"
        assert client.get("/jobs").status_code == 401 and client.get(f"/jobs/{done['id']}").status_code == 401
        assert client.app.state.jobs.jobs[done["id"]].examples == []  # a finished job does not keep its upload
    assert DyLoRAMoE.from_pretrained(system).experts.expert_ids == [0]
    assert not (system / "store.db").exists()


def test_a_failed_job_reports_why_and_changes_nothing(tmp_path, run_dir):
    with TestClient(create_app(run_dir, server_config())) as client:
        before = client.get("/experts").json()["data"]
        long_prompt = [{"prompt": "x" * 40, "response": "y"}]  # truncated away at max_length=32
        job = wait(client, upload(client, "too-long", long_prompt)["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "invalid_upload"
        assert "max_length" in job["error"]["message"]
        assert client.get("/experts").json()["data"] == before
        assert 'dylora_skill_jobs_total{status="failed"} 1.0' in client.get("/metrics").text
        ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "1+1=", "max_tokens": 1})
        assert ok.status_code == 200


def test_a_system_without_routing_memory_refuses_uploads(tmp_path):
    run = empty_run(tmp_path)
    model = DyLoRAMoE.from_pretrained(run / "system")
    model.add_new_skill(["12", "34"], name="numbers")  # an expert whose routing features were never stored
    model.save_pretrained(run / "system")
    with TestClient(create_app(run, server_config())) as client:
        r = client.post("/skills", json={"name": "letters", "examples": letters(4)}, headers=AUTH)
        assert r.status_code == 409 and "routing_memory" in r.json()["error"]["message"]


def test_a_store_failure_after_the_swap_is_reported_but_the_skill_stays_learned(tmp_path, monkeypatch):
    import dylora_moe.serving.jobs as jobs

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(jobs, "register", broken)
    run = learned_run(tmp_path)
    with TestClient(create_app(run, server_config())) as client:
        job = wait(client, upload(client, "letters", letters())["id"])
        assert job["status"] == "succeeded" and job["result"]["store_error"]["code"] == "store_write_failed"
        assert "disk full" not in json.dumps(job)  # details stay in the server log
        assert [e["expert_id"] for e in client.get("/experts").json()["data"]] == [0, 1]  # served
        assert 'kind="store_write_failed"' in client.get("/metrics").text
    assert DyLoRAMoE.from_pretrained(run / "system").experts.expert_ids == [0, 1]  # saved


def test_deleting_an_expert_of_a_server_saved_system_keeps_its_routing_memory(tmp_path):
    from dylora_moe.cli import main
    from dylora_moe.training.progress import MEMORY

    run = learned_run(tmp_path)
    with TestClient(create_app(run, server_config())) as client:
        assert wait(client, upload(client, "letters", letters())["id"])["status"] == "succeeded"
    assert main(["experts", "delete", str(run), "1"]) == 0
    assert (run / "system" / MEMORY).is_file()
    with TestClient(create_app(run, server_config())) as client:  # later uploads can still rehearse
        assert wait(client, upload(client, "letters", letters())["id"])["status"] == "succeeded"


def test_a_dead_job_worker_is_restarted(tmp_path, monkeypatch):
    import dylora_moe.serving.jobs as jobs

    real, calls = jobs.JobManager._run, []

    def dies_once(self, job):
        calls.append(job.id)
        if len(calls) == 1:
            raise SystemExit("worker killed")  # not an Exception: the worker's own handler cannot catch it
        return real(self, job)

    monkeypatch.setattr(jobs.JobManager, "_run", dies_once)
    run = empty_run(tmp_path)
    with TestClient(create_app(run, server_config())) as client:
        job = upload(client, "digits", digits())
        manager = client.app.state.jobs
        manager._thread.join(10)
        assert not manager._thread.is_alive()  # the worker died with the first job
        second = wait(client, upload(client, "digits", digits(12))["id"])
        assert second["status"] == "succeeded"  # a new upload restarted it
        assert wait(client, job["id"])["error"]["code"] == "skill_job_failed"


def test_uploads_arriving_together_cannot_pass_the_pending_job_limit_together(run_dir, monkeypatch):
    import contextlib

    import dylora_moe.serving.jobs as jobs
    from dylora_moe.data.sources import Example
    from dylora_moe.serving.errors import APIError
    from dylora_moe.serving.metrics import Metrics
    from dylora_moe.serving.uploads import Upload

    together = threading.Barrier(2, timeout=2)
    real = jobs.SkillJob

    def job_after_the_check(*args, **kwargs):  # both requests between the limit check and the job's entry
        with contextlib.suppress(threading.BrokenBarrierError):
            together.wait()
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "SkillJob", job_after_the_check)
    manager = jobs.JobManager(ServedSystem(run_dir), server_config(max_pending_jobs=1), Metrics())
    release = threading.Event()
    manager._run = lambda job: release.wait(30)  # the accepted job holds the worker
    outcomes: list[object] = []

    def submit(name: str) -> None:
        try:
            outcomes.append(manager.submit(Upload(name, [Example("p", "r")], False)).status)
        except APIError as err:
            outcomes.append(err.status)

    threads = [threading.Thread(target=submit, args=(name,)) for name in ("a", "b")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(outcomes) == 2 and outcomes.count(429) == 1  # one accepted, the other refused
    finally:
        release.set()
        manager.close()


def event_names(run) -> list[str]:
    path = run / "events.jsonl"
    return [json.loads(line)["event"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_a_job_that_fails_after_its_changes_leaves_no_events_claiming_them(tmp_path, monkeypatch):
    from dylora_moe.serving.system import ServedSystem as Served

    run = learned_run(tmp_path)
    before, stored = event_names(run), len(SkillStore(run / "store.db").events())

    def broken(self, model, memory):
        raise OSError("disk full")

    monkeypatch.setattr(Served, "save", broken)
    with TestClient(create_app(run, server_config())) as client:
        job = wait(client, upload(client, "letters", letters())["id"])
        assert job["status"] == "failed" and job["error"]["code"] == "skill_job_failed"
    # the job created expert 1 on its copy, but nothing of it was saved: neither log says it was
    assert event_names(run) == before
    assert len(SkillStore(run / "store.db").events()) == stored


def test_a_store_that_refuses_writes_does_not_fail_the_job_and_the_next_start_repairs_it(tmp_path, monkeypatch):
    from dylora_moe.checkpoint import writer_lock

    run = learned_run(tmp_path)
    store_events = len(SkillStore(run / "store.db").events())

    def locked(*args, **kwargs):
        raise OSError("database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(SkillStore, "record_event", locked)
        patch.setattr(SkillStore, "register_expert", locked)
        with TestClient(create_app(run, server_config())) as client:
            job = wait(client, upload(client, "letters", letters())["id"])
    assert job["status"] == "succeeded", job  # the novelty stage no longer writes the store
    assert job["result"]["store_error"]["code"] == "store_write_failed"
    assert event_names(run).count("expert_created") == 2  # the file, written first, has the change
    store = SkillStore(run / "store.db")
    assert len(store.events()) == store_events and [e.expert_id for e in store.experts()] == [0]

    # a kill between the save and the store write leaves the same state: the folder's writer repairs it
    with writer_lock(run / "system", who="test"):
        system = ServedSystem(run)
    assert [e.expert_id for e in store.experts()] == [0, 1]
    assert store.expert(1).training_history == [{"source": "reconciled"}]
    assert {s.name for s in store.skills()} == {"digits", "letters"}
    assert system.reconcile() == []  # in line now


def test_reconcile_drops_registry_rows_of_experts_no_longer_on_disk(tmp_path):
    from dylora_moe.store.reconcile import reconcile

    run = learned_run(tmp_path)
    store = SkillStore(run / "store.db")
    store.register_expert(7, skill_id=None, lora_config={}, storage_path="gone", rank=4)
    model = DyLoRAMoE.from_pretrained(run / "system")
    model.mark_mature(0, not bool(model.router.expert_maturity[0]))
    changes = reconcile(store, model, run / "system")
    assert len(changes) == 2 and "removed expert 7" in changes[1] and "maturity" in changes[0]
    assert [e.expert_id for e in store.experts()] == [0]
    assert store.expert(0).maturity_state == int(model.router.expert_maturity[0])


def test_an_upload_submitted_while_the_manager_closes_is_not_left_queued(run_dir):
    import dylora_moe.serving.jobs as jobs
    from dylora_moe.data.sources import Example
    from dylora_moe.serving.errors import APIError
    from dylora_moe.serving.metrics import Metrics
    from dylora_moe.serving.uploads import Upload

    manager = jobs.JobManager(ServedSystem(run_dir), server_config(), Metrics())
    manager._run = lambda job: setattr(job, "status", jobs.SUCCEEDED)  # a job the worker takes ends at once
    closer = threading.Thread(target=manager.close)
    forget = manager._forget_old

    def closing_meanwhile() -> None:  # close runs between submit's checks and its queueing of the job
        closer.start()
        closer.join(0.5)
        forget()

    manager._forget_old = closing_meanwhile
    try:
        job = manager.submit(Upload("late", [Example("p", "r")], False))
    except APIError:  # refused outright: not left queued either
        return
    finally:
        closer.join(30)  # the one close: a second one would drain the queue again
    assert job.status != jobs.QUEUED  # run before the close, or failed by it: never waiting for a worker gone
    if job.status == jobs.FAILED:
        assert job.error["code"] == "shutting_down"


def test_a_failure_after_the_swap_does_not_fail_the_job_or_lose_its_events(tmp_path, monkeypatch):
    from dylora_moe.serving.metrics import Metrics

    run = learned_run(tmp_path)
    created = event_names(run).count("expert_created")

    def broken(self, model):
        raise RuntimeError("metrics broke")

    with TestClient(create_app(run, server_config())) as client:
        monkeypatch.setattr(Metrics, "observe_system", broken)  # after the start: only the job's call fails
        job = wait(client, upload(client, "letters", letters())["id"])
        assert job["status"] == "succeeded", job  # the skill is saved and served
        assert [e["expert_id"] for e in client.get("/experts").json()["data"]] == [0, 1]
    assert event_names(run).count("expert_created") == created + 1  # its events were committed
    assert [e.expert_id for e in SkillStore(run / "store.db").experts()] == [0, 1]
