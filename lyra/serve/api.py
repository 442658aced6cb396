"""An OpenAI-compatible HTTP API for Lyra, with dynamic batching.

    python -m lyra.serve.api --model outputs/nano/model [--host 127.0.0.1] [--port 8000]
                             [--api-key KEY] [--max-batch-size 8] [--max-wait-ms 10]

Endpoints (docs/api.md has the full request format and client examples):

* `POST /v1/chat/completions`: system / developer / user / assistant messages whose
  content is a string or a list of parts: `text`, `image_url` (a `data:` URL or a local
  file path; remote http(s) URLs are refused), `input_audio` (speech: `{"data": base64,
  "format": "wav"|"mp3"|"flac"}`), and two Lyra extensions in the same style,
  `input_sound` (non-speech audio) and `input_video` (`{"data": base64, "format":
  "mp4"|"webm"|"mov"|"mkv"|"avi"}`, its frames). `stream: true` answers with
  server-sent events ending in `data: [DONE]`; `modalities: ["text", "audio"]` adds a
  base64 wav in `message.audio` when the model can speak. Greedy by default
  (`temperature` 0); `max_tokens` / `max_completion_tokens`, `temperature`, `top_p`.
* `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` (no key needed).

Every error is an OpenAI error object `{"error": {"message", "type", "param", "code"}}`
with a 4xx status for anything the client can fix: malformed JSON, unknown fields (the
schema is strict), bad base64, unsupported or undecodable media, media over the
configured caps, a body over `--max-body-mb`, a missing or wrong API key (401).

Threads: `ThreadingHTTPServer` gives each connection a thread, which parses the request
and decodes and preprocesses its media; only requests that passed all of that reach the
`DynamicBatcher`, whose single worker thread owns the model.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import queue
import re
import socket
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import unquote, urlsplit

import numpy as np
import soundfile as sf
from PIL import Image

from lyra.data.audio import AudioError
from lyra.data.vision import VisionError, VisionLimits, sample_frame_indices
from lyra.inference import Media, attach_vocoder, load_model
from lyra.model import mlora
from lyra.processing import PLACEHOLDER_PATTERN, LyraProcessor, ProcessedSample
from lyra.serve.batcher import BatchKey, BatcherClosed, Completion, DynamicBatcher, Job

log = logging.getLogger("lyra.serve")

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what PIL may decode here
IMAGE_MIME_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp"}
AUDIO_FORMATS = {"wav": {"WAV", "WAVEX", "RF64"}, "mp3": {"MP3", "MPEG"}, "flac": {"FLAC"}}  # -> soundfile's names
VIDEO_FORMATS = {"mp4": "mp4", "mov": "mov", "webm": "webm", "mkv": "matroska", "avi": "avi"}  # -> PyAV demuxer
AUDIO_OUTPUT_FORMATS = ("wav",)
MAX_MEDIA_ITEMS = 32  # media parts per request
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384000  # Hz accepted for audio input
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

REQUEST_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                  "temperature", "top_p", "n", "modalities", "audio", "user"}
MESSAGE_FIELDS = {"role", "content", "name"}
PART_FIELDS = {"text": {"type", "text"}, "image_url": {"type", "image_url"}, "input_audio": {"type", "input_audio"},
               "input_sound": {"type", "input_sound"}, "input_video": {"type", "input_video"}}
PART_OBJECT_FIELDS = {"image_url": {"url", "detail"}, "input_audio": {"data", "format"},
                      "input_sound": {"data", "format"}, "input_video": {"data", "format"}}
PART_KIND = {"image_url": "image", "input_audio": "speech", "input_sound": "sound", "input_video": "video"}


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered with `status` and an OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.close = close  # the request body was not read: the connection cannot be reused

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


class CannotSpeak(Exception):
    """Audio output was asked of a model without a speech generator."""


def cannot_speak_message(model_id: str) -> str:
    return (f"this model cannot speak: '{model_id}' has no speech generator and vocoder (stage 4 of the recipe); "
            f"ask for modalities [\"text\"]")


# ---------------------------------------------------------------------- configuration
@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the preset name or checkpoint directory name
    max_batch_size: int = 8
    max_wait_ms: float = 10.0
    max_body_mb: float = 64.0
    max_audio_seconds: float = 600.0  # per speech / sound input (the model config may cap lower)
    max_image_pixels: int = 4096 * 4096  # width x height of an input image or video frame, before resizing
    max_video_seconds: float = 120.0
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_concurrent: int = 64  # requests being prepared, queued or generated; more get 429
    media_roots: list[str] = field(default_factory=list)  # local paths must lie inside one of these
    allow_local_files: bool | None = None  # None: allowed when bound to a loopback address
    request_timeout_s: float = 600.0
    vision_limits: VisionLimits = field(default_factory=VisionLimits)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def local_files_allowed(self) -> bool:
        if self.allow_local_files is not None:
            return self.allow_local_files
        return bool(self.media_roots) or is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------- request schema
@dataclass
class MediaRef:
    """One media part of a request, validated but not yet decoded."""

    kind: str  # image | video | speech | sound
    param: str  # where it is in the request, for errors
    data: bytes | None = None
    path: Path | None = None
    format: str | None = None


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]  # processor-ready: one placeholder per media part
    media: list[MediaRef]
    max_tokens: int
    stream: bool = False
    include_usage: bool = False
    temperature: float = 0.0
    top_p: float | None = None
    want_audio: bool = False
    audio_format: str = "wav"


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def _get(obj: dict, key: str, kind: str, param: str, required: bool = False, nullable: bool = True) -> Any:
    """`obj[key]` checked against a JSON type; None when absent (or null and allowed)."""
    if key not in obj:
        if required:
            raise invalid(f"missing required parameter '{param}'", param, "missing_required_parameter")
        return None
    value = obj[key]
    if value is None:
        if nullable and not required:
            return None
        raise invalid(f"'{param}' must not be null", param, "invalid_type")
    ok = {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
    }[kind]
    if not ok:
        raise invalid(f"'{param}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, got {_type_name(value)}",
                      param, "invalid_type")
    if kind == "number" and not math.isfinite(value):
        raise invalid(f"'{param}' must be a finite number", param)
    return value


def _no_unknown(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        name = unknown[0]
        param = f"{where}.{name}" if where else name
        raise invalid(f"unknown parameter '{param}'; allowed here: {', '.join(sorted(allowed))}", param,
                      "unknown_parameter")


def decode_base64(text: str, param: str) -> bytes:
    cleaned = re.sub(r"[\r\n\t ]", "", text)
    try:
        data = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as error:
        raise invalid(f"'{param}' is not valid base64: {error}", param, "invalid_base64") from None
    if not data:
        raise invalid(f"'{param}' is empty", param, "invalid_base64")
    return data


DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),(.*)\Z", re.S)


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise invalid(f"the request body is not UTF-8: {error}", None, "invalid_json") from None

    def reject_constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(text, parse_constant=reject_constant)
    except RecursionError:
        raise invalid("the request body is nested too deeply", None, "invalid_json") from None
    except ValueError as error:
        raise invalid(f"the request body is not valid JSON: {error}", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"the request body must be a JSON object, got {_type_name(data)}", None, "invalid_json")
    return data


def parse_chat_request(data: dict[str, Any], config: ServerConfig) -> ChatRequest:
    """Validate a chat completion request (strictly: unknown fields are errors)."""
    _no_unknown(data, REQUEST_FIELDS, "")
    model = _get(data, "model", "string", "model", required=True)
    messages, media = _parse_messages(_get(data, "messages", "array", "messages", required=True), config)

    max_tokens = _get(data, "max_tokens", "integer", "max_tokens")
    max_completion = _get(data, "max_completion_tokens", "integer", "max_completion_tokens")
    if max_tokens is not None and max_completion is not None:
        raise invalid("give either 'max_tokens' or 'max_completion_tokens', not both", "max_tokens")
    limit_param = "max_completion_tokens" if max_completion is not None else "max_tokens"
    limit = max_completion if max_completion is not None else max_tokens
    if limit is None:
        limit = config.default_max_tokens
    elif not 1 <= limit <= config.max_tokens_limit:
        raise invalid(f"'{limit_param}' must be between 1 and {config.max_tokens_limit}, got {limit}", limit_param)

    temperature = _get(data, "temperature", "number", "temperature")
    temperature = 0.0 if temperature is None else float(temperature)
    if not 0.0 <= temperature <= 2.0:
        raise invalid(f"'temperature' must be between 0 and 2, got {temperature}", "temperature")
    top_p = _get(data, "top_p", "number", "top_p")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise invalid(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    n = _get(data, "n", "integer", "n")
    if n is not None and n != 1:
        raise invalid("only n=1 is supported", "n")
    _get(data, "user", "string", "user")

    stream = bool(_get(data, "stream", "boolean", "stream"))
    include_usage = False
    options = _get(data, "stream_options", "object", "stream_options")
    if options is not None:
        if not stream:
            raise invalid("'stream_options' is only allowed with stream: true", "stream_options")
        _no_unknown(options, {"include_usage"}, "stream_options")
        include_usage = bool(_get(options, "include_usage", "boolean", "stream_options.include_usage"))

    modalities = _get(data, "modalities", "array", "modalities")
    want_audio = False
    if modalities is not None:
        for i, item in enumerate(modalities):
            if item not in ("text", "audio"):
                raise invalid(f"'modalities[{i}]' must be \"text\" or \"audio\", got {item!r}", f"modalities[{i}]")
        if "text" not in modalities or len(set(modalities)) != len(modalities):
            raise invalid('\'modalities\' must be ["text"] or ["text", "audio"]', "modalities")
        want_audio = "audio" in modalities
    audio_format = "wav"
    audio = _get(data, "audio", "object", "audio")
    if audio is not None:
        if not want_audio:
            raise invalid("'audio' is only used with modalities [\"text\", \"audio\"]", "audio")
        _no_unknown(audio, {"voice", "format"}, "audio")
        _get(audio, "voice", "string", "audio.voice")  # one voice for now; accepted and ignored
        audio_format = _get(audio, "format", "string", "audio.format") or "wav"
        if audio_format not in AUDIO_OUTPUT_FORMATS:
            raise invalid(f"'audio.format' must be one of {', '.join(AUDIO_OUTPUT_FORMATS)}, got {audio_format!r}",
                          "audio.format", "unsupported_format")
    return ChatRequest(model=model, messages=messages, media=media, max_tokens=limit, stream=stream,
                       include_usage=include_usage, temperature=temperature, top_p=top_p, want_audio=want_audio,
                       audio_format=audio_format)


def _parse_messages(raw: list, config: ServerConfig) -> tuple[list[dict[str, str]], list[MediaRef]]:
    if not raw:
        raise invalid("'messages' must hold at least one message", "messages")
    messages: list[dict[str, str]] = []
    media: list[MediaRef] = []
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"'{where}' must be an object, got {_type_name(message)}", where, "invalid_type")
        _no_unknown(message, MESSAGE_FIELDS, where)
        role = _get(message, "role", "string", f"{where}.role", required=True)
        if role not in ROLES:
            raise invalid(f"'{where}.role' must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        _get(message, "name", "string", f"{where}.name")
        content = message.get("content")
        if isinstance(content, str):
            _check_text(content, f"{where}.content")
            text = content
        elif isinstance(content, list):
            text = _parse_parts(content, ROLES[role], f"{where}.content", media, config)
        else:
            raise invalid(f"'{where}.content' must be a string or an array of content parts, got "
                          f"{_type_name(content)}", f"{where}.content", "invalid_type")
        messages.append({"role": ROLES[role], "content": text})
    if messages[-1]["role"] != "user":
        raise invalid("the last message must be a user message", f"messages[{len(raw) - 1}].role")
    if len(media) > MAX_MEDIA_ITEMS:
        raise invalid(f"at most {MAX_MEDIA_ITEMS} media parts per request, got {len(media)}", "messages",
                      "too_many_media")
    return messages, media


def _check_text(text: str, param: str) -> None:
    found = PLACEHOLDER_PATTERN.search(text)
    if found:
        raise invalid(f"'{param}' contains {found.group(0)!r}, which is reserved for media; send media as "
                      f"content parts instead", param)


def _parse_parts(parts: list, role: str, where: str, media: list[MediaRef], config: ServerConfig) -> str:
    if not parts:
        raise invalid(f"'{where}' must hold at least one content part", where)
    pieces: list[str] = []
    for j, part in enumerate(parts):
        param = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise invalid(f"'{param}' must be an object, got {_type_name(part)}", param, "invalid_type")
        kind = _get(part, "type", "string", f"{param}.type", required=True)
        if kind not in PART_FIELDS:
            raise invalid(f"'{param}.type' must be one of {', '.join(PART_FIELDS)}, got {kind!r}", f"{param}.type")
        _no_unknown(part, PART_FIELDS[kind], param)
        if kind == "text":
            text = _get(part, "text", "string", f"{param}.text", required=True)
            _check_text(text, f"{param}.text")
            pieces.append(text)
            continue
        if role != "user":
            raise invalid(f"'{param}': {role} messages may only hold text parts; put media in user messages", param)
        body = _get(part, kind, "object", f"{param}.{kind}", required=True)
        _no_unknown(body, PART_OBJECT_FIELDS[kind], f"{param}.{kind}")
        if kind == "image_url":
            ref = _image_ref(body, f"{param}.image_url", config)
        else:
            ref = _data_ref(body, PART_KIND[kind], f"{param}.{kind}")
        media.append(ref)
        pieces.append(f"<{ref.kind}>")
    return "\n".join(pieces)


def _image_ref(body: dict, where: str, config: ServerConfig) -> MediaRef:
    url = _get(body, "url", "string", f"{where}.url", required=True)
    detail = _get(body, "detail", "string", f"{where}.detail")  # accepted for compatibility; the pixel budget rules
    if detail is not None and detail not in ("auto", "low", "high"):
        raise invalid(f"'{where}.detail' must be auto, low or high, got {detail!r}", f"{where}.detail")
    param = f"{where}.url"
    if url.startswith("data:"):
        match = DATA_URL.match(url)
        if match is None:
            raise invalid(f"'{param}' is not a valid data URL (data:image/png;base64,...)", param, "invalid_url")
        mime, params, payload = match.group(1).strip().lower(), match.group(2).lower(), match.group(3)
        if "base64" not in [p.strip() for p in params.split(";")]:
            raise invalid(f"'{param}': only base64 data URLs are supported", param, "invalid_url")
        if mime not in IMAGE_MIME_TYPES:
            raise invalid(f"'{param}': unsupported image type {mime or '(none)'!r}; use "
                          f"{', '.join(sorted(IMAGE_MIME_TYPES))}", param, "unsupported_format")
        return MediaRef("image", param, data=decode_base64(payload, param))
    try:
        scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    except ValueError:
        raise invalid(f"'{param}' is not a valid URL", param, "invalid_url") from None
    if scheme in ("http", "https"):
        raise invalid(f"'{param}': remote fetching is disabled; send the image inline as a data: URL", param,
                      "remote_fetching_disabled")
    if scheme not in ("", "file"):
        raise invalid(f"'{param}': unsupported URL scheme {scheme!r}; use a data: URL or a local file path",
                      param, "invalid_url")
    return MediaRef("image", param, path=_local_path(url, scheme, param, config))


def _local_path(url: str, scheme: str, param: str, config: ServerConfig) -> Path:
    if not config.local_files_allowed():
        raise invalid(f"'{param}': local file paths are disabled on this server; send a data: URL", param,
                      "local_files_disabled")
    if scheme == "file":
        parts = urlsplit(url)  # parsed once already
        if parts.netloc not in ("", "localhost"):
            raise invalid(f"'{param}': file URLs must name a local file (file:///path)", param, "invalid_url")
        text = unquote(parts.path)
    else:
        text = url
    if not text or "\x00" in text:
        raise invalid(f"'{param}' is not a usable file path", param, "invalid_url")
    try:
        path = Path(text).resolve()
    except (OSError, RuntimeError, ValueError):
        raise invalid(f"'{param}' is not a usable file path", param, "invalid_url") from None
    if config.media_roots and not any(path.is_relative_to(Path(root).resolve()) for root in config.media_roots):
        raise APIError(403, f"'{param}': {path} is outside the allowed media directories", param,
                       "path_not_allowed", type="permission_error")
    return path


def _data_ref(body: dict, kind: str, where: str) -> MediaRef:
    data = _get(body, "data", "string", f"{where}.data", required=True)
    fmt = _get(body, "format", "string", f"{where}.format", required=True)
    allowed = VIDEO_FORMATS if kind == "video" else AUDIO_FORMATS
    if fmt not in allowed:
        raise invalid(f"'{where}.format' must be one of {', '.join(allowed)}, got {fmt!r}", f"{where}.format",
                      "unsupported_format")
    return MediaRef(kind, f"{where}.data", data=decode_base64(data, f"{where}.data"), format=fmt)


# ---------------------------------------------------------------------- media decoding
def decode_image(data: bytes, max_pixels: int, param: str):
    """Image bytes -> RGB PIL image, refusing unsupported formats and oversized images."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS))
            width, height = image.size
            if width * height > max_pixels:
                raise APIError(400, f"'{param}': the image is {width}x{height} = {width * height:,} pixels, over "
                                    f"this server's limit of {max_pixels:,}", param, "image_too_large")
            image.load()
            return image.convert("RGB")
    except APIError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(400, f"'{param}': the image is too large to decode safely", param, "image_too_large") from None
    except Exception as error:  # PIL raises many types for bad data
        raise invalid(f"'{param}': cannot decode the image ({type(error).__name__}: {error}); use "
                      f"{', '.join(IMAGE_FORMATS)}", param, "invalid_image") from None


def read_local_file(path: Path, max_bytes: int, param: str) -> bytes:
    try:
        if not path.is_file():
            raise APIError(400, f"'{param}': file not found: {path}", param, "file_not_found")
        size = path.stat().st_size
        if size > max_bytes:
            raise APIError(413, f"'{param}': {path} is {size:,} bytes, over the limit of {max_bytes:,}", param,
                           "file_too_large")
        return path.read_bytes()
    except OSError as error:
        raise invalid(f"'{param}': cannot read {path}: {error.strerror or error}", param, "file_unreadable") from None


def decode_audio(data: bytes, fmt: str, max_seconds: float, param: str) -> tuple[np.ndarray, int]:
    """Audio bytes -> (samples [T] or [T, C] float32, sample rate), duration checked before decoding."""
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as error:
        raise invalid(f"'{param}': cannot decode the {fmt} audio ({error})", param, "invalid_audio") from None
    if info.format not in AUDIO_FORMATS[fmt]:
        raise invalid(f"'{param}': the format says {fmt} but the data is {info.format}", param, "format_mismatch")
    if info.frames <= 0:
        raise invalid(f"'{param}': the audio holds no samples", param, "invalid_audio")
    if not MIN_SAMPLE_RATE <= info.samplerate <= MAX_SAMPLE_RATE:
        raise invalid(f"'{param}': the sample rate {info.samplerate} Hz is outside {MIN_SAMPLE_RATE}-"
                      f"{MAX_SAMPLE_RATE} Hz", param, "invalid_audio")
    seconds = info.frames / info.samplerate
    if seconds > max_seconds:
        raise invalid(f"'{param}': the audio is {seconds:.1f} s long, over the limit of {max_seconds:g} s", param,
                      "audio_too_long")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    except Exception as error:
        raise invalid(f"'{param}': cannot decode the {fmt} audio ({error})", param, "invalid_audio") from None
    if samples.size == 0:
        raise invalid(f"'{param}': the audio holds no samples", param, "invalid_audio")
    if samples.shape[0] / rate > max_seconds:  # the header may understate the length
        raise invalid(f"'{param}': the audio is {samples.shape[0] / rate:.1f} s long, over the limit of "
                      f"{max_seconds:g} s", param, "audio_too_long")
    return samples, int(rate)


def decode_video(data: bytes, fmt: str, config: ServerConfig, temporal_patch: int, param: str) -> list:
    """Video bytes -> the frames the model sees (PIL), sampled at the configured fps.

    Frames are counted from the demuxed packets first (no decoding), so the length cap
    applies before any work, and only the sampled frames are kept while decoding.
    """
    import av

    limits = config.vision_limits
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            demuxers = container.format.name.split(",")
            if VIDEO_FORMATS[fmt] not in demuxers:
                raise invalid(f"'{param}': the format says {fmt} but the data is {container.format.name}", param,
                              "format_mismatch")
            if not container.streams.video:
                raise invalid(f"'{param}': the file has no video stream", param, "invalid_video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > config.max_image_pixels:
                raise invalid(f"'{param}': frames are {width}x{height}, over the limit of "
                              f"{config.max_image_pixels:,} pixels", param, "video_too_large")
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            frames = sum(1 for packet in container.demux(stream) if packet.size)
            seconds = max(frames / fps, (container.duration or 0) / 1e6)
        if frames == 0:
            raise invalid(f"'{param}': the video holds no frames", param, "invalid_video")
        if seconds > config.max_video_seconds:
            raise invalid(f"'{param}': the video is {seconds:.1f} s long, over the limit of "
                          f"{config.max_video_seconds:g} s", param, "video_too_long")
        indices = sample_frame_indices(frames, fps, limits, temporal_patch)
        wanted = set(indices)
        kept: dict[int, Any] = {}
        with av.open(io.BytesIO(data), mode="r") as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if i in wanted:
                    kept[i] = frame.to_image()
                if i >= indices[-1]:
                    break
    except APIError:
        raise
    except Exception as error:  # PyAV raises many types for bad data
        raise invalid(f"'{param}': cannot decode the {fmt} video ({type(error).__name__}: {error})", param,
                      "invalid_video") from None
    if not kept:
        raise invalid(f"'{param}': no frame of the video could be decoded", param, "invalid_video")
    last = kept[min(kept)]
    sampled = []
    for i in indices:  # a stream with fewer frames than packets repeats its last frame
        last = kept.get(i, last)
        sampled.append(last)
    return sampled


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
    """Request handling independent of HTTP: validation, preparation, batching, responses."""

    def __init__(self, model, tokenizer, info: dict[str, Any], config: ServerConfig):
        self.model, self.tokenizer, self.info, self.config = model, tokenizer, info, config
        self.model_id = config.served_model_name or _default_model_id(info.get("model", "lyra"))
        self.created = int(time.time())
        self.processor = LyraProcessor(tokenizer, model.config, config.vision_limits)
        self.batcher = DynamicBatcher(model, config.max_batch_size, config.max_wait_ms).start()
        self.slots = threading.BoundedSemaphore(config.max_concurrent)
        self.tokenizer_lock = threading.Lock()  # fast tokenizers must not be borrowed from two threads at once

    def close(self) -> None:
        self.batcher.stop()

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
            "can_speak": can_speak(self.model), "queued": self.batcher.queued,
            "max_batch_size": self.batcher.max_batch_size, "max_wait_ms": self.config.max_wait_ms,
            "batches": self.batcher.stats.as_dict(),
        }

    # ------------------------------------------------------------------ chat completions
    def parse(self, body: bytes) -> ChatRequest:
        request = parse_chat_request(parse_json(body), self.config)
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
        for ref in request.media:
            data = ref.data if ref.data is not None else read_local_file(ref.path, config.max_body_bytes, ref.param)
            if ref.kind == "image":
                media.images.append(decode_image(data, config.max_image_pixels, ref.param))
            elif ref.kind == "video":
                media.videos.append(decode_video(data, ref.format, config,
                                                 self.model.config.vision.temporal_patch_size, ref.param))
            else:
                getattr(media, ref.kind).append(decode_audio(data, ref.format, audio_caps[ref.kind], ref.param))
        return media

    def build_sample(self, messages: list[dict[str, str]], media: Media) -> ProcessedSample:
        try:
            with self.tokenizer_lock:
                return self.processor(messages, images=media.images, videos=media.videos, speech=media.speech,
                                      sound=media.sound)
        except (AudioError, VisionError, ValueError) as error:
            raise invalid(f"the request cannot be turned into model inputs: {error}", "messages",
                          "invalid_media") from None

    def prepare(self, request: ChatRequest, on_token: Callable[[int], None] | None = None) -> Job:
        """Decode, check and tokenise one request into a batcher job (all its 4xx happen here)."""
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
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lyra-serve/0.1"
    sys_version = ""
    timeout = 60  # seconds a connection may sit idle or trickle a request
    disable_nagle_algorithm = True  # small writes (headers, SSE events) go out at once

    server: "LyraHTTPServer"

    @property
    def api(self) -> LyraAPI:
        return self.server.api

    # -- plumbing
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Protocol-level errors from http.server (bad request line, headers too long, ...) as JSON."""
        self.close_connection = True
        try:
            self._send_json(code, APIError(code, message or explain or "bad request", None, "bad_request").body(),
                            close=True)
        except OSError:
            pass

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # any other method: 405 rather than http.server's 501
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self._error(APIError(405, f"method {self.command} is not allowed on {self._route()}", None,
                             "method_not_allowed", close=True))

    def _send_json(self, status: int, payload: dict[str, Any], close: bool = False,
                   headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode("utf-8")
        close = close or not self._body_read  # unread body bytes would be taken for the next request
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if close:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, error: APIError) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        self._send_json(error.status, error.body(), close=error.close, headers=headers)

    _body_read = True

    # -- routes
    def do_HEAD(self) -> None:
        self._method_not_allowed()

    def _route(self) -> str:
        try:
            return urlsplit(self.path).path.rstrip("/") or "/"
        except ValueError:
            return self.path

    def do_GET(self) -> None:
        self._body_read = self.headers.get("Content-Length", "0").strip() in ("", "0")
        path = self._route()
        try:
            if path == "/health":
                status, payload = self.api.health()
                self._send_json(status, payload)
                return
            if path.startswith("/v1/"):
                self.api.check_auth(self.headers.get("Authorization"))
            if path == "/v1/models":
                self._send_json(200, self.api.models())
            elif path.startswith("/v1/models/"):
                name = unquote(path[len("/v1/models/"):])
                if name != self.api.model_id:
                    raise APIError(404, f"the model '{name}' does not exist", "model", "model_not_found")
                self._send_json(200, self.api.model_card())
            elif path == "/v1/chat/completions":
                raise APIError(405, "use POST for /v1/chat/completions", None, "method_not_allowed")
            else:
                raise APIError(404, f"no such endpoint: GET {path}", None, "not_found")
        except APIError as error:
            self._error(error)
        except Exception as error:  # a bug: answer 500, keep serving
            log.exception("GET %s failed", path)
            self._error(APIError(500, f"internal error ({type(error).__name__})", None, "internal_error"))

    def do_POST(self) -> None:
        self._body_read = False
        path = self._route()
        acquired = False
        try:
            if path != "/v1/chat/completions":
                if path in ("/v1/models", "/health") or path.startswith("/v1/models/"):
                    raise APIError(405, f"use GET for {path}", None, "method_not_allowed")
                raise APIError(404, f"no such endpoint: POST {path}", None, "not_found")
            self.api.check_auth(self.headers.get("Authorization"))
            if self.headers.get_content_type() != "application/json":
                raise APIError(415, f"Content-Type must be application/json, got {self.headers.get_content_type()}",
                               None, "unsupported_media_type")
            body = self._read_body()
            request = self.api.parse(body)
            if not self.api.slots.acquire(blocking=False):
                raise APIError(429, "the server is busy; retry later", None, "rate_limit_exceeded",
                               type="rate_limit_error")
            acquired = True
            self._chat(request)
        except APIError as error:
            self._error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # a bug: answer 500, keep serving
            log.exception("POST %s failed", path)
            self._error(APIError(500, f"internal error ({type(error).__name__})", None, "internal_error"))
        finally:
            if acquired:
                self.api.slots.release()

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "chunked request bodies are not supported; send Content-Length", None,
                           "length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise APIError(411, "a Content-Length header is required", None, "length_required")
        if not length.strip().isdigit():
            raise APIError(400, f"invalid Content-Length {length!r}", None, "invalid_request")
        size = int(length)
        limit = self.api.config.max_body_bytes
        if size > limit:
            raise APIError(413, f"the request body is {size:,} bytes, over this server's limit of {limit:,} "
                                f"(--max-body-mb)", None, "request_too_large")
        body = self.rfile.read(size)
        if len(body) != size:
            raise APIError(400, "the request body ended early", None, "invalid_request", close=True)
        self._body_read = True
        return body

    def _chat(self, request: ChatRequest) -> None:
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        api = self.api
        tokens: queue.Queue = queue.Queue()
        job = api.prepare(request, on_token=tokens.put if request.stream else None)
        api.submit(job)
        timeout = api.config.request_timeout_s
        if not request.stream:
            try:
                completion = job.future.result(timeout)
            except BaseException as error:
                job.future.cancel()
                raise error_from_exception(error) from None
            self._send_json(200, api.response(rid, created, job, completion), headers={"X-Request-Id": rid})
            return
        done = object()
        job.future.add_done_callback(lambda _: tokens.put(done))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("X-Request-Id", rid)
        self.end_headers()
        try:
            self._stream(request, job, tokens, done, rid, created, timeout)
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            job.future.cancel()  # the client went away; stop streaming, the batch goes on
            self.close_connection = True
        except Exception:  # headers are out: no second response, just end the connection
            log.exception("streaming %s failed", rid)
            job.future.cancel()
            self.close_connection = True

    def _stream(self, request: ChatRequest, job: Job, tokens: queue.Queue, done: object, rid: str, created: int,
                timeout: float) -> None:
        api = self.api
        self._event(api.chunk(rid, created, {"role": "assistant", "content": "", "refusal": None}))
        received: list[int] = []
        sent = ""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = tokens.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                item = None
            if item is done or item is None:
                break
            received.append(item)
            text = api.decode(received)
            if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
                self._event(api.chunk(rid, created, {"content": text[len(sent):]}))
                sent = text
        try:
            completion = job.future.result(timeout=0)
        except BaseException as error:
            job.future.cancel()
            self._event(error_from_exception(error).body())
            self._event_raw(b"data: [DONE]\n\n")
            self._end_chunks()
            return
        text = api.decode(completion.token_ids)
        if len(text) > len(sent) and text.startswith(sent):
            self._event(api.chunk(rid, created, {"content": text[len(sent):]}))
        audio = api.audio_object(completion, text, created)
        if audio is not None:
            self._event(api.chunk(rid, created, {"audio": audio}))
        self._event(api.chunk(rid, created, {}, completion.finish_reason))
        if request.include_usage:
            usage = api.chunk(rid, created, {})
            usage["choices"], usage["usage"] = [], api.usage(job, completion)
            self._event(usage)
        self._event_raw(b"data: [DONE]\n\n")
        self._end_chunks()

    def _event(self, payload: dict[str, Any]) -> None:
        self._event_raw(b"data: " + json.dumps(payload).encode("utf-8") + b"\n\n")

    def _event_raw(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _end_chunks(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class LyraHTTPServer(ThreadingHTTPServer):
    """The HTTP server; `api` holds the model, batcher and configuration."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, api: LyraAPI, host: str, port: int):
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.api = api
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server_address[1]

    @property
    def url(self) -> str:
        host = self.server_address[0]
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self) -> "LyraHTTPServer":
        """Serve from a background thread (tests, benchmarks)."""
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="lyra-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(10)
        self.server_close()
        self.api.close()


def create_server(model, tokenizer, info: dict[str, Any], config: ServerConfig | None = None) -> LyraHTTPServer:
    """An HTTP server for a loaded model, bound but not yet serving (`.start()` or `.serve_forever()`)."""
    config = config or ServerConfig()
    api = LyraAPI(model, tokenizer, info, config)
    try:
        return LyraHTTPServer(api, config.host, config.port)
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
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="how long the first request of a batch waits for others")
    parser.add_argument("--max-body-mb", type=float, default=defaults.max_body_mb)
    parser.add_argument("--max-audio-seconds", type=float, default=defaults.max_audio_seconds)
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--max-video-seconds", type=float, default=defaults.max_video_seconds)
    parser.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens_limit)
    parser.add_argument("--max-concurrent", type=int, default=defaults.max_concurrent,
                        help="requests in flight before the server answers 429")
    parser.add_argument("--media-root", action="append", default=[], metavar="DIR",
                        help="local image paths must lie under DIR (repeatable)")
    parser.add_argument("--no-local-files", action="store_true", help="refuse local file paths in image_url")
    parser.add_argument("--log-level", default="INFO")
    return parser


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    for name in ("max_batch_size", "max_concurrent", "default_max_tokens", "max_tokens_limit", "max_image_pixels"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("max_wait_ms", "max_body_mb", "max_audio_seconds", "max_video_seconds"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key or None, served_model_name=args.served_model_name,
        max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms, max_body_mb=args.max_body_mb,
        max_audio_seconds=args.max_audio_seconds, max_image_pixels=args.max_image_pixels,
        max_video_seconds=args.max_video_seconds, default_max_tokens=args.default_max_tokens,
        max_tokens_limit=args.max_tokens_limit, max_concurrent=args.max_concurrent, media_roots=args.media_root,
        allow_local_files=False if args.no_local_files else None,
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
    print(f"Lyra API serving '{server.api.model_id}' at {server.url}/v1 (batch <= {config.max_batch_size}, "
          f"wait {config.max_wait_ms:g} ms)", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.api.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
