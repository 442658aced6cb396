"""Vision-tower pretraining for Lyra-Nano: the stand-in for the pretraining Qwen2-VL's ViT had
(DFN CLIP) before it ever met the LLM.

A Qwen2-VL ViT trained from scratch *together with* a from-scratch LLM does not learn on the
nano task in a CPU budget: the LLM settles on the answer prior and the image tokens collapse to
one vector (held-out accuracy at chance after 400 steps, docs/nano_results.md). Pretrained
first on the generator's labels, the same ViT gives the LLM features it can use at once. The
labels are per merged token for scenes (the colour and shape in that cell, or "empty"), per
image for a scene's count and for signs (word and ink; no ink label for the distractor inks),
each from the mean of the image's tokens; the linear heads are thrown away. Only training media
are used; held-out colour x shape pairs and word x ink pairs never appear. (Without the count
label, count was the base phase's most fragile skill: 94 % held-out in one run, 33 % in the
next after an unrelated change.)

    config = load_yaml_config(VisionPretrainConfig, files("lyra.nano") / "configs" / "vision.yaml")
    report = pretrain_vision(model, task, config)  # trains model.backbone.model.visual in place
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lyra.config import config_dataclass
from lyra.data.vision import VisionLimits, VisionProcessor, load_image
from lyra.nano.task import COLOURS, NUMBERS, SHAPES, WORDS, NanoTask

EMPTY_COLOUR, EMPTY_SHAPE = len(COLOURS), len(SHAPES)  # the "nothing in this cell" classes


@config_dataclass
class VisionPretrainConfig:
    steps: int = 400
    batch_size: int = 32  # images per step, half scenes and half signs
    lr: float = 1.0e-3
    warmup_steps: int = 20
    image_max_pixels: int = 7056  # 84 x 84: 3 x 3 merged tokens
    eval_images: int = 200  # held-out images for the probe accuracies in the report


def warmup_cosine(step: int, steps: int, warmup_steps: int) -> float:
    """The learning-rate multiplier at `step`: linear warm-up, then cosine decay to zero."""
    return min(1.0, (step + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / steps))


class VisionProbes(torch.nn.Module):
    """Linear heads on merged vision tokens `[N, d]`: per-token colour/shape, per-image count and
    word/ink."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.cell = torch.nn.Linear(hidden_size, EMPTY_COLOUR + 1 + EMPTY_SHAPE + 1)
        self.count = torch.nn.Linear(hidden_size, len(NUMBERS))
        self.sign = torch.nn.Linear(hidden_size, len(WORDS) + len(COLOURS))

    def loss_and_hits(self, tokens: torch.Tensor, targets: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, list[bool]]]:
        """`tokens`: `[B * 9, d]` in image order; `targets[i]`: `image_targets` of image i."""
        per_image = tokens.reshape(len(targets), -1, tokens.shape[-1])
        losses, hits = [], {"cell colour": [], "cell shape": [], "count": [], "word": [], "ink": []}
        scenes = [i for i, t in enumerate(targets) if t["kind"] == "scene"]
        if scenes:
            logits = self.cell(per_image[scenes])  # (S, 9, 7 + 5)
            colour = torch.stack([targets[i]["colour"] for i in scenes])
            shape = torch.stack([targets[i]["shape"] for i in scenes])
            colour_logits, shape_logits = logits[..., :EMPTY_COLOUR + 1], logits[..., EMPTY_COLOUR + 1:]
            losses += [F.cross_entropy(colour_logits.flatten(0, 1), colour.flatten()),
                       F.cross_entropy(shape_logits.flatten(0, 1), shape.flatten())]
            hits["cell colour"] += (colour_logits.argmax(-1) == colour).flatten().tolist()
            hits["cell shape"] += (shape_logits.argmax(-1) == shape).flatten().tolist()
            count_logits = self.count(per_image[scenes].mean(1))  # how many shapes, from all the image's tokens
            count = torch.stack([targets[i]["count"] for i in scenes])
            losses.append(F.cross_entropy(count_logits, count))
            hits["count"] += (count_logits.argmax(-1) == count).tolist()
        signs = [i for i, t in enumerate(targets) if t["kind"] == "sign"]
        if signs:
            logits = self.sign(per_image[signs].mean(1))
            word = torch.tensor([targets[i]["word"] for i in signs])
            losses.append(F.cross_entropy(logits[:, :len(WORDS)], word))
            hits["word"] += (logits[:, :len(WORDS)].argmax(-1) == word).tolist()
            named = [k for k, i in enumerate(signs) if targets[i]["ink"] is not None]  # distractor inks: no label
            if named:
                ink = torch.tensor([targets[signs[k]]["ink"] for k in named])
                losses.append(F.cross_entropy(logits[named, len(WORDS):], ink))
                hits["ink"] += (logits[named, len(WORDS):].argmax(-1) == ink).tolist()
        return torch.stack(losses).sum(), hits


def image_targets(content: dict[str, Any]) -> dict[str, Any]:
    """Probe targets of one image from its `media.json` entry."""
    if content["kind"] == "scene":
        colour = torch.full((9,), EMPTY_COLOUR)
        shape = torch.full((9,), EMPTY_SHAPE)
        for obj in content["objects"]:
            colour[obj["cell"]] = list(COLOURS).index(obj["colour"])
            shape[obj["cell"]] = SHAPES.index(obj["shape"])
        return {"kind": "scene", "colour": colour, "shape": shape, "count": torch.tensor(len(content["objects"]))}
    ink = list(COLOURS).index(content["ink"]) if content["ink"] in COLOURS else None
    return {"kind": "sign", "word": WORDS.index(content["word"]), "ink": ink}


def load_split(task: NanoTask, split: str, processor: VisionProcessor, limit: int | None = None):
    """(pixel rows per image, grid per image, targets) of the task's `split` images."""
    media = task.media()
    paths = sorted(p for p, c in media.items() if p.startswith(f"images/{split}/"))[:limit]
    pixels, grids, targets = [], [], []
    for path in paths:
        rows, grid = processor.images([load_image(task.root / path)])
        if int(grid.prod()) != 36:
            raise ValueError(f"{task.root / path}: expected 84 x 84 (3 x 3 merged tokens), got grid {grid.tolist()}")
        pixels.append(rows)
        grids.append(grid)
        targets.append(image_targets(media[path]))
    return pixels, grids, targets


def pretrain_vision(model, task: NanoTask, config: VisionPretrainConfig, seed: int = 0,
                    progress: bool = True) -> dict[str, Any]:
    """Train `model`'s ViT (with its merger) in place on the task's training images; returns a
    report with the probes' accuracy on held-out images before and after."""
    torch.manual_seed(seed)
    processor = VisionProcessor(VisionLimits(image_max_pixels=config.image_max_pixels))
    train_pixels, train_grids, train_targets = load_split(task, "train", processor)
    eval_set = load_split(task, "eval", processor, config.eval_images)
    vit = model.backbone.model.visual
    probes = VisionProbes(model.config.text.hidden_size)
    parameters = [*vit.parameters(), *probes.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def forward(pixels, grids, targets):
        tokens = vit(torch.cat(pixels), grid_thw=torch.cat(grids), return_dict=True).pooler_output
        return probes.loss_and_hits(tokens, targets)

    def evaluate() -> dict[str, float]:
        vit.eval()
        with torch.no_grad():
            _, hits = forward(*eval_set)
        vit.train()
        return {name: round(sum(h) / len(h), 4) for name, h in hits.items() if h}

    scenes = [i for i, t in enumerate(train_targets) if t["kind"] == "scene"]
    signs = [i for i, t in enumerate(train_targets) if t["kind"] == "sign"]
    before = evaluate()
    started = time.perf_counter()
    vit.train()
    bar = tqdm(range(config.steps), desc="nano vision: ViT pretraining", disable=not progress)
    for step in bar:
        scale = warmup_cosine(step, config.steps, config.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * scale
        half = config.batch_size // 2
        batch = [scenes[i] for i in torch.randint(len(scenes), (half,), generator=generator).tolist()]
        batch += [signs[i] for i in torch.randint(len(signs), (config.batch_size - half,), generator=generator).tolist()]
        loss, _ = forward([train_pixels[i] for i in batch], [train_grids[i] for i in batch],
                          [train_targets[i] for i in batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    vit.eval()
    return {"steps": config.steps, "seconds": round(time.perf_counter() - started, 1), "final_loss": loss.item(),
            "held_out_probe_accuracy_before": before, "held_out_probe_accuracy_after": evaluate()}
