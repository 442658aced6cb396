"""Turn a conversation with `<image>`, `<video>`, `<speech>`, `<sound>` placeholders
and the matching files into model inputs.

Each placeholder becomes a run of pad tokens whose length is the number of embeddings
its file produces (Qwen2-VL's scheme, extended to audio):

    <image>  -> <|vision_start|> <|image_pad|> * (t*h*w / 4) <|vision_end|>
    <video>  -> <|vision_start|> <|video_pad|> * (t*h*w / 4) <|vision_end|>
    <speech> -> <|speech_pad|> * (300 per started 30 s clip)
    <sound>  -> <|sound_pad|>  * (300 per started 30 s clip)

`LyraProcessor.__call__` builds inference prompts. For training, `encode_turns` tokenises a
conversation message by message and returns labels (assistant answers and their
`<|im_end|>`; everything else `IGNORE_INDEX`), so that `lyra.data.dataset` can drop whole
trailing turns when a sample is over the length budget; `for_training` is the one-call form.
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


@dataclass
class EncodedTurn:
    """One message of a conversation, tokenised (see `LyraProcessor.encode_turns`)."""

    role: str
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the token is not learned
    media: dict[str, int] = field(default_factory=dict)  # placeholders of each kind in this message


@dataclass
class MediaInputs:
    """Preprocessed media of one conversation, one entry per file, in placeholder order."""

    image_pixels: list[torch.Tensor] = field(default_factory=list)  # [rows_i, C*tp*p*p]
    image_grids: list[torch.Tensor] = field(default_factory=list)  # [1, 3]
    video_pixels: list[torch.Tensor] = field(default_factory=list)
    video_grids: list[torch.Tensor] = field(default_factory=list)
    speech: list[torch.Tensor] = field(default_factory=list)  # 16 kHz waveforms
    sound: list[torch.Tensor] = field(default_factory=list)
    runs: dict[str, list[list[int]]] = field(default_factory=lambda: {k: [] for k in PLACEHOLDERS})

    def fill(self, sample: ProcessedSample, keep: dict[str, int] | None = None) -> None:
        """Set the media fields of `sample` from the first `keep[kind]` files of each kind (all by default)."""
        keep = keep or {}
        n_img = keep.get("image", len(self.image_pixels))
        n_vid = keep.get("video", len(self.video_pixels))
        if n_img:
            sample.pixel_values = torch.cat(self.image_pixels[:n_img])
            sample.image_grid_thw = torch.cat(self.image_grids[:n_img])
        if n_vid:
            sample.pixel_values_videos = torch.cat(self.video_pixels[:n_vid])
            sample.video_grid_thw = torch.cat(self.video_grids[:n_vid])
        sample.speech = self.speech[: keep.get("speech", len(self.speech))]
        sample.sound = self.sound[: keep.get("sound", len(self.sound))]


def assemble(
    turns: list[EncodedTurn], media: MediaInputs, image_id: int, video_id: int, sample: ProcessedSample | None = None
) -> ProcessedSample:
    """Join encoded turns into one sample with ids, labels and the media those turns use."""
    ids = [i for t in turns for i in t.input_ids]
    labels = [i for t in turns for i in t.labels]
    if sample is None:
        sample = ProcessedSample(input_ids=torch.empty(0, dtype=torch.long), mm_token_type_ids=torch.empty(0))
    keep = {kind: sum(t.media.get(kind, 0) for t in turns) for kind in PLACEHOLDERS}
    media.fill(sample, keep)
    sample.input_ids = torch.tensor(ids, dtype=torch.long)
    sample.labels = torch.tensor(labels, dtype=torch.long)
    sample.mm_token_type_ids = mm_token_types(sample.input_ids, image_id, video_id)
    return sample


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
        if kind == "sound":
            self.config.check_sound_input()
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

    def audio_token_count(self, waveform: torch.Tensor, kind: str = "speech") -> int:
        return num_clips(waveform.shape[0], self.config.speech.window_rule) * self.config.audio_tokens_per_clip(kind)

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

        inputs = self.process_media(media["image"], media["video"], media["speech"], media["sound"])
        sample = ProcessedSample(input_ids=torch.empty(0, dtype=torch.long), mm_token_type_ids=torch.empty(0))
        inputs.fill(sample)
        next_run = {k: 0 for k in PLACEHOLDERS}
        ids = self._encode_text(text, inputs.runs, next_run)
        sample.input_ids = torch.tensor(ids, dtype=torch.long)
        sample.mm_token_type_ids = mm_token_types(sample.input_ids, self.tokens.image, self.tokens.video)
        return sample

    # ------------------------------------------------------------------ training
    def process_media(
        self,
        images: list[ImageInput] | None = None,
        videos: list[VideoInput] | None = None,
        speech: list[AudioInput] | None = None,
        sound: list[AudioInput] | None = None,
    ) -> MediaInputs:
        """Load and preprocess media, one entry per file, in placeholder order."""
        out = MediaInputs()
        if images:
            pixel_values, grids = self.vision.images([load_image(i) for i in images])
            rows = [int(g.prod()) for g in grids]
            out.image_pixels = list(torch.split(pixel_values, rows))
            out.image_grids = [g.unsqueeze(0) for g in grids]
            out.runs["image"] = [self._vision_run(self.tokens.image, g) for g in grids]
        for video in videos or []:
            frames = video if isinstance(video, list) else load_video_frames(
                video, self.vision.limits, self.vision.temporal_patch_size
            )
            flat, grid = self.vision.video(frames)
            out.video_pixels.append(flat)
            out.video_grids.append(grid)
            out.runs["video"].append(self._vision_run(self.tokens.video, grid[0]))
        for kind, token_id, sources in (("speech", self.tokens.speech, speech), ("sound", self.tokens.sound, sound)):
            waveforms = [self.load_audio(a, kind) for a in sources or []]
            setattr(out, kind, waveforms)
            out.runs[kind] = [[token_id] * self.audio_token_count(w, kind) for w in waveforms]
        return out

    def encode_turns(self, messages: list[dict[str, str]], runs: dict[str, list[list[int]]]) -> list[EncodedTurn]:
        """Tokenise a conversation message by message, with labels for training.

        The conversation is rendered with the tokenizer's chat template; each message's
        share of the rendered text is tokenised on its own, placeholders becoming the pad
        runs of `runs` (consumed in order, as in `__call__`). Labels are the ids of each
        assistant message's content plus the end-of-turn special token that follows it
        (`<|im_end|>` in ChatML); everything else -- system prompt, user turns, role
        headers, the newline after `<|im_end|>` -- is `IGNORE_INDEX`. With ChatML the
        concatenated ids equal `self(messages, ..., add_generation_prompt=False).input_ids`.

        Raises:
            ValueError: a placeholder in an assistant message, more placeholders than
                runs, or a chat template whose renderings are not prefixes of each other.
        """
        special_ids = set(self.tokenizer.all_special_ids)
        next_run = {k: 0 for k in PLACEHOLDERS}
        turns: list[EncodedTurn] = []
        previous = ""
        for k, message in enumerate(messages):
            full = self.render(messages[: k + 1], add_generation_prompt=False)
            if not full.startswith(previous):
                raise ValueError(
                    "the chat template does not render a conversation as a prefix of its continuation; "
                    "turn-by-turn tokenisation needs a ChatML-like template"
                )
            piece = full[len(previous):]
            turn = EncodedTurn(role=message["role"], input_ids=[], labels=[])
            before = {kind: next_run[kind] for kind in PLACEHOLDERS}
            if message["role"] == "assistant":
                content = message["content"]
                if PLACEHOLDER_PATTERN.search(content):
                    raise ValueError(f"assistant message {k} holds a media placeholder; put media in user turns")
                head, body, tail = self._split_assistant_piece(messages[:k], previous, piece, content)
                head_ids = self.tokenizer.encode(head, add_special_tokens=False)
                body_ids = self.tokenizer.encode(body, add_special_tokens=False)
                tail_ids = self.tokenizer.encode(tail, add_special_tokens=False)
                tail_labels = [IGNORE_INDEX] * len(tail_ids)
                if tail_ids and tail_ids[0] in special_ids:  # the end-of-turn token is learned
                    tail_labels[0] = tail_ids[0]
                turn.input_ids = head_ids + body_ids + tail_ids
                turn.labels = [IGNORE_INDEX] * len(head_ids) + body_ids + tail_labels
            else:
                turn.input_ids = self._encode_text(piece, runs, next_run)
                turn.labels = [IGNORE_INDEX] * len(turn.input_ids)
            turn.media = {kind: next_run[kind] - before[kind] for kind in PLACEHOLDERS}
            turns.append(turn)
            previous = full
        return turns

    def _split_assistant_piece(self, history, previous: str, piece: str, content: str) -> tuple[str, str, str]:
        """Split an assistant message's rendered text into (header, content, trailer)."""
        prompt = self.render(history, add_generation_prompt=True) if history else ""
        header_len = len(prompt) - len(previous)
        if prompt.startswith(previous) and header_len >= 0 and piece[header_len:].startswith(content):
            at = header_len
        else:  # a template that rewrites the prompt: find the content itself
            at = piece.rfind(content)
            if at < 0:
                raise ValueError("cannot find the assistant message in the rendered chat template output")
        return piece[:at], piece[at:at + len(content)], piece[at + len(content):]

    def _encode_text(self, text: str, runs: dict[str, list[list[int]]], next_run: dict[str, int]) -> list[int]:
        ids: list[int] = []
        pieces = PLACEHOLDER_PATTERN.split(text)  # text, kind, text, kind, ..., text
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
            else:
                if next_run[piece] >= len(runs[piece]):
                    raise ValueError(f"more <{piece}> placeholders than {piece} inputs")
                ids.extend(runs[piece][next_run[piece]])
                next_run[piece] += 1
        return ids

    def for_training(
        self,
        messages: list[dict[str, str]],
        images: list[ImageInput] | None = None,
        videos: list[VideoInput] | None = None,
        speech: list[AudioInput] | None = None,
        sound: list[AudioInput] | None = None,
    ) -> ProcessedSample:
        """`__call__` for a complete conversation, with `labels` (see `encode_turns`); no truncation."""
        media = {"image": images or [], "video": videos or [], "speech": speech or [], "sound": sound or []}
        check_placeholder_counts(
            "".join(m["content"] for m in messages), {k: len(v) for k, v in media.items()}
        )
        inputs = self.process_media(media["image"], media["video"], media["speech"], media["sound"])
        return assemble(self.encode_turns(messages, inputs.runs), inputs, self.tokens.image, self.tokens.video)

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
