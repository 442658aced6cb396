"""ContinuousBatcher: greedy answers equal `model.generate` alone while jobs join and leave
the running batch at different steps; cancellation; failures stay with their job."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from lyra.config import load_config
from lyra.model.lyra import LyraForConditionalGeneration
from lyra.processing import LyraProcessor, ProcessedSample, collate
from lyra.serve.batcher import BatcherClosed, BatchKey, Completion, ContinuousBatcher, Job

from conftest import tone


def picture(seed: int, size: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size, size, 3, generator=g) * 255).byte().numpy())


@pytest.fixture(scope="module")
def model():
    """The tiny model with a short rotary wavelength and sharpened attention, so that a
    wrong position or mask changes its answers (a random init attends almost uniformly)."""
    config = load_config("tiny")
    config.text.rope_theta = 10.0
    torch.manual_seed(0)
    model = LyraForConditionalGeneration.from_config(config).eval()
    with torch.no_grad():
        for layer in model.backbone.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


def user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def processor(model, tiny_tokenizer) -> LyraProcessor:
    from lyra.data.vision import VisionLimits

    return LyraProcessor(tiny_tokenizer, model.config, VisionLimits(image_min_pixels=56 * 56,
                                                                    image_max_pixels=112 * 112))


@pytest.fixture(scope="module")
def samples(processor) -> list[ProcessedSample]:
    """Text, image + text, speech, image + speech and a long text prompt (lengths differ)."""
    return [
        processor(user("hello there")),
        processor(user("<image>\nwhat is in the picture?"), images=[picture(1, 84)]),
        processor(user("<speech>"), speech=[tone(1.0, freq=300.0)]),
        processor(user("<image> and <speech>: answer it"), images=[picture(2, 56)], speech=[tone(2.0, freq=500.0)]),
        processor(user("a much longer question, with many more words in it than any of the other prompts")),
    ]


def alone(model, sample: ProcessedSample, max_new_tokens: int) -> tuple[list[int], str]:
    """What `model.generate` gives for `sample` on its own: (tokens before the stop token, reason)."""
    batch = collate([sample], model.config.tokens.pad, padding_side="left")
    new = model.generate(**batch, max_new_tokens=max_new_tokens)[0].tolist()
    stop = set(model.config.stop_token_ids)
    for i, token in enumerate(new):
        if token in stop:
            return new[:i], "stop"
    return new, "length"


def outcome(completion: Completion) -> tuple[list[int], str]:
    return completion.token_ids, completion.finish_reason


@pytest.fixture()
def engine(model, request):
    """A started batcher; `request.param`: (max_batch_size, encoder_thread)."""
    size, encoder_thread = getattr(request, "param", (8, True))
    batcher = ContinuousBatcher(model, max_batch_size=size, encoder_thread=encoder_thread).start()
    yield batcher
    batcher.stop()


def chained(engine: ContinuousBatcher, jobs: list[Job], after: list[int]) -> None:
    """Submit `jobs[0]` now and `jobs[i + 1]` once `jobs[i]` has produced `after[i]` tokens,
    from the worker thread, so each one joins a batch that is already decoding."""
    for i, job in enumerate(jobs[:-1]):
        def submit_next(_token: int, job=job, i=i) -> None:
            if len(job.tokens) == after[i]:
                engine.submit(jobs[i + 1])
        job.on_token = submit_next
    engine.submit(jobs[0])


@pytest.mark.parametrize("engine", [(8, False), (1, False)], indirect=True, ids=["continuous", "one-at-a-time"])
def test_greedy_answers_equal_generate_alone(model, samples, engine):
    """Without the encoder thread, so that the chained jobs join at the steps the test picks."""
    limits = [9, 6, 12, 4, 7]
    expected = [alone(model, s, n) for s, n in zip(samples, limits)]
    jobs = [Job(sample=s, max_new_tokens=n) for s, n in zip(samples, limits)]
    chained(engine, jobs, after=[2, 1, 3, 1])
    results = [outcome(j.result(60)) for j in jobs]
    assert results == expected
    sizes = engine.stats.sizes
    if engine.max_batch_size == 1:
        assert set(sizes) == {1}
    else:
        assert max(sizes) >= 3  # the jobs really shared decode steps
        assert engine.stats.row_steps < sum(len(tokens) for tokens, _ in expected)  # fewer steps than rows


@pytest.mark.parametrize("engine", [(2, False)], indirect=True)
def test_a_finished_row_frees_its_slot_at_once(model, samples, engine):
    """With two slots, a short job leaves and the next queued one joins while a long one decodes."""
    long_tokens, reason = alone(model, samples[0], 24)
    assert reason == "length"  # the test needs a job that runs its full length
    long = Job(sample=samples[0], max_new_tokens=24)
    short = Job(sample=samples[1], max_new_tokens=2)
    waiting = Job(sample=samples[2], max_new_tokens=3)
    seen_with_long_running: list[bool] = []
    waiting.on_token = lambda _t: seen_with_long_running.append(not long.future.done())
    for job in (long, short, waiting):
        engine.submit(job)
    assert long.result(60).token_ids == long_tokens
    assert waiting.result(60).finish_reason in ("stop", "length")
    assert seen_with_long_running and all(seen_with_long_running)
    assert max(engine.stats.sizes) == 2


def test_cancel_drops_a_running_row_within_one_step(model, samples, engine):
    other_expected = alone(model, samples[2], 10)
    cancelled = Job(sample=samples[0], max_new_tokens=40)
    other = Job(sample=samples[2], max_new_tokens=10)
    cancelled.on_token = lambda _t: cancelled.cancel() if len(cancelled.tokens) == 3 else None
    engine.submit(other)
    engine.submit(cancelled)
    result = cancelled.result(60)
    assert result.finish_reason == "cancelled"
    assert result.token_ids == alone(model, samples[0], 3)[0]  # no token after the step it was cancelled in
    cancelled.cancel()  # idempotent
    assert outcome(other.result(60)) == other_expected
    assert engine.stats.cancelled_requests == 1


@pytest.mark.parametrize("engine", [(1, False)], indirect=True)
def test_cancel_removes_a_queued_job_without_running_it(model, samples, engine):
    running = Job(sample=samples[0], max_new_tokens=6)
    queued = Job(sample=samples[1], max_new_tokens=6)
    client_cancelled = Job(sample=samples[2], max_new_tokens=6)
    resolved_at_once: list[bool] = []

    def cancel_the_queued(_token: int) -> None:
        if len(running.tokens) == 1:
            queued.cancel()
            resolved_at_once.append(queued.future.done())
            client_cancelled.future.cancel()  # a client giving up on its future also counts

    running.on_token = cancel_the_queued
    for job in (running, queued, client_cancelled):
        engine.submit(job)
    assert running.result(60).finish_reason in ("stop", "length")
    assert resolved_at_once == [True]
    assert queued.result(0) == Completion(token_ids=[], finish_reason="cancelled", batch_size=0)
    assert client_cancelled.future.cancelled()
    assert engine.stats.requests == 1  # neither cancelled job was prefilled
    assert engine.stats.cancelled_requests == 2 and engine.queued == 0


def test_a_cancelled_future_drops_its_running_row(model, samples, engine):
    job = Job(sample=samples[0], max_new_tokens=40)
    job.on_token = lambda _t: job.future.cancel() if len(job.tokens) == 3 else None
    engine.submit(job)
    deadline = time.monotonic() + 60
    while engine.stats.cancelled_requests == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert job.future.cancelled() and job.cancelled
    assert job.tokens == alone(model, samples[0], 3)[0]  # no token after the step it was cancelled in
    assert engine.stats.cancelled_requests == 1


def test_failures_stay_with_their_job(model, samples, engine):
    """A job whose inputs break inside the model, a postprocess that raises and an on_token
    that raises: only the first two fail; the worker and the other jobs go on."""
    broken = ProcessedSample(input_ids=samples[2].input_ids, mm_token_type_ids=samples[2].mm_token_type_ids)
    expected = alone(model, samples[0], 8)

    def bad_postprocess(job: Job, completion: Completion) -> None:
        raise RuntimeError("vocoder exploded")

    def bad_on_token(_token: int) -> None:
        raise RuntimeError("client gone")

    good = Job(sample=samples[0], max_new_tokens=8, on_token=bad_on_token)
    jobs = [good, Job(sample=broken, max_new_tokens=8), Job(sample=samples[1], max_new_tokens=4,
                                                              postprocess=bad_postprocess)]
    for job in jobs:
        engine.submit(job)
    assert outcome(good.result(60)) == expected
    with pytest.raises(ValueError, match="speech"):
        jobs[1].result(60)
    with pytest.raises(RuntimeError, match="vocoder exploded"):
        jobs[2].result(60)
    assert engine.alive and engine.stats.failed_requests == 2
    assert engine.submit(Job(sample=samples[3], max_new_tokens=2)).result(60).finish_reason in ("stop", "length")


def test_sampled_and_greedy_jobs_never_share_a_step(samples, engine):
    sampled = BatchKey.for_request(None, temperature=0.8, top_p=0.9)
    jobs = [Job(sample=samples[i % 2], key=sampled if i % 2 else BatchKey(), max_new_tokens=5) for i in range(4)]
    for job in jobs:
        engine.submit(job)
    results = [j.result(60) for j in jobs]
    assert all(len(r.token_ids) <= 5 for r in results)
    assert max(engine.stats.sizes) == 2  # two of each key, never four in one step


def test_stop_fails_queued_jobs_and_refuses_new_ones(model, samples):
    batcher = ContinuousBatcher(model, max_batch_size=1).start()
    started, gate = threading.Event(), threading.Event()
    first = Job(sample=samples[0], max_new_tokens=4, on_token=lambda _t: (started.set(), gate.wait(10)))
    second = Job(sample=samples[1], max_new_tokens=4)
    batcher.submit(first)
    batcher.submit(second)
    assert started.wait(30)
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    with pytest.raises(BatcherClosed):
        second.result(10)
    gate.set()
    stopper.join(30)
    assert first.result(10).finish_reason in ("stop", "length")  # the running job finished
    assert not batcher.alive
    with pytest.raises(BatcherClosed):
        batcher.submit(Job(sample=samples[2]))


def test_bad_settings_are_refused(model):
    with pytest.raises(ValueError, match="max_batch_size"):
        ContinuousBatcher(model, max_batch_size=0)


class EncoderCalls:
    """Records the thread of each speech-encoder forward; `gate` (when set up) holds the next
    call until released, and `fail` makes the next call raise."""

    def __init__(self, model):
        self.threads: list[str] = []
        self.entered, self.gate, self.fail = threading.Event(), None, False
        self.hook = model.speech_encoder.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        if self.fail:
            self.fail = False
            raise ValueError("audio the encoder rejects")


@pytest.fixture()
def encoder_calls(model):
    calls = EncoderCalls(model)
    yield calls
    if calls.gate is not None:  # a failed test must not leave the encoder thread blocked
        calls.gate.set()
    calls.hook.remove()


def test_the_encoder_thread_encodes_ahead_and_answers_stay_the_same(model, processor, samples, engine, encoder_calls,
                                                                    monkeypatch):
    """Speech is encoded in the encoder thread, except an input longer than one encoder batch,
    which the prefill encodes; greedy answers are those of `generate` alone either way."""
    monkeypatch.setattr(model.config.speech, "encode_batch_clips", 1)
    long_speech = processor(user("<speech>"), speech=[tone(31.0, freq=350.0)])  # 2 clips
    cases = samples + [long_speech]
    expected = [alone(model, s, 6) for s in cases]
    encoder_calls.threads.clear()
    jobs = [Job(sample=s, max_new_tokens=6) for s in cases]
    for job in jobs:
        engine.submit(job)
    assert [outcome(j.result(60)) for j in jobs] == expected
    # the 2 short inputs in the encoder thread; the long one's 2 clips in the prefill (it skips the encoder's queue)
    assert sorted(encoder_calls.threads) == ["lyra-encoder"] * 2 + ["lyra-engine"] * 2
    assert engine.stats.encode_seconds > 0 and engine.queued == 0
    assert all(j.speech_frames is None for j in jobs)  # not held once prefilled


def test_a_job_cancelled_in_the_encoder_is_never_prefilled(samples, engine, encoder_calls):
    encoder_calls.gate = threading.Event()
    job = Job(sample=samples[2], max_new_tokens=6)
    engine.submit(job)
    assert encoder_calls.entered.wait(30)
    assert engine.queued == 0  # taken by the encoder thread
    job.cancel()
    assert not job.future.done()  # it resolves once its encoders return
    encoder_calls.gate.set()
    assert job.result(30) == Completion(token_ids=[], finish_reason="cancelled", batch_size=0)
    assert engine.stats.requests == 0 and engine.stats.cancelled_requests == 1
    assert engine.submit(Job(sample=samples[0], max_new_tokens=2)).result(60).finish_reason in ("stop", "length")


def test_an_encoder_failure_stays_with_its_job(model, samples, engine, encoder_calls):
    encoder_calls.fail = True
    failing, other = Job(sample=samples[2], max_new_tokens=4), Job(sample=samples[3], max_new_tokens=4)
    engine.submit(failing)
    engine.submit(other)
    with pytest.raises(ValueError, match="audio the encoder rejects"):
        failing.result(60)
    assert outcome(other.result(60)) == alone(model, samples[3], 4)
    assert engine.alive and engine.stats.failed_requests == 1 and engine.stats.requests == 2


def test_stop_fails_jobs_waiting_for_the_encoder(model, samples, encoder_calls):
    batcher = ContinuousBatcher(model).start()
    encoder_calls.gate = threading.Event()
    in_encoder, waiting = Job(sample=samples[2]), Job(sample=samples[3])
    batcher.submit(in_encoder)
    assert encoder_calls.entered.wait(30)
    batcher.submit(waiting)
    batcher.stop(timeout=0)
    with pytest.raises(BatcherClosed):
        waiting.result(10)
    encoder_calls.gate.set()
    with pytest.raises(BatcherClosed):
        in_encoder.result(30)
    batcher.stop()
    assert not any(thread.is_alive() for thread in batcher._threads)


def test_the_encoder_thread_waits_while_a_batch_of_encoded_jobs_is_queued(model, samples, encoder_calls):
    """With one slot busy, the encoder thread encodes one job ahead and then waits: encoder
    outputs are held for at most `max_batch_size` queued jobs."""
    batcher = ContinuousBatcher(model, max_batch_size=1).start()
    try:
        started, gate = threading.Event(), threading.Event()
        running = Job(sample=samples[0], max_new_tokens=3, on_token=lambda _t: (started.set(), gate.wait(30)))
        speech = [Job(sample=samples[i], max_new_tokens=2) for i in (2, 3, 2)]
        batcher.submit(running)
        assert started.wait(30)
        for job in speech:
            batcher.submit(job)
        deadline = time.monotonic() + 30
        while len(encoder_calls.threads) < 1 or batcher.queued != 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)  # time enough to encode the other two, were it not waiting
        assert len(encoder_calls.threads) == 1 and [j.speech_frames is not None for j in speech] == [True, False, False]
        gate.set()
        assert all(j.result(60).finish_reason in ("stop", "length") for j in [running] + speech)
        assert encoder_calls.threads == ["lyra-encoder"] * 3
    finally:
        gate.set()
        batcher.stop()
