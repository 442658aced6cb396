"""Images and video for the Qwen2-VL vision tower, without torchvision.

Images go through transformers' `Qwen2VLImageProcessorPil` (PIL + numpy). Video
frames are decoded with PyAV, sampled by fps, resized with the same smart-resize rule
(sides multiple of 28, pixel budget) and cut into the same patch layout the vision
tower expects, with `temporal_patch_size` consecutive frames per patch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
PIXELS_PER_TOKEN = 28 * 28  # one merged 2x2 group of 14-pixel patches


@dataclass
class VisionLimits:
    """Pixel and frame budgets (Qwen2-VL's defaults; lower them for small models)."""

    image_min_pixels: int = 4 * PIXELS_PER_TOKEN
    image_max_pixels: int = 1280 * PIXELS_PER_TOKEN
    video_fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 768
    video_min_pixels: int = 128 * PIXELS_PER_TOKEN
    video_max_pixels: int = 768 * PIXELS_PER_TOKEN
    video_total_pixels: int = 24576 * PIXELS_PER_TOKEN  # whole-video budget, shared by the frames


class VisionError(ValueError):
    """An image or video that cannot be used; the message names the file and the fix."""


def load_image(source: str | Path | Image.Image) -> Image.Image:
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except Exception as error:
        raise VisionError(f"cannot decode image {path}: {error}; use PNG, JPEG or WebP") from error


def even_frame_count(available: int, maximum: int, temporal_patch: int) -> int:
    """How many of `available` frames (a folder of frames) to use: a multiple of the temporal patch."""
    count = min(available, maximum)
    count -= count % temporal_patch
    return max(count, min(available, temporal_patch))


def fit_image(image: Image.Image) -> Image.Image:
    """Make degenerate images usable, as the reference trainer does: sides of at least 28 pixels
    and an aspect ratio of at most 200 (Qwen2-VL's resize refuses more)."""
    width, height = image.size
    if min(width, height) < 28:
        width, height = max(width, 28), max(height, 28)
        image = image.resize((width, height), Image.NEAREST)
    if width / height > 200:
        image = image.resize((height * 180, height), Image.NEAREST)
    elif height / width > 200:
        image = image.resize((width, width * 180), Image.NEAREST)
    return image


def split_frame_grid(image: Image.Image, rows: int = 4, cols: int = 4) -> list[Image.Image]:
    """Frames of a video stored as one grid image (rows x cols, row-major), after trimming a
    white margin -- the reference trainer's `.jpg` video format."""
    pixels = np.asarray(image.convert("RGB"))
    ink = pixels.astype(np.int32).sum(axis=-1) < 720  # anything not (almost) white
    ys, xs = np.any(ink, axis=1).nonzero()[0], np.any(ink, axis=0).nonzero()[0]
    if ys.size and xs.size:
        pixels = pixels[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1]
    height, width = pixels.shape[0] // rows, pixels.shape[1] // cols
    if height < 1 or width < 1:
        raise VisionError(f"a frame-grid image of {pixels.shape[1]}x{pixels.shape[0]} is too small for {rows}x{cols} frames")
    return [
        Image.fromarray(pixels[r * height : (r + 1) * height, c * width : (c + 1) * width])
        for r in range(rows)
        for c in range(cols)
    ]


def sample_frame_indices(num_frames: int, native_fps: float, limits: VisionLimits, temporal_patch: int) -> list[int]:
    """Evenly spaced frame indices at `limits.video_fps`, an even count within limits."""
    duration = num_frames / native_fps
    wanted = round(duration * limits.video_fps / temporal_patch) * temporal_patch
    wanted = max(limits.video_min_frames, min(limits.video_max_frames, wanted))
    available = max(temporal_patch, num_frames - num_frames % temporal_patch)
    wanted = min(wanted, available)  # a short clip repeats no frame more than needed
    return np.linspace(0, num_frames - 1, wanted).round().astype(int).tolist()


def load_video_frames(path: str | Path, limits: VisionLimits, temporal_patch: int = 2) -> list[Image.Image]:
    """Frames of a video sampled at `limits.video_fps` (PyAV), decoding the stream once and
    converting only the chosen frames to PIL, so an hour-long video does not fill memory."""
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VisionError(f"{path} has no video stream; pass it as audio (--audio-only-video) instead")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            total = stream.frames
            if not total:  # the container does not say: estimate from the duration
                seconds = float(stream.duration * stream.time_base) if stream.duration else \
                    (container.duration or 0) / 1_000_000
                total = max(1, round(seconds * fps))
            wanted = sample_frame_indices(total, fps, limits, temporal_patch)
            keep = set(wanted)
            kept: dict[int, Image.Image] = {}
            last = None
            for index, frame in enumerate(container.decode(stream)):
                if index in keep:
                    kept[index] = frame.to_image()
                last = frame
                if index >= wanted[-1]:
                    break
            if last is None:
                raise VisionError(f"video {path} holds no frames")
            # A stream shorter than its header says: the last decoded frame stands in for the missing ones.
            fallback = kept[max(kept)] if kept else last.to_image()
    except VisionError:
        raise
    except Exception as error:  # PyAV raises many types for broken files
        raise VisionError(f"cannot decode video {path}: {error}; re-encode it as H.264 MP4") from error
    frames, previous = [], fallback
    for index in wanted:
        previous = kept.get(index, previous)
        frames.append(previous)
    return frames


class VisionProcessor:
    """Images -> (pixel_values, image_grid_thw); frame lists -> (pixel_values_videos, video_grid_thw)."""

    def __init__(self, limits: VisionLimits, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2):
        self.limits = limits
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.temporal_patch_size = temporal_patch_size
        self.image_processor = Qwen2VLImageProcessorPil(
            min_pixels=limits.image_min_pixels,
            max_pixels=limits.image_max_pixels,
            patch_size=patch_size,
            merge_size=merge_size,
            temporal_patch_size=temporal_patch_size,
        )

    def tokens_for_grid(self, grid_thw: torch.Tensor) -> int:
        return int(grid_thw.prod()) // self.merge_size**2

    def images(self, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"]

    def video(self, frames: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """`frames` (even count) -> `[t*h*w, C*tp*p*p]` patches and grid `[1, 3]`."""
        limits = self.limits
        factor = self.patch_size * self.merge_size
        width, height = frames[0].size
        per_frame_budget = min(limits.video_max_pixels, limits.video_total_pixels / len(frames) * self.temporal_patch_size)
        max_pixels = max(per_frame_budget, int(limits.video_min_pixels * 1.05))
        h, w = smart_resize(height, width, factor=factor, min_pixels=limits.video_min_pixels, max_pixels=max_pixels)
        pixels = np.stack([np.asarray(f.convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32) for f in frames])
        pixels = (pixels / 255.0 - np.array(OPENAI_CLIP_MEAN, np.float32)) / np.array(OPENAI_CLIP_STD, np.float32)
        return self.patchify(torch.from_numpy(pixels).permute(0, 3, 1, 2))

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[T, C, H, W]` normalised frames -> (`[T/tp * H/p * W/p, C*tp*p*p]`, grid `[1, 3]`),
        in the order of Qwen2-VL's image patches (merge groups contiguous)."""
        tp, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if frames.shape[0] % tp:  # repeat the last frame to fill the temporal patch
            pad = tp - frames.shape[0] % tp
            frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        t, c, height, width = frames.shape
        gt, gh, gw = t // tp, height // p, width // p
        patches = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
        flat = patches.reshape(gt * gh * gw, c * tp * p * p)
        return flat, torch.tensor([[gt, gh, gw]])

