"""The offline Piper voice as a unit vocoder: phoneme units from text, audio from units, word streaming,
judged by the real Whisper tiny.en."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lyra.eval.heard import WhisperJudge, _decoder_logits
from lyra.model.vocoder import load_vocoder

ANSWERS = ["three circles", "four", "blue", "two high beeps", "a rising tone", "triangle", "cat", "one low beep"]


@pytest.fixture(scope="module")
def voice():
    return load_vocoder("piper:en_US-joe-medium")


@pytest.fixture(scope="module")
def judge():
    return WhisperJudge()


def test_units_are_the_voices_phoneme_ids(voice):
    assert voice.unit_kind == "piper-phoneme" and voice.num_units == 256 and voice.sample_rate == 22050
    units = voice.text_to_units("three circles")
    assert voice.phonemes(units) == "θɹˈiː sˈɜːkəlz"
    assert voice.word_boundary in units and not {voice.pad, voice.bos, voice.eos} & set(units)
    # what piper itself feeds its model for the same text: ^ _ p1 _ p2 _ ... $
    ids = voice.voice.phonemes_to_ids(voice.voice.phonemize("three circles")[0])
    assert ids[2:-1:2] == units


def test_synthesis_is_heard_as_the_text(voice, judge):
    for text in ANSWERS:
        audio = voice.synthesize(voice.text_to_units(text))
        assert audio.dtype == np.float32 and 0.2 < audio.size / voice.sample_rate < 2.0
        assert judge.choose(audio, voice.sample_rate, ANSWERS)[0] == text
    # deterministic (noise scales 0): the same units give the same samples
    units = voice.text_to_units("four")
    assert np.array_equal(voice.synthesize(units), voice.synthesize(units))


def test_stream_voices_each_word_once_it_is_complete(voice, judge):
    """Each piece is the new words' stretch of a synthesis that starts with the words before them,
    cut where the model's own alignment puts the word borders."""
    units = voice.text_to_units("two high beeps")
    first, second = [i for i, u in enumerate(units) if u == voice.word_boundary]
    stream = voice.stream()
    assert stream.push(units[:first]).size == 0  # "two" may go on: nothing yet
    two = stream.push(units[first:first + 1])  # the boundary arrives: "two" is voiced
    audio, ends = voice.synthesize_aligned(units[:first])
    assert ends[-1] < audio.size and np.array_equal(two, audio[:ends[-1]])  # without the final silence
    high = stream.push(units[first + 1:second + 1])
    audio, ends = voice.synthesize_aligned(units[:second])
    assert np.array_equal(high, audio[ends[first - 1]:ends[-1]])  # " high", after "two" as context
    beeps = np.concatenate([stream.push(units[second + 1:]), stream.flush()])
    audio, ends = voice.synthesize_aligned(units)
    assert np.array_equal(beeps, audio[ends[second - 1]:])  # to the end of the utterance
    streamed, one_shot = np.concatenate([two, high, beeps]), voice.synthesize(units)
    heard = judge.choose(streamed, voice.sample_rate, ANSWERS)[0]
    assert heard == judge.choose(one_shot, voice.sample_rate, ANSWERS)[0] == "two high beeps"
    assert stream.flush().size == 0


def test_markers_are_dropped_and_foreign_ids_refused(voice):
    units = voice.text_to_units("cat")
    noisy = [voice.bos, voice.word_boundary, *units, voice.pad, voice.eos]
    assert np.array_equal(voice.synthesize(noisy), voice.synthesize(units))
    assert voice.synthesize([voice.pad, voice.word_boundary]).size == 0
    with pytest.raises(ValueError, match=r"unit ids \[300\] are outside the 256 units of the voice piper:en_US"):
        voice.synthesize([*units, 300])


def test_unknown_or_missing_vocoders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown installed Piper voice 'xx'"):
        load_vocoder("piper:xx")
    with pytest.raises(FileNotFoundError, match="Piper voice not found"):
        load_vocoder(tmp_path / "voice.onnx")
    with pytest.raises(FileNotFoundError, match="is not a vocoder folder"):
        load_vocoder(tmp_path)
    (tmp_path / "lonely.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="voice config not found"):
        load_vocoder(tmp_path / "lonely.onnx")
    with pytest.raises(ValueError, match="unknown vocoder 'hifigan'"):
        load_vocoder("hifigan")


def test_judge_decoder_equals_whisper_logits(judge, voice):
    features = judge._features(voice.synthesize(voice.text_to_units("blue")), voice.sample_rate)
    tokens = torch.tensor([judge.prefix + judge.tokenizer.encode(" Blue.") + [judge.tokenizer.eot]] * 3)
    with torch.no_grad():
        expected = judge.model.logits(tokens, features.expand(3, -1, -1))
    torch.testing.assert_close(_decoder_logits(judge.model, tokens, features), expected, atol=2e-4, rtol=1e-4)
