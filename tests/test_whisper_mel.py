"""The Whisper mel filters Lyra computes without librosa are librosa's (and so openai-whisper's)."""

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
