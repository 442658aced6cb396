"""Soft-DTW forward+backward: time and peak memory, ours against its peers.

Methods, all on the same cost matrices [B, L, S] (uniform in [0, 1), γ = 0.1):

* ours-fp32 / ours-fp64: `lyra.losses.soft_dtw` (anti-diagonal wavefront, analytic backward).
* loop: the straightforward per-cell Python loop over (i, j), each cell a few torch ops
  on the [B] batch, backward by autograd (the reference's CPU fallback, but batched).
* tslearn: `tslearn.metrics.SoftDTW` on the precomputed cost (`.compute()` then
  `.grad()`), one sample at a time (numba, float64).
* torchmetrics: `torchmetrics.functional.timeseries.soft_dtw`, which takes sequences
  and a `distance_fn`, not a cost matrix: it is handed the cost through a
  `distance_fn` that ignores its inputs. Backward by autograd.

Each (method, size) runs in a fresh process: one small warm-up call (JIT, lazy
init), then the peak-RSS counter is reset (/proc/self/clear_refs) and the first real
call's peak RSS above the baseline is the memory figure; the time is the median of the
following repeats (at least two; fewer than --repeats for methods past a time budget). Speedups are other / ours-fp32, measured in the same run.

    python scripts/bench_softdtw.py --install-peers --out outputs/bench_softdtw.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lyra.utils.io import atomic_write_json
from lyra.memory import reset_peak_rss, status_mib

SIZES = [(300, 32), (1200, 128), (4800, 512)]
METHODS = ["ours-fp32", "ours-fp64", "loop", "tslearn", "torchmetrics"]
GAMMA = 0.1
# Past these cell counts per sample a method takes minutes per call: reported as skipped.
MAX_CELLS = {"loop": 300 * 32, "torchmetrics": 1200 * 128}
TIME_BUDGET_S = 30.0  # per (method, size): slow methods stop repeating after two timed runs past this


def loop_soft_dtw(cost, gamma: float):
    """Per-cell reference: R[i, j] = C[i, j] + softmin(R[i-1, j], R[i, j-1], R[i-1, j-1]), batched over B."""
    import torch

    batch, rows, cols = cost.shape
    inf = cost.new_full((batch,), math.inf)
    previous = [cost.new_zeros(batch)] + [inf] * cols
    for i in range(1, rows + 1):
        current = [inf]
        for j in range(1, cols + 1):
            r = torch.stack((previous[j], current[j - 1], previous[j - 1]), dim=1)
            current.append(cost[:, i - 1, j - 1] - gamma * torch.logsumexp(-r / gamma, dim=1))
        previous = current
    return previous[cols]


def make_runner(method: str, cost):
    """A zero-argument function running one forward+backward of `method` on `cost`, and its forward-only twin."""
    import torch

    if method in ("ours-fp32", "ours-fp64", "loop", "torchmetrics"):
        x = cost.to(torch.float64 if method == "ours-fp64" else torch.float32, copy=True).requires_grad_()
        if method.startswith("ours"):
            from lyra.losses.soft_dtw import soft_dtw

            def forward():
                return soft_dtw(x, GAMMA)
        elif method == "loop":

            def forward():
                return loop_soft_dtw(x, GAMMA)
        else:
            from torchmetrics.functional.timeseries import soft_dtw as tm_soft_dtw

            batch, rows, cols = x.shape
            dummy_a, dummy_b = x.new_zeros(batch, rows, 1), x.new_zeros(batch, cols, 1)

            def forward():
                return tm_soft_dtw(dummy_a, dummy_b, gamma=GAMMA, distance_fn=lambda a, b: x)

        def forward_backward():
            values = forward()
            (grad,) = torch.autograd.grad(values.sum(), x)
            return values, grad

        return forward_backward, forward
    if method == "tslearn":
        from tslearn.metrics import SoftDTW

        matrices = [m.numpy() for m in cost.to(torch.float64, copy=True)]

        def forward_backward():
            values, grads = [], []
            for d in matrices:
                sdtw = SoftDTW(d, gamma=GAMMA)
                values.append(sdtw.compute())
                grads.append(sdtw.grad())
            return values, grads

        def forward():
            return [SoftDTW(d, gamma=GAMMA).compute() for d in matrices]

        return forward_backward, forward
    raise ValueError(f"unknown method {method!r}")


def measure(method: str, batch: int, rows: int, cols: int, repeats: int, threads: int) -> dict:
    """One (method, size) in this process: peak memory of the first call, median times of the rest."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    warm_fb, _ = make_runner(method, torch.rand(2, 8, 4, dtype=torch.float64))
    warm_fb()
    cost = torch.rand(batch, rows, cols, dtype=torch.float64)
    forward_backward, forward = make_runner(method, cost)
    reset_peak_rss()
    baseline = status_mib("VmRSS")
    start = time.perf_counter()
    forward_backward()
    first = time.perf_counter() - start
    peak = status_mib("VmHWM") - baseline
    times, forward_times = [], []
    budget_end = time.perf_counter() + TIME_BUDGET_S
    while len(times) < repeats and (len(times) < 2 or time.perf_counter() < budget_end):
        start = time.perf_counter()
        forward()
        forward_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        forward_backward()
        times.append(time.perf_counter() - start)
    return {
        "runs": len(times),
        "first_ms": round(first * 1e3, 2),
        "fwd_ms": round(statistics.median(forward_times) * 1e3, 2),
        "fwd_bwd_ms": round(statistics.median(times) * 1e3, 2),
        "fwd_bwd_min_ms": round(min(times) * 1e3, 2),
        "peak_mib": round(peak, 1),
    }


def fp32_error(batch: int, rows: int, cols: int) -> dict:
    """How far ours in float32 is from ours in float64 on the same costs (value and gradient)."""
    import torch

    from lyra.losses.soft_dtw import soft_dtw

    torch.manual_seed(0)
    cost = torch.rand(batch, rows, cols, dtype=torch.float64)
    results = []
    for dtype in (torch.float32, torch.float64):
        x = cost.to(dtype).requires_grad_()
        values = soft_dtw(x, GAMMA)
        (grad,) = torch.autograd.grad(values.sum(), x)
        results.append((values.detach().double(), grad.double()))
    (v32, g32), (v64, g64) = results
    return {
        "value_rel_err": float(((v32 - v64).abs() / v64.abs()).max()),
        "grad_err_over_max_grad": float((g32 - g64).abs().max() / g64.abs().max()),
    }


def peer_available(method: str) -> str | None:
    """None when `method` can run here, else why not."""
    module = {"tslearn": "tslearn.metrics", "torchmetrics": "torchmetrics.functional.timeseries"}.get(method)
    if module is None:
        return None
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], check=False, capture_output=True, text=True)
    return None if probe.returncode == 0 else f"not importable: {probe.stderr.strip().splitlines()[-1]}"


def run_child(method: str, batch: int, rows: int, cols: int, repeats: int, threads: int) -> dict:
    child = subprocess.run(
        [sys.executable, __file__, "--one", method, str(batch), str(rows), str(cols), str(repeats), str(threads)],
        check=False,
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        return {"skipped": "failed: " + (child.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    lines = [
        "| threads | L×S | method | fwd ms | fwd+bwd ms (median) | peak MiB | ours-fp32 speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['threads']} | {row['L']}×{row['S']} | {row['method']}"
        if "skipped" in row:
            lines.append(f"{head} | skipped: {row['skipped']} | | | |")
            continue
        speedup = f"{row['speedup']:.1f}×" if "speedup" in row else ""
        lines.append(f"{head} | {row['fwd_ms']} | {row['fwd_bwd_ms']} | {row['peak_mib']} | {speedup} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads values to run")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--install-peers", action="store_true", help="pip install tslearn and torchmetrics first")
    parser.add_argument("--out", default="outputs/bench_softdtw.json")
    parser.add_argument("--one", nargs=6, help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    if args.one is not None:
        method, *numbers = args.one
        batch, rows, cols, repeats, threads = map(int, numbers)
        print(json.dumps(measure(method, batch, rows, cols, repeats, threads)))
        return 0
    if args.install_peers:
        subprocess.run([sys.executable, "-m", "pip", "install", "tslearn", "torchmetrics"], check=True)
    load_at_start = os.getloadavg()
    unavailable = {m: peer_available(m) for m in args.methods}
    rows = []
    for threads in args.threads:
        for L, S in SIZES:
            size_rows = []
            for method in args.methods:
                row = {"threads": threads, "L": L, "S": S, "B": args.batch, "method": method}
                if unavailable[method]:
                    row["skipped"] = unavailable[method]
                elif L * S > MAX_CELLS.get(method, math.inf):
                    row["skipped"] = f"too slow past {MAX_CELLS[method]} cells per sample"
                else:
                    row.update(run_child(method, args.batch, L, S, args.repeats, threads))
                print(json.dumps(row), file=sys.stderr)
                size_rows.append(row)
            ours = next((r for r in size_rows if r["method"] == "ours-fp32" and "fwd_bwd_ms" in r), None)
            for row in size_rows:
                if ours is not None and "fwd_bwd_ms" in row:
                    row["speedup"] = round(row["fwd_bwd_ms"] / ours["fwd_bwd_ms"], 2)
            rows.extend(size_rows)
    accuracy = {f"{L}x{S}": fp32_error(args.batch, L, S) for L, S in SIZES[:2]}
    print(table(rows))
    print("float32 vs float64 (ours):", json.dumps(accuracy))
    report = {
        "gamma": GAMMA,
        "cpus": os.cpu_count(),
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "rows": rows,
        "fp32_vs_fp64": accuracy,
    }
    out = Path(args.out)
    atomic_write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
