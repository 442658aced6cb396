"""Check a training data file before a run: `python -m lyra.data.validate DATA.json --root DIR`.

Every sample is checked the way `LyraDataset` will load it: the file is readable, UTF-8 and
holds records; each record parses (a JSON list with a syntax error, or a bad JSONL line, is
reported with line and column), the roles alternate human/gpt starting with human and ending
with gpt, the placeholders match the files, every file exists and decodes (images, videos,
audio; empty audio and audio over the model's limit are errors), and the tokenised sample fits
`--model-max-length`. A sample whose media alone exceed the budget is an error (`over_length`);
one that only fits after dropping trailing turns or cutting text is a warning (`truncated`).
It is stricter than the loader in what the loader tolerates: ids must be unique, media paths
must stay under their root (no absolute paths, no `..` above it, no symlink leading out unless
`--follow-symlinks`), records and turns may hold only known keys, answers may not be empty,
and `tgt_unit` ids must lie in the speech generator's vocabulary (`--config`'s
`speech_generator.num_units`, the check stage 4's loss makes).

The output is a table of problem kinds with counts and hints, then the first problems in
detail. Exit status: 0 when there is no error (warnings too with `--strict`), 1 otherwise, 2
when the check cannot run (a bad `--config` or `--tokenizer`); no case prints a traceback.
`--fix-report OUT.json` writes every problem (index, line, id, code, file, message, hint)
and the list of bad indices, for a script that fixes or filters the data.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from tqdm import tqdm

from lyra.config import load_config
from lyra.data.dataset import LyraDataset
from lyra.data.records import BAD_SAMPLE_CODES, BadSampleError, DataFileError, inspect_record, strict_problems
from lyra.data.units import check_unit_range
from lyra.data.vision import VisionLimits
from lyra.processing import PLACEHOLDERS, LyraProcessor
from lyra.tokenizer import load_tokenizer
from lyra.utils.io import atomic_write_text

HINTS: dict[str, str] = {
    "unreadable_file": "give a readable regular file (not a directory, FIFO or device) or fix the path",
    "not_utf8": "re-save the data file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
    "no_records": "the file is empty, [] or blank lines; point at the right file",
    "malformed_json": "fix the JSON at the line and column given",
    "duplicate_id": "give every record its own id, or drop the repeated record",
    "unknown_key": "rename the key (a typo?) or remove it; put bookkeeping under 'meta'",
    "path_outside_root": "write paths relative to the root and keep the files under it",
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
    "empty_answer": "write the answer or drop the turn pair",
    "unit_out_of_range": "regenerate tgt_unit with the model's unit set, or pass the model's --config",
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


@dataclass
class SampleCheck:
    """What checking sample `index` (at `line` of the file) found; `sample_id` is None when
    the record has no id."""

    index: int
    line: int | None
    sample_id: str | None = None
    findings: list[Finding] = field(default_factory=list)

    def add(self, code: str, message: str, file: str | None = None) -> None:
        severity = "warning" if code in WARNINGS else "error"
        self.findings.append(
            Finding(self.index, self.line, self.sample_id or "", code, severity, message, file, HINTS.get(code, ""))
        )


def leaves_root(path: str) -> str | None:
    """Why a media path as written leaves its root, found without touching the disk
    (absolute, or `..` above the root); None when it stays under it."""
    if PurePosixPath(path).is_absolute():
        return "is absolute"
    if os.path.normpath(path).split("/")[0] == "..":
        return "climbs above the root with '..'"
    return None


class Validator:
    """Checks samples of one data file with a `LyraDataset`'s own loading code.

    `follow_symlinks` accepts media reached through a symlink whose target lies outside its
    root (a data set folder linked in); absolute and `..` paths are refused either way.
    """

    def __init__(self, dataset: LyraDataset, follow_symlinks: bool = False):
        self.dataset = dataset
        self.follow_symlinks = follow_symlinks

    def check(self, index: int) -> SampleCheck:
        report = SampleCheck(index, self.dataset.records.line(index))
        try:
            self._check(report)
        except Exception as error:  # a checker bug must not stop the run or print a traceback
            report.add("error", f"{type(error).__name__}: {error}")
        return report

    def _check(self, report: SampleCheck) -> None:
        dataset = self.dataset
        try:
            record = dataset.records.get(report.index)
        except BadSampleError as error:
            report.add(error.code, str(error))
            return
        if isinstance(record, dict) and record.get("id") is not None:
            report.sample_id = str(record["id"])
        parsed, problems = inspect_record(record)
        for problem in problems + (strict_problems(record, parsed) if parsed is not None else []):
            report.add(problem.code, problem.message)
        if parsed is None:
            return
        if parsed.tgt_units is not None:
            try:
                check_unit_range(parsed.tgt_units, dataset.processor.config.speech_generator.num_units)
            except ValueError as error:
                report.add("unit_out_of_range", f"'tgt_unit': {error}")
        loaded: dict[str, list[Any]] = {kind: [] for kind in PLACEHOLDERS}
        for kind in PLACEHOLDERS:
            for path in parsed.media[kind]:
                if not self._media_file_ok(kind, path, report):
                    continue
                try:
                    loaded[kind].append(dataset.load_media(kind, path))
                except BadSampleError as error:
                    report.add(error.code, str(error), path)
                except Exception as error:  # a loader bug must not stop the run
                    report.add("error", f"{type(error).__name__}: {error}", path)
        if report.findings:
            return
        try:
            sample = dataset.build(report.index, parsed, loaded)
        except BadSampleError as error:
            report.add(error.code, str(error))
            return
        if sample.dropped_turns or sample.truncated_tokens:
            report.add(
                "truncated",
                f"over model_max_length={dataset.model_max_length}: {sample.dropped_turns} trailing turn(s) "
                f"dropped, {sample.truncated_tokens} text token(s) cut",
            )

    def _media_file_ok(self, kind: str, path: str, report: SampleCheck) -> bool:
        """Whether a media path stays under its root and names a file (or a video's frame
        folder) that can be read without blocking; adds the problem to `report` if not."""
        base = self.dataset.root_of(kind)
        reason = leaves_root(path)
        if reason is not None:
            report.add("path_outside_root", f"{kind} path {path!r} {reason}; write it relative to {base}", path)
            return False
        try:
            full = self.dataset.resolve(kind, path)
        except BadSampleError as error:
            report.add(error.code, str(error), path)
            return False
        target = full.resolve()
        if not self.follow_symlinks and not target.is_relative_to(base.resolve()):
            report.add(
                "path_outside_root",
                f"{kind} path {path!r} leads through a symlink to {target}, outside {base} "
                f"(--follow-symlinks accepts links out of the root)",
                path,
            )
            return False
        if not (full.is_file() or (kind == "video" and full.is_dir())):
            what = "a directory" if full.is_dir() else "not a regular file (a FIFO, device or socket)"
            report.add("unreadable_file", f"{kind} file {full} is {what}", path)
            return False
        return True


# ----------------------------------------------------------------------------- running
def build_processor(args: argparse.Namespace) -> LyraProcessor:
    tokenizer = load_tokenizer(None if args.tokenizer in (None, "qwen2") else args.tokenizer)
    config = load_config(args.config or ("tiny" if args.tokenizer == "tiny" else "mini"))
    limits = VisionLimits()
    for name in ("image_max_pixels", "video_max_pixels", "video_total_pixels"):
        if getattr(args, name, None):
            setattr(limits, name, getattr(args, name))
    return LyraProcessor(tokenizer, config, limits)


def open_dataset(args: argparse.Namespace, processor: LyraProcessor) -> LyraDataset:
    """The data file as training reads it; raises `DataFileError` or `OSError` when unreadable."""
    max_length = args.model_max_length or processor.config.text.max_position_embeddings
    return LyraDataset(
        args.data, processor, root=args.root, image_root=args.image_root,
        audio_root=args.audio_root, model_max_length=max_length, on_bad_sample="raise",
    )


_WORKER: Validator | None = None


def _init_worker(args: argparse.Namespace) -> None:
    logging.getLogger("lyra.data").setLevel(logging.ERROR)
    global _WORKER
    _WORKER = Validator(open_dataset(args, build_processor(args)), args.follow_symlinks)


def _check_chunk(indices: list[int]) -> list[SampleCheck]:
    assert _WORKER is not None
    return [_WORKER.check(i) for i in indices]


def _check_all(dataset: LyraDataset, args: argparse.Namespace) -> Iterator[SampleCheck]:
    """Every sample's check, in file order, in `args.workers` processes."""
    total = len(dataset)
    progress = tqdm(total=total, desc="validating", unit="sample", disable=args.quiet, file=sys.stderr)
    validator = Validator(dataset, args.follow_symlinks)
    if args.workers <= 1:
        for index in range(total):
            yield validator.check(index)
            progress.update(1)
    else:
        global _WORKER
        chunks = [list(range(i, min(i + 16, total))) for i in range(0, total, 16)]
        if "fork" in multiprocessing.get_all_start_methods():  # workers inherit the built dataset
            _WORKER = validator
            pool = multiprocessing.get_context("fork").Pool(args.workers)
        else:
            pool = multiprocessing.get_context("spawn").Pool(args.workers, _init_worker, (args,))
        with pool:
            for results in pool.imap(_check_chunk, chunks):
                for result in results:
                    yield result
                    progress.update(1)
        _WORKER = None
    progress.close()


def _file_finding(code: str, message: str, data: str, line: int | None = None) -> Finding:
    return Finding(-1, line, "", code, "error", message, str(data), HINTS[code])


def run(args: argparse.Namespace) -> tuple[int, list[Finding]]:
    """Check every sample: (number of samples, findings in file order). Raises only when the
    check itself cannot be set up (a bad `--config` or `--tokenizer`)."""
    processor = build_processor(args)
    try:
        dataset = open_dataset(args, processor)
    except DataFileError as error:
        return 0, [_file_finding(error.code, str(error), args.data, error.line)]
    except OSError as error:
        return 0, [_file_finding("unreadable_file", f"cannot read the data file: {error}", args.data)]
    if len(dataset) == 0:
        return 0, [_file_finding("no_records", f"{args.data} holds no records (it is empty, [] or blank lines)", args.data)]
    findings: list[Finding] = []
    first_with_id: dict[str, tuple[int, int | None]] = {}  # id -> (index, line) of its first record
    for report in _check_all(dataset, args):
        if report.sample_id is not None:
            index, line = first_with_id.setdefault(report.sample_id, (report.index, report.line))
            if index != report.index:
                report.add("duplicate_id", f"id {report.sample_id!r} is also the id of record #{index} (line {line})")
        findings.extend(report.findings)
    return len(dataset), findings


def format_table(total: int, findings: list[Finding], show: int = 20) -> str:
    counts = Counter((f.code, f.severity) for f in findings)
    bad = len({f.index for f in findings if f.severity == "error" and f.index >= 0})
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
                 f"{len({f.index for f in findings if f.severity == 'warning'})} with warnings"
                 + ("; the file itself is unusable" if any(f.index < 0 for f in findings) else ""))
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
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="accept media reached through symlinks that lead out of the root (a linked data set folder)")
    parser.add_argument("--workers", type=int, default=1, help="processes (each decodes files on its own)")
    parser.add_argument("--show", type=int, default=20, help="problems to list in detail")
    parser.add_argument("--strict", action="store_true", help="fail on warnings too")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("lyra.data").setLevel(logging.ERROR)  # problems go to the table, not the log
    try:
        total, findings = run(args)
        if args.fix_report:
            write_fix_report(args.fix_report, args.data, total, findings)
    except Exception as error:  # a bad --config/--tokenizer or an unwritable report: a message, not a traceback
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(format_table(total, findings, args.show))
    if args.fix_report:
        print(f"\nfix report: {args.fix_report}")
    failing = [f for f in findings if f.severity == "error" or args.strict]
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
