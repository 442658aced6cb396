"""Media of API requests: references to media parts, local files, and decoding with caps.

Every decoder reads the size first, from the container's header, and refuses oversized
input before decoding it (image pixels, audio seconds, video frame size and length), so
a small file that claims a huge image or a long recording costs nothing.

Local files are closed unless the server has a `--media-root`. Then only regular files
under a root are read: the path is resolved (symlinks included) before the check, `/proc`,
`/sys` and `/dev` are never read even under a root, the file is opened non-blocking (a
FIFO or a device cannot stall the open) and refused unless `fstat` says it is a regular
file, and the read is bounded in bytes and time. A missing file, a file outside the
roots and a file that is not regular all get the same error, so callers cannot probe
which paths exist.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
import soundfile as sf
from PIL import Image

from lyra.data.vision import VisionLimits, sample_frame_indices
from lyra.serve.schema import AUDIO_INPUT_FORMATS, VIDEO_INPUT_FORMATS, APIError, invalid

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what PIL may decode here
IMAGE_MIME_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp"}
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384000  # Hz accepted for audio input
NEVER_READ = (Path("/proc"), Path("/sys"), Path("/dev"))  # not even under a --media-root
READ_CHUNK = 1 << 20
DATA_URL = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),(.*)\Z", re.S)


@dataclass
class MediaRef:
    """One media part of a request, validated but not yet decoded."""

    kind: str  # image | video | speech | sound
    param: str  # where it is in the request, for errors
    data: bytes | None = None
    path: str | None = None  # a local path as the client gave it (read only under a media root)
    format: str | None = None


def decode_base64(text: str, param: str) -> bytes:
    cleaned = re.sub(r"[\r\n\t ]", "", text)
    try:
        data = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as error:
        raise invalid(f"'{param}' is not valid base64: {error}", param, "invalid_base64") from None
    if not data:
        raise invalid(f"'{param}' is empty", param, "invalid_base64")
    return data


def image_ref(url: str, param: str, local_files: bool) -> MediaRef:
    """An `image_url.url`: a base64 data URL, or (with a media root) a local path or file:// URL."""
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
        parts = urlsplit(url)
    except ValueError:
        raise invalid(f"'{param}' is not a valid URL", param, "invalid_url") from None
    scheme = parts.scheme.lower() if "://" in url else ""
    if scheme in ("http", "https"):
        raise invalid(f"'{param}': remote fetching is disabled; send the image inline as a data: URL", param,
                      "remote_fetching_disabled")
    if scheme not in ("", "file"):
        raise invalid(f"'{param}': unsupported URL scheme {scheme!r}; use a data: URL", param, "invalid_url")
    if not local_files:
        raise invalid(f"'{param}': local files are closed on this server (no --media-root); send a data: URL",
                      param, "local_files_disabled")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise invalid(f"'{param}': file URLs must name a local file (file:///path)", param, "invalid_url")
        path = unquote(parts.path)
    else:
        path = url
    if not path or "\x00" in path:
        raise invalid(f"'{param}' is not a usable file path", param, "invalid_url")
    return MediaRef("image", param, path=path)


def data_ref(data: str, fmt: str, kind: str, param: str) -> MediaRef:
    """An `input_audio` / `input_sound` / `input_video` part (its format checked by the schema)."""
    return MediaRef(kind, param, data=decode_base64(data, param), format=fmt)


# ---------------------------------------------------------------------- local files
def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def read_local_file(path: str, roots: list[str], max_bytes: int, timeout_s: float, param: str) -> bytes:
    """The bytes of a regular file under one of `roots`, read within `max_bytes` and `timeout_s`.

    Never blocks on open (O_NONBLOCK: a FIFO without a writer opens at once and is then
    refused by fstat) and gives one error for missing, outside, special or unreadable files.
    """
    unavailable = invalid(f"'{param}': there is no readable file at {path!r} under this server's media roots",
                          param, "file_not_found")
    try:
        resolved = os.path.realpath(path)
    except (OSError, ValueError):
        raise unavailable from None
    real_roots = [os.path.realpath(root) for root in roots]
    if not any(_inside(resolved, root) for root in real_roots) or any(
            _inside(resolved, str(blocked)) for blocked in NEVER_READ):
        raise unavailable
    deadline = time.monotonic() + timeout_s
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        raise unavailable from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise unavailable
        if info.st_size > max_bytes:
            raise APIError(413, f"'{param}': the file is {info.st_size:,} bytes, over the limit of {max_bytes:,}",
                           param, "file_too_large")
        chunks, total = [], 0
        while True:
            if time.monotonic() > deadline:
                raise unavailable
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:  # grew while being read
                raise APIError(413, f"'{param}': the file is over the limit of {max_bytes:,} bytes", param,
                               "file_too_large")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        raise unavailable from None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- decoding
def decode_image(data: bytes, max_pixels: int, param: str):
    """Image bytes -> RGB PIL image; the pixel count is read from the header before decoding."""
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


def decode_audio(data: bytes, fmt: str, max_seconds: float, param: str) -> tuple[np.ndarray, int]:
    """Audio bytes -> (samples [T] or [T, C] float32, sample rate), duration checked from the header first."""
    try:
        info = sf.info(io.BytesIO(data))
    except Exception as error:
        raise invalid(f"'{param}': cannot decode the {fmt} audio ({error})", param, "invalid_audio") from None
    if info.format not in AUDIO_INPUT_FORMATS[fmt]:
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
        # frames= caps the decode even when the header understates the length
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False,
                                frames=int(max_seconds * info.samplerate) + 1)
    except Exception as error:
        raise invalid(f"'{param}': cannot decode the {fmt} audio ({error})", param, "invalid_audio") from None
    if samples.size == 0:
        raise invalid(f"'{param}': the audio holds no samples", param, "invalid_audio")
    if samples.shape[0] / rate > max_seconds:
        raise invalid(f"'{param}': the audio is longer than the limit of {max_seconds:g} s", param,
                      "audio_too_long")
    return samples, int(rate)


def decode_video(data: bytes, fmt: str, limits: VisionLimits, max_pixels: int, max_seconds: float,
                 temporal_patch: int, param: str) -> list:
    """Video bytes -> the frames the model sees (PIL), sampled at `limits.video_fps`.

    The frame size comes from the stream header and the length from the demuxed packets
    (no decoding), so both caps apply before any work; only the sampled frames are kept.
    """
    import av

    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            demuxers = container.format.name.split(",")
            if VIDEO_INPUT_FORMATS[fmt] not in demuxers:
                raise invalid(f"'{param}': the format says {fmt} but the data is {container.format.name}", param,
                              "format_mismatch")
            if not container.streams.video:
                raise invalid(f"'{param}': the file has no video stream", param, "invalid_video")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise invalid(f"'{param}': frames are {width}x{height}, over the limit of {max_pixels:,} pixels",
                              param, "video_too_large")
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            frames = sum(1 for packet in container.demux(stream) if packet.size)
            seconds = max(frames / fps, (container.duration or 0) / 1e6)
        if frames == 0:
            raise invalid(f"'{param}': the video holds no frames", param, "invalid_video")
        if seconds > max_seconds:
            raise invalid(f"'{param}': the video is {seconds:.1f} s long, over the limit of {max_seconds:g} s",
                          param, "video_too_long")
        indices = sample_frame_indices(frames, fps, limits, temporal_patch)
        wanted = set(indices)
        kept: dict[int, Any] = {}
        with av.open(io.BytesIO(data), mode="r") as container:
            for i, frame in enumerate(container.decode(container.streams.video[0])):
                if frame.width * frame.height > max_pixels:  # a stream may change size after its header
                    raise invalid(f"'{param}': a frame is {frame.width}x{frame.height}, over the limit of "
                                  f"{max_pixels:,} pixels", param, "video_too_large")
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
