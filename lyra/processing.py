"""Turn a conversation with `<image>`, `<video>`, `<speech>`, `<sound>` placeholders
and the matching files into model inputs.

Each placeholder becomes a run of pad tokens whose length is the number of embeddings
its file produces (Qwen2-VL's scheme, extended to audio):

    <image>  -> <|vision_start|> <|image_pad|> * (t*h*w / 4) <|vision_end|>
    <video>  -> <|vision_start|> <|video_pad|> * (t*h*w / 4) <|vision_end|>
    <speech> -> <|speech_pad|> * (300 per started 30 s clip)
    <sound>  -> <|sound_pad|>  * (300 per started 30 s clip)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from lyra.config import LyraConfig
from lyra.data.audio import SAMPLE_RATE, AudioError, load_audio, to_mono_16k
from lyra.data.vision import VisionLimits, VisionProcessor, load_image, load_video_frames
from lyra.model.speech import num_clips

PLACEHOLDERS = ("image", "video", "speech", "sound")
PLACEHOLDER_PATTERN = re.compile(r"<(image|video|speech|sound)>")
IGNORE_INDEX = -100

AudioInput = Union[str, Path, np.ndarray, tuple]  # path, 16 kHz mono array, or (array, sample_rate)
ImageInput = Union[str, Path, Image.Image]
VideoInput = Union[str, Path, list]  # path or a list of PIL frames


@dataclass
class ProcessedSample:
    """One tokenised sample and its media tensors."""

    input_ids: torch.Tensor  # [L]
    mm_token_type_ids: torch.Tensor  # [L]: 0 text (incl. speech/sound), 1 image, 2 video
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    speech: list[torch.Tensor] = field(default_factory=list)  # 16 kHz waveforms, in order
    sound: list[torch.Tensor] = field(default_factory=list)
    labels: torch.Tensor | None = None  # [L], IGNORE_INDEX outside answers


class LyraProcessor:
    def __init__(self, tokenizer, config: LyraConfig, limits: VisionLimits | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.tokens = config.tokens
        vision = config.vision
        self.vision = VisionProcessor(
            limits or VisionLimits(), vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        )

    # ------------------------------------------------------------------ media
    def load_audio(self, source: AudioInput, kind: str) -> torch.Tensor:
        """Any supported audio input -> `[T]` 16 kHz mono float32, checked against the limit."""
        if isinstance(source, (str, Path)):
            samples, name = load_audio(source), str(source)
        elif isinstance(source, tuple):
            samples, name = to_mono_16k(source[0], int(source[1])), f"<{kind} array>"
        else:
            samples, name = to_mono_16k(source, SAMPLE_RATE), f"<{kind} array>"
        limit = self.config.speech.max_seconds if kind == "speech" else self.config.sound.max_seconds
        seconds = samples.shape[0] / SAMPLE_RATE
        if seconds > limit:
            raise AudioError(
                f"{name}: {kind} is {seconds:.1f} s long, over the configured maximum of {limit:.0f} s "
                f"({kind}.max_seconds in the model config); trim the audio or raise the limit"
            )
        return torch.from_numpy(samples)

    def audio_token_count(self, waveform: torch.Tensor) -> int:
        return num_clips(waveform.shape[0]) * self.config.speech_tokens_per_clip

    # ------------------------------------------------------------------ text
    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __call__(
        self,
        messages: list[dict[str, str]],
        images: list[ImageInput] | None = None,
        videos: list[VideoInput] | None = None,
        speech: list[AudioInput] | None = None,
        sound: list[AudioInput] | None = None,
        add_generation_prompt: bool = True,
    ) -> ProcessedSample:
        """Tokenise one conversation (`[{"role": ..., "content": ...}]`) with its media."""
        media = {"image": images or [], "video": videos or [], "speech": speech or [], "sound": sound or []}
        text = self.render(messages, add_generation_prompt)
        check_placeholder_counts(text, {k: len(v) for k, v in media.items()})

        sample = ProcessedSample(input_ids=torch.empty(0, dtype=torch.long), mm_token_type_ids=torch.empty(0))
        runs: dict[str, list[list[int]]] = {k: [] for k in PLACEHOLDERS}
        if media["image"]:
            pixel_values, grids = self.vision.images([load_image(i) for i in media["image"]])
            sample.pixel_values, sample.image_grid_thw = pixel_values, grids
            runs["image"] = [self._vision_run(self.tokens.image, g) for g in grids]
        if media["video"]:
            patches, grids = [], []
            for video in media["video"]:
                frames = video if isinstance(video, list) else load_video_frames(
                    video, self.vision.limits, self.vision.temporal_patch_size
                )
                flat, grid = self.vision.video(frames)
                patches.append(flat)
                grids.append(grid)
            sample.pixel_values_videos, sample.video_grid_thw = torch.cat(patches), torch.cat(grids)
            runs["video"] = [self._vision_run(self.tokens.video, g) for g in sample.video_grid_thw]
        for kind, token_id in (("speech", self.tokens.speech), ("sound", self.tokens.sound)):
            waveforms = [self.load_audio(a, kind) for a in media[kind]]
            setattr(sample, kind, waveforms)
            runs[kind] = [[token_id] * self.audio_token_count(w) for w in waveforms]

        ids: list[int] = []
        pieces = PLACEHOLDER_PATTERN.split(text)  # text, kind, text, kind, ..., text
        next_run = {k: 0 for k in PLACEHOLDERS}
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
            else:
                ids.extend(runs[piece][next_run[piece]])
                next_run[piece] += 1
        sample.input_ids = torch.tensor(ids, dtype=torch.long)
        sample.mm_token_type_ids = mm_token_types(sample.input_ids, self.tokens.image, self.tokens.video)
        return sample

    def _vision_run(self, pad_id: int, grid_thw: torch.Tensor) -> list[int]:
        n = self.vision.tokens_for_grid(grid_thw)
        return [self.tokens.vision_start] + [pad_id] * n + [self.tokens.vision_end]

    def decode(self, token_ids: torch.Tensor) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def check_placeholder_counts(text: str, given: dict[str, int]) -> None:
    """Raise if the number of `<kind>` placeholders differs from the files given."""
    found = {k: 0 for k in PLACEHOLDERS}
    for kind in PLACEHOLDER_PATTERN.findall(text):
        found[kind] += 1
    problems = [
        f"{found[k]} <{k}> placeholder(s) but {given.get(k, 0)} {k} file(s)"
        for k in PLACEHOLDERS
        if found[k] != given.get(k, 0)
    ]
    if problems:
        raise ValueError(
            "placeholders and files do not match: " + "; ".join(problems)
            + ". Put exactly one placeholder in the text per file, in the order the files are given"
        )


def mm_token_types(input_ids: torch.Tensor, image_id: int, video_id: int) -> torch.Tensor:
    types = torch.zeros_like(input_ids, dtype=torch.int)
    types[input_ids == image_id] = 1
    types[input_ids == video_id] = 2
    return types


def collate(samples: list[ProcessedSample], pad_id: int, padding_side: str = "right") -> dict[str, Any]:
    """Pad samples into a batch for `LyraForConditionalGeneration.forward/generate`.

    Use `padding_side="left"` for generation so every prompt ends at the last column.
    """
    length = max(s.input_ids.shape[0] for s in samples)
    batch_size = len(samples)
    input_ids = torch.full((batch_size, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch_size, length), dtype=torch.long)
    mm_types = torch.zeros((batch_size, length), dtype=torch.int)
    labels = torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        n = sample.input_ids.shape[0]
        cols = slice(length - n, length) if padding_side == "left" else slice(0, n)
        input_ids[row, cols] = sample.input_ids
        attention_mask[row, cols] = 1
        mm_types[row, cols] = sample.mm_token_type_ids
        if sample.labels is not None:
            labels[row, cols] = sample.labels
    batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if any(s.labels is not None for s in samples):
        batch["labels"] = labels
    for name in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [getattr(s, name) for s in samples if getattr(s, name) is not None]
        if parts:
            batch[name] = torch.cat(parts)
    if "image_grid_thw" in batch or "video_grid_thw" in batch:
        batch["mm_token_type_ids"] = mm_types
    for kind in ("speech", "sound"):
        waveforms = [w for s in samples for w in getattr(s, kind)]
        if waveforms:
            batch[kind] = waveforms
    return batch
