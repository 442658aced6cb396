"""Whisper encoder numerics: the mel filters Lyra computes without librosa are librosa's (and so
openai-whisper's), and a bf16 cast of the encoder still normalises in float32."""

import librosa
import numpy as np
import pytest

from lyra.model.whisper_encoder import N_FFT, mel_filterbank


@pytest.mark.parametrize("n_mels", [80, 128])
def test_mel_filterbank_equals_librosa(n_mels):
    ours = mel_filterbank(n_mels).numpy()
    reference = librosa.filters.mel(sr=16000, n_fft=N_FFT, n_mels=n_mels).astype(np.float32)
    assert ours.shape == (n_mels, N_FFT // 2 + 1)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-8)


def test_encoder_cast_to_bf16_runs_and_matches_fp32():
    """A model cast to bf16 as a whole (DeepSpeed's bf16) still normalises in float32."""
    import torch

    from lyra.config import AudioEncoderConfig
    from lyra.model.speech import WhisperEncoder

    torch.manual_seed(0)
    encoder = WhisperEncoder(AudioEncoderConfig(n_mels=80, n_audio_state=64, n_audio_head=2, n_audio_layer=2))
    mel = torch.randn(1, 80, 3000)
    reference = encoder(mel)
    cast = encoder.to(torch.bfloat16)
    out = cast(mel.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference, atol=0.1, rtol=0.05)
