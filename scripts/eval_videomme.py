#!/usr/bin/env python
"""VideoMME accuracy by duration (short/medium/long) in vision, audio-only or omni mode.

    python scripts/eval_videomme.py --model outputs/base/model --data-root data/Video-MME \\
        --mode vision --out runs/videomme_vision.json
    # the paper's Table 5: the audio track alone, "yes"+letter or "no" (Fig. 8 prompt), and the
    # vision answers standing in where the audio was not enough ("Baseline + LSCI")
    python scripts/eval_videomme.py --model outputs/base/model --data-root data/Video-MME --mode audio \\
        --lmme 4,0.7 --fallback-predictions runs/videomme_vision.predictions.jsonl --out runs/videomme_audio.json

Predictions go to `<out stem>.predictions.jsonl` (or --predictions), one line per question as
it finishes; running the same command again skips the questions already there. `--limit N`
evaluates the first N questions. Layout and prompts: see `lyra/eval/videomme.py`.
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
    META_KEY, PredictionLog, add_model_arguments, default_predictions_path, first, load_assistant,
    model_meta, run_items,
)
from lyra.eval.videomme import (
    MODES, VideoMMEItem, build_prompt, find_video, has_audio_track, load_questions,
    score_predictions,
)


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
    try:
        items = first(load_questions(args.data_root, args.question_file), args.limit)
        fallback = read_predictions(args.fallback_predictions) if args.fallback_predictions else None
        if fallback is not None and args.mode != "audio":
            raise ValueError("--fallback-predictions only applies to --mode audio")
        assistant, options, info = load_assistant(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    limits = assistant.processor.vision.limits
    temporal_patch = assistant.processor.vision.temporal_patch_size

    def answer(item: VideoMMEItem) -> dict:
        path = find_video(args.data_root, item.video, args.video_dir)
        videos, speech, mode = [], [], args.mode
        audio_track = has_audio_track(path) if mode in ("audio", "omni") else None
        if mode == "audio" and not audio_track:  # nothing to listen to: the question stays unanswered
            return {"video": item.video, "duration": item.duration, "answer": item.answer, "response": None,
                    "audio_track": False, **item.extra}
        if mode == "omni" and not audio_track:
            mode = "vision"  # a silent video: the frames alone
        if mode in ("vision", "omni"):
            videos = [load_video_frames(path, limits, temporal_patch)]
        if mode in ("audio", "omni"):
            speech = [(load_video_audio(path), SAMPLE_RATE)]
        reply = assistant.reply([{"role": "user", "content": build_prompt(item, mode)}],
                                Media(videos=videos, speech=speech), options)
        return {"video": item.video, "duration": item.duration, "answer": item.answer, "options": item.options,
                "response": reply.text, "audio_track": audio_track,
                "prompt_tokens": reply.prompt_tokens, "new_tokens": len(reply.token_ids),
                "seconds": reply.timings["total_s"], **item.extra}

    predictions = Path(args.predictions) if args.predictions else default_predictions_path(args.out)
    meta = {"benchmark": "videomme", "mode": args.mode, **model_meta(args, info)}
    try:
        with PredictionLog(predictions, meta) as log:
            summary = run_items(items, log, answer, lambda item: item.id, desc=f"VideoMME {args.mode}")
            # Ground truth from the question file (failed items have no copy of it).
            records = [{**log.records[item.id], "duration": item.duration, "answer": item.answer,
                        "options": item.options} for item in items]
        metrics = score_predictions(records, args.mode, fallback)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = {"benchmark": "videomme", "mode": args.mode, "model": info["model"], "untrained": info["untrained"],
               "unit": "percent", **metrics, "settings": meta, "predictions": str(predictions),
               "run": {"computed": summary.computed, "skipped": summary.skipped, "failed": summary.failed}}
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
