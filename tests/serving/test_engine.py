"""The generation worker: batches route every sequence on its own prompt and respect per-request limits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import pytest
from fastapi.testclient import TestClient

from dylora_moe.data.sources import Example
from dylora_moe.serving import ServedSystem, continuous, create_app
from dylora_moe.serving.config import ServerConfig
from dylora_moe.serving.decoding import safe_prefix
from dylora_moe.serving.engine import Engine, GenerationRequest
from dylora_moe.serving.errors import APIError
from dylora_moe.serving.jobs import JobManager
from dylora_moe.serving.metrics import Metrics
from dylora_moe.serving.static import generate_static
from dylora_moe.serving.uploads import Upload
from tests.serving.conftest import learned_run, letters, server_config, upload, wait


@pytest.fixture(scope="module")
def two_experts(tmp_path_factory):
    """A system with digits (expert 0) and letters (expert 1)."""
    run = learned_run(tmp_path_factory.mktemp("engine"))
    with TestClient(create_app(run, server_config())) as client:
        assert wait(client, upload(client, "letters", letters())["id"])["status"] == "succeeded"
    return ServedSystem(run)


def requests(*specs) -> list[GenerationRequest]:
    return [GenerationRequest(prompt, max_tokens, stop=stop) for prompt, max_tokens, stop in specs]



def start_streaming(engine: Engine, tokens: int) -> GenerationRequest:
    """Submit a long request and return once its first token has streamed (it is decoding)."""
    streaming = threading.Event()
    long = GenerationRequest("hello world", tokens, on_event=lambda kind, _: kind == "delta" and streaming.set())
    engine.submit(long)
    assert streaming.wait(60)
    return long

def test_a_batch_routes_each_sequence_on_its_own_prompt(two_experts):
    engine = Engine(two_experts, ServerConfig(), Metrics())
    try:
        alone = requests(("up cd:", 6, ()), ("12+12=", 3, ()))
        for r in alone:
            engine._serve([r])
        batch = requests(("up cd:", 6, ()), ("12+12=", 3, ()), ("up x", 1, ()))
        engine._serve(batch)
        results = [r.future.result(timeout=0) for r in batch]
        assert [g.routing["experts"][0]["expert_id"] for g in results] == [1, 0, 1]
        for single, batched in zip(alone, results[:2], strict=True):
            assert single.future.result().routing == batched.routing
            assert single.future.result().text == batched.text  # left padding changes nothing
        assert [g.completion_tokens <= m for g, m in zip(results, (6, 3, 1), strict=True)] == [True] * 3
        assert results[2].completion_tokens == 1
    finally:
        engine.close()


def test_a_bad_prompt_in_a_batch_fails_alone(two_experts):
    engine = Engine(two_experts, ServerConfig(), Metrics())
    try:
        good, bad = requests(("1+1=", 2, ()), ("9" * 200, 2, ()))
        engine._serve([good, bad])
        assert good.future.result().completion_tokens >= 1
        with pytest.raises(APIError, match="200 tokens"):
            bad.future.result()
    finally:
        engine.close()


def test_an_abandoned_or_untokenisable_request_does_not_fail_its_batch(two_experts):
    engine = Engine(two_experts, ServerConfig(), Metrics())
    try:
        abandoned, bad, good = requests(("1+1=", 2, ()), ("1+\ud800", 2, ()), ("2+2=", 2, ()))
        assert abandoned.future.cancel()  # its client went away while it waited in the queue
        engine._serve([abandoned, bad, good])
        assert good.future.result(timeout=0).completion_tokens >= 1
        with pytest.raises(APIError, match="could not be tokenised"):
            bad.future.result(timeout=0)
    finally:
        engine.close()


def test_the_worker_answers_submitted_requests(two_experts):
    engine = Engine(two_experts, ServerConfig(max_batch=4), Metrics())
    try:
        futures: list[Future] = [engine.submit(GenerationRequest(p, 2)) for p in ("1+1=", "up a", "3+3=", "up b")]
        routed = [f.result(timeout=60).routing["experts"][0]["expert_id"] for f in futures]
        assert routed == [0, 1, 0, 1]
    finally:
        engine.close()
    with pytest.raises(APIError, match="shutting down"):
        engine.submit(GenerationRequest("1+1=", 1))


def test_safe_prefix_holds_back_partial_stop_strings():
    assert safe_prefix("hello wor", ("world",)) == "hello "
    assert safe_prefix("hello world!", ("world",)) == "hello "
    assert safe_prefix("abc\ufffd", ()) == "abc"
    assert safe_prefix("abc", ("x", "cd")) == "ab"


def test_job_manager_refuses_when_too_many_jobs_wait(two_experts):
    jobs = JobManager(two_experts, server_config(max_pending_jobs=1), Metrics())
    release = threading.Event()
    jobs._run = lambda job: release.wait(30)  # the first job holds the worker
    try:
        jobs.submit(Upload("a", [Example("p", "r")], False))
        with pytest.raises(APIError, match="already queued or running"):
            jobs.submit(Upload("b", [Example("p", "r")], False))
    finally:
        release.set()
        jobs.close()


def test_decoding_guard_is_off_by_default_and_applied_when_configured():
    from dylora_moe.serving.static import generation_config
    from tests.conftest import build

    model, request = build(), GenerationRequest("1+1=", max_tokens=4)
    plain = generation_config(model, [request], ServerConfig())
    assert plain.repetition_penalty == 1.0 and plain.no_repeat_ngram_size == 0
    guarded = generation_config(model, [request], ServerConfig(repetition_penalty=1.3, no_repeat_ngram_size=4))
    assert guarded.repetition_penalty == 1.3 and guarded.no_repeat_ngram_size == 4
    with pytest.raises(ValueError, match="repetition_penalty"):
        ServerConfig(repetition_penalty=0.0)


@pytest.mark.parametrize("penalty", [float("nan"), float("inf")])
def test_a_repetition_penalty_that_is_not_a_finite_number_is_refused(penalty):
    # accepted, it would fail every batch's decoding guard (transformers refuses NaN) rather than the start
    with pytest.raises(ValueError, match="repetition_penalty"):
        ServerConfig(repetition_penalty=penalty)


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A saved tiny system with three random experts: its answers run to max_tokens rather than stopping."""
    from dylora_moe import DyLoRAConfig, DyLoRAMoE, ExpertConfig
    from tests.conftest import char_tokenizer, randomise_experts, tiny_llama

    root = tmp_path_factory.mktemp("untrained")
    tiny_llama().save_pretrained(root / "model")
    char_tokenizer().save_pretrained(root / "model")
    model = DyLoRAMoE.from_config(DyLoRAConfig(model=str(root / "model"), device="cpu",
                                               expert=ExpertConfig(rank=4, alpha=8, dropout=0.0)))
    for _ in range(3):
        model.create_expert()
    randomise_experts(model)
    model.save_pretrained(root / "system")
    return ServedSystem(root / "system")


def run_two(engine: Engine, between=None) -> tuple[list[str], str]:
    """A long streaming request, then (once it streams) a short one: the order in which they finish, and the
    short one's answer."""
    finished: list[str] = []
    streaming = threading.Event()
    long = GenerationRequest("hello world", 100, on_event=lambda kind, _: kind == "delta" and streaming.set())
    engine.submit(long).add_done_callback(lambda f: finished.append("long"))
    assert streaming.wait(60)
    if between is not None:
        between()
    short = GenerationRequest("1+1=", 3, on_event=lambda *_: None)
    engine.submit(short).add_done_callback(lambda f: finished.append("short"))
    long.future.result(timeout=120), short.future.result(timeout=120)
    assert long.future.result().completion_tokens == 100
    return finished, short.future.result().text


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_a_short_request_joins_a_running_stream_and_leaves_first(untrained, batching):
    engine = Engine(untrained, ServerConfig(batching=batching, max_tokens_cap=100), Metrics())
    try:
        # static batching runs a stream alone to its end: the short request waits for it
        order, _ = run_two(engine)
        assert order == (["short", "long"] if batching == "continuous" else ["long", "short"])
    finally:
        engine.close()


def test_static_batching_generates_at_most_max_batch_sequences_together(untrained):
    metrics = Metrics()
    engine = Engine(untrained, ServerConfig(batching="static", max_batch=4, max_tokens_cap=100), metrics)
    try:
        batch = [GenerationRequest(p, 2, n=2) for p in ("1+1=", "2+2=", "3+3=")]  # as the worker takes them
        engine._serve(batch)
        assert [len(r.future.result(timeout=0).choices) for r in batch] == [2, 2, 2]
        wide = GenerationRequest("1+1=", 2, n=5)  # more choices than max_batch: it runs alone
        engine._serve([wide])
        assert len(wide.future.result(timeout=0).choices) == 5
    finally:
        engine.close()
    assert metrics.registry.get_sample_value("dylora_batch_size_sum") == 11
    assert metrics.registry.get_sample_value("dylora_batch_size_count") == 3  # 4 + 2 rows, then 5: never 6


def test_a_running_batch_finishes_on_its_system_and_the_next_runs_on_the_new_one(untrained):
    from tests.conftest import randomise_experts

    engine = Engine(untrained, ServerConfig(max_tokens_cap=100), Metrics())
    old = untrained.model
    new = untrained.load_model()
    randomise_experts(new, seed=7)
    try:
        order, short = run_two(engine, between=lambda: untrained.swap(new, untrained.memory))
    finally:
        engine.close()
        untrained.swap(old, untrained.memory)
    answers = {}
    for name, model in (("old", old), ("new", new)):
        r = GenerationRequest("1+1=", 3)
        r.prompt_ids = model.tokenizer("1+1=", add_special_tokens=False)["input_ids"]
        generate_static(model, [r], ServerConfig(), Metrics())
        answers[name] = r.future.result().text
    assert answers["old"] != answers["new"]
    assert order == ["long", "short"] and short == answers["new"]  # it waited for the old batch to drain


def test_joiners_wait_a_few_decode_steps_to_share_one_prefill_pass(untrained, monkeypatch):
    """While a long request decodes, a lone arrival waits ``join_wait_steps`` decode steps for company, and
    arrivals that fill ``join_batch`` join together at once."""
    wait_steps = 5

    passes: list[tuple[int, list[str]]] = []  # (decode steps run so far, prompts prefilled in one pass)
    steps = [0]
    join, step = continuous.RunningBatch.join, continuous.RunningBatch.step
    monkeypatch.setattr(continuous.RunningBatch, "join",
                        lambda self, rs: (passes.append((steps[0], [r.prompt for r in rs])), join(self, rs))[1])
    monkeypatch.setattr(continuous.RunningBatch, "step", lambda self: (steps.__setitem__(0, steps[0] + 1),
                                                                       step(self))[1])
    engine = Engine(untrained, ServerConfig(max_tokens_cap=100, join_batch=2, join_wait_steps=wait_steps), Metrics())
    try:
        long = start_streaming(engine, 60)
        lone = GenerationRequest("1+1=", 2)
        submitted = steps[0]  # the first delta reaches this thread some steps after it was decoded
        engine.submit(lone)
        lone.future.result(timeout=60)
        pair = [GenerationRequest("2+2=", 2), GenerationRequest("3+3=", 2)]
        for r in pair:
            engine.submit(r)
        for r in pair:
            r.future.result(timeout=60)
        long.future.result(timeout=120)
    finally:
        engine.close()
    _, (at, alone), *rest = passes
    assert alone == ["1+1="]
    assert wait_steps <= at - submitted <= wait_steps + 2  # the lone arrival waited for company that never came
    assert ["2+2=", "3+3="] in [p for _, p in rest]  # a full pass joins at once


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_prefill_share_makes_joiners_wait_until_decoding_has_earned_the_pass(untrained, monkeypatch, share):
    """With ``prefill_share=0.5`` a prefill pass that stalled running rows is paid back by as many seconds of
    decoding before the next one; without a limit the next arrival joins at once."""
    import time

    from dylora_moe.serving import continuous

    log: list[tuple[str, float, float]] = []  # (what, start, end)
    join, step = continuous.RunningBatch.join, continuous.RunningBatch.step

    def timed(kind, fn, pause):
        def run(self, *args):
            start = time.perf_counter()
            time.sleep(pause)  # a pass much slower than a step, as on a real model
            out = fn(self, *args)
            log.append((kind, start, time.perf_counter()))
            return out
        return run

    monkeypatch.setattr(continuous.RunningBatch, "join", timed("join", join, 0.15))
    monkeypatch.setattr(continuous.RunningBatch, "step", timed("step", step, 0.01))
    config = ServerConfig(max_tokens_cap=100, join_batch=1, join_wait_steps=0, prefill_share=share)
    engine = Engine(untrained, config, Metrics())
    try:
        long = start_streaming(engine, 80)
        first = GenerationRequest("1+1=", 1)
        engine.submit(first)
        first.future.result(timeout=60)
        second = GenerationRequest("2+2=", 1)
        engine.submit(second)
        second.future.result(timeout=60)
        assert not long.future.done()  # both joined while the long request decoded
        long.future.result(timeout=120)
    finally:
        engine.close()
    joins = [(start, end) for kind, start, end in log if kind == "join"]
    assert len(joins) == 3
    (_, _), (a_start, a_end), (b_start, _) = joins
    decoded = sum(end - start for kind, start, end in log if kind == "step" and a_end <= start and end <= b_start)
    if share < 1:
        assert decoded >= 0.8 * (a_end - a_start)  # the first joiner's pass, paid back (less one step saved up)
    else:
        assert decoded < 0.5 * (a_end - a_start)  # no budget: the second joins within a few steps


@pytest.mark.parametrize("share", [0.0, -0.5, 1.5])
def test_prefill_share_outside_its_range_is_refused(share):
    with pytest.raises(ValueError, match="prefill_share"):
        ServerConfig(prefill_share=share)


def test_requests_abandoned_in_a_full_queue_do_not_turn_a_live_one_away(two_experts, monkeypatch):
    hold, release = threading.Event(), threading.Event()
    step = continuous.RunningBatch.step
    monkeypatch.setattr(continuous.RunningBatch, "step", lambda self: (hold.is_set() and release.wait(60),
                                                                       step(self))[1])
    engine = Engine(two_experts, ServerConfig(max_batch=1, max_queue=2, max_tokens_cap=100), Metrics())
    try:
        long = start_streaming(engine, 60)  # holds the one row: later requests wait in the queue
        hold.set()  # and it stays there until released
        gone = requests(("1+1=", 2, ()), ("2+2=", 2, ()))
        for r in gone:
            engine.submit(r)
        with pytest.raises(APIError, match="requests waiting"):
            engine.submit(requests(("3+3=", 2, ()))[0])
        for r in gone:
            assert r.future.cancel()  # their clients went away while they waited
        live = requests(("4+4=", 2, ()))[0]
        engine.submit(live)  # taken in place of the abandoned ones
        long.cancelled = True
        release.set()
        assert live.future.result(timeout=60).completion_tokens >= 1
    finally:
        engine.close()


@pytest.mark.parametrize("batching", ["continuous", "static"])
def test_close_answers_the_requests_still_queued(untrained, batching):
    engine = Engine(untrained, ServerConfig(batching=batching, max_batch=1, max_tokens_cap=100), Metrics())
    first, queued = requests(("1+1=", 2, ()), ("2+2=", 2, ()))
    with untrained.lock:  # the worker takes the first request and waits for the system: the second stays queued
        engine.submit(first)
        engine.submit(queued)
        engine.close(timeout=0.2)
    try:
        with pytest.raises(APIError, match="shutting down"):
            queued.future.result(timeout=10)
        first.future.exception(timeout=10)  # answered too: generated, or refused by the stopping worker
    finally:
        engine.close()


def test_a_request_submitted_while_the_engine_closes_is_answered(untrained, monkeypatch):
    engine = Engine(untrained, ServerConfig(), Metrics())
    put = engine._queue.put_nowait

    def closing_then_put(request):  # close runs between submit's check and its put
        closer = threading.Thread(target=engine.close)
        closer.start()
        closer.join(0.5)
        put(request)

    monkeypatch.setattr(engine._queue, "put_nowait", closing_then_put)
    late = requests(("1+1=", 2, ()))[0]
    try:
        engine.submit(late)
    except APIError:  # refused outright: answered as well
        return
    finally:
        engine.close()
    error = late.future.exception(timeout=10)  # generated before the close, or refused by it: never left waiting
    assert error is None or "shutting down" in str(error)


def test_requests_that_cannot_be_admitted_are_answered_and_the_worker_goes_on(untrained, monkeypatch):
    calls = [0]
    init = continuous.RunningBatch.__init__

    def broken(self, *args):
        calls[0] += 1
        raise RuntimeError("no batch today")

    monkeypatch.setattr(continuous.RunningBatch, "__init__", broken)
    engine = Engine(untrained, ServerConfig(), Metrics())
    try:
        first = requests(("1+1=", 2, ()))[0]
        engine.submit(first)
        with pytest.raises(RuntimeError, match="no batch today"):
            first.future.result(timeout=10)
        time.sleep(0.3)
        assert calls[0] <= 2  # no retrying in a tight loop
        monkeypatch.setattr(continuous.RunningBatch, "__init__", init)
        later = requests(("2+2=", 2, ()))[0]
        engine.submit(later)
        assert later.future.result(timeout=60).completion_tokens >= 1
    finally:
        engine.close()
