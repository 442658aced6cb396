"""The web demo (`python -m lyra.serve.web`) in a real headless browser.

Debian's chromium driven by Playwright for Python (`lyra.serve.web_browser`); both come from
`make setup`, so a missing one fails the test (with how to install it) instead of skipping it.
The demo runs as a subprocess on 127.0.0.1 and a free port with a tiny random model that can
speak: its speech generator predicts the Piper voice's phonemes, and its checkpoint names that
voice. The test uploads the demo image and question, sends them and waits for the answer bubble
and its audio (the untrained model's words are noise, so only their presence is checked). The
page is saved to a temporary folder; docs/web_demo.png comes from scripts/web_screenshot.py with
the trained nano model.
"""

from __future__ import annotations

import io
import urllib.request
from pathlib import Path

import pytest
import soundfile as sf

from lyra.serve.web_browser import BrowserMissing, ask, chromium, serve

from conftest import talking

REPO = Path(__file__).resolve().parents[1]
IMAGE = REPO / "data" / "demo" / "circle.png"
SPEECH = REPO / "data" / "demo" / "question.wav"


@pytest.fixture(scope="module")
def browser():
    try:
        with chromium() as browser:
            yield browser
    except BrowserMissing as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def speaking_model(tmp_path_factory):
    from lyra.config import load_config
    from lyra.model.lyra import LyraForConditionalGeneration

    config = load_config("tiny")
    config.speech_generator.unit_kind, config.speech_generator.num_units = "piper-phoneme", 256
    config.speech_generator.vocoder = "piper:en_US-joe-medium"
    folder = tmp_path_factory.mktemp("speaker") / "model"
    talking(LyraForConditionalGeneration.from_config(config)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def web_demo(tmp_path_factory, speaking_model):
    log = tmp_path_factory.mktemp("web") / "web.log"
    with serve(str(speaking_model), log, "--max-new-tokens", "12") as url:
        yield url, log


def test_web_demo_shows_the_media_and_plays_the_spoken_answer(browser, web_demo, tmp_path):
    url, log = web_demo
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    turn = ask(page, url, IMAGE, SPEECH, "What shape is in the picture?", want_audio=True)
    assert turn.answer, f"no answer bubble appeared (page errors: {turn.errors}); server log:\n{log.read_text()[-3000:]}"
    assert not turn.errors, f"the page showed an error: {turn.errors}"
    # the user's turn shows what was sent: the image and a player for the question, not file names
    assert turn.user_images == 1 and turn.user_audio == 1
    assert "circle.png" not in turn.user_text and "question.wav" not in turn.user_text
    assert "What shape is in the picture?" in turn.user_text
    # the answer shows its text and its audio, and the audio plays: a browser <audio> element
    # loads the spoken answer's source, and gives it the duration of the WAV the server serves
    assert turn.answer_audio_players == 1
    assert turn.answer_audio_seconds is not None and turn.answer_audio_url, turn
    with urllib.request.urlopen(turn.answer_audio_url, timeout=10) as response:
        served = sf.info(io.BytesIO(response.read()))
    assert served.frames > 0
    assert abs(turn.answer_audio_seconds - served.frames / served.samplerate) < 0.01, (turn, served)
    page.screenshot(path=str(tmp_path / "web_demo.png"), full_page=True)
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
    assert messages[-1]["content"] == "<image>\n<speech>\nHi"
    assert shown == [{"path": str(IMAGE)}, {"path": str(SPEECH)}, "Hi"]  # the bubble shows the media
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
