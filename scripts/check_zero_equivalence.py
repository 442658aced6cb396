#!/usr/bin/env python
"""ZeRO-2 and ZeRO-3 give the losses of plain data parallelism: the same tiny stage-1 run under
`deepspeed --num_gpus N` with each config of configs/deepspeed/, loss by loss.

    python scripts/check_zero_equivalence.py [--steps 4] [--processes 2] [--json outputs/zero_equivalence.json]

Runs on the CPU (gloo) as well as on GPUs. The data is the speech samples of the synthetic sample
set (tests/support/sample_set.py), as stage-1 data is speech (a batch with nothing trainable on
its path cannot step under ZeRO-3). Prints the losses per step of each run and the largest
difference to the run without ZeRO, and writes them as JSON; exits 1 when a difference exceeds
`--tolerance`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lyra.utils.io import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"no ZeRO": None, "ZeRO-2": "configs/deepspeed/zero2.json", "ZeRO-3": "configs/deepspeed/zero3.json"}


def train_losses(work: Path, name: str, deepspeed_config: str | None, data: Path, steps: int, processes: int) -> list[float]:
    """The logged training losses of one short stage-1 run."""
    out = work / name.replace(" ", "_")
    command = ["deepspeed", "--num_gpus", str(processes), str(ROOT / "scripts" / "train_stage1.py"),
               "--config", str(ROOT / "configs" / "train" / "stage1_tiny.yaml"), "--output-dir", str(out),
               "--set", f"data.path={data}", "--set", f"optim.max_steps={steps}", "--set", "save_steps=1000",
               "--set", "logging_steps=1"]
    if deepspeed_config:
        command += ["--set", f"deepspeed={ROOT / deepspeed_config}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise SystemExit(f"{name}: {' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    state = json.loads((out / "final" / "trainer_state.json").read_text()) if (out / "final" / "trainer_state.json").is_file() \
        else json.loads(next(out.glob("checkpoint-*/trainer_state.json")).read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--json", default="outputs/zero_equivalence.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lyra-zero-") as tmp:
        work = Path(tmp)
        data = subprocess.run([sys.executable, str(ROOT / "tests" / "support" / "sample_set.py"), str(work / "data"),
                               "--samples", "32"], capture_output=True, text=True, check=True).stdout.strip()
        records = [r for r in json.loads(Path(data).read_text()) if r.get("speech")]
        speech_data = Path(data).with_name("speech.json")
        speech_data.write_text(json.dumps(records))
        losses = {name: train_losses(work, name, config, speech_data, args.steps, args.processes)
                  for name, config in VARIANTS.items()}
    reference = losses["no ZeRO"]
    difference = {name: max(abs(a - b) for a, b in zip(values, reference)) if len(values) == len(reference) else None
                  for name, values in losses.items()}
    print("| run | " + " | ".join(f"step {k + 1}" for k in range(len(reference))) + " | max abs diff |")
    print("|---|" + "---|" * (len(reference) + 1))
    for name, values in losses.items():
        print(f"| {name} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {difference[name]} |")
    atomic_write_json(args.json, {"processes": args.processes, "steps": args.steps, "losses": losses,
                                  "max_abs_difference": difference, "tolerance": args.tolerance})
    print(f"wrote {args.json}")
    bad = [name for name, diff in difference.items() if diff is None or diff > args.tolerance]
    if bad:
        print(f"error: {bad} differ from the run without ZeRO by more than {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
