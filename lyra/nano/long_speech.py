"""Long-speech records for the nano model's stage 3 (the paper's long-speech stage, in miniature).

Each record is a stage-1 record (a training image, a spoken question about it, read by a
training voice) whose recording is hidden at a random depth in tens of seconds of chatter:
everyday sentences that mention nothing the task asks about, read by the training voices in
turn, like a conversation. The model learns to find the one question in long speech and answer
it (stage-2 records are mixed in: the adapter starts from the base LLM, so it learns spoken
questions too); `python -m lyra.nano.reproduce` (d) then hides held-out questions in a real recorded call it
never heard. Built under `<task root>/long_speech/` (records: `long_speech.json`), reused while
the task and spec match.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from lyra.data.audio import SAMPLE_RATE, load_audio, write_wav
from lyra.data.tts import make_backend, synthesize_16k
from lyra.eval.needle import build_haystack
from lyra.nano.task import HELD_OUT_VOICE, VOICES, NanoTask
from lyra.utils.io import atomic_write_json

# No colours, shapes, counts, sign words or sounds, and no questions: the needle is the only one.
CHATTER = (
    "I went to the market this morning and bought some bread.",
    "The train was late again, so I walked the rest of the way.",
    "My sister is visiting next week with her children.",
    "We should clean the kitchen before the guests arrive.",
    "The meeting moved to Thursday afternoon.",
    "He told me the new cafe opens early on weekends.",
    "I have not finished reading that book yet.",
    "Let me know when you are ready to leave.",
    "The weather has been strange all month.",
    "She said the tickets were sold out by noon.",
    "Our neighbours are painting their house.",
    "I think the library closes at six today.",
)
DIRECTORY = "long_speech"
RECORDS_FILE = "long_speech.json"
PAUSE_SECONDS = (0.2, 0.6)  # between chatter sentences


@dataclass(frozen=True)
class LongSpeechSpec:
    records: int = 160
    clean_records: int = 800  # stage-2 records mixed in: the new adapter learns the task itself from them
    min_seconds: float = 35.0  # past 30 s, so inference picks the "long_speech" adapter
    max_seconds: float = 90.0
    seed: int = 0

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def chatter_name(sentence: int, voice: str) -> str:
    return f"{DIRECTORY}/chatter/{voice}/{sentence:02d}.wav"


def build_long_speech(task: NanoTask, spec: LongSpeechSpec | None = None, progress: bool = True) -> Path:
    """Write the chatter recordings and haystacks under `long_speech/`, and `long_speech.json`; returns its path."""
    spec = spec or LongSpeechSpec()
    folder = task.root / DIRECTORY
    out = task.root / RECORDS_FILE  # beside the other phase files: media paths are relative to the task root
    stamp = {"spec": spec.fingerprint(), "task": task.fingerprint}
    manifest = folder / "manifest.json"
    if out.is_file() and manifest.is_file() and json.loads(manifest.read_text()) == stamp:
        return out

    voices = [(name, backend, speaker) for name, backend, speaker in VOICES if name != HELD_OUT_VOICE]
    backends = {backend: make_backend(backend) for _, backend, _ in voices}
    chatter: dict[str, list[np.ndarray]] = {}
    jobs = [(voice, k) for voice, _, _ in voices for k in range(len(CHATTER))]
    table = {name: (backend, speaker) for name, backend, speaker in voices}
    for voice, k in tqdm(jobs, desc="nano long speech: chatter (TTS)", disable=not progress, leave=False):
        backend, speaker = table[voice]
        samples = synthesize_16k(backends[backend], CHATTER[k], speaker)
        write_wav(task.root / chatter_name(k, voice), samples)
        chatter.setdefault(voice, []).append(samples)

    rng = np.random.default_rng([spec.seed, 31])
    sources = task.records("stage1")
    records: list[dict[str, Any]] = []
    for i in tqdm(range(spec.records), desc="nano long speech: haystacks", disable=not progress, leave=False):
        source = sources[i % len(sources)]
        length = float(rng.uniform(spec.min_seconds, spec.max_seconds))
        background = _conversation(chatter, length, rng)
        needle = load_audio(task.root / source["speech"][0])
        audio, at = build_haystack(background, needle, length, float(rng.uniform(0.0, 1.0)))
        relative = f"{DIRECTORY}/haystacks/{i:04d}.wav"
        write_wav(task.root / relative, audio)
        record = {key: value for key, value in source.items() if key != "speech_asr"}  # the transcript is the needle only
        record["id"] = f"long-{i}"
        record["speech"] = [relative]
        record["meta"] = {**source["meta"], "needle_at": round(at, 2), "seconds": round(length, 2)}
        records.append(record)
    records += task.records("stage2")[: spec.clean_records]
    atomic_write_json(out, records)
    atomic_write_json(manifest, stamp)
    return out


def _conversation(chatter: dict[str, list[np.ndarray]], seconds: float, rng: np.random.Generator) -> np.ndarray:
    """At least `seconds` of chatter: random sentences, the speaker changing at random, short pauses."""
    voices = sorted(chatter)
    parts, total = [], 0
    while total < seconds * SAMPLE_RATE:
        voice = voices[int(rng.integers(len(voices)))]
        sentence = chatter[voice][int(rng.integers(len(chatter[voice])))]
        pause = np.zeros(int(rng.uniform(*PAUSE_SECONDS) * SAMPLE_RATE), np.float32)
        parts += [sentence.astype(np.float32), pause]
        total += len(sentence) + len(pause)
    return np.concatenate(parts)
