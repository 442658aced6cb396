"""The API server's configuration and the checks that run before any work.

Everything here is cheap and runs before a request is decoded, tokenised or queued:
the Host allow-list (against DNS rebinding), the body size, and the text length
(tokenising is the costly step, and it is serialised per tokenizer, so an unbounded
prompt would stall every other request; capping the characters first bounds how long
one request can hold it).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from lyra.data.vision import VisionLimits
from lyra.serve.schema import APIError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# all request headers together; also uvicorn's h11 limit, which applies only to headers that arrive in pieces
MAX_HEADER_BYTES = 16 * 1024


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None  # default: the preset name or checkpoint directory name
    max_batch_size: int = 8
    encoder_thread: bool = True  # audio encoders run in a thread of their own, beside the decode loop
    max_body_mb: float = 64.0
    max_text_chars: int = 262_144  # all text of a request together, checked before tokenising
    max_audio_seconds: float = 600.0  # per speech / sound input (the model config may cap lower)
    max_image_pixels: int = 4096 * 4096  # width x height of an input image or video frame, before resizing
    max_video_seconds: float = 120.0
    default_max_tokens: int = 256
    max_tokens_limit: int = 4096
    max_concurrent: int = 64  # requests being prepared, queued or generated; more get 429
    media_roots: list[str] = field(default_factory=list)  # local paths are read only under these
    allowed_hosts: list[str] = field(default_factory=list)  # Host names accepted besides the loopback ones
    body_timeout_s: float = 30.0  # to receive the whole request body
    prepare_timeout_s: float = 30.0  # to read, decode and tokenise a request's inputs
    request_timeout_s: float = 600.0  # to generate the answer
    vision_limits: VisionLimits = field(default_factory=VisionLimits)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def host_names(self) -> set[str]:
        """Host-header names (lower case, no port) this server answers to; '*' accepts any."""
        names = {*LOOPBACK_NAMES, *(name.lower() for name in self.allowed_hosts)}
        if self.host not in ("0.0.0.0", "::", ""):  # a concrete bound address is its own name
            names.add(self.host.lower())
        return names


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """'Example.COM:8000' -> 'example.com', '[::1]:80' -> '::1' (the Host header without its port)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def check_host(header: str | None, allowed: set[str]) -> None:
    """Refuse requests whose Host is not one of ours: a page that rebinds its own DNS name to
    127.0.0.1 still sends its own name, so this keeps web pages off a loopback server."""
    if "*" in allowed:
        return
    name = host_name(header or "")
    if name not in allowed:
        raise APIError(421, f"the Host header {header!r} is not one this server answers to; start it with "
                            f"--allowed-host NAME to accept that name", None, "host_not_allowed")


def check_header_size(headers: list[tuple[bytes, bytes]]) -> None:
    size = sum(len(name) + len(value) + 4 for name, value in headers)
    if size > MAX_HEADER_BYTES:
        raise APIError(431, f"the request headers are {size:,} bytes, over the limit of {MAX_HEADER_BYTES:,}", None,
                       "headers_too_large")


def check_body_size(size: int, limit: int) -> None:
    if size > limit:
        raise APIError(413, f"the request body is over this server's limit of {limit:,} bytes (--max-body-mb)",
                       None, "request_too_large")


def check_text_length(texts: list[str], limit: int) -> None:
    """All text of a request together, before it is tokenised."""
    total = sum(len(text) for text in texts)
    if total > limit:
        raise APIError(400, f"the request holds {total:,} characters of text, over this server's limit of "
                            f"{limit:,} (--max-text-chars)", "messages", "text_too_long")
