"""CPU training step of the nano model: glibc's default heap vs `lyra.memory.keep_freed_memory`.

With the real 151,936-token vocabulary, a nano step's largest tensors are the LM head's logits
and the tied embedding's gradients (~80 MiB each). glibc maps every allocation over 32 MiB
fresh and unmaps it on free, so each step page-faults all of them in again;
`keep_freed_memory` serves them from a heap that keeps its pages. Each setting runs in its own
process (the setting is process-wide), alternately, `--rounds` times: the real nano model
(`configs/model/nano.yaml`), the real Lyra forward with labels (LM head on the answer rows only),
backward and a fused AdamW step on random text batches shaped like the base phase's. Reported:
the median step time over every round, the peak RSS, and default / keep as the speed-up.

    python scripts/bench_malloc.py --out outputs/bench_malloc.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lyra.utils.io import atomic_write_json

SETTINGS = ("glibc default", "keep_freed_memory")


def measure(setting: str, steps: int, batch: int, length: int, answer_tokens: int) -> dict:
    """Step times (s) of one process under `setting`, after two warm-up steps."""
    import torch

    from lyra.config import load_config
    from lyra.memory import keep_freed_memory, status_mib
    from lyra.model.lyra import LyraForConditionalGeneration

    if setting == "keep_freed_memory" and not keep_freed_memory():
        raise SystemExit("keep_freed_memory is not available here (not glibc)")
    torch.manual_seed(0)
    config = load_config("nano")
    model = LyraForConditionalGeneration.from_config(config).train()
    trained = [p for name, p in model.named_parameters() if name.startswith("backbone.model.language_model")]
    optimizer = torch.optim.AdamW(trained, lr=1e-4, fused=True)
    generator = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 2):
        input_ids = torch.randint(0, 150_000, (batch, length), generator=generator)
        labels = torch.full_like(input_ids, -100)
        labels[:, -answer_tokens:] = input_ids[:, -answer_tokens:]
        started = time.perf_counter()
        model(input_ids=input_ids, labels=labels, return_logits=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - started)
    return {"times": times, "peak_rss_mib": status_mib("VmHWM")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="processes per setting, run alternately")
    parser.add_argument("--steps", type=int, default=15, help="timed steps per process")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="tokens per sample")
    parser.add_argument("--answer-tokens", type=int, default=5, help="trained tokens per sample (LM-head rows)")
    parser.add_argument("--out", default="outputs/bench_malloc.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child-process mode: the setting
    args = parser.parse_args()
    shape = (args.steps, args.batch, args.length, args.answer_tokens)
    if args.one:
        print(json.dumps(measure(args.one, *shape)))
        return 0

    results: dict[str, dict] = {s: {"times": [], "peak_rss_mib": []} for s in SETTINGS}
    for round_index in range(args.rounds):
        for setting in SETTINGS:
            child = subprocess.run(
                [sys.executable, __file__, "--one", setting, "--steps", str(args.steps), "--batch", str(args.batch),
                 "--length", str(args.length), "--answer-tokens", str(args.answer_tokens)],
                capture_output=True, text=True, check=True)
            run = json.loads(child.stdout.strip().splitlines()[-1])
            results[setting]["times"] += run["times"]
            results[setting]["peak_rss_mib"].append(run["peak_rss_mib"])
            print(f"round {round_index + 1}/{args.rounds} {setting}: median {statistics.median(run['times']) * 1e3:.0f} ms",
                  file=sys.stderr, flush=True)

    rows = []
    for setting in SETTINGS:
        times = results[setting]["times"]
        rows.append({"setting": setting, "median_ms": 1e3 * statistics.median(times),
                     "p90_ms": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
                     "peak_rss_mib": max(results[setting]["peak_rss_mib"]), "steps": len(times)})
    speedup = rows[0]["median_ms"] / rows[1]["median_ms"]
    print(f"\nnano training step, batch {args.batch} x {args.length} tokens, {args.answer_tokens} trained per sample; "
          f"{args.rounds} alternating processes per setting\n")
    print("| heap | median ms/step | p90 ms/step | peak RSS MiB | steps |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['median_ms']:.0f} | {row['p90_ms']:.0f} | {row['peak_rss_mib']:.0f} | {row['steps']} |")
    print(f"\nspeed-up (default / keep_freed_memory): {speedup:.2f}x")
    out = Path(args.out)
    atomic_write_json(out, {"shape": dict(zip(("steps", "batch", "length", "answer_tokens"), shape)),
                            "rows": rows, "speedup": speedup})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
