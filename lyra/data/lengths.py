"""Token-count and modality estimates of every training sample, for length-grouped sampling.

Nothing is decoded: text is counted with the tokenizer (batched) plus the chat template's
overhead, and media tokens come from metadata (image sizes from the file header, audio
durations from `soundfile.info`, a video's size, frame count and fps from its container). The
estimates are cached in a JSON file keyed by the data file, the roots and the limits.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import av
import soundfile as sf
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from lyra.data.audio import SAMPLE_RATE
from lyra.data.records import BadSampleError, ParsedRecord, RecordStore, inspect_record
from lyra.data.vision import IMAGE_SUFFIXES, even_frame_count, sample_frame_indices
from lyra.model.speech import num_clips
from lyra.processing import PLACEHOLDERS, PLACEHOLDER_PATTERN, LyraProcessor
from lyra.utils.io import atomic_write_text


@dataclass
class SampleInfo:
    """Cheap per-sample facts for samplers: an estimated token count and the modality."""

    length: int
    modality: str


class LengthEstimator:
    """Estimates `SampleInfo` for every record of `records`.

    Args:
        records: the data file's records.
        processor: the `LyraProcessor` (tokenizer, chat template, vision limits, audio token counts).
        resolve: `(kind, path as written) -> file`, the dataset's path resolution.
        roots: the folders paths are relative to (part of the cache key).
        model_max_length: lengths are capped at it (None: no cap).
        cache: optional JSON file that keeps the estimates between runs.
    """

    def __init__(self, records: RecordStore, processor: LyraProcessor, resolve: Callable[[str, str], Path],
                 roots: tuple[Path, ...], model_max_length: int | None = None, cache: Path | None = None):
        self.records = records
        self.processor = processor
        self.resolve = resolve
        self.roots = roots
        self.model_max_length = model_max_length
        self.cache = cache

    def estimate(self, probe_media: bool = True, workers: int = 8) -> list[SampleInfo]:
        """Estimated length and modality of every record (read from and written to `cache`).

        Text is counted with the tokenizer (batched) plus the chat template's overhead; media
        tokens come from metadata only: image sizes from the file header, audio durations from
        `soundfile.info`, video size/frame count/fps from the container. With
        `probe_media=False` no file is opened and fixed per-kind estimates are used.
        Unreadable records get length 0 and modality "invalid".
        """
        key = self._cache_key(probe_media)
        cached = self._read_cache(key)
        if cached is not None:
            return cached
        parsed: list[ParsedRecord | None] = []
        for i in range(len(self.records)):
            try:
                record, _ = inspect_record(self.records.get(i))
            except BadSampleError:
                record = None
            parsed.append(record)
        text_lengths = self._text_lengths(parsed)
        jobs = [(i, kind, path) for i, p in enumerate(parsed) if p for kind in PLACEHOLDERS for path in p.media[kind]]
        media_tokens = [0] * len(parsed)
        estimate = self._estimate_media_tokens if probe_media else self._default_media_tokens
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for (i, _, _), n in zip(jobs, pool.map(lambda job: estimate(job[1], job[2]), jobs)):
                media_tokens[i] += n
        info = []
        for p, text, media in zip(parsed, text_lengths, media_tokens):
            if p is None:
                info.append(SampleInfo(0, "invalid"))
                continue
            length = text + media
            if self.model_max_length is not None:
                length = min(length, self.model_max_length)
            info.append(SampleInfo(int(length), p.modality))
        self._write_cache(key, info)
        return info

    def _text_lengths(self, parsed: list[ParsedRecord | None]) -> list[int]:
        tokenizer = self.processor.tokenizer
        render = self.processor.render
        empty = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
        base = len(tokenizer.encode(render(empty, False), add_special_tokens=False))
        per_pair = len(tokenizer.encode(render(empty * 2, False), add_special_tokens=False)) - base
        texts, owners = [], []
        for i, p in enumerate(parsed):
            for m in p.messages if p else []:
                texts.append(PLACEHOLDER_PATTERN.sub("", m["content"]))
                owners.append(i)
        lengths = [0] * len(parsed)
        for start in range(0, len(texts), 4096):
            batch = tokenizer(texts[start : start + 4096], add_special_tokens=False)["input_ids"]
            for owner, ids in zip(owners[start : start + 4096], batch):
                lengths[owner] += len(ids)
        for i, p in enumerate(parsed):
            if p:
                lengths[i] += base + per_pair * max(0, len(p.messages) // 2 - 1)
        return lengths

    def _default_media_tokens(self, kind: str, path: str) -> int:
        limits = self.processor.vision.limits
        if kind == "image":
            return limits.image_max_pixels // (28 * 28) // 2 + 2
        if kind == "video":
            return limits.video_total_pixels // (28 * 28) // 2 + 2
        return self.processor.config.audio_tokens_per_clip(kind)

    def _estimate_media_tokens(self, kind: str, path: str) -> int:
        try:
            full = self.resolve(kind, path)
            if kind == "image":
                with Image.open(full) as image:
                    width, height = image.size
                return self._image_tokens(height, width) + 2
            if kind == "video":
                return self._video_tokens(full) + 2
            seconds = sf.info(str(full)).duration
            config = self.processor.config
            return num_clips(int(seconds * SAMPLE_RATE), config.speech.window_rule) * config.audio_tokens_per_clip(kind)
        except Exception:  # unreadable: validation reports it; here any estimate will do
            return self._default_media_tokens(kind, path)

    def _image_tokens(self, height: int, width: int) -> int:
        limits = self.processor.vision.limits
        height, width = max(height, 28), max(width, 28)
        h, w = smart_resize(height, width, factor=28, min_pixels=limits.image_min_pixels, max_pixels=limits.image_max_pixels)
        return (h // 28) * (w // 28)

    def _video_tokens(self, path: Path) -> int:
        vision = self.processor.vision
        limits, tp = vision.limits, vision.temporal_patch_size
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            count = even_frame_count(len(files), limits.video_max_frames, tp)
            with Image.open(files[0]) as image:
                width, height = image.size
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as image:
                width, height = image.size[0] // 4, image.size[1] // 4
            count = 16
        else:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                fps = float(stream.average_rate or stream.guessed_rate or 25)
                frames = stream.frames or int(float(stream.duration * stream.time_base) * fps if stream.duration else 0)
                if not frames and container.duration:
                    frames = int(container.duration / 1_000_000 * fps)
                width, height = stream.codec_context.width, stream.codec_context.height
            count = len(sample_frame_indices(max(frames, 1), fps, limits, tp))
        budget = min(limits.video_max_pixels, limits.video_total_pixels / max(count, 1) * tp)
        max_pixels = max(budget, int(limits.video_min_pixels * 1.05))
        h, w = smart_resize(max(height, 28), max(width, 28), factor=28, min_pixels=limits.video_min_pixels,
                            max_pixels=max_pixels)
        return math.ceil(count / tp) * (h // 28) * (w // 28)

    def _cache_key(self, probe_media: bool) -> dict[str, Any]:
        stat = self.records.path.stat()
        limits = self.processor.vision.limits
        return {
            "data": str(self.records.path.resolve()), "size": stat.st_size, "mtime": stat.st_mtime,
            "roots": [str(root) for root in self.roots], "max_length": self.model_max_length,
            "limits": [limits.image_min_pixels, limits.image_max_pixels, limits.video_max_pixels,
                       limits.video_total_pixels, limits.video_fps, limits.video_max_frames],
            "vocab": len(self.processor.tokenizer), "probe": probe_media,
        }

    def _read_cache(self, key: dict[str, Any]) -> list[SampleInfo] | None:
        if self.cache is None or not self.cache.is_file():
            return None
        try:
            data = json.loads(self.cache.read_text())
            if data.get("key") != key:
                return None
            return [SampleInfo(int(n), str(m)) for n, m in zip(data["lengths"], data["modalities"])]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_cache(self, key: dict[str, Any], info: list[SampleInfo]) -> None:
        if self.cache is None:
            return
        payload = {"key": key, "lengths": [i.length for i in info], "modalities": [i.modality for i in info]}
        atomic_write_text(self.cache, json.dumps(payload))
