"""Held-out accuracy on the nano task (lyra/nano/task.py), per question type, for text and
spoken questions.

A question counts as right when greedy decoding reproduces the answer exactly, `<|im_end|>`
included. That is measured in one teacher-forced forward per conversation: greedy decoding
yields the answer iff, at every answer position, the arg-max of the logits is the answer token
(each decoded prefix is then the gold prefix). Earlier turns of a conversation are the gold
history, as in a chat where the earlier answers were right. The routing is inference's: a
conversation with speech runs with the "speech" MLoRA adapter (when the model has one), any
other with every adapter off. `generate_answers` decodes for real (used for LMME, whose
pruning depends on the prompt, and to check the equivalence).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lyra.config import LMMEConfig
from lyra.data.collate import LyraCollator
from lyra.data.dataset import LyraDataset
from lyra.data.vision import VisionLimits
from lyra.model import mlora
from lyra.model.lyra import PREPARE_INPUT_KEYS
from lyra.nano.task import QUESTION_TYPES
from lyra.processing import IGNORE_INDEX, LyraProcessor, collate

VARIANTS = {"text": "-text", "speech": "-speech", "voice": "-voice"}  # eval record id suffixes
VARIANT_NAMES = {"text": "text question", "speech": "spoken question (training voices)",
                 "voice": "spoken question (held-out voice)"}


@dataclass
class Accuracy:
    """Right / asked per (variant, question type); `turns` has one entry per scored turn."""

    right: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    asked: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    turns: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, variant: str, qtype: str, correct: bool, **info: Any) -> None:
        self.right[(variant, qtype)] += int(correct)
        self.asked[(variant, qtype)] += 1
        self.turns.append({"variant": variant, "type": qtype, "correct": bool(correct), **info})

    def value(self, variant: str, qtype: str | None = None, image_only: bool = False) -> float | None:
        keys = [k for k in self.asked if k[0] == variant and (qtype is None or k[1] == qtype)
                and not (image_only and k[1] == "sound")]
        asked = sum(self.asked[k] for k in keys)
        return sum(self.right[k] for k in keys) / asked if asked else None

    def count(self, variant: str, qtype: str | None = None, image_only: bool = False) -> int:
        return sum(n for k, n in self.asked.items() if k[0] == variant and (qtype is None or k[1] == qtype)
                   and not (image_only and k[1] == "sound"))

    def types(self) -> list[str]:
        return [t for t in QUESTION_TYPES if any(k[1] == t for k in self.asked)]

    def variants(self) -> list[str]:
        return [v for v in VARIANTS if any(k[0] == v for k in self.asked)]

    def table(self) -> str:
        """Markdown: one row per question type, one column per variant (accuracy and count)."""
        variants = self.variants()
        lines = ["| question type | " + " | ".join(VARIANT_NAMES[v] for v in variants) + " |",
                 "|---|" + "---|" * len(variants)]

        def cell(v, t=None, image_only=False):
            value = self.value(v, t, image_only)
            return "-" if value is None else f"{100 * value:.1f} % ({self.count(v, t, image_only)})"

        for qtype in self.types():
            lines.append(f"| {qtype} | " + " | ".join(cell(v, qtype) for v in variants) + " |")
        lines.append("| **image questions (all but sound)** | "
                     + " | ".join(cell(v, image_only=True) for v in variants) + " |")
        lines.append("| **all** | " + " | ".join(cell(v) for v in variants) + " |")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            v: {"all": self.value(v), "image": self.value(v, image_only=True),
                "by_type": {t: self.value(v, t) for t in self.types() if self.count(v, t)},
                "counts": {t: self.count(v, t) for t in self.types() if self.count(v, t)}}
            for v in self.variants()
        }


def variant_of(record_id: str) -> str | None:
    for name, suffix in VARIANTS.items():
        if record_id.endswith(suffix):
            return name
    return None


def _route(model, has_speech: bool) -> None:
    """Inference's adapter choice: the speech adapter for speech, none otherwise."""
    if mlora.adapter_names(model):
        mlora.use_adapter(model, "speech" if has_speech and "speech" in mlora.adapter_names(model) else None)


@torch.no_grad()
def answer_positions_correct(model, batch: dict[str, Any]) -> list[list[bool]]:
    """Per sample, per assistant turn (contiguous label run): whether greedy decoding gives it."""
    inputs = {k: v for k, v in batch.items() if k in PREPARE_INPUT_KEYS}
    labels = batch["labels"]
    embeds, position_ids, _ = model.prepare_inputs(**inputs)
    hidden = model.backbone.model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                                  position_ids=position_ids).last_hidden_state  # (B, L, d)
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
    rows = targets != IGNORE_INDEX
    predicted = torch.full_like(targets, IGNORE_INDEX)
    predicted[rows] = model.backbone.lm_head(hidden[rows]).argmax(-1)
    results = []
    for b in range(labels.shape[0]):
        turns, current = [], None
        for t in range(labels.shape[1]):
            if rows[b, t]:
                ok = bool(predicted[b, t] == targets[b, t])
                current = ok if current is None else (current and ok)
            elif current is not None:
                turns.append(current)
                current = None
        if current is not None:
            turns.append(current)
        results.append(turns)
    return results


def evaluate_nano(model, tokenizer, eval_file: str | Path, variants: tuple[str, ...] = ("text", "speech"),
                  batch_size: int = 16, progress: bool = True, limit: int | None = None) -> Accuracy:
    """Teacher-forced exact-match accuracy of every turn of the held-out conversations."""
    started = time.perf_counter()
    eval_file = Path(eval_file)
    records = json.loads(eval_file.read_text())
    processor = LyraProcessor(tokenizer, model.config, VisionLimits())
    dataset = LyraDataset(eval_file, processor, on_bad_sample="raise")
    collator = LyraCollator.from_processor(processor)
    chosen = [i for i, r in enumerate(records) if variant_of(r["id"]) in variants]
    if limit is not None:
        chosen = chosen[:limit]
    groups: dict[tuple[bool, str], list[int]] = defaultdict(list)
    for i in chosen:  # one adapter setting per batch; similar lengths together
        groups[("speech" in records[i], records[i].get("sound") is not None)].append(i)
    batches = [idx[k:k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)]
    accuracy = Accuracy()
    was_training = model.training
    model.eval()
    active = getattr(model, "active_adapter", None)
    try:
        for indices in tqdm(batches, desc="held-out evaluation", unit="batch", disable=not progress):
            _route(model, "speech" in records[indices[0]])
            batch = collator([dataset[i] for i in indices])
            for i, turns in zip(indices, answer_positions_correct(model, batch)):
                meta = records[i]["meta"]
                if len(turns) != len(meta["types"]):
                    raise RuntimeError(f"{records[i]['id']}: {len(turns)} answers scored, {len(meta['types'])} expected")
                variant = variant_of(records[i]["id"])
                for k, correct in enumerate(turns):
                    if variant != "text" and not meta["spoken"][k]:
                        continue  # a spoken conversation scores its spoken turns only
                    accuracy.add(variant, meta["types"][k], correct, id=records[i]["id"], turn=k,
                                 answer=meta["answers"][k])
    finally:
        if mlora.adapter_names(model):
            mlora.use_adapter(model, active)
        model.train(was_training)
    accuracy.seconds = time.perf_counter() - started
    return accuracy


def prompt_for_turn(record: dict[str, Any], turn: int) -> tuple[list[dict[str, str]], dict[str, list]]:
    """The chat messages and media up to the user message of `turn` (gold earlier answers)."""
    messages = []
    for k, entry in enumerate(record["conversations"][: 2 * turn + 1]):
        messages.append({"role": "user" if entry["from"] == "human" else "assistant", "content": entry["value"]})
    spoken_before = sum(record["meta"]["spoken"][: turn + 1])
    speech = record.get("speech") or []
    media = {"images": [record["image"]] if record.get("image") else [],
             "sound": [record["sound"]] if record.get("sound") else [],
             "speech": speech[:spoken_before] if isinstance(speech, list) else [speech]}
    return messages, media


@torch.no_grad()
def generate_answers(model, tokenizer, eval_file: str | Path, variants: tuple[str, ...] = ("speech",),
                     lmme: LMMEConfig | None = None, limit: int | None = None, progress: bool = True,
                     batch_size: int = 1) -> tuple[Accuracy, list[float]]:
    """Greedy decoding of the scored turns (LMME applied if given); a turn is right when the reply
    is the answer and ends with `<|im_end|>` within 8 tokens. Returns the accuracy and the
    prefill seconds of each prompt (time to the first new token, batch size 1 by default)."""
    eval_file = Path(eval_file)
    root = eval_file.parent
    records = [r for r in json.loads(eval_file.read_text()) if variant_of(r["id"]) in variants]
    jobs = []
    for record in records:
        for k, spoken in enumerate(record["meta"]["spoken"]):
            if variant_of(record["id"]) == "text" or spoken:
                jobs.append((record, k))
    if limit is not None:
        jobs = jobs[:limit]
    processor = LyraProcessor(tokenizer, model.config, VisionLimits())
    accuracy, prefill = Accuracy(), []
    model.eval()
    active = getattr(model, "active_adapter", None)
    started = time.perf_counter()
    try:
        for start in tqdm(range(0, len(jobs), batch_size), desc="generating", disable=not progress):
            chunk = jobs[start:start + batch_size]
            samples = []
            for record, k in chunk:
                messages, media = prompt_for_turn(record, k)
                samples.append(processor(messages, images=[root / p for p in media["images"]],
                                         speech=[root / p for p in media["speech"]],
                                         sound=[root / p for p in media["sound"]]))
            _route(model, bool(chunk[0][0].get("speech")) and any(s.speech for s in samples))
            batch = collate(samples, model.config.tokens.pad, padding_side="left")
            tick = time.perf_counter()
            model.generate(**batch, max_new_tokens=1, lmme=lmme)
            prefill.append(time.perf_counter() - tick)
            new = model.generate(**batch, max_new_tokens=8, lmme=lmme)
            for (record, k), tokens in zip(chunk, new):
                ids = tokens.tolist()
                text = tokenizer.decode([t for t in ids if t != model.config.tokens.pad], skip_special_tokens=True).strip()
                stopped = model.config.tokens.eos in ids  # the answer ends where the gold one does
                meta = record["meta"]
                accuracy.add(variant_of(record["id"]), meta["types"][k], stopped and text == meta["answers"][k],
                             id=record["id"], turn=k, answer=meta["answers"][k], reply=text)
    finally:
        if mlora.adapter_names(model):
            mlora.use_adapter(model, active)
    accuracy.seconds = time.perf_counter() - started
    return accuracy, prefill
