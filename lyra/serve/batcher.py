"""Continuous batching of generation requests for the API server.

Requests arrive one by one (each HTTP handler prepares its own `ProcessedSample`) and
wait in a queue. One worker thread owns the model and its decode loop over the KV cache:
at every decode step queued jobs join the running batch (each is prefilled alone, then
its cache rows are left-padded into the batch's `DynamicCache`) and finished or
cancelled rows leave it (their cache rows are dropped), so a new request never waits for
a running batch to end and a finished one frees its slot at once. The new jobs' first
tokens come from the same LM head call as the running rows' next ones (with a large
vocabulary that head is most of a small model's step).

* Jobs with speech or sound go first to an encoder thread, which runs their audio encoders
  (`LyraForConditionalGeneration.audio_frames`) while the worker decodes, then queues them;
  jobs without audio are queued at once. Inputs longer than one encoder batch
  (`speech.encode_batch_clips` clips) are encoded in the prefill instead, as is everything
  with `encoder_thread=False`. The encoder thread waits while `max_batch_size` encoded jobs
  are queued, so encoder outputs are held for at most that many jobs (and one being encoded).
* Every row gets its tokens as they are produced (for SSE) and its future is resolved
  as soon as it has produced its end-of-sequence token or its own `max_new_tokens`.
* A request whose media only turns out to be unusable inside the model fails in its
  own encoding or prefill, without touching the running rows.
* Nothing a request does can stop the worker: every error ends up on that request's
  future (an error in a decode step, shared by the running rows, fails those rows).

Rows of one batch share a `BatchKey`: the LoRA adapter (chosen per request by
`lyra.model.mlora.adapter_for_audio`; one adapter applies to a whole forward pass) and
the sampling settings. When the oldest queued job needs another key, the running batch
stops taking jobs, drains, and the next batch starts with that key.
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
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessorList

from lyra.model import mlora
from lyra.model.lyra import sampling_processors
from lyra.model.speech import num_clips
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


@dataclass
class Completion:
    """The outcome of one request."""

    token_ids: list[int]  # new tokens, without the end-of-sequence token
    finish_reason: str  # "stop" (end of sequence), "length" (max_new_tokens reached) or "cancelled"
    batch_size: int = 1  # the most rows of a decode step it was in (0: never ran)
    extra: dict[str, Any] = field(default_factory=dict)  # what `Job.postprocess` adds (e.g. audio)


@dataclass(eq=False)
class Job:
    """One prepared request.

    `on_token` is called from the worker thread with each new token (not the end of
    sequence); keep it cheap (e.g. put into a queue). `postprocess`, when set, runs in
    the worker thread after generation with the request's adapter still active, and may
    fill `Completion.extra`; an exception there fails only this request.

    `cancel()` (from any thread) asks `ContinuousBatcher` to drop the job: a queued job
    is removed at once, one in the encoder thread once its encoders return, a running one
    leaves the batch within one decode step; either way
    its future gets `Completion(finish_reason="cancelled")` with the tokens so far. A
    client that cancels the future instead (`job.future.cancel()`) cancels the job the same
    way, once it was submitted.
    """

    sample: ProcessedSample
    key: BatchKey = field(default_factory=BatchKey)
    max_new_tokens: int = 64
    on_token: Callable[[int], None] | None = None
    postprocess: Callable[["Job", Completion], None] | None = None
    future: Future = field(default_factory=Future)
    tokens: list[int] = field(default_factory=list)  # produced so far
    # the encoder thread's output for `sample.speech` / `sample.sound` (see `ContinuousBatcher`), until prefill
    speech_frames: list[torch.Tensor | None] | None = None
    sound_frames: list[torch.Tensor | None] | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _on_cancel: Callable[["Job"], None] | None = field(default=None, init=False, repr=False)

    def result(self, timeout: float | None = None) -> Completion:
        return self.future.result(timeout)

    def cancel(self) -> None:
        """Stop this job (thread-safe, idempotent; see the class docstring)."""
        self._cancelled.set()
        hook = self._on_cancel
        if hook is not None:
            hook(self)

    @property
    def cancelled(self) -> bool:
        """True once `cancel()` was called (by its client, or for its cancelled future)."""
        return self._cancelled.is_set()


@dataclass
class EngineStats:
    """Counters kept by `ContinuousBatcher`; `sizes` (rows in a decode step -> how many
    such steps) is replaced, never mutated, so other threads can read it while the
    worker counts."""

    requests: int = 0  # jobs taken from the queue, and jobs that failed in the encoder thread
    failed_requests: int = 0
    cancelled_requests: int = 0
    steps: int = 0  # decode steps: forward passes over the running batch
    row_steps: int = 0  # rows summed over decode steps
    encode_seconds: float = 0.0  # encoder thread time in audio encoders, one job at a time
    prefill_seconds: float = 0.0  # engine time in prompts (encoders not run ahead, and LLM), one job at a time
    decode_seconds: float = 0.0  # engine time in decode steps and their shared LM head call
    sizes: Counter = field(default_factory=Counter)

    def count_step(self, rows: int) -> None:
        sizes = Counter(self.sizes)
        sizes[rows] += 1
        self.sizes = sizes
        self.steps += 1
        self.row_steps += rows

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "failed_requests": self.failed_requests,
                "cancelled_requests": self.cancelled_requests, "steps": self.steps, "row_steps": self.row_steps,
                "encode_seconds": round(self.encode_seconds, 4),
                "prefill_seconds": round(self.prefill_seconds, 4), "decode_seconds": round(self.decode_seconds, 4),
                "mean_batch_size": round(self.row_steps / self.steps, 2) if self.steps else None,
                "max_batch_size_seen": max(self.sizes, default=0),
                "batch_sizes": {str(k): v for k, v in sorted(self.sizes.items())}}


@dataclass(eq=False)
class _Row:
    """A job in the running batch."""

    job: Job
    token: int  # the last token chosen, fed to the next decode step
    position: int  # its M-RoPE position (the same on all three axes: answers are text)
    batch_size: int = 1  # the most rows of a step it was in


@dataclass(eq=False)
class _Prefill:
    """A job whose prompt has run: its KV cache of `length` columns, the position of its
    first new token and the `[1, hidden]` state that predicts that token."""

    job: Job
    cache: DynamicCache
    length: int
    position: int
    hidden: torch.Tensor


@dataclass(eq=False)
class _Batch:
    """The running decode batch: rows that share `key`, their left-padded KV cache
    (`[B, heads, T, head_dim]` per layer) and `mask` `[B, T]`, 1 where a row's cache
    column holds one of its tokens; `warpers`, the logits warpers of `key`'s sampling
    settings, are built once for the batch."""

    key: BatchKey
    rows: list[_Row] = field(default_factory=list)
    cache: DynamicCache | None = None
    mask: torch.Tensor | None = None
    warpers: LogitsProcessorList = field(init=False, repr=False)

    def __post_init__(self) -> None:
        key = self.key
        self.warpers = sampling_processors(key.do_sample, key.temperature, key.top_k, key.top_p)

    def add(self, row: _Row, cache: DynamicCache, length: int) -> None:
        """Append a prefilled row whose cache holds `length` columns, left-padding
        whichever side is shorter."""
        mask = torch.ones(1, length, dtype=torch.long, device=cache.layers[0].keys.device)
        if self.cache is None:
            self.rows, self.cache, self.mask = [row], cache, mask
            return
        width = max(self.mask.shape[1], length)
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
            old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
        self.rows.append(row)

    def keep(self, rows: list[_Row]) -> None:
        """Drop every row not in `rows`, and the cache columns no remaining row uses."""
        if not rows:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor([self.rows.index(r) for r in rows], device=self.mask.device)
        self.rows = rows
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        first = int(self.mask.any(0).nonzero()[0])  # columns left of it are padding in every row
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
            self.mask = self.mask[:, first:]


class ContinuousBatcher:
    """Continuous batching over the model's KV cache (see the module docstring).

    Greedy answers are those of `model.generate` on each request alone: a job is
    prefilled alone, and a decode step differs from a lone one only by masked padding.
    `max_batch_size` 1 runs one job at a time. `encoder_thread` runs audio encoders in a thread
    of their own (both threads keep a core busy on a CPU; on one core, turn it off). Models
    with LMME (whose decode prunes the cache per prompt) are not supported.
    """

    def __init__(self, model, max_batch_size: int = 8, encoder_thread: bool = True):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if model.lmme_settings(None) is not None:
            raise ValueError("continuous batching does not support LMME models: set lmme.enabled to false in the "
                             "model's config.json")
        text = model.backbone.config.text_config
        if getattr(text, "use_sliding_window", False):
            raise ValueError("continuous batching needs full-attention KV caches: set use_sliding_window to false")
        self.model = model
        self.max_batch_size = max_batch_size
        self.encoder_thread = encoder_thread
        self.stats = EngineStats()
        self._stop = set(model.config.stop_token_ids)
        self._queue: list[Job] = []  # ready to prefill
        self._encoding: list[Job] = []  # waiting for the encoder thread
        self._cond = threading.Condition()  # guards both lists and the stats' counts
        self._running = False
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ control
    def start(self) -> "ContinuousBatcher":
        with self._cond:
            if self._running:
                return self
            self._running = True
        self._threads = [threading.Thread(target=self._loop, name="lyra-engine", daemon=True)]
        if self.encoder_thread:
            self._threads.append(threading.Thread(target=self._encode_loop, name="lyra-encoder", daemon=True))
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking jobs, let the running rows finish, fail the queued ones."""
        with self._cond:
            self._running = False
            pending, self._queue, self._encoding = self._encoding + self._queue, [], []
            self._cond.notify_all()
        for job in pending:
            _fail(job, BatcherClosed("the server is shutting down"))
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._running and bool(self._threads) and all(t.is_alive() for t in self._threads)

    @property
    def queued(self) -> int:
        """Jobs waiting: for the encoder thread or to join a batch."""
        with self._cond:
            return len(self._queue) + len(self._encoding)

    def submit(self, job: Job) -> Future:
        with self._cond:
            if not self._running:
                raise BatcherClosed("the batcher is not running")
            job._on_cancel = self._cancel_queued
            (self._encoding if self.encoder_thread and self._encodes_ahead(job) else self._queue).append(job)
            self._cond.notify_all()
        if job.cancelled:  # cancelled before the hook was set
            self._cancel_queued(job)
        job.future.add_done_callback(lambda future: job.cancel() if future.cancelled() else None)
        return job.future

    def _encodes_ahead(self, job: Job) -> bool:
        """Whether the encoder thread has anything to run for `job`: an input of at most one
        encoder batch of clips."""
        speech = self.model.config.speech
        return any(num_clips(len(w), speech.window_rule) <= speech.encode_batch_clips
                   for w in job.sample.speech + job.sample.sound)

    def _encoded_in_queue(self) -> int:
        return sum(j.speech_frames is not None or j.sound_frames is not None for j in self._queue)

    def _cancel_queued(self, job: Job) -> None:
        """`Job.cancel` hook: a queued job leaves now; a running one at the next step (one in the
        encoder, once encoded)."""
        with self._cond:
            waiting = next((q for q in (self._queue, self._encoding) if job in q), None)
            if waiting is None:
                return
            waiting.remove(job)
            self.stats.cancelled_requests += 1
            self._cond.notify_all()  # room in the queue for the encoder thread
        _resolve(job, Completion(token_ids=[], finish_reason="cancelled", batch_size=0))

    # ------------------------------------------------------------------ worker
    def _take(self, batch: _Batch) -> tuple[BatchKey, list[Job]] | None:
        """The key of the batch to run and the queued jobs that join it now; blocks while
        nothing runs or waits. None once stopped with no running rows."""
        with self._cond:
            while True:
                if not self._running:
                    return (batch.key, []) if batch.rows else None
                if not batch.rows and not self._queue:
                    self._cond.wait()
                    continue
                key = batch.key if batch.rows else self._queue[0].key
                room = self.max_batch_size - len(batch.rows)
                if room <= 0 or self._queue and self._queue[0].key != key:
                    return key, []  # full, or the oldest job waits for this batch to drain
                joining = [j for j in self._queue if j.key == key][:room]
                self._queue = [j for j in self._queue if j not in joining]
                self.stats.requests += len(joining)
                if joining:
                    self._cond.notify_all()  # the encoder thread may wait for room in the queue
                return key, joining

    def _encode_loop(self) -> None:
        """The encoder thread: audio encoders of the waiting jobs, oldest first, while fewer
        than `max_batch_size` encoded jobs are queued."""
        while True:
            with self._cond:
                while self._running and (not self._encoding or self._encoded_in_queue() >= self.max_batch_size):
                    self._cond.wait()
                if not self._running:
                    return
                job = self._encoding.pop(0)
            if not self._encode(job):
                continue
            with self._cond:
                running = self._running
                if running and not job.cancelled:
                    self._queue.append(job)
                    self._cond.notify_all()
                    continue
            if not running:
                _fail(job, BatcherClosed("the server is shutting down"))
            else:  # cancelled while it was encoded: its hook found it in neither list
                self._finish(job, "cancelled", 0)

    @torch.no_grad()
    def _encode(self, job: Job) -> bool:
        """Run `job`'s audio encoders, keeping the frames on the job; False (the job failed) when
        its audio cannot be encoded."""
        model, sample = self.model, job.sample
        max_clips = model.config.speech.encode_batch_clips
        started = time.perf_counter()
        try:
            if sample.speech:
                job.speech_frames = model.audio_frames("speech", sample.speech, max_clips)
            if sample.sound:
                job.sound_frames = model.audio_frames("sound", sample.sound, max_clips)
        except Exception as error:  # e.g. sound given to a model without a sound projector
            log.info("request failed in its encoders: %s", error)
            with self._cond:
                self.stats.requests += 1
                self.stats.failed_requests += 1
            _fail(job, error)
            return False
        finally:
            self.stats.encode_seconds += time.perf_counter() - started
        return True

    def _loop(self) -> None:
        batch = _Batch(BatchKey())
        while True:
            taken = self._take(batch)
            if taken is None:
                return
            key, joining = taken
            if not batch.rows and key != batch.key:
                batch = _Batch(key)
            try:
                if mlora.adapter_names(self.model) and self.model.active_adapter != key.adapter:
                    mlora.use_adapter(self.model, key.adapter)
                self._step(batch, joining)
            except BaseException as error:  # never let the worker die; the jobs carry the error
                log.exception("decode step over %d rows failed", len(batch.rows))
                failed = [r.job for r in batch.rows] + [j for j in joining if not j.future.done()]
                with self._cond:
                    self.stats.failed_requests += len(failed)
                for job in failed:
                    _fail(job, error)
                batch = _Batch(key)

    @torch.no_grad()
    def _step(self, batch: _Batch, joining: list[Job]) -> None:
        """One step of the engine: cancelled rows leave; the joining jobs are prefilled
        (each alone); one decode step runs over the running rows; one LM head call gives
        the next token of both; finished rows leave and unfinished new ones join."""
        live = [r for r in batch.rows if not r.job.cancelled]
        if len(live) < len(batch.rows):
            for row in batch.rows:
                if row not in live:
                    self._finish(row.job, "cancelled", row.batch_size)
            batch.keep(live)
        started = time.perf_counter()
        prefilled = [p for p in map(self._prefill, joining) if p is not None]
        hidden = [p.hidden for p in prefilled]
        prefilled_at = time.perf_counter()
        self.stats.prefill_seconds += prefilled_at - started
        if live:
            hidden.insert(0, self._decode(batch))
        if not hidden:
            return
        chosen = self._choose(batch, self.model.backbone.lm_head(torch.cat(hidden)))
        self.stats.decode_seconds += time.perf_counter() - prefilled_at
        done: list[tuple[_Row, str]] = []
        for row, token in zip(live, chosen):
            row.token, row.position, row.batch_size = token, row.position + 1, max(row.batch_size, len(live))
            reason = self._accept(row.job, token)
            if reason is not None:
                done.append((row, reason))
        if done:
            batch.keep([r for r in live if all(r is not d for d, _ in done)])
            for row, reason in done:
                self._finish(row.job, reason, row.batch_size)
        for new, token in zip(prefilled, chosen[len(live):]):
            reason = self._accept(new.job, token)
            if reason is not None:
                self._finish(new.job, reason, 1)
            else:
                batch.add(_Row(new.job, token, new.position), new.cache, new.length)

    def _prefill(self, job: Job) -> _Prefill | None:
        """Run `job`'s prompt alone; None (the job failed or was cancelled) when there is
        nothing to add."""
        if job.cancelled:
            self._finish(job, "cancelled", 0)
            return None
        model = self.model
        try:
            inputs = _to_device(collate([job.sample], model.config.tokens.pad, padding_side="left"), model.device)
            inputs.pop("labels", None)
            embeds, positions, _ = model.prepare_inputs(**inputs, speech_frames=job.speech_frames,
                                                        sound_frames=job.sound_frames)
            job.speech_frames = job.sound_frames = None  # the prompt's KV cache holds what they gave
            cache = DynamicCache(config=model.backbone.config.text_config)
            hidden = model.backbone.model.language_model(
                inputs_embeds=embeds, attention_mask=inputs["attention_mask"], position_ids=positions, cache=cache,
                use_cache=True).last_hidden_state
        except Exception as error:  # e.g. media the model rejects: this job fails alone
            log.info("request failed: %s", error)
            with self._cond:
                self.stats.failed_requests += 1
            _fail(job, error)
            return None
        return _Prefill(job, cache, embeds.shape[1], int(positions.max()) + 1, hidden[:, -1])

    def _decode(self, batch: _Batch) -> torch.Tensor:
        """Feed every row its last token; the `[B, hidden]` states that predict the next."""
        model, size = self.model, len(batch.rows)
        self.stats.count_step(size)
        device = batch.mask.device
        tokens = torch.tensor([[r.token] for r in batch.rows], device=device)
        positions = torch.tensor([r.position for r in batch.rows], device=device).view(1, size, 1).expand(3, -1, -1)
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones(size, 1)], dim=1)
        hidden = model.backbone.model.language_model(
            inputs_embeds=model.backbone.get_input_embeddings()(tokens), attention_mask=batch.mask,
            position_ids=positions, cache=batch.cache, use_cache=True).last_hidden_state
        return hidden[:, -1]

    def _choose(self, batch: _Batch, logits: torch.Tensor) -> list[int]:
        """The next token of each row from `[B, vocab]` logits."""
        scores = logits.float()
        if not batch.key.do_sample:
            return scores.argmax(-1).tolist()
        scores = batch.warpers(None, scores)  # the warpers look at the scores only
        return torch.multinomial(scores.softmax(-1), 1).squeeze(1).tolist()

    def _accept(self, job: Job, token: int) -> str | None:
        """Record `token` for `job` and stream it; the finish reason once the job is done."""
        if token in self._stop:
            return "stop"
        job.tokens.append(token)
        if job.on_token is not None:
            try:
                job.on_token(token)
            except Exception:  # a consumer's problem must not break the batch
                log.exception("on_token callback failed")
        return "length" if len(job.tokens) >= job.max_new_tokens else None

    def _finish(self, job: Job, reason: str, batch_size: int) -> None:
        """Resolve `job`, after its postprocess unless it was cancelled; a failing
        postprocess fails only this job."""
        completion = Completion(token_ids=list(job.tokens), finish_reason=reason, batch_size=batch_size)
        if reason == "cancelled":
            with self._cond:
                self.stats.cancelled_requests += 1
        elif job.postprocess is not None:
            try:
                job.postprocess(job, completion)
            except Exception as error:
                with self._cond:
                    self.stats.failed_requests += 1
                _fail(job, error)
                return
        _resolve(job, completion)


def _resolve(job: Job, completion: Completion) -> None:
    job.speech_frames = job.sound_frames = None
    try:
        job.future.set_result(completion)
    except InvalidStateError:  # cancelled by its client meanwhile
        pass


def _fail(job: Job, error: BaseException) -> None:
    job.speech_frames = job.sound_frames = None
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


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad `tensor` on the left of `dim` (2 of a `[B, heads, T, head_dim]` cache
    layer, 1 of a `[B, T]` mask) to `width`."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    return F.pad(tensor, (0, 0) * (tensor.dim() - 1 - dim) + (missing, 0))
