"""Long-speech records for the nano stage 3 (lyra/nano/long_speech.py), real TTS chatter."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lyra.data.audio import SAMPLE_RATE, load_audio
from lyra.nano.long_speech import LongSpeechSpec, build_long_speech
from lyra.nano.task import NanoTask, NanoTaskSpec
from lyra.data.audio import write_wav

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng speaks the chatter")


def _task(root):
    """A one-record stage-1 task whose spoken question is a 1 s chirp (easy to find again)."""
    t = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    write_wav(root / "speech" / "q.wav", (0.5 * np.sin(2 * np.pi * (300 + 400 * t) * t)).astype(np.float32))
    record = {"id": "stage1-0", "image": "images/train/scene_0.png",
              "conversations": [{"from": "human", "value": "<image>\n<speech>"}, {"from": "gpt", "value": "two"}],
              "speech": ["speech/q.wav"], "speech_asr": ["How many shapes do you see?"],
              "meta": {"types": ["count"], "answers": ["two"]}}
    (root / "stage1.json").write_text(json.dumps([record]))
    (root / "stage2.json").write_text(json.dumps([{**record, "id": "stage2-0"}, {**record, "id": "stage2-1"}]))
    files = {phase: root / f"{phase}.json" for phase in ("stage1", "stage2")}
    return NanoTask(root, NanoTaskSpec(), files, {"data_hash": "test"})


def test_the_question_is_hidden_whole_in_chatter_of_the_asked_length(tmp_path):
    task = _task(tmp_path)
    spec = LongSpeechSpec(records=3, clean_records=1, min_seconds=31.0, max_seconds=36.0)
    path = build_long_speech(task, spec, progress=False)
    records = json.loads(path.read_text())
    assert path.parent == tmp_path and [r["id"] for r in records] == ["long-0", "long-1", "long-2", "stage2-0"]
    records = records[:3]
    needle = load_audio(tmp_path / "speech" / "q.wav")
    for record in records:
        assert "speech_asr" not in record  # the transcript would cover the needle only
        assert record["conversations"][1]["value"] == "two" and record["image"] == "images/train/scene_0.png"
        audio = load_audio(tmp_path / record["speech"][0])
        assert 31.0 <= len(audio) / SAMPLE_RATE <= 36.0
        assert abs(len(audio) / SAMPLE_RATE - record["meta"]["seconds"]) < 0.01
        nominal = int(round(record["meta"]["needle_at"] * SAMPLE_RATE))  # rounded to 10 ms
        error = {s: np.abs(audio[s:s + len(needle)] - needle).max() for s in range(nominal - 80, nominal + 81)}
        start = min(error, key=error.get)
        assert error[start] < 2e-4  # the needle, sample for sample (16-bit WAV twice)
        chatter = np.delete(audio, np.s_[start:start + len(needle)])
        assert np.sqrt(np.mean(chatter ** 2)) > 0.01  # speech around it, not silence
    stamp = path.stat().st_mtime_ns
    assert build_long_speech(task, spec, progress=False) == path and path.stat().st_mtime_ns == stamp  # reused
    build_long_speech(task, LongSpeechSpec(records=2, clean_records=2, min_seconds=31.0, max_seconds=36.0),
                      progress=False)
    assert len(json.loads(path.read_text())) == 4  # a changed spec rebuilds
