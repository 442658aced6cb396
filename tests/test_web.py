"""The web demo (`python -m lyra.serve.web`) in a real headless browser.

Debian's chromium driven by Playwright for Python; both come from `make setup`, so a
missing one fails the test (with how to install it) instead of skipping it. The demo runs
as a subprocess with the untrained `tiny` preset on 127.0.0.1 and a free port; the test
uploads the demo image and question, sends them and waits for a non-empty answer bubble
(the untrained model's words are noise, so only their presence is checked). The page is
saved to docs/web_demo.png.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
IMAGE = REPO / "data" / "demo" / "circle.png"
SPEECH = REPO / "data" / "demo" / "question.wav"
SCREENSHOT = REPO / "docs" / "web_demo.png"
START_TIMEOUT_S = 60
ANSWER_TIMEOUT_S = 40


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the web demo exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the web demo did not answer on {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file() or not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`make setup` does, as root; "
                    f"or `sudo apt-get install chromium`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: `make setup` installs it (the `web` extra), "
                    "or `pip install -e '.[web]'`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def web_demo(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("web") / "web.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "lyra.serve.web", "--model", "tiny", "--host", "127.0.0.1", "--port", str(port),
             "--max-new-tokens", "12"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        _wait_until_serving(url, server, log)
        yield url, log
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_web_demo_answers_an_image_and_a_spoken_question(browser, web_demo):
    url, log = web_demo
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(url)
    page.wait_for_selector("#send", timeout=20_000)
    page.locator("#image-in input[type=file]").set_input_files(str(IMAGE))
    page.locator("#audio-in input[type=file]").set_input_files(str(SPEECH))
    # Both uploads done: the image preview and the audio player replace the drop zones.
    page.wait_for_selector("#image-in img", timeout=20_000)
    page.wait_for_selector("#audio-in audio, #audio-in #waveform, #audio-in .waveform-container", state="attached",
                           timeout=20_000)
    page.locator("#text-in textarea").fill("What shape is in the picture?")
    page.locator("#send").click()

    user = page.locator("#chat [data-testid='user']").first
    user.wait_for(timeout=20_000)
    assert "circle.png" in user.inner_text() and "question.wav" in user.inner_text()
    bot = page.locator("#chat [data-testid='bot']").first
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    answer, stable_since = "", None
    while time.monotonic() < deadline:  # until the streamed answer is non-empty and has stopped growing
        text = bot.inner_text().strip() if bot.count() else ""
        if text != answer:
            answer, stable_since = text, time.monotonic()
        elif answer and time.monotonic() - stable_since > 1.5:
            break
        time.sleep(0.25)
    errors = page.locator(".toast-body").all_inner_texts()
    assert answer, f"no answer bubble appeared within {ANSWER_TIMEOUT_S} s (page errors: {errors}); " \
                   f"server log:\n{log.read_text()[-3000:]}"
    assert not errors, f"the page showed an error: {errors}"
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    page.close()


def test_web_demo_rejects_an_empty_turn(browser, web_demo):
    """Sending nothing is refused with a message in the page, not a crash."""
    url, _ = web_demo
    page = browser.new_page()
    page.goto(url)
    page.wait_for_selector("#send", timeout=20_000)
    page.locator("#send").click()
    toast = page.locator(".toast-body").first
    toast.wait_for(timeout=20_000)
    assert "type a message or attach" in toast.inner_text()
    assert not page.locator("#chat [data-testid='bot']").count()
    page.close()



def test_web_demo_keeps_the_conversation_and_explains_bad_files(tmp_path):
    """The handlers without the browser: turn 2 carries turn 1 and its media; an unreadable
    image surfaces the inference layer's message (the page shows it as an error toast)."""
    from lyra.inference import GenerationOptions, load_model
    from lyra.serve.web import SPEECH as SPOKEN
    from lyra.serve.web import Session, WebDemo

    demo = WebDemo(*load_model("tiny", "cpu", "fp32"))
    options = GenerationOptions(max_new_tokens=3)
    messages, media, shown = demo.turn("Hi", str(SPEECH), SPOKEN, str(IMAGE), None, Session())
    assert messages[-1]["content"] == "<image>\n<speech>\nHi" and "circle.png" in shown
    events = list(demo.answer(messages, media, options))
    assert events[-1][0] == "done" and events[-1][2] is None  # the untrained preset cannot speak
    session = Session(messages + [{"role": "assistant", "content": events[-1][1].text}], media)
    messages, media, _ = demo.turn("And then?", None, SPOKEN, None, None, session)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert media.images == [str(IMAGE)] and media.speech == [str(SPEECH)]
    assert list(demo.answer(messages, media, options))[-1][0] == "done"

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    messages, media, _ = demo.turn(None, None, SPOKEN, str(bad), None, Session())
    with pytest.raises(ValueError, match="cannot decode image"):
        list(demo.answer(messages, media, options))
    with pytest.raises(ValueError, match="type a message or attach"):
        demo.turn("  ", None, SPOKEN, None, None, Session())
