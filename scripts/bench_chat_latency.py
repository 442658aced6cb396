#!/usr/bin/env python
"""Chat latency as a user meets it: `python -m lyra.chat --json` run N times in fresh processes.

    python scripts/bench_chat_latency.py [--model outputs/nano/model] [--runs 3] [--max-new-tokens 256]

Each run asks about `data/demo/circle.png` with the spoken question `data/demo/question.wav`
(by default) and reports the model's own timings (time to the first token, total) plus the
process's wall time (model loading included). Prints a table and writes JSON (`--json`), with
the machine's core count and load average, since both move these figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from lyra.utils.io import atomic_write_json


def run_once(args) -> dict:
    command = [sys.executable, "-m", "lyra.chat", "--model", args.model, "--json",
               "--max-new-tokens", str(args.max_new_tokens)]
    for image in args.image:
        command += ["--image", image]
    for speech in args.speech:
        command += ["--speech", speech]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    reply = json.loads(result.stdout.strip().splitlines()[-1])
    return {"first_token_s": reply["timings"]["first_token_s"], "total_s": reply["timings"]["total_s"],
            "process_s": round(wall, 3), "prompt_tokens": reply["prompt_tokens"], "new_tokens": reply["new_tokens"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/nano/model")
    parser.add_argument("--image", action="append", default=None)
    parser.add_argument("--speech", action="append", default=None)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--json", default="outputs/bench_chat_latency.json")
    args = parser.parse_args(argv)
    args.image = args.image if args.image is not None else ["data/demo/circle.png"]
    args.speech = args.speech if args.speech is not None else ["data/demo/question.wav"]
    runs = [run_once(args) for _ in range(args.runs)]
    median = {key: statistics.median(run[key] for run in runs) for key in ("first_token_s", "total_s", "process_s")}
    print("| run | prompt tokens | new tokens | first token s | total s | process s |\n|---|---|---|---|---|---|")
    for k, run in enumerate(runs, 1):
        print(f"| {k} | {run['prompt_tokens']} | {run['new_tokens']} | {run['first_token_s']:.2f} | "
              f"{run['total_s']:.2f} | {run['process_s']:.2f} |")
    print(f"| median | | | {median['first_token_s']:.2f} | {median['total_s']:.2f} | {median['process_s']:.2f} |")
    atomic_write_json(args.json, {"model": args.model, "image": args.image, "speech": args.speech,
                                  "max_new_tokens": args.max_new_tokens, "cpu_count": os.cpu_count(),
                                  "load_average": os.getloadavg(), "runs": runs, "median": median})
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
