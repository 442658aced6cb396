"""Soft-DTW forward+backward: time and peak memory, ours against its peers, on CPU or CUDA.

Methods, all on the same cost matrices [B, L, S] (uniform in [0, 1), γ = 0.1):

* ours-fp32 / ours-fp64: `lyra.losses.soft_dtw` with its default kernel (numba on the
  CPU; on CUDA the anti-diagonal wavefront fused into one numba.cuda launch per pass,
  or the torch wavefront where numba.cuda fails: the JSON's `cuda_kernel` says which).
* wavefront-fp32: the same call with kernel="wavefront", the torch anti-diagonal
  wavefront (three ops per diagonal; the CPU default before the numba kernel).
* per-sample: ours-fp32 called once per sample ([1, L, S] each), as a training loop
  without batching would.
* loop: the straightforward per-cell Python loop over (i, j), each cell a few torch ops
  on the [B] batch, backward by autograd (the reference's CPU fallback, but batched).
* tslearn (CPU only): `tslearn.metrics.SoftDTW` on the precomputed cost (`.compute()`
  then `.grad()`), one sample at a time (numba, float64).
* torchmetrics: `torchmetrics.functional.timeseries.soft_dtw`, which takes sequences and
  a `distance_fn`, not a cost matrix: it is handed the cost through a `distance_fn` that
  ignores its inputs. Backward by autograd.
* pysdtw: `pysdtw.SoftDTW` (numba CUDA kernels on CUDA, numba CPU ones on the CPU),
  handed the cost the same way; float32.

Each (method, size) runs in a fresh process (a crash, an out-of-memory error or a hang
past --cell-timeout is recorded for that cell and the run goes on): one small warm-up
call (JIT, lazy init; on the CPU every numba kernel of ours is compiled first), then the peak-memory counter is reset and the first real call's
peak above the baseline is the memory figure (CPU: peak RSS via /proc/self/clear_refs;
CUDA: torch's max_memory_allocated); the time is the median of the following repeats (at
least --repeats and one second's worth, at most 100; at least two, and no more past 30 s),
synchronised on CUDA. Every method
but ours is checked against ours-fp64 on the same costs (max relative value error).
Speedups are other / ours-fp32, measured in the same run.

    python scripts/bench_softdtw.py --out docs/bench_softdtw_cpu.json
    python scripts/bench_softdtw.py --device cuda --out $OUT/bench_softdtw_cuda.json
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
from importlib import metadata
from pathlib import Path

from lyra.utils.io import atomic_write_json

SIZES = {
    "cpu": [(300, 32), (1200, 128), (4800, 512)],
    "cuda": [(300, 32), (1200, 128), (4800, 512), (16384, 1024)],
}
METHODS = ["ours-fp32", "ours-fp64", "wavefront-fp32", "per-sample", "loop", "tslearn", "torchmetrics", "pysdtw"]
DEFAULT_METHODS = {
    "cpu": ["ours-fp32", "ours-fp64", "wavefront-fp32", "tslearn"],
    "cuda": ["ours-fp32", "wavefront-fp32", "per-sample", "pysdtw"],
}
PEER_MODULES = {"tslearn": "tslearn.metrics", "torchmetrics": "torchmetrics.functional.timeseries", "pysdtw": "pysdtw"}
GAMMA = 0.1
# Past these cell counts per sample a method takes minutes per call: reported as skipped.
MAX_CELLS = {"loop": 300 * 32, "torchmetrics": 1200 * 128}
TIME_BUDGET_S = 30.0  # per (method, size): slow methods stop repeating after two timed runs past this
# Fast methods repeat for at least this long (at most MAX_RUNS runs): on a shared machine a
# median of five millisecond calls is mostly the scheduler's.
MIN_TIMED_S, MAX_RUNS = 1.0, 100


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
    """A zero-argument forward+backward of `method` on `cost` [B, L, S] (on its device), and its forward-only twin.

    Both return the [B] values (a tensor or a list).
    """
    import torch

    from lyra.losses.soft_dtw import soft_dtw

    if method == "tslearn":
        if cost.device.type != "cpu":
            raise ValueError("tslearn runs on the CPU only")
        from tslearn.metrics import SoftDTW

        matrices = [m.numpy() for m in cost.to(torch.float64, copy=True)]

        def forward_backward():
            values = []
            for d in matrices:
                sdtw = SoftDTW(d, gamma=GAMMA)
                values.append(sdtw.compute())
                sdtw.grad()
            return values

        def forward():
            return [SoftDTW(d, gamma=GAMMA).compute() for d in matrices]

        return forward_backward, forward
    if method == "per-sample":
        xs = [c.to(torch.float32, copy=True).unsqueeze(0).requires_grad_() for c in cost]

        def forward():
            return [soft_dtw(x, GAMMA) for x in xs]

        def forward_backward():
            values = []
            for x in xs:
                value = soft_dtw(x, GAMMA)
                torch.autograd.grad(value.sum(), x)
                values.append(value.detach())
            return torch.cat(values)

        return forward_backward, forward
    x = cost.to(torch.float64 if method == "ours-fp64" else torch.float32, copy=True).requires_grad_()
    batch, rows, cols = x.shape
    if method in ("ours-fp32", "ours-fp64"):

        def forward():
            return soft_dtw(x, GAMMA)
    elif method == "wavefront-fp32":

        def forward():
            return soft_dtw(x, GAMMA, kernel="wavefront")
    elif method == "loop":

        def forward():
            return loop_soft_dtw(x, GAMMA)
    elif method == "torchmetrics":
        from torchmetrics.functional.timeseries import soft_dtw as tm_soft_dtw

        dummy_a, dummy_b = x.new_zeros(batch, rows, 1), x.new_zeros(batch, cols, 1)

        def forward():
            return tm_soft_dtw(dummy_a, dummy_b, gamma=GAMMA, distance_fn=lambda a, b: x)
    elif method == "pysdtw":
        import pysdtw

        dummy_a, dummy_b = x.new_zeros(batch, rows, 1), x.new_zeros(batch, cols, 1)
        sdtw = pysdtw.SoftDTW(gamma=GAMMA, dist_func=lambda a, b: x, use_cuda=x.device.type == "cuda")

        def forward():
            return sdtw(dummy_a, dummy_b)
    else:
        raise ValueError(f"unknown method {method!r}")

    def forward_backward():
        values = forward()
        torch.autograd.grad(values.sum(), x)
        return values.detach()

    return forward_backward, forward


def random_cost(batch: int, rows: int, cols: int, device):
    """The benchmark's costs: uniform [0, 1) float64 from seed 0, made on the CPU (same numbers on any device)."""
    import torch

    return torch.rand(batch, rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(device)


def measure(method: str, batch: int, rows: int, cols: int, repeats: int, threads: int, device_name: str) -> dict:
    """One (method, size) in this process: peak memory of the first call, median times of the rest."""
    import torch

    from lyra.bench import Meter
    from lyra.losses.soft_dtw import soft_dtw

    device = torch.device(device_name)
    if threads > 0:
        torch.set_num_threads(threads)
    meter = Meter(device)
    if device.type == "cpu":
        from lyra.losses import soft_dtw_numba

        soft_dtw_numba.compile_all()  # the size picks a serial or a parallel kernel: compile both
    warm_fb, _ = make_runner(method, random_cost(2, 8, 4, device))
    warm_fb()
    cost = random_cost(batch, rows, cols, device)
    forward_backward, forward = make_runner(method, cost)
    meter.reset()
    first, values = meter.timed(forward_backward)
    peak = (meter.peak_gib() - meter.baseline_gib) * 1024  # MiB above the memory in use before the call
    times, forward_times = [], []
    start = time.perf_counter()
    while len(times) < MAX_RUNS:
        elapsed = time.perf_counter() - start
        if len(times) >= 2 and elapsed > TIME_BUDGET_S or len(times) >= repeats and elapsed > MIN_TIMED_S:
            break
        forward_times.append(meter.timed(forward)[0])
        times.append(meter.timed(forward_backward)[0])
    result = {
        "runs": len(times),
        "first_ms": round(first * 1e3, 2),
        "fwd_ms": round(statistics.median(forward_times) * 1e3, 2),
        "fwd_bwd_ms": round(statistics.median(times) * 1e3, 2),
        "fwd_bwd_min_ms": round(min(times) * 1e3, 2),
        "peak_mib": round(peak, 1),
    }
    if not method.startswith("ours"):
        del forward_backward, forward
        values = torch.as_tensor(values, dtype=torch.float64).to(device).flatten()
        reference = soft_dtw(cost, GAMMA).detach()
        result["value_rel_err_vs_ours_fp64"] = float(((values - reference).abs() / reference.abs()).max())
    return result


def fp32_error(batch: int, rows: int, cols: int, device_name: str) -> dict:
    """How far ours in float32 is from ours in float64 on the same costs (value and gradient)."""
    import torch

    from lyra.losses.soft_dtw import soft_dtw

    cost = random_cost(batch, rows, cols, torch.device(device_name))
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
    module = PEER_MODULES.get(method)
    if module is None:
        return None
    probe = subprocess.run([sys.executable, "-c", f"import {module}"], check=False, capture_output=True, text=True)
    return None if probe.returncode == 0 else f"not importable: {probe.stderr.strip().splitlines()[-1]}"


def run_child(method: str, batch: int, rows: int, cols: int, repeats: int, threads: int, device: str, timeout: float) -> dict:
    """`measure` in a fresh process; its failure (error, crash, hang) becomes the cell's result."""
    command = [sys.executable, __file__, "--one", method, str(batch), str(rows), str(cols), str(repeats), str(threads), device]
    try:
        child = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if child.returncode != 0:
        return {"error": "failed: " + (child.stderr.strip().splitlines() or [f"exit {child.returncode}"])[-1]}
    return json.loads(child.stdout.strip().splitlines()[-1])


def describe(device: str) -> dict:
    """What the figures were measured on: device (CPU model or GPU) name, library versions."""
    import torch

    from lyra.bench import cpu_name, device_name

    # not device_name on the CPU: its thread count would be this process's, not the rows' --threads
    name = device_name(torch.device(device)) if device == "cuda" else cpu_name()
    versions = {}
    for package in ("torch", "numba", "numba-cuda", "tslearn", "torchmetrics", "pysdtw"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    report = {"device": device, "device_name": name, "cpus": os.cpu_count(), "versions": versions}
    if device == "cuda":
        from lyra.losses import soft_dtw_cuda

        problem = soft_dtw_cuda.unavailable("cuda")
        report["cuda_kernel"] = "fused numba.cuda" if problem is None else f"torch wavefront ({problem})"
    return report


def table(rows: list[dict]) -> str:
    lines = [
        "| threads | L×S | method | fwd ms | fwd+bwd ms (median) | peak MiB | ours-fp32 speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['threads']} | {row['L']}×{row['S']} | {row['method']}"
        if "fwd_bwd_ms" not in row:
            lines.append(f"{head} | {row.get('skipped') or row.get('error')} | | | |")
            continue
        speedup = f"{row['speedup']:.1f}×" if "speedup" in row else ""
        lines.append(f"{head} | {row['fwd_ms']} | {row['fwd_bwd_ms']} | {row['peak_mib']} | {speedup} |")
    return "\n".join(lines)


def parse_size(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes takes LxS pairs such as 300x32, got {text!r}") from None
    return rows, cols


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[2], help="torch.set_num_threads values (CPU)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: " + json.dumps(DEFAULT_METHODS))
    parser.add_argument("--sizes", nargs="+", type=parse_size, help="LxS pairs; default: " + json.dumps(SIZES))
    parser.add_argument("--cell-timeout", type=float, default=240.0, help="seconds per (method, size) process")
    parser.add_argument("--install-peers", action="store_true", help="pip install tslearn, torchmetrics, pysdtw first")
    parser.add_argument("--out", default="outputs/bench_softdtw.json")
    parser.add_argument("--one", nargs=7, help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    if args.one is not None:
        method, *numbers, device = args.one
        batch, rows, cols, repeats, threads = map(int, numbers)
        print(json.dumps(measure(method, batch, rows, cols, repeats, threads, device)))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here (the same methods run on the CPU with --device cpu)")
    if args.install_peers:
        subprocess.run([sys.executable, "-m", "pip", "install", "tslearn", "torchmetrics", "pysdtw"], check=True)
    methods = args.methods or DEFAULT_METHODS[args.device]
    sizes = args.sizes or SIZES[args.device]
    thread_counts = args.threads if args.device == "cpu" else [0]  # 0: leave torch's CPU threads alone
    load_at_start = os.getloadavg()
    unavailable = {m: peer_available(m) for m in methods}
    rows = []
    for threads in thread_counts:
        for L, S in sizes:
            size_rows = []
            for method in methods:
                row = {"threads": threads or None, "L": L, "S": S, "B": args.batch, "method": method}
                if unavailable[method]:
                    row["skipped"] = unavailable[method]
                elif L * S > MAX_CELLS.get(method, math.inf):
                    row["skipped"] = f"too slow past {MAX_CELLS[method]} cells per sample"
                else:
                    row.update(run_child(method, args.batch, L, S, args.repeats, threads, args.device, args.cell_timeout))
                print(json.dumps(row), file=sys.stderr, flush=True)
                size_rows.append(row)
            ours = next((r for r in size_rows if r["method"] == "ours-fp32" and "fwd_bwd_ms" in r), None)
            for row in size_rows:
                if ours is not None and "fwd_bwd_ms" in row:
                    row["speedup"] = round(row["fwd_bwd_ms"] / ours["fwd_bwd_ms"], 2)
            rows.extend(size_rows)
    accuracy = {f"{L}x{S}": fp32_error(args.batch, L, S, args.device) for L, S in sizes[:2]}
    print(table(rows))
    print("float32 vs float64 (ours):", json.dumps(accuracy))
    report = {
        **describe(args.device),
        "gamma": GAMMA,
        "load_average": {"start": load_at_start, "end": os.getloadavg()},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "rows": rows,
        "fp32_vs_fp64": accuracy,
    }
    out = Path(args.out)
    atomic_write_json(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
