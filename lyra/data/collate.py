"""Batches of training samples: padding, the bad samples a batch dropped, and counting them."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Iterable, Iterator

import torch

from lyra.data.records import SkippedSample
from lyra.processing import IGNORE_INDEX, LyraProcessor, ProcessedSample, collate

logger = logging.getLogger("lyra.data")


class LyraCollator:
    """Pads `TrainingSample`s (lyra.data.dataset) into a batch, dropping `SkippedSample`s (and `None`s).

    Batch keys (model inputs first, as `LyraForConditionalGeneration.forward` takes them):
        input_ids, attention_mask, labels: `[B, L]` (right padding by default; labels -100 on padding).
        pixel_values, image_grid_thw / pixel_values_videos, video_grid_thw, mm_token_type_ids:
            as `lyra.processing.collate` (only when the batch has images/videos).
        speech, sound: flat lists of 16 kHz waveforms in batch order (row, then placeholder).
        speech_sample_index: `LongTensor[len(speech)]`, the batch row of each speech waveform.
        transcript_ids: `list[LongTensor]`, the tokenised `speech_asr` of the speech inputs that
            have one, and transcript_speech_index: `LongTensor[len(transcript_ids)]`, the index
            into `speech` of each: transcript_ids[k] pairs with speech[transcript_speech_index[k]].
            For LCMR, the model encodes `speech` in order, waveform j giving
            `num_clips(len(speech[j]), speech.window_rule) * tokens_per_clip` rows of
            `encode_speech(speech)`, so the projected tokens of transcript k are that row range of
            waveform transcript_speech_index[k].
        tgt_units: `[B, U]` speech-generator units, -100 padded (rows without units all -100);
            only when a sample has `tgt_unit`.
        sample_ids (list[str]), sample_indices (`LongTensor[B]`), num_samples (int B),
        skipped (list of {"index", "id", "code", "reason"} for the dropped bad samples).
    When every sample was bad the batch is just {"num_samples": 0, "skipped": [...]}.
    """

    def __init__(self, pad_id: int, padding_side: str = "right"):
        self.pad_id = pad_id
        self.padding_side = padding_side

    @classmethod
    def from_processor(cls, processor: LyraProcessor, padding_side: str = "right") -> "LyraCollator":
        return cls(processor.tokens.pad, padding_side)

    def __call__(self, items: Iterable[ProcessedSample | SkippedSample | None]) -> dict[str, Any]:
        items = list(items)
        samples = [s for s in items if isinstance(s, ProcessedSample)]
        skipped = [s.as_dict() for s in items if isinstance(s, SkippedSample)]
        skipped += [{"index": -1, "id": "", "code": "error", "reason": "the dataset returned None"}
                    for s in items if s is None]
        if not samples:
            return {"num_samples": 0, "skipped": skipped}
        batch = collate(samples, self.pad_id, self.padding_side)
        speech_rows = [row for row, s in enumerate(samples) for _ in s.speech]
        if speech_rows:
            batch["speech_sample_index"] = torch.tensor(speech_rows, dtype=torch.long)
        transcripts, paired = [], []
        position = 0
        for s in samples:
            for j in range(len(s.speech)):
                ids = getattr(s, "transcripts", [])[j] if j < len(getattr(s, "transcripts", [])) else None
                if ids is not None:
                    transcripts.append(ids)
                    paired.append(position + j)
            position += len(s.speech)
        if transcripts:
            batch["transcript_ids"] = transcripts
            batch["transcript_speech_index"] = torch.tensor(paired, dtype=torch.long)
        units = [getattr(s, "tgt_units", None) for s in samples]
        if any(u is not None for u in units):
            width = max(u.shape[0] for u in units if u is not None)
            padded = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
            for row, u in enumerate(units):
                if u is not None:
                    padded[row, : u.shape[0]] = u
            batch["tgt_units"] = padded
        batch["sample_ids"] = [getattr(s, "sample_id", "") for s in samples]
        batch["sample_indices"] = torch.tensor([getattr(s, "index", -1) for s in samples], dtype=torch.long)
        batch["num_samples"] = len(samples)
        batch["skipped"] = skipped
        return batch


class BadSampleTracker:
    """Counts the bad samples that collated batches report, in the trainer's process.

    Args:
        max_fraction: raise once more than this fraction of the samples seen were bad (after
            `min_samples`), to stop a run whose data is broken wholesale (a wrong root, say).
        min_samples: samples to see before `max_fraction` applies.
    """

    def __init__(self, max_fraction: float | None = None, min_samples: int = 200):
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.seen = 0  # good + bad
        self.skipped = 0
        self.by_code: Counter[str] = Counter()
        self.recent: list[dict[str, Any]] = []  # the last 100 skipped samples

    def update(self, batch: dict[str, Any]) -> int:
        """Count a batch's skipped samples (logging each); returns how many it had."""
        skipped = batch.get("skipped", [])
        self.seen += int(batch.get("num_samples", 0)) + len(skipped)
        for entry in skipped:
            self.skipped += 1
            self.by_code[entry["code"]] += 1
            logger.warning("bad sample skipped (#%s, id %r): [%s] %s (%d skipped so far)",
                           entry["index"], entry["id"], entry["code"], entry["reason"], self.skipped)
        self.recent = (self.recent + list(skipped))[-100:]
        if (
            self.max_fraction is not None
            and self.seen >= self.min_samples
            and self.skipped > self.max_fraction * self.seen
        ):
            raise RuntimeError(
                f"{self.skipped} of {self.seen} samples were bad (over max_fraction={self.max_fraction}): "
                f"{dict(self.by_code)}; run `python -m lyra.data.validate` on the data"
            )
        return len(skipped)

    def track(self, batches: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Yield the batches of a DataLoader, counting each one's skipped samples."""
        for batch in batches:
            self.update(batch)
            yield batch

    def summary(self) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in self.by_code.most_common()) or "none"
        return f"{self.skipped} bad sample(s) skipped of {self.seen} ({codes})"

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": self.skipped, "by_code": dict(self.by_code)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen, self.skipped = int(state["seen"]), int(state["skipped"])
        self.by_code = Counter(state["by_code"])
