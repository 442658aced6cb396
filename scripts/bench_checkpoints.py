#!/usr/bin/env python
"""Training checkpoints at a real size: stage 1 then stage 2 of a preset (random weights, CPU),
a few steps each with a checkpoint at the last one, run with this checkout's code ("after") and
with the code of another git revision ("before"), side by side in one run.

    python scripts/bench_checkpoints.py [--model mini] [--steps 2] [--before REV] [--json docs/bench_checkpoints.json]

For each code and stage it reports the size of `checkpoint-N/` and of `final/`, the time each
took to write (from the end of the step to the Trainer's `on_save`; from the end of training
to `train` returning), the time to build the model and trainer (the base's hash included) and
the process's peak RSS. Each run is a fresh process that imports `lyra` from its code; the data
is the speech samples of the synthetic sample set (tests/support/sample_set.py), one per step.
The "before" code is `git archive <rev>` of this repository. Runs one after another (a mini
run takes ~14 GB of memory) and deletes each run's output once measured (an fp32 mini checkpoint
is 12 GB). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_CONFIGS = {1: "configs/train/stage1_{model}.yaml", 2: "configs/train/stage2_{model}.yaml"}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def child(config_path: str, overrides: str) -> None:
    """One training run in this process; prints its measurements as one JSON line."""
    from transformers import TrainerCallback

    from lyra.train.config import load_train_config
    from lyra.train.recipe import build_trainer, train

    marks: dict[str, float] = {}

    class SaveTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks["step_end"] = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            marks["checkpoint_save_s"] = time.perf_counter() - marks["step_end"]

        def on_train_end(self, args, state, control, **kwargs):
            marks["train_end"] = time.perf_counter()

    config = load_train_config(config_path, json.loads(overrides))
    started = time.perf_counter()
    trainer = build_trainer(config)
    built = time.perf_counter()
    trainer.add_callback(SaveTimes())
    train(trainer, config)
    done = time.perf_counter()
    parameters = {id(p): p for p in trainer.model.parameters()}.values()
    print(json.dumps({
        "build_s": round(built - started, 2), "checkpoint_save_s": round(marks["checkpoint_save_s"], 2),
        "final_save_s": round(done - marks["train_end"], 2), "train_and_save_s": round(done - built, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "parameters": sum(p.numel() for p in parameters),
        "trained_parameters": sum(p.numel() for p in parameters if p.requires_grad),
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }))


def run_stage(source: Path, stage: int, args, data: Path, out: Path, init_from: Path | None) -> dict:
    """Run one stage with the code under `source`; measure, then delete its checkpoints."""
    overrides = {"output_dir": str(out), "data.path": str(data), "data.workers": 0, "qwen2vl": None, "whisper": None,
                 "init_from": str(init_from) if init_from else None, "deepspeed": None, "report_to": "none",
                 "optim.max_steps": args.steps, "optim.batch_size": 1, "optim.grad_accum": 1,
                 "save_steps": args.steps, "logging_steps": 1, "group_by_modality_length": False}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(ROOT / STAGE_CONFIGS[stage].format(
        model=args.model)), json.dumps(overrides)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=3600, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(source), "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise SystemExit(f"stage {stage} ({source}) failed ({result.returncode}):\n{result.stderr[-3000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    checkpoint = out / f"checkpoint-{args.steps}"
    measured["checkpoint_bytes"] = folder_bytes(checkpoint)
    measured["checkpoint_files"] = sorted(str(p.relative_to(checkpoint)) for p in checkpoint.rglob("*") if p.is_file())
    measured["final_bytes"] = folder_bytes(out / "final")
    measured["bf16_model_bytes"] = 2 * measured["parameters"]
    for folder in out.glob("checkpoint-*"):
        shutil.rmtree(folder)
    return measured


def speech_data(work: Path) -> Path:
    made = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "sample_set.py"), str(work / "data"),
                           "--samples", "16"], capture_output=True, text=True, check=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout.strip()
    records = [r for r in json.loads(Path(made).read_text()) if r.get("speech") and not r.get("image")]
    path = Path(made).with_name("speech.json")
    path.write_text(json.dumps(records))
    return path


def export_revision(revision: str, target: Path) -> Path:
    target.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB"


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--child"]:
        child(*sys.argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mini", help="preset of configs/train/stage{1,2}_<model>.yaml")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--before", default=None,
                        help="git revision whose code is the 'before' run (default: where this branch left main)")
    parser.add_argument("--json", default="outputs/bench_checkpoints.json")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    from lyra.utils.io import atomic_write_json

    if args.before is None:
        args.before = subprocess.run(["git", "-C", str(ROOT), "merge-base", "HEAD", "main"], capture_output=True,
                                     text=True, check=True).stdout.strip()
    work = Path(args.work or tempfile.mkdtemp(prefix="lyra-bench-ckpt-"))
    try:
        data = speech_data(work)
        codes = {"before": export_revision(args.before, work / "before-src"), "after": ROOT}
        results = {}
        for name, source in codes.items():
            stage1 = run_stage(source, 1, args, data, work / name / "stage1", None)
            stage2 = run_stage(source, 2, args, data, work / name / "stage2", work / name / "stage1" / "final")
            results[name] = {"stage1": stage1, "stage2": stage2}
            shutil.rmtree(work / name)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    header = "| code | stage | trained params | checkpoint-N/ | save | final/ | save | build | peak RSS |"
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for name, stages in results.items():
        for stage, r in stages.items():
            lines.append(f"| {name} | {stage[-1]} | {r['trained_parameters']:,} of {r['parameters']:,} | "
                         f"{gb(r['checkpoint_bytes'])} | {r['checkpoint_save_s']} s | {gb(r['final_bytes'])} | "
                         f"{r['final_save_s']} s | {r['build_s']} s | {r['peak_rss_gb']} GB |")
    print("\n".join(lines))
    load = os.getloadavg()
    atomic_write_json(args.json, {
        "model": args.model, "steps": args.steps, "before": args.before,
        "before_commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.before], capture_output=True,
                                        text=True).stdout.strip(),
        "cpu_count": os.cpu_count(), "load_average_at_end": [round(x, 2) for x in load], "results": results})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
