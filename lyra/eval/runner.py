"""Plumbing shared by the benchmark scripts: sharded, batched, resumable evaluation.

One evaluation = items (questions, utterances, grid cells), each with a unique id. Under
`torchrun --nproc_per_node N` or `accelerate launch` (the RANK / WORLD_SIZE / LOCAL_RANK
environment; gloo on CPU, nccl on GPU) the items still to answer are dealt to the ranks
deterministically, and each rank appends one JSON line per finished item to its own shard,
`<predictions stem>.shards/rank<r>-of-<N>.jsonl`, flushed at once: an interrupted run loses
at most the batch in flight. Every rank first reads every shard there (and the merged file),
whatever process count wrote it, so a re-run with another number of processes answers only
what no earlier run did. When all ranks are done, rank 0 merges the shards into the
predictions file (item order, atomically) and the script scores that.

Each file's first line records what produced it (benchmark, model fingerprint, mode, ...)
and a hash of those settings; a file with another hash is refused, naming the file, rather
than mixing runs. Within a rank, items go in batches of `--batch-size` of one modality,
sorted by length, through `Assistant.reply_batch` (left-padded, the server's generate).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import soundfile
import torch
from tqdm import tqdm

from lyra.config import LMMEConfig
from lyra.data.vision import VisionLimits
from lyra.inference import Assistant, GenerationOptions, Media, load_model
from lyra.utils.io import atomic_write_text
from lyra.utils.state_dict import weights_sha256

META_KEY = "_meta"
HASH_KEY = "settings_hash"
ITEM_ERRORS = (ValueError, OSError, RuntimeError)  # what concerns one item (bad file, decoding, a limit)
FINGERPRINT_SAMPLES = 1024  # values per tensor in the model fingerprint of the predictions header


def settings_hash(meta: dict[str, Any]) -> str:
    """A short sha256 of the settings, independent of key order."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _header(meta: dict[str, Any]) -> str:
    return json.dumps({META_KEY: meta, HASH_KEY: settings_hash(meta)}, ensure_ascii=False) + "\n"


def read_predictions_file(path: Path, meta: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """(id -> record, the file's complete lines or None when that is the whole file) of a
    predictions file written with `meta`.

    A record with an "error" key marks an item that failed; a later record of an id wins.
    A last line cut off by a crash is dropped (not in the returned text).

    Raises:
        ValueError: not a predictions file, a broken line inside it, or other settings.
    """
    raw = path.read_text(encoding="utf-8")
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
            raise ValueError(f"{path}: line {number + 1} is not JSON; fix or delete the file") from None
    if not parsed or META_KEY not in parsed[0]:
        raise ValueError(f"{path} is not a predictions file of these scripts (no {META_KEY} line)")
    theirs = parsed[0][META_KEY]
    their_hash = parsed[0].get(HASH_KEY, settings_hash(theirs))
    if their_hash != settings_hash(meta):
        differ = sorted(k for k in set(theirs) | set(meta) if theirs.get(k) != meta.get(k))
        detail = ", ".join(f"{k}: {theirs.get(k)!r} there, {meta.get(k)!r} now" for k in differ) or "edited header"
        raise ValueError(
            f"{path} was written by a different run (settings hash {their_hash}, this run's is "
            f"{settings_hash(meta)}; {detail}); its predictions cannot be merged with this run's. "
            f"Pass another --predictions path, or delete the file to start over")
    records = {str(r["id"]): r for r in parsed[1:]}
    text = "\n".join(complete) + "\n"
    return records, None if text == raw else text


class PredictionLog:
    """An append-only JSONL file of per-item records, each with a unique "id", headed by the
    settings that produced it (see `read_predictions_file`)."""

    def __init__(self, path: str | Path, meta: dict[str, Any]):
        self.path = Path(path)
        self.meta = json.loads(json.dumps(meta))  # what a JSON round trip gives, to compare with the file
        self.records: dict[str, dict[str, Any]] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            self.records, complete = read_predictions_file(self.path, self.meta)
            if complete is not None:  # drop a cut-off tail: appends start afresh
                atomic_write_text(self.path, complete)
        else:
            atomic_write_text(self.path, _header(self.meta))
        self._file = open(self.path, "a", encoding="utf-8")

    def done(self, item_id: str) -> bool:
        return _finished(self.records.get(item_id))

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


def shard_folder(predictions: str | Path) -> Path:
    """`x.predictions.jsonl` -> `x.predictions.shards/`, where the ranks write."""
    predictions = Path(predictions)
    return predictions.with_name(predictions.stem + ".shards")


@dataclass
class RunSummary:
    computed: int  # items answered in this run
    skipped: int  # already in the predictions file
    failed: int  # raised an error in this run (recorded, retried next time)


def run_items(items: Sequence[Any], log: PredictionLog, answer: Callable[[Any], dict[str, Any]],
              item_id: Callable[[Any], str], desc: str) -> RunSummary:
    """Call `answer(item)` for every item not yet in `log` and append what it returns, one
    process, one at a time (the MM-Vet judge; the model goes through `evaluate`).

    An exception that concerns the item is recorded as {"id", "error"} and the run goes on;
    anything else (e.g. KeyboardInterrupt) stops it with the finished items saved.
    """
    pending = [item for item in items if not log.done(item_id(item))]
    failed = 0
    for item in tqdm(pending, desc=desc, unit="item", file=sys.stderr, dynamic_ncols=True):
        try:
            record = answer(item)
        except ITEM_ERRORS as error:
            failed += 1
            record = _error_record(item_id(item), error)
        log.append({**record, "id": item_id(item)})
    return RunSummary(computed=len(pending) - failed, skipped=len(items) - len(pending), failed=failed)


def _error_record(item_id: str, error: BaseException) -> dict[str, Any]:
    message = f"{type(error).__name__}: {error}"
    print(f"warning: {item_id}: {message}", file=sys.stderr)
    return {"id": item_id, "error": message}


# ----------------------------------------------------------------------------- processes

@dataclass
class Layout:
    """This process's place among the evaluation's processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = field(default=False, compare=False)  # `start` made the process group

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "Layout":
        """From RANK / WORLD_SIZE / LOCAL_RANK, which torchrun and accelerate launch set."""
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local = int(env.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers, got {env.get('RANK')!r} / "
                             f"{env.get('WORLD_SIZE')!r} / {env.get('LOCAL_RANK')!r}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK {rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE {world})")
        return cls(rank, world, local)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """--device for this rank: `auto`/`cuda` become this process's GPU (LOCAL_RANK)."""
        if (device == "auto" and torch.cuda.is_available()) or device == "cuda":
            return f"cuda:{self.local_rank}" if self.distributed else device
        return device

    def start(self, device: torch.device) -> None:
        """Join the process group (nccl on GPU, gloo on CPU) when there are several processes;
        one that already exists (the caller's) is used as it is."""
        if not self.distributed or torch.distributed.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.owns_group = True

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order (on every rank)."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def stop(self) -> None:
        """Leave the process group `start` made."""
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.owns_group = False

    def __enter__(self) -> "Layout":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ----------------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class Request:
    """One conversation for the model."""

    messages: list[dict[str, str]]
    media: Media


@dataclass
class EvalTask:
    """How a benchmark turns items into records.

    `prepare(item)` returns the requests the item needs (a needle cell asks one per sample),
    or a finished record when it needs no model (e.g. a silent video in audio mode);
    `finish(item, answers)` builds the record from the answers, in request order.
    `group(item)` is (modality, length): batches hold one modality, items sorted by length.
    """

    name: str
    items: Sequence[Any]
    item_id: Callable[[Any], str]
    prepare: Callable[[Any], list[Any] | dict[str, Any]]
    finish: Callable[[Any, list[Any]], dict[str, Any]]
    group: Callable[[Any], tuple[str, float]]


@dataclass
class EvalOutcome:
    """What `evaluate` leaves: the merged records (item order) on rank 0, None elsewhere."""

    records: list[dict[str, Any]] | None
    summary: RunSummary
    seconds: float  # wall time of the answering part, the slowest rank
    modality_seconds: dict[str, float] = field(default_factory=dict)  # summed over ranks

    @property
    def items_per_second(self) -> float:
        return self.summary.computed / self.seconds if self.seconds > 0 else 0.0

    def throughput(self) -> dict[str, Any]:
        """For the results JSON."""
        return {"items_per_second": round(self.items_per_second, 4), "seconds": round(self.seconds, 3),
                "modality_seconds": {m: round(s, 3) for m, s in sorted(self.modality_seconds.items())}}

    def report(self, layout: Layout, batch_size: int) -> dict[str, Any]:
        """The run's part of a results JSON: what was answered, skipped and failed, and how fast."""
        summary = self.summary
        return {"run": {"computed": summary.computed, "skipped": summary.skipped, "failed": summary.failed},
                "throughput": self.throughput(), "processes": layout.world_size, "batch_size": batch_size}

    def throughput_line(self, name: str) -> str:
        total = sum(self.modality_seconds.values()) or 1.0
        split = ", ".join(f"{m} {s:.1f} s ({100 * s / total:.0f}%)" for m, s in sorted(self.modality_seconds.items()))
        return (f"{name}: {self.summary.computed} items answered in {self.seconds:.1f} s = "
                f"{self.items_per_second:.2f} items/s; time by modality: {split or 'none'}")


def audio_seconds(path: str | Path) -> float:
    """A recording's length from its header, for grouping (0 when the header does not say;
    the file is decoded, and any error raised, when its item runs)."""
    try:
        return float(soundfile.info(str(path)).duration)
    except (RuntimeError, OSError):  # soundfile's errors are RuntimeErrors
        return 0.0


def _finished(record: dict[str, Any] | None) -> bool:
    return record is not None and "error" not in record


def read_shards(predictions: Path, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """id -> record over the merged file and every shard next to it; a finished record
    wins over a failed one, whichever file holds it."""
    paths = [predictions] + sorted(shard_folder(predictions).glob("rank*-of-*.jsonl"))
    records: dict[str, dict[str, Any]] = {}
    for path in paths:
        if not path.is_file() or not path.stat().st_size:
            continue
        for item_id, record in read_predictions_file(path, meta)[0].items():
            if not _finished(records.get(item_id)):
                records[item_id] = record
    return records


def deal(pending: Sequence[tuple[Any, tuple[str, float]]], layout: Layout) -> list[tuple[Any, str]]:
    """This rank's share of `pending` (item, its group) pairs, as (item, modality): sorted by
    (modality, length, position), every `world_size`-th from `rank`, so each rank gets a like
    mix of short and long items."""
    order = sorted(range(len(pending)), key=lambda i: (*pending[i][1], i))
    return [(pending[i][0], pending[i][1][0]) for i in order[layout.rank::layout.world_size]]


def batches(items: Sequence[tuple[Any, str]], batch_size: int) -> Iterable[tuple[list[Any], str]]:
    """(batch, modality): consecutive runs of (item, modality) pairs of one modality, at most
    `batch_size` long."""
    batch: list[Any] = []
    modality = ""
    for item, its_modality in items:
        if batch and (len(batch) == batch_size or its_modality != modality):
            yield batch, modality
            batch = []
        batch.append(item)
        modality = its_modality
    if batch:
        yield batch, modality


def _answer_batch(task: EvalTask, batch: list[Any], answer: Callable[[list[Any]], list[Any]]) -> list[dict]:
    """Records for `batch`: the requests of all its items answered together; when that fails,
    item by item, so an item the model cannot take fails alone."""
    prepared: list[list[Any] | dict[str, Any]] = []
    for item in batch:
        try:
            prepared.append(task.prepare(item))
        except ITEM_ERRORS as error:
            prepared.append(_error_record(task.item_id(item), error))
    asking = [k for k, requests in enumerate(prepared) if isinstance(requests, list)]
    answers: dict[int, list[Any] | BaseException] = {}
    try:
        flat = answer([r for k in asking for r in prepared[k]]) if asking else []
        for k in asking:
            answers[k], flat = flat[:len(prepared[k])], flat[len(prepared[k]):]
    except ITEM_ERRORS as error:
        for k in asking:
            try:
                answers[k] = error if len(asking) == 1 else answer(prepared[k])
            except ITEM_ERRORS as alone:
                answers[k] = alone
    records = []
    for k, (item, requests) in enumerate(zip(batch, prepared)):
        item_id = task.item_id(item)
        if isinstance(requests, dict):  # a finished record, or the error of its preparation
            records.append({**requests, "id": item_id})
            continue
        try:
            if isinstance(answers[k], BaseException):
                raise answers[k]
            records.append({**task.finish(item, answers[k]), "id": item_id})
        except ITEM_ERRORS as error:
            records.append(_error_record(item_id, error))
    return records


def evaluate(task: EvalTask, answer: Callable[[list[Any]], list[Any]], predictions: str | Path,
             meta: dict[str, Any], layout: Layout, batch_size: int = 1) -> EvalOutcome:
    """Answer every item no shard holds yet (this rank's share, in batches), then, on rank 0,
    merge all shards into `predictions`.

    `answer(requests)` returns one answer per request (e.g. `Assistant.reply_batch`).
    Collective: every rank of `layout` must call it with the same items and settings.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    predictions = Path(predictions)
    meta = json.loads(json.dumps(meta))
    ids = [task.item_id(item) for item in task.items]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{task.name}: item ids are not unique")
    known = read_shards(predictions, meta)
    layout.barrier()  # every rank has read the same files before any rank writes
    pending = [(item, task.group(item)) for item in task.items if not _finished(known.get(task.item_id(item)))]
    mine = deal(pending, layout)
    shard = shard_folder(predictions) / f"rank{layout.rank}-of-{layout.world_size}.jsonl"
    computed = failed = 0
    modality_seconds: dict[str, float] = defaultdict(float)
    started = time.perf_counter()
    with PredictionLog(shard, meta) as log, tqdm(
            total=len(mine), desc=f"{task.name} [rank {layout.rank}/{layout.world_size}]", unit="item",
            file=sys.stderr, dynamic_ncols=True, position=layout.rank) as bar:
        for batch, modality in batches(mine, batch_size):
            batch_started = time.perf_counter()
            for record in _answer_batch(task, batch, answer):
                log.append(record)
                failed += "error" in record
                computed += "error" not in record
            modality_seconds[modality] += time.perf_counter() - batch_started
            bar.update(len(batch))
    seconds = time.perf_counter() - started
    # Collective: once every rank has sent its figures, every shard is complete and closed.
    gathered = layout.gather((computed, failed, seconds, dict(modality_seconds)))
    merged_seconds: dict[str, float] = defaultdict(float)
    for _, _, _, by_modality in gathered:
        for modality, value in by_modality.items():
            merged_seconds[modality] += value
    summary = RunSummary(computed=sum(g[0] for g in gathered), skipped=len(task.items) - len(pending),
                         failed=sum(g[1] for g in gathered))
    outcome = EvalOutcome(None, summary, max(g[2] for g in gathered), dict(merged_seconds))
    if layout.main:
        outcome.records = merge(task, predictions, meta)
        print(outcome.throughput_line(task.name), file=sys.stderr)
    return outcome


def merge(task: EvalTask, predictions: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Write every item's record, in item order, to `predictions` (atomically); the records.

    Raises:
        ValueError: an item no shard holds (a rank stopped early).
    """
    known = read_shards(predictions, meta)
    missing = [task.item_id(item) for item in task.items if task.item_id(item) not in known]
    if missing:
        raise ValueError(f"{shard_folder(predictions)}: no prediction for {len(missing)} item(s) "
                         f"(e.g. {missing[0]}); run the evaluation again to answer them")
    records = [known[task.item_id(item)] for item in task.items]
    atomic_write_text(predictions, _header(meta) + "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                           for r in records))
    return records


# ----------------------------------------------------------------------------- model flags

def add_model_arguments(parser: argparse.ArgumentParser, max_new_tokens: int, batch_size: bool = True) -> None:
    """--model, --device, --dtype, --lmme, generation and vision-budget flags (and --batch-size)."""
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
    if batch_size:
        group.add_argument("--batch-size", type=int, default=1,
                           help="items per generate call (one modality, similar lengths); answers do not depend on it")


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


def load_assistant(args: argparse.Namespace, layout: Layout | None = None):
    """(Assistant, GenerationOptions, model info) from the model flags, on this rank's device;
    joins the process group of `layout`. `info["fingerprint"]` identifies the weights."""
    layout = layout or Layout()
    options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                lmme=LMMEConfig.parse(args.lmme) if args.lmme else None)
    model, tokenizer, info = load_model(args.model, layout.device(args.device), args.dtype)
    layout.start(model.device)
    if info["untrained"] and layout.main:
        print(f"note: '{info['model']}' is a preset with untrained weights; its answers are noise "
              f"(the run checks plumbing, not accuracy).", file=sys.stderr)
    info["fingerprint"] = weights_sha256(model, FINGERPRINT_SAMPLES)[:16]
    return Assistant(model, tokenizer, vision_limits_from_args(args)), options, info


def lyra_answers(assistant: Assistant, options: GenerationOptions) -> Callable[[list[Request]], list[Any]]:
    """`evaluate`'s `answer` for a Lyra model: the requests as one `reply_batch`."""
    return lambda requests: assistant.reply_batch([(r.messages, r.media) for r in requests], options)


def model_meta(args: argparse.Namespace, info: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings that make predictions comparable; stored (and hashed) in the predictions files.
    The batch size and process count are not among them: they do not change the answers."""
    info = info or {}
    return {"model": info.get("model", args.model), "model_fingerprint": info.get("fingerprint"),
            "dtype": info.get("dtype"), "lmme": args.lmme,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "max_pixels": args.max_pixels, "max_frames": args.max_frames, "fps": args.fps}


def exit_code(run: Callable[[], int], errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> int:
    """`run()`'s exit code; one of `errors` (a bad flag, a missing file, a predictions file of
    another run) is printed as one line and gives 2, with no traceback."""
    try:
        return run()
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def first(items: Iterable[Any], limit: int | None) -> list[Any]:
    """The first `limit` items (all when None): `--limit N` always means the same N items."""
    items = list(items)
    return items if limit is None else items[:limit]
