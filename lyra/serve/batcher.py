"""Dynamic batching of generation requests for the API server.

Requests arrive one by one (each HTTP handler thread prepares its own `ProcessedSample`)
and wait in a queue. One worker thread owns the model: it takes the oldest request,
waits up to `max_wait_ms` for others that can share a `generate` call with it (same
`BatchKey`: LoRA adapter and sampling settings), takes up to `max_batch_size` of them in
arrival order, left-pads them into one batch and runs one `generate`.

* Each row finishes on its own: the batch streamer hands every row its tokens as they
  are produced (for SSE) and resolves a row's future as soon as that row has produced
  its end-of-sequence token or its own `max_new_tokens`, even while longer rows go on
  (the batch runs for the largest `max_new_tokens` in it).
* A batch that fails is retried one request at a time, so a request whose media only
  turns out to be unusable inside the model fails alone; tokens a retried request had
  already streamed are not streamed twice.
* Nothing a request does can stop the worker: every error ends up on that request's
  future.

The adapter is chosen per request by `lyra.model.mlora.adapter_for_audio`; one adapter
applies to a whole forward pass, which is why it is part of the key.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from lyra.model import mlora
from lyra.processing import ProcessedSample, collate

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher was stopped before the request could run."""


@dataclass(frozen=True)
class BatchKey:
    """What requests must share to be generated together."""

    adapter: str | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None

    @classmethod
    def for_request(cls, adapter: str | None, temperature: float, top_p: float | None = None,
                    top_k: int | None = None) -> "BatchKey":
        if temperature > 0:
            return cls(adapter, True, float(temperature), top_p, top_k)
        return cls(adapter)  # greedy: the sampling settings do not matter

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


@dataclass
class Completion:
    """The outcome of one request."""

    token_ids: list[int]  # new tokens, without the end-of-sequence token
    finish_reason: str  # "stop" (end of sequence) or "length" (max_new_tokens reached)
    batch_size: int = 1  # how many requests shared its generate call
    extra: dict[str, Any] = field(default_factory=dict)  # what `Job.postprocess` adds (e.g. audio)


@dataclass(eq=False)
class Job:
    """One prepared request.

    `on_token` is called from the worker thread with each new token (not the end of
    sequence); keep it cheap (e.g. put into a queue). `postprocess`, when set, runs in
    the worker thread after generation with the request's adapter still active, and may
    fill `Completion.extra`; an exception there fails only this request.
    """

    sample: ProcessedSample
    key: BatchKey = field(default_factory=BatchKey)
    max_new_tokens: int = 64
    on_token: Callable[[int], None] | None = None
    postprocess: Callable[["Job", Completion], None] | None = None
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    tokens: list[int] = field(default_factory=list)  # produced so far in the current attempt
    emitted: int = 0  # tokens already given to on_token (over all attempts)

    def result(self, timeout: float | None = None) -> Completion:
        return self.future.result(timeout)


@dataclass
class BatchStats:
    """Counters kept by the worker thread; `sizes` is replaced, never mutated, so other
    threads can read it while the worker counts."""

    batches: int = 0
    requests: int = 0
    retried_batches: int = 0
    failed_requests: int = 0
    sizes: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "requests": self.requests, "retried_batches": self.retried_batches,
                "failed_requests": self.failed_requests, "max_batch_size_seen": max(self.sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


class DynamicBatcher:
    """Groups compatible jobs into one left-padded `generate` call (see the module docstring)."""

    def __init__(self, model, max_batch_size: int = 8, max_wait_ms: float = 10.0):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._running = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> "DynamicBatcher":
        with self._cond:
            if self._running:
                return self
            self._running = True
        self._thread = threading.Thread(target=self._loop, name="lyra-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, let the running batch finish, fail the queued ones."""
        with self._cond:
            self._running = False
            pending, self._queue = self._queue, []
            self._cond.notify_all()
        for job in pending:
            _fail(job, BatcherClosed("the server is shutting down"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> Future:
        with self._cond:
            if not self._running:
                raise BatcherClosed("the batcher is not running")
            job.enqueued = time.monotonic()
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    # ------------------------------------------------------------------ worker
    def _next_group(self) -> list[Job] | None:
        """Block until a group is due: the oldest job's key has `max_batch_size` jobs
        queued, or the oldest job has waited `max_wait`. None once stopped."""
        with self._cond:
            while True:
                self._queue = [j for j in self._queue if not j.future.done()]  # cancelled by their client
                if not self._running:
                    return None
                if not self._queue:
                    self._cond.wait()
                    continue
                oldest = self._queue[0]
                group = [j for j in self._queue if j.key == oldest.key][: self.max_batch_size]
                remaining = oldest.enqueued + self.max_wait - time.monotonic()
                if len(group) >= self.max_batch_size or remaining <= 0:
                    taken = set(map(id, group))
                    self._queue = [j for j in self._queue if id(j) not in taken]
                    return group
                self._cond.wait(remaining)

    def _loop(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                return
            try:
                self.run_group(group)
            except BaseException as error:  # never let the worker die; the jobs carry the error
                log.exception("batch of %d failed outside generation", len(group))
                for job in group:
                    _fail(job, error)

    def run_group(self, jobs: list[Job]) -> None:
        """Generate for `jobs` together; on failure, retry each one alone."""
        self.stats.batches += 1
        self.stats.requests += len(jobs)
        sizes = Counter(self.stats.sizes)
        sizes[len(jobs)] += 1
        self.stats.sizes = sizes
        try:
            self._generate(jobs)
            return
        except Exception as error:
            if len(jobs) == 1:
                self.stats.failed_requests += 1
                log.info("request failed: %s", error)
                _fail(jobs[0], error)
                return
            log.warning("batch of %d failed (%s: %s); retrying its requests one by one",
                        len(jobs), type(error).__name__, error)
        self.stats.retried_batches += 1
        for job in jobs:
            if job.future.done():  # finished before the failure
                continue
            try:
                self._generate([job])
            except Exception as error:
                self.stats.failed_requests += 1
                log.info("request failed when run alone: %s", error)
                _fail(job, error)

    def _generate(self, jobs: list[Job]) -> None:
        model = self.model
        key = jobs[0].key
        if mlora.adapter_names(model) and model.active_adapter != key.adapter:
            mlora.use_adapter(model, key.adapter)
        for job in jobs:
            job.tokens = []
        tokens = model.config.tokens
        batch = _to_device(collate([j.sample for j in jobs], tokens.pad, padding_side="left"), model.device)
        streamer = _RowStreamer(jobs, set(model.config.stop_token_ids), self._finish)
        model.generate(**batch, streamer=streamer, max_new_tokens=max(j.max_new_tokens for j in jobs),
                       **key.generate_kwargs())
        for row, job in enumerate(jobs):
            if not streamer.finished[row]:  # generation stopped before this row hit its limit
                streamer.finished[row] = True
                streamer.deferred.append((job, "length"))
        for job, reason in streamer.deferred:
            self._finish(job, reason, len(jobs), run_postprocess=True)

    def _finish(self, job: Job, reason: str, batch_size: int, run_postprocess: bool = False) -> bool:
        """Resolve `job`; returns False when it has to wait for the end of the batch
        (its postprocess runs after generation)."""
        if job.postprocess is not None and not run_postprocess:
            return False
        completion = Completion(token_ids=list(job.tokens), finish_reason=reason, batch_size=batch_size)
        if job.postprocess is not None:
            try:
                job.postprocess(job, completion)
            except Exception as error:
                self.stats.failed_requests += 1
                _fail(job, error)
                return True
        _resolve(job, completion)
        return True


class _RowStreamer:
    """transformers' streamer protocol over a batch: the first `put` is the prompt,
    then each call brings one new token per row."""

    def __init__(self, jobs: list[Job], stop: set[int], finish: Callable[..., bool]):
        self.jobs, self.stop, self.finish = jobs, stop, finish
        self.prompt_seen = False
        self.finished = [False] * len(jobs)
        self.deferred: list[tuple[Job, str]] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.finished[row]:
                continue
            job = self.jobs[row]
            if token in self.stop:
                self._done(row, "stop")
                continue
            job.tokens.append(token)
            if len(job.tokens) > job.emitted:
                job.emitted = len(job.tokens)
                if job.on_token is not None and not job.future.done():
                    try:
                        job.on_token(token)
                    except Exception:  # a consumer's problem must not break the batch
                        log.exception("on_token callback failed")
            if len(job.tokens) >= job.max_new_tokens:
                self._done(row, "length")

    def _done(self, row: int, reason: str) -> None:
        self.finished[row] = True
        job = self.jobs[row]
        if not self.finish(job, reason, len(self.jobs)):
            self.deferred.append((job, reason))

    def end(self) -> None:
        pass


def _resolve(job: Job, completion: Completion) -> None:
    try:
        job.future.set_result(completion)
    except InvalidStateError:  # cancelled by its client meanwhile
        pass


def _fail(job: Job, error: BaseException) -> None:
    try:
        job.future.set_exception(error)
    except InvalidStateError:
        pass


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved: dict[str, Any] = {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[name] = value.to(device)
        elif isinstance(value, list):
            moved[name] = [v.to(device) if isinstance(v, torch.Tensor) else v for v in value]
        else:
            moved[name] = value
    return moved
