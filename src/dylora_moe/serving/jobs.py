"""Live skill acquisition: uploaded skills are learned by background jobs while serving goes on.

One job at a time, in a worker thread: load a second copy of the served system from its folder (every
change is saved before it is served, so the folder holds exactly what is served), run the continual
loop's own steps on it (novelty detection; for a new skill a new expert, gate fitted on the routing
memory before and after, two-phase training; for a known skill its expert continues at the consolidation
rate), save it over the folder atomically with its routing memory, swap it in, then mirror it into the
store. Requests in flight finish on the old system; a job that fails before its save leaves the served system
and its files as they were.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import transformers
from transformers import TrainerCallback

from ..data.sources import Example
from ..data.stream import SkillFormat, SkillSource, SkillSpec, StreamSpec
from ..model import DyLoRAMoE
from ..novelty import NoveltyResult
from ..training.config import TrainingConfig
from ..training.loop import ContinualLearner, StepData
from ..training.rehearsal import RoutingMemory
from .config import ServerConfig
from .errors import APIError
from .metrics import Metrics
from .system import ServedSystem
from .uploads import Upload

logger = logging.getLogger("dylora_moe.serving")

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
KEEP_FINISHED = 200  # finished jobs remembered for GET /jobs/{id}


class UploadNotLearnable(ValueError):
    """The uploaded examples cannot be trained on (e.g. every response truncated away); the message says why."""


@dataclass
class SkillJob:
    id: str
    skill: str
    examples: list[Example] = field(repr=False)
    chat: bool = True
    status: str = QUEUED
    stage: str = "queued"
    steps_done: int = 0
    steps_total: int = 0
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    result: dict | None = None
    error: dict | None = None  # {"code", "message"}
    example_count: int = field(init=False)

    def __post_init__(self) -> None:
        self.example_count = len(self.examples)

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "skill.job", "skill": self.skill, "examples": self.example_count,
                "status": self.status, "stage": self.stage,
                "progress": {"steps_done": self.steps_done, "steps_total": self.steps_total},
                "created": self.created, "started": self.started, "finished": self.finished,
                "result": self.result, "error": self.error}


class JobManager:
    def __init__(self, system: ServedSystem, config: ServerConfig, metrics: Metrics) -> None:
        self.system = system
        self.config = config
        self.metrics = metrics
        self.jobs: dict[str, SkillJob] = {}
        self._queue: queue.Queue[SkillJob | None] = queue.Queue()
        self._closed = False
        self._submitting = threading.Lock()  # uploads arriving together are checked and entered one at a time
        self._thread = self._start()

    def _start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, name="dylora-skill-jobs", daemon=True)
        thread.start()
        return thread

    def _supervise(self) -> None:
        """Restart the worker if it died (an error its own handler could not catch): without it every later
        upload would wait forever. The job it was running is marked failed."""
        if self._thread.is_alive() or self._closed:
            return
        for job in self.jobs.values():
            if job.status == RUNNING:
                job.status, job.finished = FAILED, time.time()
                job.error = {"code": "skill_job_failed", "message": f"the skill worker stopped while {job.stage}; "
                                                                    f"the server log has the details (job {job.id})"}
        logger.error("skill job worker had stopped: restarted", extra={"fields": {"event": "error",
                                                                                  "kind": "worker_restarted"}})
        self.metrics.error("skill_worker_restarted", 500)
        self._thread = self._start()

    def submit(self, upload: Upload) -> SkillJob:
        """Queue a job for ``upload``. Called from several request threads at once: the checks and the entry
        of the job are one step, so two uploads cannot both pass the pending-job limit (or both restart a
        dead worker)."""
        with self._submitting:
            return self._submit(upload)

    def _submit(self, upload: Upload) -> SkillJob:
        if self._closed:
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
        self._supervise()
        with self.system.lock:  # the served system may be swapped by the worker meanwhile
            missing = self.system.unrehearsable()
        if missing:
            raise APIError(409, f"the served system has no stored routing features for skill(s) {', '.join(missing)}; "
                                "the gate must rehearse them to keep routing them while it learns a new skill. Serve "
                                "the `dylora train` output folder, or a system saved by `dylora serve` (both keep "
                                "system/routing_memory.safetensors)", code="no_routing_memory")
        active = [j for j in self.jobs.values() if j.status in (QUEUED, RUNNING)]
        if len(active) >= self.config.max_pending_jobs:
            raise APIError(429, f"{len(active)} skill jobs are already queued or running (limit "
                                f"{self.config.max_pending_jobs}): wait for one to finish", code="too_many_jobs")
        job = SkillJob(f"job-{uuid.uuid4().hex[:12]}", upload.name, upload.examples, upload.chat)
        self.jobs[job.id] = job
        self._forget_old()
        self._queue.put(job)
        logger.info("skill job queued", extra={"fields": {"event": "skill_job_queued", "job": job.id,
                                                          "skill": job.skill, "examples": len(job.examples)}})
        return job

    def get(self, job_id: str) -> SkillJob:
        if job_id not in self.jobs:
            raise APIError(404, f"no job {job_id!r}; POST /skills returns the id of the job it starts",
                           param="job_id", code="job_not_found")
        return self.jobs[job_id]

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking jobs; queued ones are failed (the running one finishes if it can within ``timeout``). Under
        the submit lock: an upload is queued before the queue is drained, or refused."""
        with self._submitting:
            self._closed = True
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.status, job.finished, job.examples = FAILED, time.time(), []
                    job.error = {"code": "shutting_down",
                                 "message": "the server stopped before this job ran: upload again"}
            self._queue.put(None)
        self._thread.join(timeout)

    def _forget_old(self) -> None:
        done = [j for j in self.jobs.values() if j.status in (SUCCEEDED, FAILED)]
        for job in done[: max(0, len(done) - KEEP_FINISHED)]:
            del self.jobs[job.id]

    # ------------------------------------------------------------------ worker
    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            job.status, job.started = RUNNING, time.time()
            try:
                self._run(job)
            except Exception as err:
                # the client gets a stable code and where it failed; the details (paths, SQL) stay in the log
                job.status = FAILED
                job.error = ({"code": "invalid_upload", "message": f"the upload cannot be learned: {err}"}
                             if isinstance(err, UploadNotLearnable) else
                             {"code": "skill_job_failed", "message": f"the skill job failed while {job.stage}; the "
                                                                     f"server log has the details (job {job.id})"})
                self.metrics.jobs.labels(FAILED).inc()
                self.metrics.error("skill_job_failed", 500)
                logger.exception("skill job failed", extra={"fields": {"event": "error", "job": job.id,
                                                                       "skill": job.skill, "kind": type(err).__name__}})
            finally:
                # up to KEEP_FINISHED jobs stay listed: without this each would hold its whole upload in memory
                job.finished, job.examples = time.time(), []

    def _run(self, job: SkillJob) -> None:
        cfg = self.config.training
        stage(job, "loading")
        model = self.system.load_model()
        model.events.hold()  # published once the result is saved and served: a failed job leaves no claims behind
        memory = RoutingMemory(cfg.rehearsal_per_skill, seed=cfg.seed)
        memory.load_tensors(self.system.memory.tensors())
        with tempfile.TemporaryDirectory(prefix="dylora-job-") as work:
            learner, data = job_step(model, job, cfg, work, memory)
            stage(job, "novelty")
            transformers.set_seed(cfg.seed)
            result = model.add_new_skill(data.train, name=job.skill)
            job.steps_total = (cfg.seed_steps if result.is_novel else 0) + cfg.consolidation_steps
            stage(job, "training")
            learner.remember(data, result)
            learner.fit_router()
            with job_progress(job):
                train_log = learner.train_expert(len(model.library) - 1, data, result)
            learner.fit_router()
            model.mark_mature(result.expert_id)
        loss = next((e.get("loss", e.get("task_loss")) for e in reversed(train_log)), None)
        stage(job, "saving")
        self.system.save(model, memory)
        stage(job, "swapping")  # right after the save: the folder always holds what is served
        self.system.swap(model, memory)
        # the skill is learned, saved and served from here: what follows records it, and cannot fail the job
        store_error = None
        try:
            model.events.commit()  # events.jsonl and the store's event table, now that the change is on disk
            if self.system.store is not None:
                register(self.system, model, job, result, loss)
        except Exception as err:  # the new system is saved and served already: only the records lag behind
            store_error = {"code": "store_write_failed",
                           "message": "the skill is learned and served but its registry entry or events were not "
                                      f"recorded; the server log has the details (job {job.id}), and the next "
                                      "start of the server reconciles the registry with the system folder"}
            self.metrics.error("store_write_failed", 500)
            logger.exception("skill learned but not registered", extra={"fields": {
                "event": "error", "job": job.id, "skill": job.skill, "kind": type(err).__name__}})
        try:
            self.metrics.swaps.inc()
            self.metrics.observe_system(model)
            self.metrics.acquisitions.labels("novel" if result.is_novel else "recognised").inc()
            self.metrics.jobs.labels(SUCCEEDED).inc()
        except Exception as err:
            logger.exception("skill learned but not counted in the metrics", extra={"fields": {
                "event": "error", "job": job.id, "skill": job.skill, "kind": type(err).__name__}})
        job.result = {"novel": result.is_novel, "expert_id": result.expert_id, "skill_id": result.skill_id,
                      "nearest_skill": result.nearest_skill, "similarity": result.similarity, "rank": result.rank,
                      "experts": model.num_experts, "routing_strategy": model.router.strategy,
                      "train_loss": loss, "store_error": store_error}
        job.status, job.stage, job.steps_done = SUCCEEDED, "done", job.steps_total
        logger.info("skill learned", extra={"fields": {"event": "skill_job_succeeded", "job": job.id,
                                                       "skill": job.skill, **job.result}})


def stage(job: SkillJob, name: str) -> None:
    job.stage = name
    logger.info("skill job stage", extra={"fields": {"event": "skill_job_stage", "job": job.id, "stage": name,
                                                     "seconds": round(time.time() - (job.started or job.created), 2)}})


def job_step(model: DyLoRAMoE, job: SkillJob, training: TrainingConfig, work: str,
             memory: RoutingMemory) -> tuple[ContinualLearner, StepData]:
    """The continual loop's learner around one uploaded skill, and the skill's step data: every uploaded
    example is training data (the server does not evaluate) and nothing is read from a source."""
    spec = SkillSpec(job.skill, source=SkillSource(type="file", path="upload"), format=SkillFormat(chat=job.chat))
    learner = ContinualLearner(model, StreamSpec(name="serve", skills=[spec]), training, work)
    learner.memory = memory
    try:  # the same format augmentation as `dylora train`
        train_set = learner.train_dataset(job.examples, job.chat)
    except ValueError as err:  # the data pipeline's own messages: what is wrong with the examples, and the fix
        raise UploadNotLearnable(str(err)) from err
    return learner, StepData(spec, job.examples, [], train_set, None)


class JobProgress(TrainerCallback):
    """Training steps go to the job (``GET /jobs/{id}``) and the Trainer's logs to the JSON log."""

    def __init__(self, job: SkillJob) -> None:
        self.job = job

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.job.steps_done = min(state.global_step, self.job.steps_total)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        logger.info("skill job training", extra={"fields": {"event": "skill_job_log", "job": self.job.id,
                                                            "step": state.global_step, **(logs or {})}})


@contextlib.contextmanager
def job_progress(job: SkillJob) -> Iterator[None]:
    """While a job trains, the Trainer reports to ``JobProgress`` instead of drawing a terminal progress bar
    (which would break the one-JSON-object-per-line log). Only the job worker creates Trainers in a server."""
    import transformers.trainer as hf_trainer

    default = hf_trainer.DEFAULT_PROGRESS_CALLBACK
    hf_trainer.DEFAULT_PROGRESS_CALLBACK = JobProgress(job)
    try:
        yield
    finally:
        hf_trainer.DEFAULT_PROGRESS_CALLBACK = default


def register(system: ServedSystem, model: DyLoRAMoE, job: SkillJob, result: NoveltyResult,
             loss: float | None) -> None:
    """Mirror a learned skill into the store, as ``dylora train`` does after each step: the skill, its data as
    a new version, the expert's row (written after its weights)."""
    store = system.store
    skill = model.library.skills[result.skill_id]
    store.add_skill(skill.skill_id, skill.name, skill.embedding.numpy())
    store.add_skill_data(skill.skill_id, [(e.prompt, e.response) for e in job.examples], result.expert_id)
    name = f"expert_{result.expert_id}"
    peft_config = model.experts.peft_model.peft_config[name].to_dict()
    store.register_expert(
        result.expert_id, skill_id=skill.skill_id, lora_config=json.loads(json.dumps(peft_config, default=str)),
        storage_path=str(system.files.system / "experts" / name), rank=result.rank,
        maturity_state=int(model.router.expert_maturity[model.column(result.expert_id)]),
        training={"source": "serve", "job": job.id, "skill": job.skill, "examples": len(job.examples),
                  "novel": result.is_novel, "steps": job.steps_total, "train_loss": loss})
