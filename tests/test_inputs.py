"""Input handling: audio files, log-mel, vision patches, placeholders, configs."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from lyra.config import LyraConfig, load_config
from lyra.data.audio import AudioError, load_audio, to_mono_16k
from lyra.data.vision import VisionLimits, VisionProcessor, load_image
from lyra.model.speech import CLIP_SAMPLES, log_mel
from lyra.processing import LyraProcessor

from conftest import tone


# ---------------------------------------------------------------- audio files
def test_wav_at_16k_loads_unchanged(tmp_path):
    audio = tone(1.5)
    sf.write(tmp_path / "a.wav", audio, 16000, subtype="FLOAT")
    assert np.array_equal(load_audio(tmp_path / "a.wav"), audio)


def test_other_sample_rate_is_resampled(tmp_path):
    sf.write(tmp_path / "a.wav", tone(2.0, sample_rate=44100, freq=300.0), 44100)
    loaded = load_audio(tmp_path / "a.wav")
    assert loaded.shape[0] == 32000
    spectrum = np.abs(np.fft.rfft(loaded))
    assert abs(np.argmax(spectrum) * 16000 / loaded.shape[0] - 300.0) < 1.0  # pitch kept


@pytest.mark.parametrize("rate,length", [(22050, 34025 * 22050 // 16000), (44100, 44100 * 3 + 7), (8000, 12345)])
def test_resampling_equals_librosa_soxr_hq(rate, length):
    """soxr is called directly, with librosa's output length: the same samples as before."""
    import librosa

    samples = np.random.default_rng(rate).standard_normal(length).astype(np.float32)
    expected = librosa.resample(samples, orig_sr=rate, target_sr=16000, res_type="soxr_hq")
    assert np.array_equal(to_mono_16k(samples, rate), expected)


def test_stereo_is_downmixed_by_averaging(tmp_path):
    left, right = tone(1.0, freq=200.0), tone(1.0, freq=500.0)
    sf.write(tmp_path / "s.wav", np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    assert np.allclose(load_audio(tmp_path / "s.wav"), (left + right) / 2, atol=1e-7)


def test_missing_corrupt_and_empty_audio_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="audio file not found: .*nope.wav"):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "bad.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 10)
    with pytest.raises(AudioError, match="cannot decode audio file .*bad.wav"):
        load_audio(tmp_path / "bad.wav")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match="empty.wav: the audio is empty"):
        load_audio(tmp_path / "empty.wav")


def test_log_mel_batch_equals_whisper_per_clip():
    import whisper

    clips = torch.stack([torch.from_numpy(tone(30.0, freq=f)) * s for f, s in ((300.0, 1.0), (1200.0, 0.01))])
    ours = log_mel(clips, n_mels=80)
    for i in range(2):
        assert torch.allclose(ours[i], whisper.log_mel_spectrogram(clips[i], n_mels=80), atol=1e-5)
    assert clips.shape[1] == CLIP_SAMPLES


# ---------------------------------------------------------------- vision
def test_video_patches_equal_image_processor_for_a_still_clip():
    """Two identical frames == the image processor's patches (it repeats an image in time)."""
    rng = np.random.default_rng(0)
    frame = Image.fromarray(rng.integers(0, 255, (84, 112, 3), dtype=np.uint8))
    limits = VisionLimits(image_min_pixels=84 * 112, image_max_pixels=84 * 112,
                          video_min_pixels=84 * 112, video_max_pixels=84 * 112)
    processor = VisionProcessor(limits)
    image_pixels, image_grid = processor.images([frame])
    video_pixels, video_grid = processor.video([frame, frame])
    assert image_grid.tolist() == video_grid.tolist() == [[1, 6, 8]]
    assert torch.allclose(image_pixels.float(), video_pixels, atol=1e-5)


def test_unreadable_image_is_a_clear_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode image .*x.png"):
        load_image(tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="image file not found"):
        load_image(tmp_path / "y.png")


# ---------------------------------------------------------------- processor
@pytest.fixture()
def processor(tiny_tokenizer, tiny_config):
    limits = VisionLimits(image_min_pixels=56 * 56, image_max_pixels=56 * 56)
    return LyraProcessor(tiny_tokenizer, tiny_config, limits)


def test_placeholders_expand_to_pad_runs(processor, tiny_config):
    image = Image.new("RGB", (56, 56), "red")
    sample = processor([{"role": "user", "content": "<image>\nWhat did I say? <speech>"}],
                       images=[image], speech=[tone(95.0)])
    ids = sample.input_ids
    tokens = tiny_config.tokens
    assert int((ids == tokens.speech).sum()) == 4 * 300  # 95 s -> 4 clips
    assert int((ids == tokens.image).sum()) == 4  # 56x56 -> 4x4 patches -> 2x2 merged
    assert sample.mm_token_type_ids[ids == tokens.image].eq(1).all()
    assert sample.mm_token_type_ids[ids == tokens.speech].eq(0).all()
    start = int((ids == tokens.vision_start).nonzero()[0])
    assert ids[start + 5] == tokens.vision_end


def test_placeholder_count_mismatch_is_an_error(processor):
    with pytest.raises(ValueError, match=r"1 <speech> placeholder\(s\) but 2 speech file\(s\)"):
        processor([{"role": "user", "content": "<speech>"}], speech=[tone(1.0), tone(1.0)])
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but 0 image file\(s\)"):
        processor([{"role": "user", "content": "look <image>"}])


def test_sound_over_the_limit_is_an_error(processor):
    with pytest.raises(AudioError, match="sound is 31.0 s long, over the configured maximum of 30 s"):
        processor([{"role": "user", "content": "<sound>"}], sound=[tone(31.0)])


def test_array_with_sample_rate_is_resampled(processor):
    sample = processor([{"role": "user", "content": "<speech>"}], speech=[(tone(1.0, sample_rate=8000), 8000)])
    assert sample.speech[0].shape[0] == 16000


# ---------------------------------------------------------------- configs
def test_presets_load_and_unknown_ones_fail():
    assert load_config("mini").text.hidden_size == 1536
    with pytest.raises(ValueError, match="unknown model preset 'huge'; available: .*base.*tiny"):
        load_config("huge")


def test_unknown_config_key_is_an_error(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("text:\n  hidden_size: 64\n  num_attention_heads: 4\n  mrope_section: [2, 3, 3]\n  hiden: 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hiden'\] in 'text'"):
        load_config(path)


def test_config_round_trips_through_dict():
    config = load_config("nano")
    assert LyraConfig.from_dict(config.to_dict()) == config


def test_invalid_mrope_section_is_an_error():
    with pytest.raises(ValueError, match="mrope_section"):
        load_config("tiny", overrides={"text.mrope_section": [1, 1, 1]})


def test_unknown_unit_kind_is_an_error():
    with pytest.raises(ValueError, match=r"speech_generator.unit_kind 'mel' is not a known unit kind; "
                                         r"choose one of \['hubert', 'piper-phoneme'\]"):
        load_config("tiny", overrides={"speech_generator.unit_kind": "mel"})


def test_a_vocoder_for_other_units_is_refused(tiny_model):
    from conftest import small_vocoder

    with pytest.raises(ValueError, match="no speech generator"):
        tiny_model.attach_vocoder(small_vocoder())
    tiny_model.config.speech_generator.num_units = 1000
    tiny_model.add_speech_generator()
    with pytest.raises(ValueError, match=r"'small code HiFi-GAN' speaks 50 hubert units .* the speech generator "
                                         r"predicts 1000 hubert units"):
        tiny_model.attach_vocoder(small_vocoder())
