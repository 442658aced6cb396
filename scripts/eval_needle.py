#!/usr/bin/env python
"""Needle in a long-speech haystack: retrieval over a grid of lengths x depths, and its heatmap.

    python scripts/eval_needle.py --model outputs/base/model --haystack talk1.wav talk2.wav \\
        --lengths 450 900 1800 3600 4500 --depths 0 0.25 0.5 0.75 1 --samples 5 --lmme 4,0.7 \\
        --out runs/needle.json          # also runs/needle.heatmap.png (Fig. 6)

The needle (question + the sentence answering it) is spoken with espeak-ng, or read from
--needle-audio; the model hears the haystack and is asked the question in text. Each grid
cell (length, depth) is one item: its `--samples` trials go to the model together (in
batches of `--batch-size` trials, cells of one length side by side). Under
`torchrun --nproc_per_node N` the cells are dealt to the processes; each appends its cells
to a shard next to --out, and the first process merges them and draws the heatmap. Running
again skips finished cells, so the grid can grow (more lengths or depths) without redoing
the old ones (other --samples or --stride settings start over: the predictions say why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lyra.data.audio import SAMPLE_RATE, load_audio
from lyra.eval.metrics import mean
from lyra.eval.needle import (
    DEFAULT_NEEDLE, Needle, build_haystack, cell_id, draw_heatmap, grid_scores, load_background, retrieval_score,
    synthesize_espeak,
)
from lyra.utils.io import atomic_write_json
from lyra.eval.runner import (
    EvalTask, Layout, Request, add_model_arguments, default_predictions_path, evaluate, exit_code, load_assistant,
    lyra_answers, model_meta,
)
from lyra.inference import Media


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--haystack", nargs="+", required=True, metavar="AUDIO", help="long background recordings")
    parser.add_argument("--lengths", nargs="+", type=float, required=True, help="haystack lengths in seconds")
    parser.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="needle positions as fractions of the haystack")
    parser.add_argument("--samples", type=int, default=1, help="trials per cell, on different background stretches")
    parser.add_argument("--stride", type=float, default=None,
                        help="seconds between the background starts of a cell's trials (default: spread evenly)")
    parser.add_argument("--question", default=DEFAULT_NEEDLE.question)
    parser.add_argument("--answer", default=DEFAULT_NEEDLE.answer, help="what the reply must contain")
    parser.add_argument("--answer-sentence", default=None, help="spoken after the question (default: the example's)")
    parser.add_argument("--needle-audio", default=None, help="a recorded needle instead of espeak-ng")
    parser.add_argument("--voice", default="en-us", help="espeak-ng voice")
    parser.add_argument("--out", required=True, help="results JSON (written atomically)")
    parser.add_argument("--heatmap", default=None, help="PNG (default: <out stem>.heatmap.png)")
    parser.add_argument("--title", default=None, help="heatmap title")
    parser.add_argument("--predictions", default=None, help="predictions JSONL (default: next to --out)")
    add_model_arguments(parser, max_new_tokens=48)
    return parser


def make_needle(args: argparse.Namespace) -> Needle:
    if args.answer_sentence:
        return Needle.from_sentence(args.question, args.answer, args.answer_sentence)
    if args.question == DEFAULT_NEEDLE.question and args.answer == DEFAULT_NEEDLE.answer:
        return DEFAULT_NEEDLE
    return Needle.from_sentence(args.question, args.answer, f"The answer is {args.answer}.")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with Layout.from_env() as layout:  # espeak-ng's failures are RuntimeErrors
        return exit_code(lambda: run(args, layout), (ValueError, OSError, RuntimeError))


def run(args: argparse.Namespace, layout: Layout) -> int:
    if any(not 0 <= d <= 1 for d in args.depths):
        raise ValueError(f"--depths must be fractions in [0, 1], got {args.depths}")
    if args.samples < 1:
        raise ValueError(f"--samples must be at least 1, got {args.samples}")
    needle = make_needle(args)
    needle_audio = load_audio(args.needle_audio) if args.needle_audio else synthesize_espeak(needle.spoken, args.voice)
    background = load_background(args.haystack)
    assistant, options, info = load_assistant(args, layout)
    background_seconds = len(background) / SAMPLE_RATE
    stride = args.stride if args.stride is not None else background_seconds / args.samples
    cells = [(length, depth) for length in args.lengths for depth in args.depths]
    starts: dict[tuple[float, float], list[float]] = {}  # the needle's second in each trial of a cell

    def prepare(cell: tuple[float, float]) -> list[Request]:
        length, depth = cell
        requests, starts[cell] = [], []
        for sample in range(args.samples):
            audio, needle_start = build_haystack(background, needle_audio, length, depth,
                                                 offset_seconds=sample * stride)
            starts[cell].append(round(needle_start, 2))
            requests.append(Request([{"role": "user", "content": f"<speech>\n{needle.question}"}],
                                    Media(speech=[audio])))
        return requests

    def finish(cell: tuple[float, float], replies: list) -> dict:
        scores = [retrieval_score(reply.text, needle.answer) for reply in replies]
        return {"length": cell[0], "depth": cell[1], "score": mean(scores),
                "trials": [{"sample": k, "needle_start_s": start, "response": reply.text, "score": score,
                            "prompt_tokens": reply.prompt_tokens, "seconds": reply.timings["total_s"]}
                           for k, (start, reply, score) in enumerate(zip(starts.pop(cell), replies, scores))]}

    task = EvalTask("needle", cells, lambda cell: cell_id(*cell), prepare, finish,
                    lambda cell: ("speech", cell[0]))
    out = Path(args.out)
    predictions = Path(args.predictions) if args.predictions else default_predictions_path(out)
    meta = {"benchmark": "needle", "question": needle.question, "answer": needle.answer, "spoken": needle.spoken,
            "needle_audio": args.needle_audio, "haystack": [str(p) for p in args.haystack], "stride": stride,
            "samples": args.samples, **model_meta(args, info)}
    # A batch is counted in trials: a cell brings `samples` of them.
    outcome = evaluate(task, lyra_answers(assistant, options), predictions, meta, layout,
                       max(1, args.batch_size // args.samples))
    if not layout.main:
        return 0
    records = outcome.records
    trials = [{**trial, "length": r["length"], "depth": r["depth"]} for r in records for trial in r.get("trials", [])]
    grid = grid_scores(trials, args.lengths, args.depths)
    heatmap = Path(args.heatmap) if args.heatmap else out.with_name(out.stem + ".heatmap.png")
    title = args.title or f"Needle in a speech haystack: {info['model']}"
    heatmap.parent.mkdir(parents=True, exist_ok=True)
    draw_heatmap(grid, args.lengths, args.depths, title).save(heatmap)
    results = {
        "benchmark": "needle", "model": info["model"], "untrained": info["untrained"], "unit": "fraction",
        "overall": mean([t["score"] for t in trials]), "lengths": args.lengths, "depths": args.depths,
        "grid": grid, "grid_layout": "rows follow depths, columns follow lengths",
        "by_length": {f"{length:g}": mean([t["score"] for t in trials if t["length"] == length])
                      for length in args.lengths},
        "trials": len(cells) * args.samples, "errors": sum("error" in r for r in records),
        "heatmap": str(heatmap), "settings": meta, "predictions": str(predictions),
        **outcome.report(layout, args.batch_size),
    }
    atomic_write_json(out, results)
    print(f"needle: {results['overall']} mean retrieval over {len(trials)} trials -> {out}, {heatmap}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
