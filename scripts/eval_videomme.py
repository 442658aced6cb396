#!/usr/bin/env python
"""VideoMME accuracy by duration (short/medium/long) in vision, audio-only or omni mode.

    python scripts/eval_videomme.py --model outputs/base/model --data-root data/Video-MME \\
        --mode vision --out runs/videomme_vision.json
    # the paper's Table 5: the audio track alone, "yes"+letter or "no" (Fig. 8 prompt), and the
    # vision answers standing in where the audio was not enough ("Baseline + LSCI")
    python scripts/eval_videomme.py --model outputs/base/model --data-root data/Video-MME --mode audio \\
        --lmme 4,0.7 --fallback-predictions runs/videomme_vision.predictions.jsonl --out runs/videomme_audio.json

    # 8 GPUs, 8 questions per generate call; the same predictions as one process
    torchrun --nproc_per_node 8 scripts/eval_videomme.py --model outputs/base/model --data-root data/Video-MME \
        --mode vision --batch-size 8 --out runs/videomme_vision.json

Each process appends its answers, one line per question as it finishes, to
`<out stem>.predictions.shards/`; running again (with any number of processes) skips the
questions already there, and the first process merges them into `<out stem>.predictions.jsonl`
(or --predictions) and scores. `--limit N` evaluates the first N questions. Layout and
prompts: see `lyra/eval/videomme.py`; sharding and batching: `lyra/eval/runner.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lyra.data.audio import SAMPLE_RATE, load_video_audio
from lyra.data.vision import load_video_frames
from lyra.inference import Media
from lyra.utils.io import atomic_write_json
from lyra.eval.runner import (
    META_KEY, EvalTask, Layout, Request, add_model_arguments, default_predictions_path, evaluate, exit_code, first,
    load_assistant, lyra_answers, model_meta,
)
from lyra.eval.videomme import (
    MODES, VideoMMEItem, build_prompt, find_video, has_audio_track, load_questions,
    score_predictions,
)

DURATION_ORDER = {"short": 0, "medium": 1, "long": 2}  # batches group questions of one duration class


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="the VideoMME folder (videomme/*.parquet + data/*.mp4)")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--out", required=True, help="results JSON (written atomically)")
    parser.add_argument("--question-file", default=None, help="parquet/json/jsonl (default: found in --data-root)")
    parser.add_argument("--video-dir", default=None, help="where the videos are (default: data/, video/, ...)")
    parser.add_argument("--predictions", default=None, help="predictions JSONL (default: next to --out)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--fallback-predictions", default=None,
                        help="audio mode: a vision run's predictions, used where the audio did not suffice")
    add_model_arguments(parser, max_new_tokens=32)
    return parser


def read_predictions(path: str | Path) -> dict[str, dict]:
    """id -> record of a predictions JSONL (the last record of an id wins)."""
    records = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if META_KEY not in record:
                records[str(record["id"])] = record
    return records


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with Layout.from_env() as layout:
        return exit_code(lambda: run(args, layout))


def run(args: argparse.Namespace, layout: Layout) -> int:
    items = first(load_questions(args.data_root, args.question_file), args.limit)
    fallback = read_predictions(args.fallback_predictions) if args.fallback_predictions else None
    if fallback is not None and args.mode != "audio":
        raise ValueError("--fallback-predictions only applies to --mode audio")
    assistant, options, info = load_assistant(args, layout)
    limits = assistant.processor.vision.limits
    temporal_patch = assistant.processor.vision.temporal_patch_size

    def record(item: VideoMMEItem, **fields) -> dict:
        return {"video": item.video, "duration": item.duration, "answer": item.answer, **fields, **item.extra}

    def prepare(item: VideoMMEItem) -> list[Request] | dict:
        path = find_video(args.data_root, item.video, args.video_dir)
        videos, speech, mode = [], [], args.mode
        audio_track = has_audio_track(path) if mode in ("audio", "omni") else None
        if mode == "audio" and not audio_track:  # nothing to listen to: the question stays unanswered
            return record(item, response=None, audio_track=False)
        if mode == "omni" and not audio_track:
            mode = "vision"  # a silent video: the frames alone
        if mode in ("vision", "omni"):
            videos = [load_video_frames(path, limits, temporal_patch)]
        if mode in ("audio", "omni"):
            speech = [(load_video_audio(path), SAMPLE_RATE)]
        return [Request([{"role": "user", "content": build_prompt(item, mode)}], Media(videos=videos, speech=speech))]

    def finish(item: VideoMMEItem, replies: list) -> dict:
        reply = replies[0]
        return record(item, options=item.options, response=reply.text, audio_track=None
                      if args.mode == "vision" else bool(reply.speech_seconds),
                      prompt_tokens=reply.prompt_tokens, new_tokens=len(reply.token_ids),
                      seconds=reply.timings["total_s"])

    task = EvalTask(f"VideoMME {args.mode}", items, lambda item: item.id, prepare, finish,
                    lambda item: (args.mode, DURATION_ORDER.get(item.duration, 3)))
    predictions = Path(args.predictions) if args.predictions else default_predictions_path(args.out)
    meta = {"benchmark": "videomme", "mode": args.mode, **model_meta(args, info)}
    outcome = evaluate(task, lyra_answers(assistant, options), predictions, meta, layout, args.batch_size)
    if not layout.main:
        return 0
    # Ground truth from the question file (failed items have no copy of it).
    records = [{**r, "duration": item.duration, "answer": item.answer, "options": item.options}
               for item, r in zip(items, outcome.records)]
    metrics = score_predictions(records, args.mode, fallback)
    results = {"benchmark": "videomme", "mode": args.mode, "model": info["model"], "untrained": info["untrained"],
               "unit": "percent", **metrics, "settings": meta, "predictions": str(predictions),
               **outcome.report(layout, args.batch_size)}
    atomic_write_json(args.out, results)
    accuracy = results["accuracy"]
    print(f"VideoMME {args.mode}: {accuracy['overall']}% overall (short {accuracy['short']}, medium "
          f"{accuracy['medium']}, long {accuracy['long']}) over {results['n']} questions -> {args.out}")
    if args.mode == "audio":
        print(f"  answered {results['answered_fraction']['overall']}% of questions, "
              f"{results['answered_accuracy']['overall']}% of those correctly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
