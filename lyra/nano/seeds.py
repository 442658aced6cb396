"""The spread of the demo build over seeds: `make demo`'s training and held-out accuracy, once per
seed, reported as mean ± sd (the README's demo figures come from here).

The seed drives both the generated task (which media, voices and questions) and the training
(initialisation, data order), as `python -m lyra.nano.demo --seed S` would use it.

    python -m lyra.nano.seeds [--seeds 0,1,2] [--out outputs/nano_seeds] [--threads N]

Each seed's build is cached in `<out>/seed-S` like the demo's (a second run only evaluates).
Writes a table to stdout and `<out>/seeds.json` (or `--json`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lyra.bench import cpu_name
from lyra.inference import load_model
from lyra.memory import keep_freed_memory
from lyra.nano.evaluate import evaluate_nano
from lyra.nano.pipeline import shared_frame_cache, train_nano
from lyra.nano.task import NanoTaskSpec, build_nano_task
from lyra.utils.io import atomic_write_json

VARIANTS = ("text", "speech")


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def build_and_score(out: Path, seed: int) -> dict:
    """Train (or reuse) the demo build of `seed` under `out` and score it as the demo does."""
    cache = shared_frame_cache()
    spec = NanoTaskSpec(seed=seed)
    started = time.perf_counter()
    model_dir, build, reused = train_nano(out, spec, seed=seed, frame_cache=cache)
    train_seconds = time.perf_counter() - started
    task = build_nano_task(out / "data", spec, progress=False)
    model, tokenizer, _ = load_model(str(model_dir), device="cpu", dtype="fp32")
    model.frame_cache = cache
    accuracy = evaluate_nano(model, tokenizer, task.files["eval"], variants=VARIANTS, batch_size=32)
    return {
        "seed": seed, "build": build["hash"], "reused": reused,
        "train_seconds": round(train_seconds, 1) if not reused else None,
        "phases": {p["phase"]: round(p["seconds"], 1) for p in build["phases"]},
        "accuracy": {v: accuracy.value(v) for v in VARIANTS},
        "by_type": {v: {t: accuracy.value(v, t) for t in accuracy.types()} for v in VARIANTS},
        "asked": {v: accuracy.count(v) for v in VARIANTS},
    }


def summarise(runs: list[dict]) -> dict:
    """Mean and sd over seeds of each variant's accuracy, overall and per question type."""
    summary = {}
    for variant in VARIANTS:
        overall = mean_sd([run["accuracy"][variant] for run in runs])
        types = runs[0]["by_type"][variant]
        summary[variant] = {"mean": overall[0], "sd": overall[1], "by_type": {
            qtype: dict(zip(("mean", "sd"), mean_sd([run["by_type"][variant][qtype] for run in runs])))
            for qtype in types}}
    return summary


def table(runs: list[dict], summary: dict) -> str:
    percent = lambda x: f"{100 * x:.1f}"  # noqa: E731
    lines = ["| seed | build | text % | spoken % |", "|---|---|---|---|"]
    lines += [f"| {run['seed']} | {run['build']} | {percent(run['accuracy']['text'])} | "
              f"{percent(run['accuracy']['speech'])} |" for run in runs]
    lines.append(f"| mean ± sd | | {percent(summary['text']['mean'])} ± {percent(summary['text']['sd'])} | "
                 f"{percent(summary['speech']['mean'])} ± {percent(summary['speech']['sd'])} |")
    lines += ["", "| question type | text % (mean ± sd) | spoken % (mean ± sd) |", "|---|---|---|"]
    for qtype in summary["text"]["by_type"]:
        cells = [summary[v]["by_type"][qtype] for v in VARIANTS]
        lines.append(f"| {qtype} | " + " | ".join(f"{percent(c['mean'])} ± {percent(c['sd'])}" for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lyra.nano.seeds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="outputs/nano_seeds")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", default=None, help="default: <out>/seeds.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    runs = []
    for seed in seeds:
        print(f"\n==> seed {seed}", flush=True)
        runs.append(build_and_score(out / f"seed-{seed}", seed))
        print(f"    text {100 * runs[-1]['accuracy']['text']:.1f} %, spoken {100 * runs[-1]['accuracy']['speech']:.1f} %")
    summary = summarise(runs)
    print("\n" + table(runs, summary))
    record = {"seeds": seeds, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu": cpu_name(), "runs": runs, "summary": summary}
    path = Path(args.json) if args.json else out / "seeds.json"
    atomic_write_json(path, record)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
