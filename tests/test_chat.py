"""`python -m lyra.chat` end to end on the tiny model: flags, JSON schema, interactive mode."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from lyra import chat

from conftest import REPO_ROOT, SMALL_VOCODER, small_vocoder, talking, tone


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
    torch_save_small_vocoder(tmp_path / "vocoder")
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
    assert chat.main(argv[:-3] + ["--json"]) == 2  # --speech-out without --vocoder, and none recorded
    assert "names no vocoder for its hubert units; pass --vocoder" in capsys.readouterr().err

    # a checkpoint that records its vocoder speaks without the flag
    model = LyraForConditionalGeneration.from_pretrained(tmp_path / "speaker")
    model.config.speech_generator.vocoder = str(tmp_path / "vocoder")
    model.save_pretrained(tmp_path / "recorded")
    assert chat.main(["--model", str(tmp_path / "recorded"), "--text", "hi", "--max-new-tokens", "4",
                      "--speech-out", str(tmp_path / "again.wav"), "--json"]) == 0
    assert sf.read(tmp_path / "again.wav")[0].size > 0
    capsys.readouterr()

    # a vocoder whose units are not the generator's
    wrong = {**SMALL_VOCODER, "num_embeddings": 40}
    (tmp_path / "vocoder" / "config.json").write_text(json.dumps(wrong))
    torch.manual_seed(0)
    from lyra.model.hifigan import CodeHiFiGAN, VocoderConfig

    torch.save({"generator": CodeHiFiGAN(VocoderConfig.from_dict(wrong)).fairseq_state_dict()},
               tmp_path / "vocoder" / "g_00500000")
    assert chat.main(argv) == 2
    assert "speaks 40 hubert units" in capsys.readouterr().err


def test_the_piper_voice_speaks_a_model_trained_on_its_phonemes(tmp_path, capsys):
    """A generator on piper-phoneme units (what Lyra-Nano's stage 4 trains) needs no flag: the
    checkpoint names the installed voice. Its random units are still voiced at 22.05 kHz."""
    from lyra.config import load_config
    from lyra.model.lyra import LyraForConditionalGeneration

    config = load_config("tiny")
    config.speech_generator.unit_kind, config.speech_generator.num_units = "piper-phoneme", 256
    config.speech_generator.vocoder = "piper:en_US-joe-medium"
    talking(LyraForConditionalGeneration.from_config(config)).save_pretrained(tmp_path / "piper")
    wav = tmp_path / "reply.wav"
    assert chat.main(["--model", str(tmp_path / "piper"), "--text", "hi", "--max-new-tokens", "6",
                      "--speech-out", str(wav), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    audio, rate = sf.read(wav)
    assert rate == 22050 and audio.size > 0
    assert result["timings"]["first_audio_after_token_s"] >= 0
    assert abs(result["timings"]["audio_seconds"] - audio.size / rate) < 1e-3
    # the hubert vocoder cannot speak phoneme units
    hubert = tmp_path / "hubert"
    hubert.mkdir()
    torch_save_small_vocoder(hubert)
    assert chat.main(["--model", str(tmp_path / "piper"), "--text", "hi", "--speech-out", str(wav),
                      "--vocoder", str(hubert)]) == 2
    error = capsys.readouterr().err
    assert "speaks 50 hubert units" in error and "predicts 256 piper-phoneme units" in error


@pytest.mark.parametrize("where,message", [
    ("missing-dir/sub/reply.wav", None),  # created as needed: fine
    ("is-a-file/reply.wav", "cannot write"),
    ("a-dir", "it is a directory"),
])
def test_speech_out_path_is_checked_before_any_work(tmp_path, capsys, where, message):
    (tmp_path / "is-a-file").write_text("x")
    (tmp_path / "a-dir").mkdir()
    code = chat.main(["--model", "tiny", "--text", "x", "--speech-out", str(tmp_path / where)])
    error = capsys.readouterr().err
    assert code == 2
    if message is None:
        assert "needs a model with a trained speech generator" in error  # the path passed; the model did not
    else:
        assert message in error and "cannot write" in error


def torch_save_small_vocoder(folder):
    import torch

    torch.save({"generator": small_vocoder().generator.fairseq_state_dict()}, folder / "g_00500000")
    (folder / "config.json").write_text(json.dumps(SMALL_VOCODER))
