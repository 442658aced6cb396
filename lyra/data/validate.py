"""Check a training data file before a run: `python -m lyra.data.validate DATA.json --root DIR`.

Every sample is checked the way `LyraDataset` will load it: the record parses (a JSON list
with a syntax error, or a bad JSONL line, is reported with line and column), the roles
alternate human/gpt starting with human and ending with gpt, the placeholders match the
files, every file exists and decodes (images, videos, audio; empty audio and audio over the
model's limit are errors), and the tokenised sample fits `--model-max-length`. A sample whose
media alone exceed the budget is an error (`over_length`); one that only fits after dropping
trailing turns or cutting text is a warning (`truncated`).

The output is a table of problem kinds with counts and hints, then the first problems in
detail. Exit status: 0 when there is no error (warnings too with `--strict`), 1 otherwise.
`--fix-report OUT.json` writes every problem (index, line, id, code, file, message, hint)
and the list of bad indices, for a script that fixes or filters the data.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lyra.config import load_config
from lyra.data.dataset import LyraDataset
from lyra.data.records import BAD_SAMPLE_CODES, BadSampleError, DataFileError, inspect_record
from lyra.data.vision import VisionLimits
from lyra.processing import PLACEHOLDERS, LyraProcessor
from lyra.tokenizer import load_tokenizer
from lyra.utils.io import atomic_write_text

HINTS: dict[str, str] = {
    "malformed_json": "fix the JSON at the line and column given",
    "bad_schema": "give each record 'conversations' [{from, value}] and paths as strings or lists",
    "bad_roles": "alternate human/gpt turns, starting with human and ending with gpt",
    "placeholder_mismatch": "put one <image>/<video>/<speech>/<sound> per file, in human turns",
    "missing_file": "restore the file, fix the path or --root/--image-root/--audio-root, or drop the sample",
    "corrupt_image": "re-encode the image (PNG/JPEG) or drop the sample",
    "corrupt_video": "re-encode the video (H.264 MP4) or drop the sample",
    "corrupt_audio": "re-encode the audio (16 kHz WAV/FLAC) or drop the sample",
    "empty_audio": "regenerate the audio or drop the sample",
    "audio_too_long": "trim the audio or raise speech/sound.max_seconds",
    "bad_media": "resize the image/video to a sane aspect ratio",
    "over_length": "shorten the media or raise --model-max-length",
    "no_answer": "shorten the first exchange or raise --model-max-length",
    "truncated": "fine for training (trailing turns/text are dropped); split long conversations to keep them",
    "error": "see the message; it may be a bug",
}
WARNINGS = {"truncated"}


@dataclass
class Finding:
    index: int
    line: int | None
    sample_id: str
    code: str
    severity: str
    message: str
    file: str | None = None
    hint: str = ""


class Validator:
    """Checks samples of one data file with a `LyraDataset`'s own loading code."""

    def __init__(self, dataset: LyraDataset):
        self.dataset = dataset

    def check(self, index: int) -> list[Finding]:
        dataset = self.dataset
        line = dataset.records.line(index)
        found: list[Finding] = []

        def add(code: str, message: str, sample_id: str = "", file: str | None = None) -> None:
            severity = "warning" if code in WARNINGS else "error"
            found.append(Finding(index, line, sample_id, code, severity, message, file, HINTS.get(code, "")))

        try:
            record = dataset.records.get(index)
        except BadSampleError as error:
            add(error.code, str(error))
            return found
        sample_id = str(record.get("id", "")) if isinstance(record, dict) else ""
        parsed, problems = inspect_record(record)
        for problem in problems:
            add(problem.code, problem.message, sample_id)
        if parsed is None:
            return found
        loaded: dict[str, list[Any]] = {kind: [] for kind in PLACEHOLDERS}
        for kind in PLACEHOLDERS:
            for path in parsed.media[kind]:
                try:
                    loaded[kind].append(dataset.load_media(kind, path))
                except BadSampleError as error:
                    add(error.code, str(error), sample_id, path)
                except Exception as error:  # a loader bug must not stop the run
                    add("error", f"{type(error).__name__}: {error}", sample_id, path)
        if found:
            return found
        try:
            sample = dataset.build(index, parsed, loaded)
        except BadSampleError as error:
            add(error.code, str(error), sample_id)
        except Exception as error:
            add("error", f"{type(error).__name__}: {error}", sample_id)
        else:
            if sample.dropped_turns or sample.truncated_tokens:
                add(
                    "truncated",
                    f"over model_max_length={dataset.model_max_length}: {sample.dropped_turns} trailing turn(s) "
                    f"dropped, {sample.truncated_tokens} text token(s) cut",
                    sample_id,
                )
        return found


# ----------------------------------------------------------------------------- running
def build_dataset(args: argparse.Namespace) -> LyraDataset:
    tokenizer = load_tokenizer(None if args.tokenizer in (None, "qwen2") else args.tokenizer)
    config = load_config(args.config or ("tiny" if args.tokenizer == "tiny" else "mini"))
    limits = VisionLimits()
    for name in ("image_max_pixels", "video_max_pixels", "video_total_pixels"):
        if getattr(args, name, None):
            setattr(limits, name, getattr(args, name))
    max_length = args.model_max_length or config.text.max_position_embeddings
    return LyraDataset(
        args.data, LyraProcessor(tokenizer, config, limits), root=args.root, image_root=args.image_root,
        audio_root=args.audio_root, model_max_length=max_length, on_bad_sample="raise",
    )


_WORKER: Validator | None = None


def _init_worker(args: argparse.Namespace) -> None:
    logging.getLogger("lyra.data").setLevel(logging.ERROR)
    global _WORKER
    _WORKER = Validator(build_dataset(args))


def _check_chunk(indices: list[int]) -> list[list[Finding]]:
    assert _WORKER is not None
    return [_WORKER.check(i) for i in indices]


def run(args: argparse.Namespace) -> tuple[int, list[Finding], LyraDataset | None]:
    """Check every sample; returns (number of samples, findings, dataset or None if unreadable)."""
    try:
        dataset = build_dataset(args)
    except DataFileError as error:
        return 0, [Finding(-1, error.line, "", "malformed_json", "error", str(error), str(args.data), HINTS["malformed_json"])], None
    total = len(dataset)
    findings: list[Finding] = []
    progress = tqdm(total=total, desc="validating", unit="sample", disable=args.quiet, file=sys.stderr)
    if args.workers <= 1:
        validator = Validator(dataset)
        for index in range(total):
            findings.extend(validator.check(index))
            progress.update(1)
    else:
        global _WORKER
        chunks = [list(range(i, min(i + 16, total))) for i in range(0, total, 16)]
        if "fork" in multiprocessing.get_all_start_methods():  # workers inherit the built dataset
            _WORKER = Validator(dataset)
            pool = multiprocessing.get_context("fork").Pool(args.workers)
        else:
            pool = multiprocessing.get_context("spawn").Pool(args.workers, _init_worker, (args,))
        with pool:
            for results in pool.imap(_check_chunk, chunks):
                for result in results:
                    findings.extend(result)
                    progress.update(1)
        _WORKER = None
    progress.close()
    return total, findings, dataset


def format_table(total: int, findings: list[Finding], show: int = 20) -> str:
    counts = Counter((f.code, f.severity) for f in findings)
    bad = len({f.index for f in findings if f.severity == "error"})
    lines = []
    if not findings:
        lines.append(f"{total} sample(s) checked: no problems")
        return "\n".join(lines)
    width = max(len("problem"), *(len(code) for code, _ in counts))
    lines.append(f"{'problem':<{width}}  {'severity':<8}  {'count':>7}  hint")
    lines.append(f"{'-' * width}  {'-' * 8}  {'-' * 7}  {'-' * 4}")
    for (code, severity), n in sorted(counts.items(), key=lambda kv: (kv[0][1] != "error", -kv[1], kv[0][0])):
        lines.append(f"{code:<{width}}  {severity:<8}  {n:>7}  {HINTS.get(code, BAD_SAMPLE_CODES.get(code, ''))}")
    lines.append("")
    lines.append(f"{total} sample(s) checked: {bad} with errors, "
                 f"{len({f.index for f in findings if f.severity == 'warning'})} with warnings")
    if show:
        lines.append("")
        lines.append(f"first {min(show, len(findings))} problem(s):")
        for f in findings[:show]:
            where = f"#{f.index}" if f.index >= 0 else "file"
            if f.line:
                where += f" (line {f.line}{', id ' + repr(f.sample_id) if f.sample_id else ''})"
            lines.append(f"  {where} {f.code}: {f.message}")
    return "\n".join(lines)


def write_fix_report(path: str | Path, data: str, total: int, findings: list[Finding]) -> None:
    report = {
        "data": str(data),
        "num_samples": total,
        "counts": dict(Counter(f.code for f in findings)),
        "bad_indices": sorted({f.index for f in findings if f.severity == "error" and f.index >= 0}),
        "warning_indices": sorted({f.index for f in findings if f.severity == "warning"}),
        "problems": [asdict(f) for f in findings],
    }
    atomic_write_text(path, json.dumps(report, indent=1) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lyra.data.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="JSON list or JSONL file of LLaVA-style records")
    parser.add_argument("--root", default=None, help="base folder of relative paths (default: the data file's folder)")
    parser.add_argument("--image-root", default=None, help="base of image/video paths (default: --root)")
    parser.add_argument("--audio-root", default=None, help="base of speech/long_speech/sound paths (default: --root)")
    parser.add_argument("--tokenizer", default=None, help="'tiny', a tokenizer folder, or omitted for the Qwen2 tokenizer")
    parser.add_argument("--config", default=None, help="model preset or YAML (default: tiny with --tokenizer tiny, else mini)")
    parser.add_argument("--model-max-length", type=int, default=None,
                        help="token budget per sample (default: the config's max_position_embeddings)")
    parser.add_argument("--image-max-pixels", type=int, default=None)
    parser.add_argument("--video-max-pixels", type=int, default=None)
    parser.add_argument("--video-total-pixels", type=int, default=None)
    parser.add_argument("--fix-report", default=None, help="write every problem to this JSON file")
    parser.add_argument("--workers", type=int, default=1, help="processes (each decodes files on its own)")
    parser.add_argument("--show", type=int, default=20, help="problems to list in detail")
    parser.add_argument("--strict", action="store_true", help="fail on warnings too")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("lyra.data").setLevel(logging.ERROR)  # problems go to the table, not the log
    total, findings, _ = run(args)
    print(format_table(total, findings, args.show))
    if args.fix_report:
        write_fix_report(args.fix_report, args.data, total, findings)
        print(f"\nfix report: {args.fix_report}")
    failing = [f for f in findings if f.severity == "error" or args.strict]
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
