#!/usr/bin/env python
"""Evaluation throughput of the sharded, batched runner (`lyra/eval/runner.py`) on a mix of
image, speech and text questions: items/s at --batch-size 1, 4 and 16 in one process, and
one process against two (`torchrun --standalone`), each ratio taken to batch 1 in the same run.

    python scripts/bench_eval.py                       # nano, 12 items per modality, JSON to docs/
    python scripts/bench_eval.py --model outputs/nano/model --items-per-modality 24 --json out.json

The items are made for the run: pictures of a coloured shape drawn with PIL at several sizes,
questions spoken by espeak-ng (different lengths), and text questions. Every configuration
answers all of them from an empty predictions folder, after a warm-up item of each modality;
items/s counts the answering loop only (model loading excluded), best of --rounds rounds
that each go through all configurations. The process comparison
runs at batch 1: one process with every core's thread (its baseline), one with a single
thread, and two with half the threads each. Answers are greedy, and each configuration's
are checked against batch 1's (`same_answers_as_batch_1`): only the time may differ.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

import lyra
from lyra.eval.runner import EvalTask, Layout, Request, add_model_arguments, evaluate, load_assistant, lyra_answers
from lyra.inference import Assistant, GenerationOptions, Media, default_model
from lyra.model.speech import FrameCache
from lyra.utils.io import atomic_write_json

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (30, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("circle", "square")
SPOKEN = ["What colour is the shape?", "Which shape is in this picture, a circle or a square?",
          "Please look at the picture carefully and tell me the colour of the shape in the middle of it.",
          "Is it round?"]
TEXT = ["What is two plus two?", "Name a colour.", "Write one sentence about the sea and the sky at night.",
        "Which is larger, a mouse or a horse? Answer in one word, then explain why in a short sentence."]


@dataclass
class BenchItem:
    id: str
    modality: str  # image | speech | text
    prompt: str
    image: str | None = None
    speech: str | None = None
    length: float = 0.0  # pixels, seconds or characters: the batching order within a modality


def make_items(folder: Path, per_modality: int) -> list[BenchItem]:
    """`per_modality` items of each kind, their files under `folder`, interleaved."""
    images, speech, text = [], [], []
    for k in range(per_modality):
        colour = list(COLOURS)[k % len(COLOURS)]
        side = (96, 160, 224, 320)[k % 4]
        image = Image.new("RGB", (side, side), "white")
        box = (side // 4, side // 4, 3 * side // 4, 3 * side // 4)
        (ImageDraw.Draw(image).ellipse if SHAPES[k % 2] == "circle" else ImageDraw.Draw(image).rectangle)(
            box, fill=COLOURS[colour])
        path = folder / f"image{k}.png"
        image.save(path)
        images.append(BenchItem(f"image{k}", "image", "<image>\nWhat colour is the shape?", image=str(path),
                                length=float(side * side)))
        wav = folder / f"speech{k}.wav"
        sentence = SPOKEN[k % len(SPOKEN)]
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", str(140 + 10 * (k % 3)), "-w", str(wav), sentence],
                       check=True, capture_output=True)
        speech.append(BenchItem(f"speech{k}", "speech", "<speech>", speech=str(wav), length=float(len(sentence))))
        question = TEXT[k % len(TEXT)]
        text.append(BenchItem(f"text{k}", "text", question, length=float(len(question))))
    return [item for triple in zip(images, speech, text) for item in triple]


def bench_task(items: list[BenchItem]) -> EvalTask:
    def prepare(item: BenchItem) -> list[Request]:
        media = Media(images=[item.image] if item.image else [], speech=[item.speech] if item.speech else [])
        return [Request([{"role": "user", "content": item.prompt}], media)]

    def finish(item: BenchItem, replies: list) -> dict:
        return {"modality": item.modality, "response": replies[0].text, "new_tokens": len(replies[0].token_ids)}

    return EvalTask("bench", items, lambda item: item.id, prepare, finish, lambda item: (item.modality, item.length))


def timed_run(assistant: Assistant, options: GenerationOptions, items: list[BenchItem], folder: Path,
              batch_size: int, layout: Layout) -> dict | None:
    """Warm up on one item per modality, then answer every item; rank 0 returns the figures."""
    warm = [next(i for i in items if i.modality == m) for m in ("image", "speech", "text")]
    meta = {"benchmark": "bench_eval", "model": "bench"}
    evaluate(bench_task(warm), lyra_answers(assistant, options), folder / "warm.predictions.jsonl", meta, layout)
    model = assistant.model
    if model.frame_cache is not None:  # an evaluation hears each recording once: nothing cached yet
        model.frame_cache = FrameCache(model.config.speech.frozen_encoder_cache_mib)
    outcome = evaluate(bench_task(items), lyra_answers(assistant, options), folder / "run.predictions.jsonl", meta,
                       layout, batch_size)
    if not layout.main:
        return None
    new_tokens = sum(r.get("new_tokens", 0) for r in outcome.records)
    return {"batch_size": batch_size, "processes": layout.world_size, "items": len(items),
            "failed": outcome.summary.failed, "new_tokens": new_tokens, **outcome.throughput(),
            "answers": {r["id"]: r.get("response") for r in outcome.records}}


def worker(args: argparse.Namespace) -> int:
    """One rank of the process comparison (under torchrun): rank 0 writes the figures to --result."""
    items = [BenchItem(**row) for row in json.loads(Path(args.items).read_text())]
    with Layout.from_env() as layout:
        assistant, options, _ = load_assistant(args, layout)
        figures = timed_run(assistant, options, items, Path(args.work), 1, layout)
    if figures is not None:
        atomic_write_json(args.result, figures)
    return 0


def processes_run(args: argparse.Namespace, items_file: Path, work: Path, processes: int, threads: int) -> dict:
    """`processes` ranks under torchrun, `threads` intra-op threads each; rank 0's figures."""
    result = work / "result.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               __file__, "--worker", "--items", str(items_file), "--work", str(work), "--result", str(result),
               *model_flags(args)]
    # the workers import the lyra this process runs (a checkout may differ from the installed one)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(Path(lyra.__file__).resolve().parents[1])}
    started = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if run.returncode != 0:
        raise SystemExit(f"{processes}-process run failed ({run.returncode}):\n{run.stderr[-3000:]}")
    return {**json.loads(result.read_text()), "threads_per_process": threads,
            "launch_wall_s": round(time.perf_counter() - started, 2)}


def model_flags(args: argparse.Namespace) -> list[str]:
    """The model flags of this run, for the workers."""
    flags = ["--model", args.model, "--device", args.device, "--dtype", args.dtype,
             "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature)]
    for name in ("lmme", "max_pixels", "max_frames", "fps"):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def fastest(rounds: list[list[dict]]) -> list[dict]:
    """Per configuration (the same position in every round): its fastest round's figures, with
    every round's items/s beside them and every round's answers (to check)."""
    rows = []
    for runs in zip(*rounds):
        best = dict(max(runs, key=lambda run: run["items_per_second"]))
        best["items_per_second_of_rounds"] = [run["items_per_second"] for run in runs]
        best["answers_of_rounds"] = [run["answers"] for run in runs]
        del best["answers"]
        rows.append(best)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, max_new_tokens=16, batch_size=False)  # --model: default outputs/nano/model, else nano
    parser.add_argument("--items-per-modality", type=int, default=12)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--rounds", type=int, default=2, help="times every configuration runs (the fastest counts)")
    parser.add_argument("--json", default="docs/bench_eval.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--items", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.model = args.model or default_model()
    if args.worker:
        return worker(args)
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is needed to speak the questions (apt-get install espeak-ng, or `make setup`)")

    load_before = [round(v, 2) for v in os.getloadavg()]  # other work on the machine moves every figure
    with tempfile.TemporaryDirectory(prefix="lyra-bench-eval-") as tmp:
        tmp = Path(tmp)
        items = make_items(tmp, args.items_per_modality)
        items_file = tmp / "items.json"
        items_file.write_text(json.dumps([asdict(i) for i in items]))
        assistant, options, info = load_assistant(args)
        # Rounds go through every configuration in turn, so a change in the machine's load
        # touches all of them alike; each keeps its fastest round.
        batch_rounds = [[timed_run(assistant, options, items, tmp / f"r{r}batch{b}", b, Layout())
                         for b in args.batch_sizes] for r in range(args.rounds)]
        del assistant
        # All cores in one process (the baseline), one thread alone, then the cores split over 2 ranks.
        cores = os.cpu_count() or 1
        layouts = [(1, cores), (1, 1), (2, max(1, cores // 2))]
        process_rounds = [[processes_run(args, items_file, tmp / f"r{r}procs{n}x{t}", n, t) for n, t in layouts]
                          for r in range(args.rounds)]
    batches, processes = fastest(batch_rounds), fastest(process_rounds)

    reference = batches[0]["answers_of_rounds"][0]
    for row in batches + processes:  # greedy: every configuration must give batch 1's answers
        row["same_answers_as_batch_1"] = all(answers == reference for answers in row.pop("answers_of_rounds"))
    base = batches[0]["items_per_second"]
    for row in batches:
        row["ratio_to_batch_1"] = round(row["items_per_second"] / base, 3) if base else None
    for row in processes:
        row["ratio_to_1_process_all_cores"] = round(row["items_per_second"] / processes[0]["items_per_second"], 3)
    print(f"{len(items)} items ({args.items_per_modality} image, speech and text each), {info['model']}, "
          f"max {args.max_new_tokens} new tokens, {os.cpu_count()} cores")
    print("| configuration | items/s | ratio | image s | speech s | text s | same answers |\n"
          "|---|---|---|---|---|---|---|")
    for row, label, ratio in ([(r, f"1 process, batch {r['batch_size']}", r["ratio_to_batch_1"]) for r in batches]
                              + [(r, f"{r['processes']} process(es) x {r['threads_per_process']} thread(s), batch 1",
                                  r["ratio_to_1_process_all_cores"]) for r in processes]):
        split = row["modality_seconds"]
        print(f"| {label} | {row['items_per_second']:.2f} | {ratio:.2f} | {split.get('image', 0):.1f} | "
              f"{split.get('speech', 0):.1f} | {split.get('text', 0):.1f} | {row['same_answers_as_batch_1']} |")
    atomic_write_json(args.json, {
        "model": info["model"], "untrained": info["untrained"], "device": info["device"],
        "items_per_modality": args.items_per_modality, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
        "cores": os.cpu_count(), "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "batch_sizes": batches, "processes": processes,
        "command": "python scripts/bench_eval.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    })
    print(f"-> {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
