"""An OpenAI-compatible HTTP API for Lyra, on FastAPI + uvicorn, with batched generation.

    python -m lyra.serve.api --model outputs/nano/model [--host 127.0.0.1] [--port 8000]
                             [--api-key KEY] [--max-batch-size 8] [--media-root DIR]
                             [--allowed-host NAME]

Endpoints (docs/api.md has the full request format, the limits and client examples):

* `POST /v1/chat/completions`: system / developer / user / assistant messages whose
  content is a string or a list of parts: `text`, `image_url` (a `data:` URL; a local
  path or `file://` URL only under `--media-root`), `input_audio` (speech), and two Lyra
  extensions, `input_sound` (non-speech audio) and `input_video` (its frames).
  `stream: true` answers with server-sent events ending in `data: [DONE]`;
  `modalities: ["text", "audio"]` adds a base64 wav in `message.audio` when the model
  can speak. Greedy by default (`temperature` 0).
* `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` (no key needed), `GET /openapi.json`.

Every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`,
with a 4xx status for anything the client can fix, including malformed HTTP (uvicorn's
h11 parser does the framing; its 400 is answered in the same shape).

Order of work per request, cheapest first: Host allow-list, API key, content type and
body size (`Gate`, before the body is read), the body within `--body-timeout-s`, the
pydantic schema, the text length and the configured caps (`chat_request`), then in a
worker thread within `--prepare-timeout-s`: media read and decoded (sizes from headers
first) and the prompt tokenised. Only then is the request queued for the batcher, whose
single worker thread owns the model. A client that goes away cancels its job.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import hmac
import io
import json
import logging
import os
import queue
import socket
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import h11
import numpy as np
import soundfile as sf
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from lyra.data.audio import AudioError
from lyra.data.vision import VisionError
from lyra.inference import Media, attach_vocoder, load_model
from lyra.model import mlora
from lyra.processing import PLACEHOLDER_PATTERN, LyraProcessor, ProcessedSample
from lyra.serve.batcher import BatchKey, BatcherClosed, Completion, ContinuousBatcher, Job
from lyra.serve.limits import (MAX_HEADER_BYTES, ServerConfig, check_body_size, check_header_size, check_host,
                               check_text_length, is_loopback)
from lyra.serve.media import (MediaRef, data_ref, decode_audio, decode_image, decode_video, image_ref,
                              read_local_file)
from lyra.serve.schema import APIError, ChatCompletionRequest, ContentPart, TextPart, first_error, invalid

__all__ = ["APIError", "LyraAPI", "LyraServer", "ServerConfig", "build_app", "build_parser", "config_from_args",
           "create_server", "main"]

log = logging.getLogger("lyra.serve")

MAX_MEDIA_ITEMS = 32  # media parts per request
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
PART_KIND = {"image_url": "image", "input_audio": "speech", "input_sound": "sound", "input_video": "video"}
CHAT_PATH = "/v1/chat/completions"


class CannotSpeak(Exception):
    """Audio output was asked of a model without a speech generator."""


def cannot_speak_message(model_id: str) -> str:
    return (f"this model cannot speak: '{model_id}' has no speech generator and vocoder (stage 4 of the recipe); "
            f"ask for modalities [\"text\"]")


class ClientGone(Exception):
    """The client closed its connection; nobody is left to answer."""


# ---------------------------------------------------------------------- request checks
@dataclass
class ChatRequest:
    """A request that passed the schema and the server's caps; its media not yet decoded."""

    model: str
    messages: list[dict[str, str]]  # processor-ready: one placeholder per media part
    parts: list[tuple[str, ContentPart]]  # (param, part) of each media part, in prompt order
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    temperature: float = 0.0
    top_p: float | None = None
    want_audio: bool = False  # a wav of the answer (the only audio format the schema allows)


def chat_request(body: ChatCompletionRequest, config: ServerConfig) -> ChatRequest:
    """The checks the schema cannot make: field combinations, roles, caps and text length (before
    anything is decoded or tokenised)."""
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise invalid("give either 'max_tokens' or 'max_completion_tokens', not both", "max_tokens")
    limit_param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if limit is None:
        limit = config.default_max_tokens
    elif limit > config.max_tokens_limit:
        raise invalid(f"'{limit_param}' must be between 1 and {config.max_tokens_limit}, got {limit}", limit_param)
    if body.stream_options is not None and not body.stream:
        raise invalid("'stream_options' is only allowed with stream: true", "stream_options")
    want_audio = False
    if body.modalities is not None:
        if "text" not in body.modalities or len(set(body.modalities)) != len(body.modalities):
            raise invalid('\'modalities\' must be ["text"] or ["text", "audio"]', "modalities")
        want_audio = "audio" in body.modalities
    if body.audio is not None and not want_audio:
        raise invalid("'audio' is only used with modalities [\"text\", \"audio\"]", "audio")

    messages: list[dict[str, str]] = []
    parts: list[tuple[str, ContentPart]] = []
    texts: list[tuple[str, str]] = []  # (param, text)
    for i, message in enumerate(body.messages):
        where, role = f"messages[{i}]", ROLES[message.role]
        if isinstance(message.content, str):
            texts.append((f"{where}.content", message.content))
            pieces = [message.content]
        else:
            pieces = []
            for j, part in enumerate(message.content):
                param = f"{where}.content[{j}]"
                if isinstance(part, TextPart):
                    texts.append((f"{param}.text", part.text))
                    pieces.append(part.text)
                    continue
                if role != "user":
                    raise invalid(f"'{param}': {role} messages may only hold text parts; put media in user messages",
                                  param)
                parts.append((f"{param}.{part.type}", part))
                pieces.append(f"<{PART_KIND[part.type]}>")
        messages.append({"role": role, "content": "\n".join(pieces)})
    if messages[-1]["role"] != "user":
        raise invalid("the last message must be a user message", f"messages[{len(messages) - 1}].role")
    if len(parts) > MAX_MEDIA_ITEMS:
        raise invalid(f"at most {MAX_MEDIA_ITEMS} media parts per request, got {len(parts)}", "messages",
                      "too_many_media")
    check_text_length([text for _, text in texts], config.max_text_chars)
    for param, text in texts:
        found = PLACEHOLDER_PATTERN.search(text)
        if found:
            raise invalid(f"'{param}' contains {found.group(0)!r}, which is reserved for media; send media as "
                          f"content parts instead", param)
    return ChatRequest(model=body.model, messages=messages, parts=parts, max_tokens=limit, stream=bool(body.stream),
                       include_usage=bool(body.stream_options and body.stream_options.include_usage),
                       temperature=body.temperature or 0.0, top_p=body.top_p, want_audio=want_audio)


def media_ref(param: str, part: ContentPart, config: ServerConfig) -> MediaRef:
    """A media part -> its bytes (base64 decoded) or its local path (only under a media root)."""
    if part.type == "image_url":
        return image_ref(part.image_url.url, f"{param}.url", bool(config.media_roots))
    body = getattr(part, part.type)
    return data_ref(body.data, body.format, PART_KIND[part.type], f"{param}.data")


# ---------------------------------------------------------------------- audio output
def can_speak(model) -> bool:
    return bool(getattr(model, "can_speak", False))


def synthesize_speech(model, job: Job, completion: Completion) -> tuple[np.ndarray, int]:
    """The answer of `job` as speech: (`[T]` float waveform, sample rate).

    This is the one place audio output plugs in. It runs in the batcher's worker thread
    right after the answer was generated, with the request's adapter still active, so
    it may run the model again: e.g. a forward pass over prompt + answer for the LLM
    hidden states that `model.speech_generator` turns into units, then the vocoder.
    The model's `speak(sample, answer_token_ids) -> (waveform, sample_rate)` needs its
    speech generator and its vocoder (recorded in the checkpoint, or `--vocoder`); without them the request is refused
    up front (`can_speak`), with this message.
    """
    if not can_speak(model):
        raise CannotSpeak(cannot_speak_message(getattr(model.config, "name", "this model")))
    waveform, sample_rate = model.speak(job.sample, completion.token_ids)
    return np.asarray(waveform, dtype=np.float32).reshape(-1), int(sample_rate)


def wav_base64(waveform: np.ndarray, sample_rate: int) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(waveform, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------- the application
class LyraAPI:
    """Request handling independent of HTTP: checks, preparation, batching, responses."""

    def __init__(self, model, tokenizer, info: dict[str, Any], config: ServerConfig):
        self.model, self.tokenizer, self.info, self.config = model, tokenizer, info, config
        self.model_id = config.served_model_name or _default_model_id(info.get("model", "lyra"))
        self.created = int(time.time())
        # media decoding and tokenising run in these threads, off the event loop
        self.prepare_threads = max(2, min(8, config.max_concurrent))
        # One processor per preparing thread, each on its own tokenizer copy (see `processor`), built
        # now: a copy of a 150k-token vocabulary takes a large part of a second, which the first requests
        # to reach each thread would otherwise wait for.
        self._processors: queue.SimpleQueue[LyraProcessor] = queue.SimpleQueue()
        for _ in range(self.prepare_threads):
            self._processors.put(LyraProcessor(copy.deepcopy(tokenizer), model.config, config.vision_limits))
        self.workers = ThreadPoolExecutor(self.prepare_threads, thread_name_prefix="lyra-prepare")
        self.batcher = ContinuousBatcher(model, config.max_batch_size, config.encoder_thread).start()
        self.in_flight = 0  # requests holding a slot: being prepared, queued or generated
        self._slots_lock = threading.Lock()
        self.tokenizer_lock = threading.Lock()  # guards self.tokenizer, which decodes answers

    def close(self) -> None:
        self.batcher.stop()
        self.workers.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ simple endpoints
    def check_auth(self, authorization: str | None) -> None:
        key = self.config.api_key
        if not key:
            return
        given = ""
        if authorization and authorization[:7].lower() == "bearer ":
            given = authorization[7:].strip()
        if not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8")):
            message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "incorrect API key"
            raise APIError(401, message, None, "invalid_api_key")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "lyra"}

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def health(self) -> tuple[int, dict[str, Any]]:
        alive = self.batcher.alive
        return (200 if alive else 503), {
            "status": "ok" if alive else "unavailable", "model": self.model_id,
            "untrained": bool(self.info.get("untrained", False)), "device": self.info.get("device"),
            "can_speak": can_speak(self.model), "queued": self.batcher.queued, "in_flight": self.in_flight,
            "max_batch_size": self.batcher.max_batch_size,
            "encoder_thread": self.batcher.encoder_thread, "batches": self.batcher.stats.as_dict(),
        }

    # ------------------------------------------------------------------ chat completions
    def check(self, body: ChatCompletionRequest) -> ChatRequest:
        request = chat_request(body, self.config)
        if request.model != self.model_id:
            raise APIError(404, f"the model '{request.model}' does not exist; this server serves '{self.model_id}'",
                           "model", "model_not_found")
        if request.want_audio and not can_speak(self.model):
            raise invalid(cannot_speak_message(self.model_id), "modalities", "audio_output_unavailable")
        return request

    def decode_media(self, request: ChatRequest) -> Media:
        config, media = self.config, Media()
        audio_caps = {"speech": min(config.max_audio_seconds, self.model.config.speech.max_seconds),
                      "sound": min(config.max_audio_seconds, self.model.config.sound.max_seconds)}
        for param, part in request.parts:
            ref = media_ref(param, part, config)
            data = ref.data if ref.data is not None else read_local_file(
                ref.path, config.media_roots, config.max_body_bytes, config.prepare_timeout_s, ref.param)
            if ref.kind == "image":
                media.images.append(decode_image(data, config.max_image_pixels, ref.param))
            elif ref.kind == "video":
                media.videos.append(decode_video(data, ref.format, config.vision_limits, config.max_image_pixels,
                                                 config.max_video_seconds,
                                                 self.model.config.vision.temporal_patch_size, ref.param))
            else:
                getattr(media, ref.kind).append(decode_audio(data, ref.format, audio_caps[ref.kind], ref.param))
        return media

    @contextmanager
    def processor(self) -> Iterator[LyraProcessor]:
        """A processor no other thread is using, given back on exit. A fast tokenizer must not be
        used by two threads at once, and with a copy per preparing thread, tokenising one request
        never waits for another request's tokenising (the text cap bounds each one)."""
        processor = self._processors.get()
        try:
            yield processor
        finally:
            self._processors.put(processor)

    def build_sample(self, messages: list[dict[str, str]], media: Media) -> ProcessedSample:
        try:
            with self.processor() as processor:
                return processor(messages, images=media.images, videos=media.videos, speech=media.speech,
                                 sound=media.sound)
        except (AudioError, VisionError, ValueError) as error:
            raise invalid(f"the request cannot be turned into model inputs: {error}", "messages",
                          "invalid_media") from None

    def prepare(self, request: ChatRequest, on_token: Callable[[int], None] | None = None) -> Job:
        """Decode, check and tokenise one request into a batcher job (runs in a worker thread)."""
        sample = self.build_sample(request.messages, self.decode_media(request))
        prompt = int(sample.input_ids.shape[0])
        context = self.model.config.text.max_position_embeddings
        if prompt + request.max_tokens > context:
            raise invalid(f"the prompt is {prompt} tokens and max_tokens {request.max_tokens}, over the model's "
                          f"context of {context} tokens", "messages", "context_length_exceeded")
        adapter = mlora.adapter_for_audio(self.model, [w.shape[0] for w in sample.speech])
        key = BatchKey.for_request(adapter, request.temperature, request.top_p)
        return Job(sample=sample, key=key, max_new_tokens=request.max_tokens, on_token=on_token,
                   postprocess=self._speak if request.want_audio else None)

    def _speak(self, job: Job, completion: Completion) -> None:
        completion.extra["audio"] = synthesize_speech(self.model, job, completion)

    async def start(self, request: ChatRequest, on_token: Callable[[int], None] | None) -> Job:
        """Take a concurrency slot, prepare the job off the event loop and queue it. The slot is
        given back when the job resolves, or at once when preparing fails or runs out of time."""
        with self._slots_lock:
            full = self.in_flight >= self.config.max_concurrent
            self.in_flight += not full
        if full:
            raise APIError(429, "the server is busy; retry later", None, "rate_limit_exceeded",
                           type="rate_limit_error")
        loop = asyncio.get_running_loop()
        try:
            job = await asyncio.wait_for(loop.run_in_executor(self.workers, self.prepare, request, on_token),
                                         self.config.prepare_timeout_s)
            self.submit(job)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            self._release_slot()
            raise APIError(408, f"reading and decoding the request's inputs took longer than "
                                f"{self.config.prepare_timeout_s:g} s (--prepare-timeout-s)", None,
                           "request_timeout") from None
        except BaseException:
            self._release_slot()
            raise
        job.future.add_done_callback(lambda _: self._release_slot())
        return job

    def _release_slot(self) -> None:
        with self._slots_lock:
            self.in_flight -= 1

    def submit(self, job: Job) -> None:
        try:
            self.batcher.submit(job)
        except BatcherClosed as error:
            raise APIError(503, f"the server is not accepting requests: {error}", None, "unavailable") from None

    def decode(self, token_ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def audio_object(self, completion: Completion, transcript: str, created: int) -> dict[str, Any] | None:
        audio = completion.extra.get("audio")
        if audio is None:
            return None
        return {"id": f"audio_{uuid.uuid4().hex}", "data": wav_base64(*audio), "expires_at": created + 3600,
                "transcript": transcript}

    def response(self, rid: str, created: int, job: Job, completion: Completion) -> dict[str, Any]:
        text = self.decode(completion.token_ids)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        audio = self.audio_object(completion, text, created)
        if audio is not None:
            message["audio"] = audio
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.model_id,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": completion.finish_reason}],
                "usage": self.usage(job, completion), "system_fingerprint": None}

    def usage(self, job: Job, completion: Completion) -> dict[str, int]:
        prompt = int(job.sample.input_ids.shape[0])
        return {"prompt_tokens": prompt, "completion_tokens": len(completion.token_ids),
                "total_tokens": prompt + len(completion.token_ids)}

    def chunk(self, rid: str, created: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict:
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.model_id,
                "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    # ------------------------------------------------------------------ waiting for answers
    async def answer(self, job: Job, receive: Callable) -> Completion:
        """The job's completion; cancels the job when the client disconnects or time runs out."""
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait({result, gone}, timeout=self.config.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if result in done:
            try:
                return result.result()
            except BaseException as error:
                raise error_from_exception(error) from None
        job.cancel()
        if gone in done:
            raise ClientGone()
        raise error_from_exception(FutureTimeout())

    async def events(self, request: ChatRequest, job: Job, tokens: asyncio.Queue, rid: str,
                     created: int) -> AsyncIterator[bytes]:
        """The server-sent events of a streamed answer. Whenever tokens arrive, all those queued
        by then are taken and the answer so far is decoded once; a delta is sent when that text
        extends what was sent and does not end in a partial character. When the client goes
        away the framework stops this generator, and `finally` cancels the job."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.request_timeout_s
        try:
            yield _sse(self.chunk(rid, created, {"role": "assistant", "content": "", "refusal": None}))
            received: list[int] = []
            sent = decoded = ""  # decoded: the text of all of `received`
            finished = False
            while not finished:
                try:
                    items = [await asyncio.wait_for(tokens.get(), max(0.0, deadline - loop.time()))]
                except asyncio.TimeoutError:
                    break
                while items[-1] is not _DONE and not tokens.empty():
                    items.append(tokens.get_nowait())
                finished = items[-1] is _DONE
                if finished:
                    items.pop()
                if not items:
                    continue
                received += items
                decoded = await asyncio.to_thread(self.decode, list(received))
                if len(decoded) > len(sent) and decoded.startswith(sent) and not decoded.endswith("\ufffd"):
                    yield _sse(self.chunk(rid, created, {"content": decoded[len(sent):]}))
                    sent = decoded
            if not job.future.done():
                job.cancel()
                raise error_from_exception(FutureTimeout())
            completion = job.future.result()
            if completion.token_ids == received:
                text = decoded
            else:
                text = await asyncio.to_thread(self.decode, completion.token_ids)
            if len(text) > len(sent) and text.startswith(sent):
                yield _sse(self.chunk(rid, created, {"content": text[len(sent):]}))
            audio = self.audio_object(completion, text, created)
            if audio is not None:
                yield _sse(self.chunk(rid, created, {"audio": audio}))
            yield _sse(self.chunk(rid, created, {}, completion.finish_reason))
            if request.include_usage:
                usage = self.chunk(rid, created, {})
                usage["choices"], usage["usage"] = [], self.usage(job, completion)
                yield _sse(usage)
        except Exception as error:  # headers are out: the error goes in the stream
            yield _sse(error_from_exception(error).body())
        finally:
            if not job.future.done():
                job.cancel()
        yield b"data: [DONE]\n\n"


_DONE = object()


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n"


async def _disconnected(receive: Callable) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _call_in_loop(loop: asyncio.AbstractEventLoop, function: Callable, *args: Any) -> None:
    """Run `function(*args)` in the event loop from the batcher's thread (a no-op once the loop is gone)."""
    try:
        loop.call_soon_threadsafe(function, *args)
    except RuntimeError:  # the loop closed: the server is shutting down
        pass


def _default_model_id(spec: str) -> str:
    path = Path(spec)
    if not path.is_dir():
        return spec
    path = path.resolve()
    return f"{path.parent.name}/{path.name}" if path.name == "model" and path.parent.name else path.name


def error_from_exception(error: BaseException) -> APIError:
    """Map an error raised while a request ran in the batcher to an HTTP error."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, CannotSpeak):
        return invalid(str(error), "modalities", "audio_output_unavailable")
    if isinstance(error, BatcherClosed):
        return APIError(503, str(error), None, "unavailable")
    if isinstance(error, (FutureTimeout, TimeoutError)):
        return APIError(504, "generation took longer than the server's request timeout", None, "timeout")
    if isinstance(error, ValueError):  # includes AudioError / VisionError: input the model could not use
        return invalid(f"the model could not process this request: {error}", None, "generation_failed")
    log.error("generation failed", exc_info=error)
    return APIError(500, f"internal error during generation ({type(error).__name__})", None, "internal_error")


# ---------------------------------------------------------------------- HTTP
def error_response(error: APIError, close: bool = False) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if close:  # the body was not read: the connection cannot carry another request
        headers["Connection"] = "close"
    return JSONResponse(error.body(), error.status, headers=headers)


class Gate:
    """ASGI middleware for what must happen before the app sees a request: the header size, the Host allow-list,
    the API key on /v1, the content type, and the body, read whole within its size and time
    limits (then replayed to the app). Nothing here parses or decodes the body."""

    def __init__(self, app, api: LyraAPI):
        self.app, self.api = app, api
        self.hosts = api.config.host_names()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        try:
            check_header_size(scope["headers"])
            check_host(headers.get("host"), self.hosts)
            if scope["path"].startswith("/v1/"):
                self.api.check_auth(headers.get("authorization"))
            if scope["method"] == "POST" and scope["path"].rstrip("/") == CHAT_PATH:
                content_type = headers.get("content-type", "").split(";")[0].strip().lower()
                if content_type != "application/json":
                    raise APIError(415, f"Content-Type must be application/json, got {content_type or 'none'}",
                                   None, "unsupported_media_type")
                body = await self._read_body(headers, receive)
                receive = _replay(body, receive)
        except APIError as error:
            await error_response(error, close=True)(scope, receive, send)
            return
        except ClientGone:
            return
        await self.app(scope, receive, send)

    async def _read_body(self, headers: Headers, receive: Callable) -> bytes:
        config = self.api.config
        limit = config.max_body_bytes
        length = headers.get("content-length")
        if length is not None:  # h11 has checked that it is ASCII digits
            check_body_size(int(length), limit)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.body_timeout_s
        chunks, total = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise APIError(408, f"the request body did not arrive within {config.body_timeout_s:g} s "
                                    f"(--body-timeout-s)", None, "request_timeout") from None
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            total += len(chunk)
            check_body_size(total, limit)  # chunked bodies have no Content-Length to check up front
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Callable) -> Callable:
    """An ASGI receive that gives the app the body already read, then the connection's own events."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict[str, Any]:
        return pending.pop() if pending else await receive()

    return replayed


class JSONErrorH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering malformed HTTP (bad framing, junk request lines, headers
    over the size limit) with an OpenAI error object instead of plain text."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(APIError(400, f"malformed HTTP request: {msg}", None, "bad_request").body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def build_app(api: LyraAPI) -> FastAPI:
    """The FastAPI app: routes, the OpenAI error shape for every error, and the `Gate`."""
    app = FastAPI(title="Lyra API", description="OpenAI-compatible chat completions for Lyra models.",
                  version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(first_error(error.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        route = f"{request.method} {request.url.path}"
        if error.status_code == 404:
            return error_response(APIError(404, f"no such endpoint: {route}", None, "not_found"))
        if error.status_code == 405:
            return error_response(APIError(405, f"method not allowed: {route}", None, "method_not_allowed"))
        if error.status_code == 400:  # FastAPI could not parse the body (not UTF-8, nested too deeply)
            return error_response(invalid(f"the request body is not valid JSON: {error.detail}", None,
                                          "invalid_json"))
        return error_response(APIError(error.status_code, str(error.detail), None, f"http_{error.status_code}"))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return error_response(APIError(500, f"internal error ({type(error).__name__})", None, "internal_error"))

    @app.get("/health")
    async def health() -> JSONResponse:
        status, payload = api.health()
        return JSONResponse(payload, status)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return api.models()

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != api.model_id:
            raise APIError(404, f"the model '{name}' does not exist", "model", "model_not_found")
        return api.model_card()

    @app.post(CHAT_PATH, response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        chat = api.check(body)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue = asyncio.Queue()
        on_token = (lambda token: _call_in_loop(loop, tokens.put_nowait, token)) if chat.stream else None
        job = await api.start(chat, on_token)
        headers = {"X-Request-Id": rid}
        if not chat.stream:
            try:
                completion = await api.answer(job, request.receive)
            except ClientGone:
                return JSONResponse(invalid("the client closed the connection").body(), 400)
            return JSONResponse(api.response(rid, created, job, completion), headers=headers)
        job.future.add_done_callback(lambda _: _call_in_loop(loop, tokens.put_nowait, _DONE))
        return StreamingResponse(api.events(chat, job, tokens, rid, created), media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})

    return Gate(app, api)


class LyraServer:
    """uvicorn serving `build_app(api)` on a socket bound at construction (so `port=0` has a port)."""

    def __init__(self, api: LyraAPI, host: str, port: int):
        self.api = api
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(2048)  # connections made before uvicorn runs wait in the backlog
        config = uvicorn.Config(build_app(api), http=JSONErrorH11Protocol, loop="asyncio", ws="none",
                                lifespan="off", log_config=None, log_level="warning", access_log=False,
                                timeout_keep_alive=5, timeout_graceful_shutdown=2, server_header=False,
                                h11_max_incomplete_event_size=MAX_HEADER_BYTES)
        self.uvicorn = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.socket.getsockname()[1]

    @property
    def url(self) -> str:
        host = self.socket.getsockname()[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def start(self, timeout: float = 30.0) -> "LyraServer":
        """Serve from a background thread (tests, benchmarks); returns once it accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="lyra-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def close(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(10)
        self.socket.close()
        self.api.close()


def create_server(model, tokenizer, info: dict[str, Any], config: ServerConfig | None = None) -> LyraServer:
    """An HTTP server for a loaded model, bound but not yet serving (`.start()` or `.serve_forever()`)."""
    config = config or ServerConfig()
    api = LyraAPI(model, tokenizer, info, config)
    try:
        return LyraServer(api, config.host, config.port)
    except BaseException:
        api.close()
        raise


# ---------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    defaults = ServerConfig()
    parser = argparse.ArgumentParser(prog="python -m lyra.serve.api", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint directory or preset (default: as lyra.chat)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    parser.add_argument("--host", default=defaults.host, help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=defaults.port, help="0 picks a free port")
    parser.add_argument("--api-key", default=os.environ.get("LYRA_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $LYRA_API_KEY)")
    parser.add_argument("--served-model-name", default=None, help="the model id clients use")
    parser.add_argument("--vocoder", default=None, metavar="SPEC",
                        help="override the vocoder the model records (a code HiFi-GAN folder, a Piper .onnx "
                             "voice or piper:<voice>); a model with a speech generator answers in speech when asked")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--no-encoder-thread", dest="encoder_thread", action="store_false",
                        help="run the speech and sound encoders in the decode loop's thread, not in one of their "
                             "own beside it (for a machine with one core)")
    parser.add_argument("--max-body-mb", type=float, default=defaults.max_body_mb)
    parser.add_argument("--max-text-chars", type=int, default=defaults.max_text_chars,
                        help="characters of text per request, checked before tokenising")
    parser.add_argument("--max-audio-seconds", type=float, default=defaults.max_audio_seconds)
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--max-video-seconds", type=float, default=defaults.max_video_seconds)
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens_limit)
    parser.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent,
                        help="requests in flight before the server answers 429")
    parser.add_argument("--media-root", action="append", default=[], metavar="DIR",
                        help="serve local image paths and file:// URLs, only for regular files under DIR "
                             "(repeatable; default: local files are closed)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="accept this Host header name besides the loopback names and the bound address "
                             "(repeatable; '*' accepts any)")
    parser.add_argument("--body-timeout-s", type=float, default=defaults.body_timeout_s,
                        help="time to receive a request body")
    parser.add_argument("--prepare-timeout-s", type=float, default=defaults.prepare_timeout_s,
                        help="time to read, decode and tokenise a request's inputs")
    parser.add_argument("--request-timeout-s", type=float, default=defaults.request_timeout_s,
                        help="time to generate an answer")
    parser.add_argument("--log-level", default="INFO")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    for name in ("max_batch_size", "max_concurrent", "default_max_tokens", "max_tokens_limit", "max_image_pixels",
                 "max_text_chars"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_body_mb", "max_audio_seconds", "max_video_seconds"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    for name in ("body_timeout_s", "prepare_timeout_s", "request_timeout_s"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    for root in args.media_root:
        if not Path(root).is_dir():
            raise ValueError(f"--media-root {root}: not a directory")
    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or None, served_model_name=args.served_model_name,
        max_batch_size=args.max_batch_size, encoder_thread=args.encoder_thread, max_body_mb=args.max_body_mb,
        max_text_chars=args.max_text_chars, max_audio_seconds=args.max_audio_seconds,
        max_image_pixels=args.max_image_pixels, max_video_seconds=args.max_video_seconds,
        default_max_tokens=args.default_max_tokens, max_tokens_limit=args.max_tokens_limit,
        max_concurrent=args.max_concurrent, media_roots=args.media_root, allowed_hosts=args.allowed_host,
        body_timeout_s=args.body_timeout_s, prepare_timeout_s=args.prepare_timeout_s,
        request_timeout_s=args.request_timeout_s,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.getLevelName(args.log_level.upper())
    if not isinstance(level, int):
        parser.error(f"unknown --log-level {args.log_level!r}; use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        config = config_from_args(args)
        model, tokenizer, info = load_model(args.model, args.device, args.dtype)
        attach_vocoder(model, args.vocoder, required=False)
        server = create_server(model, tokenizer, info, config)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not is_loopback(config.host) and not config.api_key:
        print(f"warning: listening on {config.host} without --api-key; anyone who can reach it can use it",
              file=sys.stderr)
    if info["untrained"]:
        print(f"note: '{info['model']}' is a preset with untrained weights; its answers are noise.", file=sys.stderr)
    print(f"Lyra API serving '{server.api.model_id}' at {server.url}/v1 (continuous batching, "
          f"batch <= {config.max_batch_size})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.socket.close()
        server.api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
