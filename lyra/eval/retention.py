"""Pictures of what LMME kept (the paper's Fig. 5): an image overlay and a timeline.

Both read a `RetentionRecord` (from `model(..., lmme=...)`.retention or a saved JSON)
and draw with PIL, so no plotting library is needed.
"""

from __future__ import annotations

from PIL import Image, ImageDraw

from lyra.model.lmme import RetentionRecord

KEPT_TINT = (255, 255, 255)
DROPPED_TINT = (20, 20, 20)
STEP_COLOURS = [(33, 113, 181), (107, 174, 214), (189, 215, 231), (239, 243, 255)]


def image_overlay(image: Image.Image, grid_thw: tuple[int, int, int], record: RetentionRecord, sample: int = 0,
                  run: int = 0, step: int = -1, merge: int = 2) -> Image.Image:
    """The image with every merged patch that LMME dropped by pruning step `step` darkened.

    Args:
        image: the picture as given to the model (resized to the grid here).
        grid_thw: its `image_grid_thw` row (t, h, w) in 14-pixel patches.
        run: which context run of `sample` is this image (see `record.context`).
    """
    modality, start, end = record.context[sample][run]
    if modality != "image":
        raise ValueError(f"context run {run} of sample {sample} is {modality}, not an image")
    _, height, width = grid_thw
    rows, cols = height // merge, width // merge
    if end - start != rows * cols:
        raise ValueError(f"grid {grid_thw} gives {rows * cols} tokens but the run holds {end - start}")
    cell = 14 * merge
    base = image.convert("RGB").resize((cols * cell, rows * cell))
    shade = Image.new("RGB", base.size, DROPPED_TINT)
    mask = Image.new("L", base.size, 0)
    draw = ImageDraw.Draw(mask)
    kept = set(record.kept[step][sample]) if record.kept else set(range(start, end))
    for index in range(start, end):
        if index not in kept:
            r, c = divmod(index - start, cols)
            draw.rectangle((c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1), fill=180)
    return Image.composite(shade, base, mask)


def timeline(record: RetentionRecord, sample: int = 0, width: int = 1200, row_height: int = 18,
             tokens_per_second: float = 10.0) -> Image.Image:
    """One row per pruning step, one column per context token (all runs side by side):
    kept tokens coloured, dropped ones blank. Speech runs span 10 tokens per second."""
    runs = record.context[sample]
    total = sum(end - start for _, start, end in runs)
    if total == 0:
        raise ValueError(f"sample {sample} has no context tokens")
    steps = len(record.kept)
    label_height = 16
    picture = Image.new("RGB", (width, label_height + max(1, steps) * row_height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    scale = width / total
    offset = 0
    for modality, start, end in runs:
        x0 = offset * scale
        label = modality if modality != "speech" else f"speech {(end - start) / tokens_per_second:.0f}s"
        draw.text((x0 + 2, 2), label, fill=(0, 0, 0))
        for step in range(steps):
            kept = set(record.kept[step][sample])
            y0 = label_height + step * row_height
            colour = STEP_COLOURS[step % len(STEP_COLOURS)]
            for index in range(start, end):
                if index in kept:
                    x = (offset + index - start) * scale
                    draw.rectangle((x, y0, x + max(scale, 1), y0 + row_height - 3), fill=colour)
        offset += end - start
        draw.line(((offset * scale, 0), (offset * scale, picture.height)), fill=(0, 0, 0))
    return picture
