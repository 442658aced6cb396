"""`python -m lyra.chat` end to end on the tiny model: flags, JSON schema, interactive mode."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from lyra import chat
from lyra.config import REPO_ROOT

from conftest import SMALL_VOCODER, small_vocoder, talking, tone

IMAGE = str(REPO_ROOT / "data" / "demo" / "circle.png")
SPEECH = str(REPO_ROOT / "data" / "demo" / "question.wav")
JSON_KEYS = {"answer", "prompt_tokens", "new_tokens", "adapter", "timings", "kept_fraction", "speech_seconds",
             "model", "untrained", "device", "dtype", "speech_out"}


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> str:
    """A 2 s 64x64 H.264 video with a stereo AAC 440 Hz track, made with PyAV."""
    import av

    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        audio = container.add_stream("aac", rate=44100)
        audio.layout = "stereo"
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 10, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        wave = np.stack([tone(2.0, 44100)] * 2)
        for start in range(0, wave.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(wave[:, start:start + 1024]), format="fltp",
                                               layout="stereo")
            frame.sample_rate = 44100
            container.mux(audio.encode(frame))
        container.mux(stream.encode())
        container.mux(audio.encode())
    return str(path)


def run_json(capsys, *argv: str) -> dict:
    assert chat.main(["--model", "tiny", "--max-new-tokens", "3", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("argv,speech_count,kept", [
    (["--image", IMAGE, "--speech", SPEECH], 1, False),
    (["--image", IMAGE, "--image", IMAGE, "--text", "which is brighter?"], 0, False),
    (["--text", "hello"], 0, False),
    (["--speech", SPEECH, "--text", "answer briefly"], 1, False),
    (["--sound", SPEECH, "--text", "what sound is this?"], 0, False),
    (["--image", IMAGE, "--speech", SPEECH, "--lmme", "2,0.5"], 1, True),
])
def test_one_shot_json(capsys, argv, speech_count, kept):
    result = run_json(capsys, *argv)
    assert set(result) == JSON_KEYS
    assert result["new_tokens"] <= 3 and result["untrained"] is True
    assert len(result["speech_seconds"]) == speech_count
    assert (result["kept_fraction"] is not None) == kept
    assert result["timings"]["first_token_s"] <= result["timings"]["total_s"]


def test_video_and_its_audio_track(capsys, video):
    frames = run_json(capsys, "--video", video, "--text", "what happens?")
    audio = run_json(capsys, "--audio-only-video", video, "--text", "what is said?")
    assert frames["speech_seconds"] == []
    assert audio["speech_seconds"] and abs(audio["speech_seconds"][0] - 2.0) < 0.1


def test_stream_prints_the_answer(capsys):
    assert chat.main(["--model", "tiny", "--max-new-tokens", "4", "--text", "hi", "--stream"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and len(out) > 1


@pytest.mark.parametrize("argv,message", [
    (["--image", "nope.png", "--text", "x"], "image file not found"),
    (["--speech", "nope.wav"], "audio file not found"),
    (["--text", "x", "--lmme", "4"], "--lmme expects BLOCKS,KEEP"),
    (["--text", "x", "--speech-out", "r.wav"], "needs a model with a trained speech generator"),
])
def test_clear_errors(capsys, argv, message):
    assert chat.main(["--model", "tiny", *argv]) == 2
    assert message in capsys.readouterr().err


def test_audio_over_the_limit_and_unsupported_file(capsys, tmp_path):
    sf.write(tmp_path / "long.wav", tone(31.0), 16000)
    assert chat.main(["--model", "tiny", "--sound", str(tmp_path / "long.wav"), "--text", "x"]) == 2
    assert "over the configured maximum of 30 s" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not audio")
    assert chat.main(["--model", "tiny", "--speech", str(tmp_path / "notes.txt")]) == 2
    assert "cannot decode audio file" in capsys.readouterr().err


def test_subprocess_json_and_bad_model_directory(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lyra.chat", "--model", "tiny", "--image", IMAGE, "--speech", SPEECH,
                           "--max-new-tokens", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert set(json.loads(done.stdout)) == JSON_KEYS
    bad = subprocess.run([sys.executable, "-m", "lyra.chat", "--model", str(tmp_path), "--text", "hi"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not a Lyra checkpoint" in bad.stderr


def test_subprocess_interactive_session_through_stdin():
    script = f"/image {IMAGE}\nwhat is this?\nand the colour?\n/speech {SPEECH}\n\n/image missing.png\nx\n/reset\nhi\n/quit\n"
    done = subprocess.run([sys.executable, "-m", "lyra.chat", "--model", "tiny", "--max-new-tokens", "3"],
                          input=script, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "(conversation cleared)" in lines
    assert any(line.startswith("error: image file not found") for line in lines)
    answers = [line for line in lines if line != "(conversation cleared)" and not line.startswith("error:")]
    assert len(answers) == 4  # three turns before /reset (one failed), one after


def test_speech_out_streams_text_and_writes_a_wav(tmp_path, capsys):
    import torch

    from lyra.config import load_config
    from lyra.model.lyra import LyraForConditionalGeneration

    (tmp_path / "vocoder").mkdir()
    torch.save({"generator": small_vocoder().fairseq_state_dict()}, tmp_path / "vocoder" / "g_00500000")
    (tmp_path / "vocoder" / "config.json").write_text(json.dumps(SMALL_VOCODER))
    talking(LyraForConditionalGeneration.from_config(load_config("tiny"))).save_pretrained(tmp_path / "speaker")
    wav = tmp_path / "reply.wav"
    argv = ["--model", str(tmp_path / "speaker"), "--text", "hi", "--max-new-tokens", "4",
            "--speech-out", str(wav), "--vocoder", str(tmp_path / "vocoder"), "--json"]
    assert chat.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    audio, rate = sf.read(wav)
    assert rate == 16000 and len(audio) > 0
    assert abs(result["timings"]["audio_seconds"] - len(audio) / 16000) < 1e-3
    assert result["timings"]["first_audio_s"] <= result["timings"]["total_s"]
    assert chat.main(argv[:-3] + ["--json"]) == 2  # --speech-out without --vocoder
    assert "needs --vocoder DIR" in capsys.readouterr().err
