"""The web demo driven by a headless Chromium, as a user would use it: start the server, upload an
image and a spoken question, send, wait for the streamed answer and its audio.

Used by tests/test_web.py and scripts/web_screenshot.py. Needs Debian's chromium and Playwright
for Python (the `web` extra); `make setup` installs both.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--autoplay-policy=no-user-gesture-required"]


class BrowserMissing(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve(model: str, log: Path, *extra: str, start_timeout_s: float = 90) -> Iterator[str]:
    """`python -m lyra.serve.web --model MODEL` on a free 127.0.0.1 port; yields its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "lyra.serve.web", "--model", model, "--host", "127.0.0.1",
                                   "--port", str(port), *extra], env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the web demo exited with code {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the web demo did not answer on {url} within {start_timeout_s:.0f} s:\n"
                                       f"{log.read_text()[-3000:]}") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def chromium() -> Iterator:
    """A headless Chromium browser (Playwright)."""
    if not Path(CHROMIUM).is_file() or not os.access(CHROMIUM, os.X_OK):
        raise BrowserMissing(f"{CHROMIUM} is missing: install Debian's chromium (`make setup` does, as root; "
                             f"or `sudo apt-get install chromium`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise BrowserMissing("Playwright for Python is missing: `make setup` installs it (the `web` extra), "
                             "or `pip install -e '.[web]'`") from None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Exchange:
    """What the page showed for one turn."""

    answer: str  # the text of the answer's bubbles
    user_images: int  # <img> elements in the user's turn
    user_audio: int  # audio players in the user's turn
    user_text: str
    answer_audio_players: int  # audio players in the answer's bubbles
    answer_audio_seconds: float | None  # duration of the spoken answer as the browser loads it, None without one
    answer_audio_url: str | None  # where the page's spoken answer file is served from
    errors: list[str]


def ask(page, url: str, image: Path | None, speech: Path | None, text: str = "", answer_timeout_s: float = 60,
        want_audio: bool = False) -> Exchange:
    """Upload `image` and `speech`, type `text`, send, and wait until the answer has stopped
    growing (and, with `want_audio`, until its audio player has loaded)."""
    page.goto(url)
    page.wait_for_selector("#send", timeout=30_000)
    if image is not None:
        page.locator("#image-in input[type=file]").set_input_files(str(image))
        page.wait_for_selector("#image-in img", timeout=20_000)
    if speech is not None:
        page.locator("#audio-in input[type=file]").set_input_files(str(speech))
        page.wait_for_selector("#audio-in audio, #audio-in #waveform, #audio-in .waveform-container",
                               state="attached", timeout=20_000)
    if text:
        page.locator("#text-in textarea").fill(text)
    page.locator("#send").click()
    user = page.locator("#chat [data-testid='user']")
    user.first.wait_for(timeout=20_000)
    bot = page.locator("#chat [data-testid='bot']")
    players = "[data-testid^='waveform-']"  # gradio's audio players (image: <img>)
    deadline = time.monotonic() + answer_timeout_s
    answer, stable_since, seconds = "", None, None
    while time.monotonic() < deadline:  # until the answer is non-empty and has stopped growing
        shown = " ".join(text.strip() for text in bot.all_inner_texts() if text.strip())
        if shown != answer:
            answer, stable_since = shown, time.monotonic()
        elif answer and time.monotonic() - stable_since > 1.5:
            seconds = _spoken_seconds(page)
            if seconds is not None or not want_audio:
                break
        time.sleep(0.25)
    texts = [bot.nth(k).locator(".message-content").inner_text().strip() for k in range(bot.count())
             if bot.nth(k).locator(".message-content").count()]
    return Exchange(answer=" ".join(t for t in texts if t), user_images=user.locator("img").count(),
                    user_audio=user.locator(players).count(), user_text=" ".join(user.all_inner_texts()),
                    answer_audio_players=bot.locator(players).count(), answer_audio_seconds=seconds,
                    answer_audio_url=spoken_answer_url(page),
                    errors=page.locator(".toast-body").all_inner_texts())


def spoken_answer_url(page) -> str | None:
    """The absolute URL of the spoken answer's file (the #spoken player's source), None without one."""
    link = page.locator("#spoken a[data-testid='download-link']")
    href = link.first.get_attribute("href") if link.count() else None
    return urljoin(page.url, href) if href else None


def _spoken_seconds(page) -> float | None:
    """The duration of the spoken answer's file as the browser's own <audio> element loads it:
    None while there is none or it does not load."""
    url = spoken_answer_url(page)
    if url is None:
        return None
    return page.evaluate("""async (url) => {
        const audio = new Audio(url);
        try {
            await new Promise((ok, bad) => { audio.onloadedmetadata = ok; audio.onerror = bad; });
        } catch (error) { return null; }
        return isFinite(audio.duration) ? audio.duration : null;
    }""", url)
