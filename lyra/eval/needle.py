"""Needle in a long-speech haystack (paper, Sec. 4.3 and Fig. 6).

A spoken needle -- a question and the sentence that answers it -- is inserted at a depth
(fraction of the recording) into a background built from long recordings, for each length
of a grid; the model hears the haystack and is asked the question in text. A trial scores 1
when the normalised answer appears in the normalised reply. The grid of mean scores (lengths
across, depths down) is drawn as a heatmap like Fig. 6.

Background: the given recordings are concatenated (16 kHz mono) and cycled when shorter than
the haystack; trial `k` of a cell starts the background `k * stride` seconds in, so the
samples of one cell hear different material (the paper averages five). The needle goes at
the quietest 20 ms frame within +-0.5 s of its nominal position, so it rarely cuts a word,
with 0.3 s of silence on both sides.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
from PIL import Image, ImageDraw, ImageFont

from lyra.data.audio import SAMPLE_RATE, load_audio, to_mono_16k
from lyra.eval.metrics import whisper_normalizer

GAP_SECONDS = 0.3  # silence around the needle
SNAP_SECONDS = 0.5  # how far the needle may move to land in a pause
FRAME = SAMPLE_RATE // 50  # 20 ms energy frames


@dataclass(frozen=True)
class Needle:
    """What is hidden and how it is asked: `spoken` goes into the audio, `question` is the
    text prompt, `answer` what the reply must contain."""

    question: str
    answer: str
    spoken: str

    @classmethod
    def from_sentence(cls, question: str, answer: str, answer_sentence: str) -> "Needle":
        """The needle as the paper builds it: the question, then the sentence answering it."""
        return cls(question=question, answer=answer, spoken=f"{question} {answer_sentence}")


DEFAULT_NEEDLE = Needle.from_sentence(
    question="What is the secret password of the blue castle?",
    answer="pineapple",
    answer_sentence="The secret password of the blue castle is pineapple.",
)


def synthesize_espeak(text: str, voice: str = "en-us", words_per_minute: int = 160) -> np.ndarray:
    """Speak `text` with espeak-ng; 16 kHz mono float32."""
    binary = shutil.which("espeak-ng")
    if binary is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng, or `make setup`); "
                           "it speaks the needle -- or pass recorded needle audio instead")

    with tempfile.TemporaryDirectory(prefix="lyra-needle-") as folder:
        out = Path(folder) / "needle.wav"
        subprocess.run([binary, "-v", voice, "-s", str(words_per_minute), "-w", str(out), text],
                       check=True, capture_output=True, timeout=120)
        samples, rate = sf.read(str(out), dtype="float32")
    return to_mono_16k(samples, int(rate), source="espeak-ng")


def load_background(paths: Sequence[str | Path]) -> np.ndarray:
    """The recordings, each 16 kHz mono, end to end."""
    if not paths:
        raise ValueError("the haystack needs at least one background recording")
    return np.concatenate([load_audio(p) for p in paths])


def _quiet_point(audio: np.ndarray, position: int, radius: int) -> int:
    """The start of the lowest-energy 20 ms frame within `radius` samples of `position`."""
    start, stop = max(0, position - radius), min(len(audio), position + radius)
    if stop - start < 2 * FRAME:
        return position
    window = audio[start:stop]
    frames = len(window) // FRAME
    energy = (window[: frames * FRAME].reshape(frames, FRAME) ** 2).mean(axis=1)
    return start + int(np.argmin(energy)) * FRAME


def build_haystack(background: np.ndarray, needle: np.ndarray, length_seconds: float, depth: float,
                   offset_seconds: float = 0.0) -> tuple[np.ndarray, float]:
    """A `length_seconds` recording with `needle` at `depth` (0 = start, 1 = end).

    Returns:
        (audio `[length_seconds * 16000]` float32, the second at which the needle starts).
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    total = int(round(length_seconds * SAMPLE_RATE))
    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), np.float32)
    insert = np.concatenate([gap, needle.astype(np.float32), gap])
    room = total - len(insert)
    if room < 0:
        raise ValueError(f"a {length_seconds:g} s haystack cannot hold the {len(needle) / SAMPLE_RATE:.1f} s needle")
    if len(background) == 0:
        raise ValueError("the background recording is empty")
    start = int(offset_seconds * SAMPLE_RATE) % len(background)
    repeats = math.ceil((start + room) / len(background)) if room else 0
    hay = np.tile(background, max(repeats, 1))[start:start + room] if room else np.zeros(0, np.float32)
    position = int(round(depth * room))
    if 0 < position < room:
        position = _quiet_point(hay, position, int(SNAP_SECONDS * SAMPLE_RATE))
    audio = np.concatenate([hay[:position], insert, hay[position:]]).astype(np.float32)
    return audio, (position + len(gap)) / SAMPLE_RATE


def normalize_text(text: str) -> str:
    """Whisper's English normaliser ("Seven." -> "7"), so spelling of numbers does not matter."""
    return " ".join(whisper_normalizer()(text).split())


def retrieval_score(reply: str, answer: str) -> float:
    """1.0 when the normalised `answer` occurs in the normalised `reply` as whole words."""
    wanted = normalize_text(answer)
    return float(bool(wanted) and f" {wanted} " in f" {normalize_text(reply)} ")


def trial_id(length: float, depth: float, sample: int) -> str:
    return f"len{length:g}_depth{depth:g}_s{sample}"


def cell_id(length: float, depth: float) -> str:
    """The id of a grid cell, the unit of a sharded run (its trials go together)."""
    return f"len{length:g}_depth{depth:g}"


def grid_scores(records: Sequence[dict], lengths: Sequence[float], depths: Sequence[float]) -> list[list[float | None]]:
    """Mean score per (depth row, length column); None where no trial finished."""
    cells: dict[tuple[float, float], list[float]] = {}
    for record in records:
        if "score" in record:
            cells.setdefault((float(record["length"]), float(record["depth"])), []).append(float(record["score"]))
    return [[(sum(v) / len(v)) if (v := cells.get((float(length), float(depth)))) else None for length in lengths]
            for depth in depths]


# ----------------------------------------------------------------------------- heatmap

def _colour(score: float | None) -> tuple[int, int, int]:
    """Red (0) -> yellow (0.5) -> green (1); grey for a missing cell."""
    if score is None:
        return (200, 200, 200)
    red, yellow, green = np.array([215, 48, 39]), np.array([254, 224, 139]), np.array([26, 152, 80])
    low, high, t = (red, yellow, score * 2) if score < 0.5 else (yellow, green, score * 2 - 1)
    return tuple(int(c) for c in (low + (high - low) * t).round())


def draw_heatmap(scores: list[list[float | None]], lengths: Sequence[float], depths: Sequence[float],
                 title: str = "Needle in a speech haystack", cell: int = 56):
    """The length x depth grid as a PIL image: one cell per (depth, length), coloured by the
    mean retrieval score and labelled with it, axes in seconds and percent depth."""
    font = ImageFont.load_default(size=13)
    small = ImageFont.load_default(size=11)
    left, top, right, bottom = 70, 64, 90, 56
    title_width = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)
    width = max(left + cell * len(lengths) + right, int(title_width) + 20)
    height = top + cell * len(depths) + bottom
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 12), title, fill="black", font=font)
    for row, depth in enumerate(depths):
        y = top + row * cell
        draw.text((left - 8, y + cell / 2), f"{100 * depth:g}%", fill="black", font=small, anchor="rm")
        for column, length in enumerate(lengths):
            x = left + column * cell
            score = scores[row][column]
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=_colour(score), outline="white")
            label = "-" if score is None else f"{score:.2f}"
            draw.text((x + cell / 2, y + cell / 2), label, fill="black", font=small, anchor="mm")
    grid_bottom = top + cell * len(depths)
    for column, length in enumerate(lengths):
        draw.text((left + column * cell + cell / 2, grid_bottom + 6), f"{length:g}", fill="black", font=small,
                  anchor="mt")
    draw.text((left + cell * len(lengths) / 2, grid_bottom + 26), "haystack length (s)", fill="black", font=font,
              anchor="mt")
    draw.text((left - 8, top - 8), "depth", fill="black", font=font, anchor="rb")
    # Colour bar: score 1 at the top, 0 at the bottom.
    bar_x, bar_h = left + cell * len(lengths) + 24, cell * len(depths)
    for k in range(bar_h):
        draw.line((bar_x, top + k, bar_x + 16, top + k), fill=_colour(1 - k / max(bar_h - 1, 1)))
    draw.text((bar_x + 22, top), "1.0", fill="black", font=small, anchor="lt")
    draw.text((bar_x + 22, top + bar_h), "0.0", fill="black", font=small, anchor="lb")
    return image
