"""A seeded fuzz of the API server over raw sockets, and the slot time limits (tiny model).

Every malformed request must get a 4xx with an OpenAI error object: broken framing
(h11 does it), schema errors and unknown fields, special and absent files, a foreign
Host, media over the caps, decompression bombs, and streams dropped mid-answer. After
the run a normal request answers within 1 s and /health is ok.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import socket
import struct
import threading
import time
import zlib

import pytest

from test_api import (  # noqa: F401 (loaded is a fixture)
    CHAT_PATH, ERROR_KEYS, KEY, assert_error, audio_b64, chat, image, loaded, make_server, png_data_url, raw_http,
    speech, text, user, video_b64,
)

REQUESTS = 520


# ---------------------------------------------------------------------- raw requests
def http_request(body: bytes, headers: dict[str, str] | None = None, method: str = "POST", path: str = CHAT_PATH,
                 host: str | None = "127.0.0.1", key: str | None = KEY) -> bytes:
    """One HTTP/1.1 request as bytes, Content-Length set unless `headers` sets framing itself."""
    sent = {"Content-Type": "application/json"}
    if host is not None:
        sent["Host"] = host
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    sent.update(headers or {})
    if "Content-Length" not in sent and "Transfer-Encoding" not in sent:
        sent["Content-Length"] = str(len(body))
    head = "".join(f"{name}: {value}\r\n" for name, value in sent.items())
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode("utf-8") + body


def encoded(body: dict) -> bytes:
    return json.dumps(body).encode()


# ---------------------------------------------------------------------- bombs and oversized media
def png_bomb(width: int = 40_000, height: int = 40_000) -> str:
    """A tiny PNG whose header claims width x height 8-bit grey pixels (its data holds a few rows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * (width + 1) * 4, 9)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(data).decode()


# a gzip body that would inflate to 50 MB of JSON (the server never inflates request bodies)
GZIP_BOMB = gzip.compress(b'{"model": "tiny", "messages": [' + b" " * 50_000_000 + b"]}", 9)


# ---------------------------------------------------------------------- the fuzz cases
WRONG = {str: [12345, [], {}, True, 1.5], bool: ["yes", 1, [], {}], int: ["x", [], {}, True, 1.5],
         float: ["x", [], {}, True], list: ["x", 3, {}, True], dict: ["x", 3, [], True]}
REQUIRED = {"model", "messages", "role", "content", "type", "text", "url", "data", "format", "image_url",
            "input_audio"}


def _paths(node, path=()):
    """Every (path, value) below a JSON node."""
    yield path, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, path + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, path + (i,))


def _set(root, path, value):
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


class Cases:
    """Seeded malformed requests; each returns the raw bytes to send."""

    def __init__(self, media_root: str, seed: int = 1234):
        self.rng = random.Random(seed)
        self.root = media_root
        self.base = [
            chat([user(text("hi"))], max_tokens=1, temperature=0.0, stream=False),
            chat([{"role": "system", "content": "s"}, user(image(png_data_url(28)), text("q"))], max_tokens=1,
                 top_p=0.9),
            chat([user(speech(audio_b64(0.3, 8000)))], max_tokens=1, user="u1"),
        ]
        self.files = [os.path.join(media_root, name) for name in ("fifo", "missing.png", "proc-link", "dev-link",
                                                                   "dir", "outside-link")]
        self.files += ["/proc/kmsg", "/proc/self/environ", "/dev/zero", "/dev/urandom", "/sys/kernel/notes",
                       "/etc/passwd", "/nonexistent/x.png", "file:///dev/stdin", f"file://{media_root}/fifo"]
        self.oversized = [
            chat([user(text("x" * 30_000))]),  # over --max-text-chars 20000
            chat([user(text("w " * 12_000)), user(text("w " * 12_000))]),
            chat([user(speech(audio_b64(3.0, 8000)))]),  # over --max-audio-seconds 2
            chat([user({"type": "input_sound", "input_sound": {"data": audio_b64(2.5, 8000), "format": "wav"}})]),
            chat([user(image(png_data_url(200)))]),  # over --max-image-pixels 128 x 128
            chat([user(image(png_bomb()))]),
            chat([user({"type": "input_video", "input_video": {"data": VIDEO_LONG, "format": "mp4"}})]),
            chat([user({"type": "input_video", "input_video": {"data": VIDEO_LARGE, "format": "mp4"}})]),
            chat([user(image(png_data_url(28))) for _ in range(40)]),  # over 32 media parts
        ]

    def schema(self) -> bytes:
        """The body mutated at a random place: unknown fields, wrong types, missing fields, bad values."""
        rng = self.rng
        body = json.loads(json.dumps(rng.choice(self.base)))
        nodes = list(_paths(body))
        op = rng.randrange(8)
        if op == 0:
            path = rng.choice([p for p, v in nodes if isinstance(v, dict)])
            target = body
            for key in path:
                target = target[key]
            target[rng.choice(["foo", "extra", "tools", "Model", "seed_x", ""])] = rng.choice([1, "x", None, {}])
        elif op == 1:
            path, value = rng.choice([(p, v) for p, v in nodes if p and type(v) in WRONG])
            _set(body, path, rng.choice([3, {}, True, None] if path[-1] == "content" else WRONG[type(value)]))
        elif op == 2:
            path, _ = rng.choice([(p, v) for p, v in nodes if p and p[-1] in REQUIRED])
            parent = body
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
        elif op == 3:
            key, value = rng.choice([("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 10 ** 9),
                                     ("temperature", -1), ("temperature", 9.5), ("top_p", 0), ("top_p", 1.5),
                                     ("n", 4), ("modalities", ["video"]), ("modalities", []),
                                     ("stream_options", {"include_usage": True}), ("model", "other-model"),
                                     ("modalities", ["text", "audio"])])
            body[key] = value
        elif op == 4:
            body["messages"] = rng.choice([{}, "hi", [], [1], body["messages"] + [{"role": "assistant", "content": "a"}],
                                           [{"role": "assistant", "content": [image(png_data_url(28))]},
                                            user(text("x"))], [user(text("<speech> injected"))],
                                           [{"role": "robot", "content": "x"}],
                                           [user({"type": rng.choice(["image", "file", ""]), "text": "x"})]])
        elif op == 5:
            junk = base64.b64encode(rng.randbytes(rng.randrange(8, 200))).decode()
            body["messages"][-1]["content"] = [rng.choice([
                image("data:image/png;base64," + junk), speech(junk, rng.choice(["wav", "mp3", "flac"])),
                speech("@@not base64", "wav"), image(rng.choice(["data:image/png;base64,!!", "data:", "gopher://x",
                                                                 "https://a.b/c.jpg", "data:text/plain;base64,AA"])),
                {"type": "input_sound", "input_sound": {"data": junk, "format": "wav"}},
                {"type": "input_video", "input_video": {"data": junk, "format": rng.choice(["mp4", "webm"])}}])]
        elif op == 6:
            raw = encoded(body)
            return http_request(raw[: rng.randrange(0, len(raw) - 1)])
        else:
            return http_request(rng.choice([rng.randbytes(rng.randrange(1, 64)), b"null", b"42", b"[]", b'"x"',
                                            b'{"model": Infinity}', b"[" * 50_000, b'{"a": ' * 3000,
                                            b'{"model": "\xff\xfe"}']))
        return http_request(encoded(body))

    def framing(self) -> bytes:
        rng = self.rng
        body = encoded(self.base[0])
        choice = rng.randrange(9)
        if choice == 0:  # Content-Length that is not ASCII digits (Unicode digits, signs, spaces, lists)
            length = rng.choice(["\u00b2", "\u0663", "\uff11\uff12", "-4", "+5", "1e3", "0x10", "12 34", "5, 6", ""])
            return http_request(body, {"Content-Length": length})
        if choice == 1:  # conflicting framing
            return http_request(body, {"Content-Length": str(len(body)), "Transfer-Encoding": "chunked"})
        if choice == 2:  # bad chunked framing
            return http_request(rng.choice([b"zz\r\nabc\r\n0\r\n\r\n", b"5\r\nabc\r\n0\r\n\r\n",
                                            b"-1\r\n\r\n"]), {"Transfer-Encoding": "chunked"})
        if choice == 3:  # junk request lines
            return rng.choice([b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"GET\r\n\r\n",
                               b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n", b"\r\n\r\n\r\n",
                               b"G\x00ET / HTTP/1.1\r\n\r\n", "GËT / HTTP/1.1\r\n\r\n".encode(),
                               b"GET /\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                               b"POST " + b"/x" * 20_000 + b" HTTP/1.1\r\n\r\n", rng.randbytes(100) + b"\r\n\r\n"])
        if choice == 4:  # huge or broken headers
            return rng.choice([http_request(body, {"X-Big": "a" * rng.randrange(20_000, 80_000)}),
                               http_request(body, {f"X-{i}": "v" * 200 for i in range(200)}),
                               http_request(body, {"Bad Header": "x"}), http_request(body, {"X-Nul": "a\x00b"})])
        if choice == 5:  # no Host, or a foreign one
            return http_request(body, host=rng.choice([None, "evil.example", "127.0.0.1.nip.io", "localhost.evil",
                                                       "[::2]:80", "", "10.0.0.1"]))
        if choice == 6:  # the wrong method, path or key
            return rng.choice([http_request(body, method="PUT"), http_request(b"", method="GET"),
                               http_request(body, path="/v1/completions"), http_request(body, key=None),
                               http_request(body, key="nope"), http_request(body, {"Content-Type": "text/plain"}),
                               http_request(body, method="FOO", path="/v1/models")])
        if choice == 7:  # a body over --max-body-mb, announced or chunked
            if rng.random() < 0.5:
                return http_request(b"", {"Content-Length": str(5 * 1024 * 1024)})
            piece = b"8000\r\n" + b"x" * 0x8000 + b"\r\n"
            return http_request(piece * 40 + b"0\r\n\r\n", {"Transfer-Encoding": "chunked"})
        # a gzip-encoded body: not inflated, so not JSON
        return http_request(GZIP_BOMB, {"Content-Encoding": "gzip"})

    def files_and_media(self) -> bytes:
        rng = self.rng
        if rng.random() < 0.5:
            return http_request(encoded(chat([user(image(rng.choice(self.files)), text("what is it?"))])))
        return http_request(encoded(rng.choice(self.oversized)))

    def short_body(self) -> bytes:
        body = encoded(self.base[0])
        return http_request(body[: len(body) // 2], {"Content-Length": str(len(body))})


VIDEO_LONG = video_b64(3.0, fps=5, size=32)  # over --max-video-seconds 2
VIDEO_LARGE = video_b64(0.4, fps=5, size=160)  # frames over --max-image-pixels


def drop_stream(port: int, rng: random.Random) -> bool:
    """A valid streaming request whose client goes away after the first bytes (True) or before any."""
    body = encoded(chat([user(text("go on and on"))], max_tokens=rng.randrange(200, 800), stream=True))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(http_request(body))
        started = rng.random() < 0.7
        if started:
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset, no goodbye
    return started


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def media_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    os.mkfifo(root / "fifo")
    (root / "proc-link").symlink_to("/proc/self/environ")
    (root / "dev-link").symlink_to("/dev/zero")
    (root / "outside-link").symlink_to("/etc/hostname")
    (root / "dir").mkdir()
    return root


@pytest.fixture(scope="module")
def server(loaded, media_root):
    srv = make_server(loaded, api_key=KEY, max_body_mb=1, max_text_chars=20_000, max_audio_seconds=2,
                      max_image_pixels=128 * 128, max_video_seconds=2, max_concurrent=8,
                      media_roots=[str(media_root)], body_timeout_s=0.3, prepare_timeout_s=2)
    yield srv
    srv.close()


# ---------------------------------------------------------------------- tests
def test_fuzz_malformed_requests(server, media_root):
    cases = Cases(str(media_root))
    rng = cases.rng
    kinds = [cases.schema] * 40 + [cases.framing] * 30 + [cases.files_and_media] * 25 + [cases.short_body] * 2
    statuses: dict[int, int] = {}
    codes: set[str] = set()
    dropped = streamed = 0
    started = time.monotonic()
    for i in range(REQUESTS):
        if rng.random() < 0.03:
            streamed += drop_stream(server.port, rng)
            dropped += 1
            continue
        payload = rng.choice(kinds)()
        status, body = raw_http(server.port, payload, timeout=10)
        statuses[status] = statuses.get(status, 0) + 1
        assert 400 <= status < 500, (status, payload[:300], body[:300])
        error = json.loads(body)
        assert set(error) == {"error"} and set(error["error"]) == ERROR_KEYS, (payload[:200], body[:300])
        assert isinstance(error["error"]["message"], str) and error["error"]["message"]
        codes.add(error["error"]["code"])
    elapsed = time.monotonic() - started
    assert sum(statuses.values()) + dropped == REQUESTS and dropped > 5
    expected = {"bad_request", "headers_too_large", "host_not_allowed", "invalid_api_key", "unknown_parameter", "invalid_type",
                "missing_required_parameter", "invalid_value", "invalid_json", "request_too_large", "request_timeout",
                "file_not_found", "text_too_long", "audio_too_long", "image_too_large", "video_too_long",
                "video_too_large", "method_not_allowed", "not_found", "unsupported_media_type", "too_many_media"}
    assert expected <= codes, expected - codes
    print(f"{REQUESTS} requests in {elapsed:.1f} s; statuses {dict(sorted(statuses.items()))}")

    # the server is still itself: every dropped stream was cancelled and no slot is held
    deadline = time.monotonic() + 5
    while server.api.in_flight:
        assert time.monotonic() < deadline, server.api.health()
        time.sleep(0.05)
    assert server.api.batcher.stats.cancelled_requests >= streamed
    started = time.monotonic()
    status, body = raw_http(server.port, http_request(encoded(chat([user(text("still there?"))], max_tokens=2))))
    assert status == 200 and json.loads(body)["choices"][0]["message"]["role"] == "assistant"
    assert time.monotonic() - started < 1.0
    status, body = raw_http(server.port, http_request(b"", method="GET", path="/health"))
    assert status == 200 and json.loads(body)["status"] == "ok"


def test_fifo_cannot_hold_a_slot(loaded, media_root):
    """Requests naming a FIFO under the media root (nobody ever writes to it) are refused at
    once, and with one slot the next request still gets in."""
    srv = make_server(loaded, max_concurrent=1, media_roots=[str(media_root)], prepare_timeout_s=1.0)
    try:
        for url in (str(media_root / "fifo"), (media_root / "fifo").as_uri()):
            started = time.monotonic()
            status, body = raw_http(srv.port, http_request(encoded(chat([user(image(url))])), key=None), timeout=5)
            assert_error(status, json.loads(body), 400, "file_not_found")
            assert time.monotonic() - started < srv.api.config.prepare_timeout_s
        status, body = raw_http(srv.port, http_request(encoded(chat([user(text("hi"))], max_tokens=2)), key=None))
        assert status == 200, body
    finally:
        srv.close()


def test_a_stuck_preparation_gives_its_slot_back(loaded, monkeypatch):
    """Whatever blocks while a request's inputs are read (here: a decode that never returns),
    the request ends with a 408 at --prepare-timeout-s and its slot is free again."""
    srv = make_server(loaded, max_concurrent=1, prepare_timeout_s=0.5)
    release = threading.Event()
    decode = srv.api.decode_media

    def stuck(request):
        if request.parts:
            release.wait(30)
        return decode(request)

    monkeypatch.setattr(srv.api, "decode_media", stuck)
    try:
        started = time.monotonic()
        status, body = raw_http(srv.port, http_request(encoded(chat([user(image(png_data_url(28)))])), key=None))
        assert_error(status, json.loads(body), 408, "request_timeout")
        assert 0.5 <= time.monotonic() - started < 2.0
        status, body = raw_http(srv.port, http_request(encoded(chat([user(text("hi"))], max_tokens=2)), key=None))
        assert status == 200, body
    finally:
        release.set()
        srv.close()
