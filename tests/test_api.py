"""The OpenAI-compatible server (`lyra.serve.api`) over real HTTP on 127.0.0.1, tiny model.

Servers run in-process on a free loopback port. Clients: http.client (JSON and SSE),
raw sockets for protocol-level errors, and the official `openai` package.
"""

from __future__ import annotations

import base64
import copy
import http.client
import io
import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from lyra.inference import Assistant, GenerationOptions, Media, load_model
from lyra.serve.api import ServerConfig, build_parser, config_from_args, create_server

from conftest import REPO_ROOT, small_vocoder, talking, tone


KEY = "test-key"
IMAGE_PATH = REPO_ROOT / "data" / "demo" / "circle.png"
MEDIA_ROOT = IMAGE_PATH.parent
ERROR_KEYS = {"message", "type", "param", "code"}
CHAT_PATH = "/v1/chat/completions"


# ---------------------------------------------------------------------- media helpers
def audio_b64(seconds: float = 1.0, rate: int = 16000, fmt: str = "WAV", freq: float = 440.0) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, tone(seconds, rate, freq), rate, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def png_data_url(size: int = 56, color=(200, 30, 30)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def video_b64(seconds: float = 2.0, fps: int = 10, size: int = 64) -> str:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            frame = np.full((size, size, 3), (i * 7) % 255, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return base64.b64encode(buffer.getvalue()).decode()


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def text(value: str) -> dict:
    return {"type": "text", "text": value}


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def speech(data: str, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}


def chat(messages, **extra) -> dict:
    return {"model": "tiny", "messages": messages, "max_tokens": 4, **extra}


# ---------------------------------------------------------------------- HTTP helpers
class Client:
    """A keep-alive http.client connection to one server."""

    def __init__(self, server, key: str | None = KEY):
        self.host, self.port, self.key = "127.0.0.1", server.port, key
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def request(self, method: str, path: str, body: bytes | dict | None = None,
                headers: dict | None = None) -> tuple[int, dict, bytes]:
        sent = {"Content-Type": "application/json"}
        if self.key:
            sent["Authorization"] = f"Bearer {self.key}"
        sent.update(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        try:
            self.conn.request(method, path, body=body, headers=sent)
            response = self.conn.getresponse()
            data = response.read()
        except (ConnectionError, http.client.HTTPException):  # a server-closed keep-alive: retry once
            self.conn.close()
            self.conn.request(method, path, body=body, headers=sent)
            response = self.conn.getresponse()
            data = response.read()
        if response.will_close:
            self.conn.close()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, data

    def chat(self, body: dict | bytes, **kwargs) -> tuple[int, dict]:
        status, _, data = self.request("POST", "/v1/chat/completions", body, **kwargs)
        return status, json.loads(data)

    def stream(self, body: dict) -> tuple[int, dict, list]:
        status, headers, data = self.request("POST", "/v1/chat/completions", {**body, "stream": True})
        events = [block[len("data: "):] for block in data.decode().split("\n\n") if block.startswith("data: ")]
        return status, headers, events

    def close(self) -> None:
        self.conn.close()


def raw_http(port: int, payload: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """Send bytes on a fresh socket; the status and body of the answer. The payload goes in
    64 KiB pieces and sending stops once an answer arrives (a server that refuses a body
    early closes the connection on the rest)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = b""
        for start in range(0, len(payload), 65536):
            try:
                sock.sendall(payload[start:start + 65536])
            except (BrokenPipeError, ConnectionResetError):
                break
            if select.select([sock], [], [], 0)[0]:
                break
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")]
            if length and len(body) >= length[0]:
                break
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def assert_error(status: int, body: dict, expected_status: int, code: str | None = None, param: str | None = None):
    assert status == expected_status, body
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    if param is not None:
        assert body["error"]["param"] == param, body


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def loaded():
    return load_model("tiny", "cpu", "fp32")


def make_server(loaded, **overrides):
    model, tokenizer, info = loaded
    config = ServerConfig(host="127.0.0.1", port=0, **overrides)
    return create_server(model, tokenizer, info, config).start()


@pytest.fixture(scope="module")
def server(loaded):
    srv = make_server(loaded, api_key=KEY, max_body_mb=2, max_audio_seconds=5,
                      max_image_pixels=300 * 300, max_video_seconds=3, max_text_chars=50_000,
                      media_roots=[str(MEDIA_ROOT)], body_timeout_s=1.0)
    yield srv
    srv.close()


@pytest.fixture()
def client(server):
    c = Client(server)
    yield c
    c.close()


@pytest.fixture(scope="module")
def openai_client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


# ---------------------------------------------------------------------- basics
def test_cli_defaults_bind_loopback():
    config = config_from_args(build_parser().parse_args([]))
    assert config.host == "127.0.0.1" and config.port == 8000 and config.max_batch_size == 8
    assert config.encoder_thread and not config_from_args(build_parser().parse_args(["--no-encoder-thread"])).encoder_thread
    assert config.media_roots == []  # local files are closed by default
    assert config.host_names() == {"localhost", "127.0.0.1", "::1"}
    wide = config_from_args(build_parser().parse_args(["--host", "0.0.0.0", "--allowed-host", "Lyra.Example"]))
    assert wide.host_names() == {"localhost", "127.0.0.1", "::1", "lyra.example"}
    with pytest.raises(ValueError, match="--media-root"):
        config_from_args(build_parser().parse_args(["--media-root", "/no/such/dir"]))


def test_openapi_schema(server):
    status, _, data = Client(server, key=None).request("GET", "/openapi.json")
    schema = json.loads(data)
    assert status == 200 and CHAT_PATH in schema["paths"]
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert request["additionalProperties"] is False and {"model", "messages"} <= set(request["required"])


def test_models_health_and_routes(server, client):
    status, _, data = Client(server, key=None).request("GET", "/health")
    health = json.loads(data)
    assert status == 200 and health["status"] == "ok" and health["model"] == "tiny" and health["can_speak"] is False
    assert health["encoder_thread"] is True and health["batches"]["encode_seconds"] >= 0
    status, _, data = client.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(data)["data"]] == ["tiny"]
    status, _, data = client.request("GET", "/v1/models/tiny")
    assert status == 200 and json.loads(data)["object"] == "model"
    for method, path, expected, code in [("GET", "/v1/models/other", 404, "model_not_found"),
                                         ("GET", "/v1/nothing", 404, "not_found"),
                                         ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
                                         ("DELETE", "/v1/models", 405, "method_not_allowed"),
                                         ("POST", "/v1/models", 405, "method_not_allowed"),
                                         ("POST", "/v1/completions", 404, "not_found")]:
        status, _, data = client.request(method, path, b"{}" if method == "POST" else None)
        assert_error(status, json.loads(data), expected, code)


def test_api_key(server):
    body = chat([user(text("hi"))])
    for key in (None, "wrong"):
        status, response = Client(server, key=key).chat(body)
        assert_error(status, response, 401, "invalid_api_key")
    status, _, data = Client(server, key=None).request("GET", "/v1/models")
    assert_error(status, json.loads(data), 401, "invalid_api_key")
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()


# ---------------------------------------------------------------------- answers
def test_text_matches_the_library(loaded, client, openai_client):
    model, tokenizer, _ = loaded
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    reply = Assistant(model, tokenizer).reply(messages, Media(), GenerationOptions(max_new_tokens=6))
    status, response = client.chat(chat(messages, max_tokens=6))
    assert status == 200, response
    assert response["object"] == "chat.completion" and response["id"].startswith("chatcmpl-")
    choice = response["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"].strip() == reply.text
    assert response["usage"]["prompt_tokens"] == reply.prompt_tokens
    assert response["usage"]["completion_tokens"] == len(reply.token_ids)
    assert choice["finish_reason"] == ("length" if len(reply.token_ids) == 6 else "stop")
    sdk = openai_client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=6)
    assert sdk.choices[0].message.content == choice["message"]["content"]


def test_image_speech_video_sound(client, openai_client):
    local = client.chat(chat([user(image(str(IMAGE_PATH)), text("what is this?"))]))
    data_url = "data:image/png;base64," + base64.b64encode(IMAGE_PATH.read_bytes()).decode()
    inline = openai_client.chat.completions.create(
        model="tiny", max_tokens=4, messages=[user(image(data_url), text("what is this?"))])
    file_url = client.chat(chat([user(image(IMAGE_PATH.as_uri()), text("what is this?"))]))
    assert local[0] == 200 and file_url[0] == 200, (local, file_url)
    assert local[1]["choices"][0]["message"]["content"] == inline.choices[0].message.content
    assert file_url[1]["choices"][0]["message"] == local[1]["choices"][0]["message"]
    assert local[1]["usage"]["prompt_tokens"] > 60  # 224x224 -> 64 image tokens

    wav = openai_client.chat.completions.create(model="tiny", max_tokens=4,
                                                messages=[user(speech(audio_b64(1.0)), text("answer"))])
    flac = client.chat(chat([user(speech(audio_b64(1.0, fmt="FLAC"), "flac"), text("answer"))]))
    mp3 = client.chat(chat([user(speech(audio_b64(1.0, 22050, "MP3"), "mp3"))]))
    assert flac[0] == 200 and mp3[0] == 200, (flac, mp3)
    assert flac[1]["choices"][0]["message"]["content"] == wav.choices[0].message.content  # lossless: same input
    assert wav.usage.prompt_tokens > 300  # one 30 s clip -> 300 speech tokens

    video = {"type": "input_video", "input_video": {"data": video_b64(2.0), "format": "mp4"}}
    sound = {"type": "input_sound", "input_sound": {"data": audio_b64(1.5, 8000), "format": "wav"}}
    both = openai_client.chat.completions.create(model="tiny", max_tokens=4,  # the SDK passes the extra parts on
                                                 messages=[user(video, sound, text("what happens?"))])
    assert both.usage.prompt_tokens > 300 and both.choices[0].finish_reason in ("stop", "length")


def test_multi_turn(client):
    first = [{"role": "system", "content": [text("you are Lyra")]}, user(image(png_data_url()), text("colour?"))]
    status, one = client.chat(chat(first))
    assert status == 200, one
    history = first + [{"role": "assistant", "content": one["choices"][0]["message"]["content"]},
                       user(speech(audio_b64(1.0)), text("and now?"))]
    status, two = client.chat(chat(history))
    assert status == 200, two
    assert two["usage"]["prompt_tokens"] > one["usage"]["prompt_tokens"] + 300


def test_streaming_matches_non_streaming(client, openai_client):
    body = chat([user(image(png_data_url()), speech(audio_b64(1.0)), text("describe"))], max_tokens=6)
    status, whole = client.chat(body)
    assert status == 200, whole
    status, headers, events = client.stream({**body, "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert content == whole["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    stream = openai_client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=6,
                                                   stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == content


def test_streaming_decodes_each_answer_prefix_once(server, client, monkeypatch):
    """A stream decodes the answer so far once per batch of tokens it takes from the queue, never
    the same tokens twice, and its final text reuses the last decode."""
    api, lengths = server.api, []
    decode = api.decode
    monkeypatch.setattr(api, "decode", lambda token_ids: lengths.append(len(token_ids)) or decode(token_ids))
    status, _, events = client.stream(chat([user(text("count to twenty"))], max_tokens=16,
                                           stream_options={"include_usage": True}))
    assert status == 200 and events[-1] == "[DONE]"
    tokens = json.loads(events[-2])["usage"]["completion_tokens"]
    assert lengths == sorted(set(lengths)) and len(lengths) <= tokens
    assert lengths[-1:] == ([tokens] if tokens else [])


def test_audio_output(loaded, client, openai_client, monkeypatch):
    body = chat([user(text("say hi"))], modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})
    status, response = client.chat(body)
    assert_error(status, response, 400, "audio_output_unavailable", "modalities")
    assert response["error"]["message"].startswith("this model cannot speak: ")
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError, match="this model cannot speak"):
        openai_client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=4,
                                              modalities=["text", "audio"], audio={"voice": "alloy", "format": "wav"})

    # With a speech generator and a vocoder the model speaks: the wav is its `speak` of the answer.
    model = loaded[0]
    speaker = talking(type(model)(copy.deepcopy(model.config)))
    monkeypatch.setattr(model, "speech_generator", speaker.speech_generator)
    monkeypatch.setattr(model, "_vocoder", [small_vocoder()], raising=False)
    status, response = client.chat(body)
    assert status == 200, response
    audio = response["choices"][0]["message"]["audio"]
    samples, rate = sf.read(io.BytesIO(base64.b64decode(audio["data"])))
    assert rate == 16000 and samples.shape[0] > 0 and samples.shape[0] % 320 == 0  # 320 samples per unit frame
    assert audio["transcript"] == response["choices"][0]["message"]["content"]
    status, _, events = client.stream(body)
    assert status == 200 and events[-1] == "[DONE]"
    assert any("audio" in json.loads(e)["choices"][0]["delta"] for e in events[:-1] if json.loads(e)["choices"])

    # the offline Piper voice speaking phoneme units (what the trained nano model uses): 22.05 kHz
    from lyra.model.vocoder import load_vocoder

    units = model.config.speech_generator
    monkeypatch.setattr(units, "unit_kind", "piper-phoneme")
    monkeypatch.setattr(units, "num_units", 256)
    monkeypatch.setattr(model, "speech_generator", talking(type(model)(copy.deepcopy(model.config))).speech_generator)
    monkeypatch.setattr(model, "_vocoder", [load_vocoder("piper:en_US-joe-medium")])
    status, response = client.chat(body)
    assert status == 200, response
    samples, rate = sf.read(io.BytesIO(base64.b64decode(response["choices"][0]["message"]["audio"]["data"])))
    assert rate == 22050 and samples.shape[0] > 0


# ---------------------------------------------------------------------- errors
WAV_1S = audio_b64(1.0)
ERROR_CASES = [
    # (id, body, status, code, param)
    ("not json", b"{not json", 400, "invalid_json", None),
    ("not an object", b"[1, 2]", 400, "invalid_json", None),
    ("nan", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "invalid_value", "temperature"),
    ("not utf-8", b'{"model": "\xff"}', 400, "invalid_json", None),
    ("unknown top-level field", chat([user(text("hi"))], frequency_penalty=0.5), 400, "unknown_parameter",
     "frequency_penalty"),
    ("unknown part field", chat([user({"type": "text", "text": "hi", "extra": 1})]), 400, "unknown_parameter",
     "messages[0].content[0].extra"),
    ("unknown image_url field", chat([user({"type": "image_url", "image_url": {"url": png_data_url(), "x": 1}})]),
     400, "unknown_parameter", "messages[0].content[0].image_url.x"),
    ("unknown message field", chat([{"role": "user", "content": "hi", "tool_calls": []}]), 400,
     "unknown_parameter", "messages[0].tool_calls"),
    ("unknown part type", chat([user({"type": "file", "file": {}})]), 400, "invalid_value",
     "messages[0].content[0].type"),
    ("missing model", {"messages": [user(text("hi"))]}, 400, "missing_required_parameter", "model"),
    ("wrong model", {**chat([user(text("hi"))]), "model": "gpt-4o"}, 404, "model_not_found", "model"),
    ("empty messages", chat([]), 400, "invalid_value", "messages"),
    ("bad role", chat([{"role": "robot", "content": "hi"}]), 400, "invalid_value", "messages[0].role"),
    ("assistant last", chat([user(text("hi")), {"role": "assistant", "content": "yo"}]), 400, "invalid_value",
     "messages[1].role"),
    ("media in system", chat([{"role": "system", "content": [image(png_data_url())]}, user(text("hi"))]), 400,
     "invalid_value", "messages[0].content[0]"),
    ("placeholder in text", chat([user(text("look: <image>"))]), 400, "invalid_value", "messages[0].content[0].text"),
    ("bad base64 audio", chat([user(speech("not*base64!"))]), 400, "invalid_base64",
     "messages[0].content[0].input_audio.data"),
    ("bad base64 image", chat([user(image("data:image/png;base64,%%%"))]), 400, "invalid_base64",
     "messages[0].content[0].image_url.url"),
    ("audio format", chat([user(speech(WAV_1S, "ogg"))]), 400, "invalid_value",
     "messages[0].content[0].input_audio.format"),
    ("audio format mismatch", chat([user(speech(WAV_1S, "mp3"))]), 400, "format_mismatch",
     "messages[0].content[0].input_audio.data"),
    ("audio garbage", chat([user(speech(base64.b64encode(b"RIFF1234garbage" * 20).decode()))]), 400,
     "invalid_audio", "messages[0].content[0].input_audio.data"),
    ("image mime", chat([user(image("data:image/tiff;base64,AAAA"))]), 400, "unsupported_format", None),
    ("image garbage", chat([user(image("data:image/png;base64," + base64.b64encode(b"\x89PNG nope").decode()))]),
     400, "invalid_image", None),
    ("remote image", chat([user(image("https://example.com/cat.png"))]), 400, "remote_fetching_disabled", None),
    ("ftp image", chat([user(image("ftp://example.com/cat.png"))]), 400, "invalid_url", None),
    ("missing file", chat([user(image("/nonexistent/cat.png"))]), 400, "file_not_found", None),
    ("file outside the root", chat([user(image(str(REPO_ROOT / "README.md")))]), 400, "file_not_found", None),
    ("escaping the root", chat([user(image(str(MEDIA_ROOT / ".." / ".." / "README.md")))]), 400, "file_not_found",
     None),
    ("proc", chat([user(image("/proc/self/environ"))]), 400, "file_not_found", None),
    ("device", chat([user(image("file:///dev/zero"))]), 400, "file_not_found", None),
    ("a directory", chat([user(image(str(MEDIA_ROOT)))]), 400, "file_not_found", None),
    ("text too long", chat([user(text("x" * 50_001))]), 400, "text_too_long", "messages"),
    ("strict types", chat([user(text("hi"))], stream="yes"), 400, "invalid_type", "stream"),
    ("content type", chat([{"role": "user", "content": 3}]), 400, "invalid_type", "messages[0].content"),
    ("image too many pixels", chat([user(image(png_data_url(400)))]), 400, "image_too_large", None),
    ("audio too long", chat([user(speech(audio_b64(6.0, 8000)))]), 400, "audio_too_long", None),
    ("video too long", chat([user({"type": "input_video", "input_video": {"data": video_b64(5.0), "format": "mp4"}})]),
     400, "video_too_long", None),
    ("video garbage", chat([user({"type": "input_video", "input_video": {"data": WAV_1S, "format": "mp4"}})]), 400,
     None, None),
    ("max_tokens 0", chat([user(text("hi"))], max_tokens=0), 400, "invalid_value", "max_tokens"),
    ("max_tokens string", chat([user(text("hi"))], max_tokens="5"), 400, "invalid_type", "max_tokens"),
    ("both max tokens", chat([user(text("hi"))], max_completion_tokens=3), 400, "invalid_value", "max_tokens"),
    ("temperature", chat([user(text("hi"))], temperature=3), 400, "invalid_value", "temperature"),
    ("top_p", chat([user(text("hi"))], top_p=0), 400, "invalid_value", "top_p"),
    ("n", chat([user(text("hi"))], n=2), 400, "invalid_value", "n"),
    ("stream_options without stream", chat([user(text("hi"))], stream_options={"include_usage": True}), 400,
     "invalid_value", "stream_options"),
    ("modalities", chat([user(text("hi"))], modalities=["audio"]), 400, "invalid_value", "modalities"),
    ("context", chat([user(text("word " * 5000))]), 400, "context_length_exceeded", "messages"),
]


@pytest.mark.parametrize("body,status,code,param", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_request_errors(client, body, status, code, param):
    got, response = client.chat(body)
    assert_error(got, response, status, code, param)


def test_protocol_errors(server, client):
    status, _, data = client.request("POST", CHAT_PATH, b"{}", headers={"Content-Type": "text/plain"})
    assert_error(status, json.loads(data), 415, "unsupported_media_type")
    port = server.port
    head = f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n" \
           f"Content-Type: application/json\r\n"
    cases = [
        (head + "Content-Length: 3000000\r\n\r\n", 413, "request_too_large"),  # > --max-body-mb 2
        (head + "Transfer-Encoding: chunked\r\n\r\n" + ("100000\r\n" + "x" * 0x100000 + "\r\n") * 3
         + "0\r\n\r\n", 413, "request_too_large"),  # no Content-Length: counted as it arrives
        (head + "\r\n", 400, "invalid_json"),  # no body at all
        (head + "Content-Length: -4\r\n\r\n", 400, "bad_request"),
        (head + "Content-Length: \u00b2\r\n\r\n", 400, "bad_request"),  # a Unicode digit
        (head + "Content-Length: 50\r\n\r\n{}", 408, "request_timeout"),  # shorter than announced
        ("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + "a" * 70000 + "\r\n\r\n", 400, "bad_request"),
        ("\x16\x03\x01 junk\r\n\r\n", 400, "bad_request"),
        ("GET /health HTTP/1.1\r\nHost: rebound.example\r\n\r\n", 421, "host_not_allowed"),
        ("FOO /v1/models HTTP/1.1\r\nHost: localhost:1234\r\nAuthorization: Bearer " + KEY + "\r\n\r\n", 405,
         "method_not_allowed"),
    ]
    for payload, expected, code in cases:
        started = time.monotonic()
        status, body = raw_http(port, payload.encode())
        assert_error(status, json.loads(body), expected, code)
        assert time.monotonic() - started < 5, payload[:80]
    status, _, data = client.request("GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"


def test_allowed_host(loaded):
    srv = make_server(loaded, allowed_hosts=["lyra.example"])
    try:
        status, _ = raw_http(srv.port, b"GET /health HTTP/1.1\r\nHost: LYRA.example:8000\r\n\r\n")
        assert status == 200
        status, body = raw_http(srv.port, b"GET /health HTTP/1.1\r\nHost: other.example\r\n\r\n")
        assert_error(status, json.loads(body), 421, "host_not_allowed")
    finally:
        srv.close()


def test_local_file_policy(server, client, tmp_path, monkeypatch):
    """Outside the root, missing, a symlink out of the root: one error with one wording.
    No media root at all: local files are closed."""
    inside = tmp_path / "root"
    inside.mkdir()
    (inside / "link.png").symlink_to(IMAGE_PATH)  # points out of the root
    (inside / "copy.png").write_bytes(IMAGE_PATH.read_bytes())
    monkeypatch.setattr(server.api.config, "media_roots", [str(inside)])
    messages = set()
    for path in (str(IMAGE_PATH), str(inside / "missing.png"), str(inside / "link.png")):
        status, response = client.chat(chat([user(image(path))]))
        assert_error(status, response, 400, "file_not_found", "messages[0].content[0].image_url.url")
        messages.add(response["error"]["message"].replace(repr(path), "PATH"))
    assert len(messages) == 1, messages
    status, response = client.chat(chat([user(image((inside / "copy.png").as_uri()))]))
    assert status == 200, response
    monkeypatch.setattr(server.api.config, "media_roots", [])
    assert_error(*client.chat(chat([user(image(str(inside / "copy.png")))])), 400, "local_files_disabled")


def test_tokenisers_are_per_thread(server):
    """Every preparing thread can hold its own processor at once (none waits for another's
    prompt), each on its own tokenizer copy built at start-up, and a copy tokenises exactly as
    the original."""
    api = server.api
    threads = api.prepare_threads
    assert api._processors.qsize() == threads  # built before any request
    held = threading.Barrier(threads, timeout=5)

    def hold(_):
        with api.processor() as processor:
            held.wait()  # every thread holds one at the same time: no get() waited forever
            return processor

    with ThreadPoolExecutor(threads) as pool:
        processors = list(pool.map(hold, range(threads)))
    assert len({id(p) for p in processors}) == threads
    assert len({id(p.tokenizer) for p in processors} | {id(api.tokenizer)}) == threads + 1
    assert api._processors.qsize() == threads  # all given back
    text_in = "a test of the tokenizer copies, with ünïcödé"
    assert processors[0].tokenizer(text_in)["input_ids"] == api.tokenizer(text_in)["input_ids"]


def test_dropped_stream_cancels_its_job(server, monkeypatch):
    """A client that closes its stream after the first token: its job is cancelled, not run
    to max_tokens, and its concurrency slot comes back."""
    api = server.api
    jobs = []
    prepare = api.prepare

    def keep(request, on_token):
        jobs.append(prepare(request, on_token))
        return jobs[-1]

    monkeypatch.setattr(api, "prepare", keep)
    body = json.dumps(chat([user(text("tell me a long story"))], max_tokens=3000, stream=True)).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        received = b""
        while b"data: " not in received:  # the headers and the first event may come apart
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    completion = jobs[0].future.result(timeout=10)
    assert completion.finish_reason == "cancelled" and len(completion.token_ids) < 3000
    status, response = Client(server).chat(chat([user(text("still there?"))], max_tokens=2))
    assert status == 200, response


# ---------------------------------------------------------------------- batching
def mixed_requests() -> list[dict]:
    """Text, image and speech requests of different lengths and max_tokens."""
    return [
        chat([user(text("hi"))], max_tokens=5),
        chat([user(text("a much longer question about many things, with more words in it"))], max_tokens=8),
        chat([user(image(png_data_url(56)), text("what colour?"))], max_tokens=6),
        chat([user(speech(audio_b64(1.0)))], max_tokens=7),
        chat([{"role": "system", "content": "be brief"}, user(image(png_data_url(84, (0, 90, 200))),
                                                               speech(audio_b64(2.0, freq=220.0)))], max_tokens=4),
        chat([user(text("count to ten"))], max_tokens=3),
        chat([user(speech(audio_b64(1.5, 22050, freq=660.0)), text("and this?"))], max_tokens=6),
        chat([user(text("short"))], max_tokens=8),
    ]


@pytest.fixture(scope="module")
def batched_and_single(loaded):
    batched = make_server(loaded, max_batch_size=8)
    single = make_server(loaded, max_batch_size=1)
    yield batched, single
    batched.close()
    single.close()


def send_concurrently(server, bodies: list[dict]) -> list[tuple[int, dict]]:
    def send(body):
        c = Client(server, key=None)
        try:
            return c.chat(body)
        finally:
            c.close()

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(send, bodies))


def answer(result: tuple[int, dict]) -> tuple:
    status, body = result
    assert status == 200, body
    choice = body["choices"][0]
    return choice["message"]["content"], choice["finish_reason"], body["usage"]["completion_tokens"]


def test_batched_equals_one_at_a_time(batched_and_single):
    batched, single = batched_and_single
    bodies = mixed_requests()
    together = [answer(r) for r in send_concurrently(batched, bodies)]
    alone = [answer(r) for r in send_concurrently(single, bodies)]
    assert together == alone
    assert batched.api.batcher.stats.as_dict()["max_batch_size_seen"] >= 2  # batching happened
    assert single.api.batcher.stats.as_dict()["max_batch_size_seen"] == 1
    for (_, reason, count), body in zip(together, bodies):
        assert count <= body["max_tokens"] and (reason == "stop" or count == body["max_tokens"])


def test_batches_group_by_sampling_settings(batched_and_single):
    """Greedy and sampled requests never share a generate call; sampled ones with the
    same temperature / top_p do."""
    batched, _ = batched_and_single
    stats = batched.api.batcher.stats
    before_requests, before_sizes = stats.requests, stats.sizes
    greedy = chat([user(text("hi"))], max_tokens=3)
    sampled = chat([user(text("hi"))], max_tokens=3, temperature=0.8, top_p=0.9)
    results = send_concurrently(batched, [greedy, sampled, greedy, sampled])
    for status, body in results:
        assert status == 200, body
        assert body["usage"]["completion_tokens"] <= 3
    assert results[0][1]["choices"][0]["message"] == results[2][1]["choices"][0]["message"]
    new_batches = stats.sizes - before_sizes  # batch size -> how many such batches this test made
    assert stats.requests - before_requests == 4
    assert max(new_batches) <= 2  # no batch mixes greedy with sampled requests


def test_a_failing_request_does_not_affect_its_batch(batched_and_single, monkeypatch):
    """A request whose inputs break inside the model (here: its speech dropped after validation)
    fails alone with a 4xx; the others in its batch get their normal answers."""
    batched, single = batched_and_single
    api = batched.api
    build = api.build_sample

    def poisoned(messages, media):
        sample = build(messages, media)
        if "POISON" in messages[-1]["content"]:
            sample.speech = []  # the prompt still holds the speech pad tokens
        return sample

    monkeypatch.setattr(api, "build_sample", poisoned)
    bodies = mixed_requests()[:4]
    poison = chat([user(speech(audio_b64(1.0)), text("POISON"))])
    expected = [answer(r) for r in send_concurrently(single, bodies)]
    failed = api.batcher.stats.failed_requests
    results = send_concurrently(batched, bodies[:2] + [poison] + bodies[2:])
    assert_error(*results[2], 400, "generation_failed")
    assert [answer(r) for r in results[:2] + results[3:]] == expected
    assert api.batcher.stats.failed_requests == failed + 1
    status, _, data = Client(batched, key=None).request("GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"
