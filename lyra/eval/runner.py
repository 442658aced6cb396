"""Plumbing shared by the benchmark scripts: resumable predictions, atomic results, model flags.

A run appends one JSON line per finished item to a predictions file and flushes it, so an
interrupted run loses at most the item in flight; the next run with the same file skips the
ids already there. The file's first line records what produced it (benchmark, model, mode,
...), and resuming with different settings is refused rather than silently mixing runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm import tqdm

from lyra.config import LMMEConfig
from lyra.data.vision import VisionLimits
from lyra.inference import Assistant, GenerationOptions, load_model
from lyra.utils.io import atomic_write_text

META_KEY = "_meta"


class PredictionLog:
    """An append-only JSONL file of per-item records, each with a unique "id".

    A record with an "error" key marks an item that failed; it is retried on the next run
    (the later record of an id wins). A last line cut off by a crash is dropped.
    """

    def __init__(self, path: str | Path, meta: dict[str, Any]):
        self.path = Path(path)
        self.meta = json.loads(json.dumps(meta))  # what a JSON round trip gives, to compare with the file
        self.records: dict[str, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            self._load()
        else:
            self.path.write_text(json.dumps({META_KEY: self.meta}) + "\n")
        self._file = open(self.path, "a", encoding="utf-8")

    def _load(self) -> None:
        raw = self.path.read_text(encoding="utf-8")
        lines = raw.split("\n")
        complete, parsed = [], []
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                parsed.append(json.loads(line))
                complete.append(line)
            except json.JSONDecodeError:
                if number >= len(lines) - 2:  # the last line, cut off mid-write
                    break
                raise ValueError(f"{self.path}: line {number + 1} is not JSON; fix or delete the file") from None
        if not parsed or META_KEY not in parsed[0]:
            raise ValueError(f"{self.path} is not a predictions file of these scripts (no {META_KEY} line)")
        if parsed[0][META_KEY] != self.meta:
            raise ValueError(
                f"{self.path} was written by a different run ({parsed[0][META_KEY]}), not ({self.meta}); "
                f"pass another --predictions path or delete it to start over"
            )
        for record in parsed[1:]:
            self.records[str(record["id"])] = record
        repaired = "\n".join(complete) + "\n"
        if repaired != raw:  # drop a truncated tail so appends start on a fresh line
            atomic_write_text(self.path, repaired)

    def done(self, item_id: str) -> bool:
        record = self.records.get(item_id)
        return record is not None and "error" not in record

    def append(self, record: dict[str, Any]) -> None:
        record = {"id": str(record["id"]), **{k: v for k, v in record.items() if k != "id"}}
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        self.records[record["id"]] = record

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "PredictionLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_predictions_path(out: str | Path) -> Path:
    """`results.json` -> `results.predictions.jsonl`, next to it."""
    out = Path(out)
    return out.with_name(out.stem + ".predictions.jsonl")


@dataclass
class RunSummary:
    computed: int  # items answered in this run
    skipped: int  # already in the predictions file
    failed: int  # raised an error in this run (recorded, retried next time)


def run_items(items: Sequence[Any], log: PredictionLog, answer: Callable[[Any], dict[str, Any]],
              item_id: Callable[[Any], str], desc: str) -> RunSummary:
    """Call `answer(item)` for every item not yet in `log` and append what it returns.

    `answer` returns the record (its "id" is filled in). An exception that concerns the item
    (bad file, decoding, over a length limit) is recorded as {"id", "error"} and the run goes
    on; anything else (e.g. KeyboardInterrupt) stops it with the finished items saved.
    """
    pending = [item for item in items if not log.done(item_id(item))]
    failed = 0
    for item in tqdm(pending, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True):
        try:
            record = answer(item)
        except (ValueError, OSError, RuntimeError) as error:
            failed += 1
            record = {"error": f"{type(error).__name__}: {error}"}
            print(f"warning: {item_id(item)}: {record['error']}", file=sys.stderr)
        log.append({**record, "id": item_id(item)})
    return RunSummary(computed=len(pending) - failed, skipped=len(items) - len(pending), failed=failed)


# ----------------------------------------------------------------------------- model flags

def add_model_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    """--model, --device, --dtype, --lmme, generation and vision-budget flags."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None, help="checkpoint directory or preset (tiny, nano, ...)")
    group.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    group.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    group.add_argument("--lmme", default=None, metavar="BLOCKS,KEEP", help="LMME token pruning, e.g. 4,0.7")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the reference evaluates greedy)")
    group.add_argument("--max-pixels", type=int, default=None,
                       help="pixel budget per image and per video frame (lower it for small models)")
    group.add_argument("--max-frames", type=int, default=None, help="most video frames sampled (default 768)")
    group.add_argument("--fps", type=float, default=None, help="video frames sampled per second (default 2)")


def vision_limits_from_args(args: argparse.Namespace) -> VisionLimits:
    """Qwen2-VL's defaults, lowered by --max-pixels / --max-frames / --fps when given."""
    limits = VisionLimits()
    if args.max_pixels is not None:
        limits.image_max_pixels = limits.video_max_pixels = args.max_pixels
        limits.image_min_pixels = min(limits.image_min_pixels, args.max_pixels)
        limits.video_min_pixels = min(limits.video_min_pixels, args.max_pixels)
    if args.max_frames is not None:
        limits.video_max_frames = args.max_frames
        limits.video_min_frames = min(limits.video_min_frames, args.max_frames)
    if args.fps is not None:
        limits.video_fps = args.fps
    return limits


def load_assistant(args: argparse.Namespace):
    """(Assistant, GenerationOptions, model info) from the model flags."""
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                lmme=LMMEConfig.parse(args.lmme) if args.lmme else None)
    model, tokenizer, info = load_model(args.model, args.device, args.dtype)
    if info["untrained"]:
        print(f"note: '{info['model']}' is a preset with untrained weights; its answers are noise "
              f"(the run checks plumbing, not accuracy).", file=sys.stderr)
    return Assistant(model, tokenizer, vision_limits_from_args(args)), options, info


def model_meta(args: argparse.Namespace, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings that make predictions comparable; stored in the predictions file."""
    return {"model": (info or {}).get("model", args.model), "lmme": args.lmme,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "max_pixels": args.max_pixels, "max_frames": args.max_frames, "fps": args.fps}


def first(items: Iterable[Any], limit: int | None) -> list[Any]:
    """The first `limit` items (all when None): `--limit N` always means the same N items."""
    items = list(items)
    return items if limit is None else items[:limit]
