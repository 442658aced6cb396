"""Audio input: any file soundfile/librosa can decode -> 16 kHz mono float32.

Whisper works on 16 kHz mono. Other rates are resampled (soxr, as librosa's "soxr_hq") and
multi-channel audio is downmixed by averaging, rather than rejected: users hand us
phone calls, stereo podcasts and 44.1 kHz music alike.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from lyra.utils.io import atomic_file

SAMPLE_RATE = 16000  # Hz, what Whisper's front end expects


class AudioError(ValueError):
    """A file that cannot be used as audio input; the message names file and fix."""


def to_mono_16k(samples: np.ndarray, sample_rate: int, source: str = "<array>") -> np.ndarray:
    """Downmix `[T]` or `[T, C]` samples to mono and resample to 16 kHz.

    Returns:
        float32 array `[T']`.
    """
    samples = np.asarray(samples)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    elif samples.ndim != 1:
        raise AudioError(f"{source}: expected audio of shape [samples] or [samples, channels], got {samples.shape}")
    if samples.size == 0:
        raise AudioError(f"{source}: the audio is empty (0 samples); record or export it again")
    samples = samples.astype(np.float32, copy=False)
    if not np.isfinite(samples).all():
        raise AudioError(f"{source}: the audio contains NaN or infinite samples")
    if sample_rate != SAMPLE_RATE:
        import soxr  # librosa's resampler, called directly: librosa's first use costs seconds

        length = int(np.ceil(samples.shape[0] * SAMPLE_RATE / sample_rate))  # librosa's output length
        samples = soxr.resample(samples, sample_rate, SAMPLE_RATE, quality="HQ")[:length]
        samples = np.pad(samples, (0, length - samples.shape[0]))
    return np.ascontiguousarray(samples, dtype=np.float32)


def write_wav(path: str | Path, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> Path:
    """A 16-bit mono WAV, written atomically (lyra/utils/io.py); samples are clipped to [-1, 1]."""
    import soundfile as sf  # here, not at import: building a model needs no audio I/O

    samples = np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0)
    with atomic_file(path) as temporary:
        sf.write(str(temporary), samples, sample_rate, subtype="PCM_16", format="WAV")
    return Path(path)


def load_audio(path: str | Path) -> np.ndarray:
    """Read an audio file as 16 kHz mono float32 `[T]`.

    Raises:
        FileNotFoundError: the file does not exist.
        AudioError: it cannot be decoded, or it holds no samples.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio file not found: {path}")
    import soundfile as sf

    try:
        samples, sample_rate = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as soundfile_error:  # soundfile raises several types for bad files
        samples, sample_rate = _decode_with_librosa(path, soundfile_error)
    return to_mono_16k(samples, sample_rate, source=str(path))


def _decode_with_librosa(path: Path, soundfile_error: Exception) -> tuple[np.ndarray, int]:
    """Fallback for formats libsndfile lacks (e.g. m4a via audioread)."""
    import librosa

    try:
        with warnings.catch_warnings():  # librosa warns about the soundfile failure we already handle
            warnings.simplefilter("ignore", (UserWarning, FutureWarning))
            samples, sample_rate = librosa.load(str(path), sr=None, mono=False)
    except Exception as error:
        raise AudioError(
            f"cannot decode audio file {path}: {soundfile_error}; "
            f"convert it to 16 kHz WAV or FLAC (e.g. `sox in.ext -r 16000 out.wav`)"
        ) from error
    if samples.ndim == 2:  # librosa gives [C, T]
        samples = samples.T
    return samples, int(sample_rate)


def load_video_audio(path: str | Path) -> np.ndarray:
    """The audio track of a video file (PyAV) as 16 kHz mono float32 `[T]`."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AudioError(f"{path} has no audio track; ask about its frames with --video instead")
            stream = container.streams.audio[0]
            # Resample only; channels are averaged below, as load_audio does.
            resampler = av.AudioResampler(format="fltp", rate=SAMPLE_RATE)
            chunks = []
            for frame in container.decode(stream):
                chunks.extend(c.to_ndarray().mean(axis=0) for c in resampler.resample(frame))
            chunks.extend(c.to_ndarray().mean(axis=0) for c in resampler.resample(None))  # flush
    except AudioError:
        raise
    except Exception as error:
        raise AudioError(f"cannot decode the audio track of {path}: {error}") from error
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return to_mono_16k(samples, SAMPLE_RATE, source=str(path))
