"""soft_dtw against a float64 per-cell dynamic programme, and lcmr_loss against a hand computation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest
import torch

from lyra.config import LCMRConfig
from lyra.losses.lcmr import lcmr_loss
from lyra.losses import soft_dtw as soft_dtw_module
from lyra.losses.soft_dtw import soft_dtw

KERNELS = ["numba", "wavefront"]


def in_band(i: int, j: int, rows: int, cols: int, band: int | None) -> bool:
    """soft_dtw's band, 1-based cells."""
    return band is None or abs((i - 1) * (cols - 1) - (j - 1) * (rows - 1)) <= band * max(rows - 1, cols - 1)


def brute_soft_dtw(cost: np.ndarray, gamma: float, band: int | None = None) -> tuple[float, np.ndarray]:
    """R[L, S] and E = dR[L, S]/dC, one cell at a time in float64 (Cuturi & Blondel's E recursion)."""
    rows, cols = cost.shape
    r = np.full((rows + 2, cols + 2), math.inf)
    r[0, 0] = 0.0
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            if not in_band(i, j, rows, cols, band):
                continue
            previous = [r[i - 1, j], r[i, j - 1], r[i - 1, j - 1]]
            low = min(previous)
            if low == math.inf:
                continue
            r[i, j] = cost[i - 1, j - 1] + low - gamma * math.log(sum(math.exp(-(p - low) / gamma) for p in previous))
    e = np.zeros((rows + 2, cols + 2))
    e[rows, cols] = 1.0
    for i in range(rows, 0, -1):
        for j in range(cols, 0, -1):
            if (i, j) == (rows, cols) or r[i, j] == math.inf:
                continue
            total = 0.0
            for si, sj in ((i + 1, j), (i, j + 1), (i + 1, j + 1)):
                if si <= rows and sj <= cols and r[si, sj] < math.inf:
                    # weight of (i, j) among the predecessors of (si, sj): exp((softmin - R[i, j]) / γ)
                    softmin = r[si, sj] - cost[si - 1, sj - 1]
                    total += e[si, sj] * math.exp((softmin - r[i, j]) / gamma)
            e[i, j] = total
    return float(r[rows, cols]), e[1 : rows + 1, 1 : cols + 1]


def hard_dtw(cost: np.ndarray) -> tuple[float, np.ndarray]:
    """Classic DTW value and its optimal path as a 0/1 matrix."""
    rows, cols = cost.shape
    r = np.full((rows + 1, cols + 1), math.inf)
    r[0, 0] = 0.0
    for i in range(1, rows + 1):
        for j in range(1, cols + 1):
            r[i, j] = cost[i - 1, j - 1] + min(r[i - 1, j], r[i, j - 1], r[i - 1, j - 1])
    path = np.zeros_like(cost)
    i, j = rows, cols
    while (i, j) != (0, 0):
        path[i - 1, j - 1] = 1.0
        i, j = min(((i - 1, j), (i, j - 1), (i - 1, j - 1)), key=lambda c: r[c])
    return float(r[rows, cols]), path


def value_and_grad(cost: torch.Tensor, gamma: float, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    cost = cost.detach().clone().requires_grad_()
    values = soft_dtw(cost, gamma, **kwargs)
    (grad,) = torch.autograd.grad(values.sum(), cost)
    return values.detach(), grad


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 5, 3), (2, 3, 5), (3, 7, 7), (2, 1, 6), (2, 6, 1), (1, 9, 2)])
@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_matches_brute_force(shape, gamma, kernel):
    cost = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    values, grad = value_and_grad(cost, gamma, kernel=kernel)
    for b in range(shape[0]):
        value, e = brute_soft_dtw(cost[b].numpy(), gamma)
        torch.testing.assert_close(values[b].item(), value, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad[b], torch.from_numpy(e), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
def test_float32_matches_brute_force(kernel):
    cost = torch.rand(3, 40, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    values, grad = value_and_grad(cost.float(), 0.1, kernel=kernel)
    assert values.dtype == grad.dtype == torch.float32
    for b in range(3):
        value, e = brute_soft_dtw(cost[b].numpy(), 0.1)
        torch.testing.assert_close(values[b].double().item(), value, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad[b].double(), torch.from_numpy(e), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kernel", KERNELS)
def test_upstream_gradient_of_any_sign(kernel):
    cost = torch.rand(4, 6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).requires_grad_()
    weights = torch.tensor([2.5, -0.5, 0.0, 1e-3], dtype=torch.float64)
    (grad,) = torch.autograd.grad((soft_dtw(cost, 0.3, kernel=kernel) * weights).sum(), cost)
    for b in range(4):
        _, e = brute_soft_dtw(cost[b].detach().numpy(), 0.3)
        torch.testing.assert_close(grad[b], weights[b] * torch.from_numpy(e), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("with_lengths", [False, True])
def test_gradcheck(with_lengths, kernel):
    cost = torch.rand(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    kwargs = {"kernel": kernel}
    if with_lengths:
        kwargs |= {"lengths_l": torch.tensor([5, 2, 4]), "lengths_s": torch.tensor([4, 3, 1])}
    assert torch.autograd.gradcheck(lambda c: soft_dtw(c, 0.5, **kwargs), (cost,))
    transposed = cost.detach().transpose(1, 2).contiguous().requires_grad_()  # S > L: the other skew
    assert torch.autograd.gradcheck(lambda c: soft_dtw(c, 0.5, band=1, kernel=kernel), (transposed,))


@pytest.mark.parametrize("kernel", KERNELS)
def test_small_gamma_approaches_dtw(kernel):
    cost = torch.rand(2, 12, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gamma = 1e-3
    values, grad = value_and_grad(cost, gamma, kernel=kernel)
    for b in range(2):
        hard, path = hard_dtw(cost[b].numpy())
        # softmin ∈ [min - γ log 3, min] at every cell of the path.
        assert hard - gamma * math.log(3) * (12 + 7) <= values[b].item() <= hard + 1e-12
        assert abs(values[b].item() - hard) < 0.01
        torch.testing.assert_close(grad[b], torch.from_numpy(path), rtol=0, atol=1e-3)  # E → the optimal path


@pytest.mark.parametrize("kernel", KERNELS)
def test_padded_batch_equals_per_sample_calls(kernel):
    generator = torch.Generator().manual_seed(5)
    cost = torch.rand(4, 9, 6, dtype=torch.float64, generator=generator)
    lengths_l, lengths_s = torch.tensor([9, 3, 7, 1]), torch.tensor([6, 6, 2, 4])
    padding = torch.ones_like(cost, dtype=torch.bool)
    for b in range(4):
        padding[b, : lengths_l[b], : lengths_s[b]] = False
    garbage = torch.tensor([math.nan, math.inf, -math.inf, 1e30], dtype=torch.float64)
    cost[padding] = garbage[torch.arange(int(padding.sum())) % 4]  # padding is ignored, whatever it holds
    values, grad = value_and_grad(cost, 0.2, lengths_l=lengths_l, lengths_s=lengths_s, kernel=kernel)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    assert (grad[padding] == 0).all()
    for b in range(4):
        own = cost[b : b + 1, : lengths_l[b], : lengths_s[b]]
        value, own_grad = value_and_grad(own, 0.2, kernel=kernel)
        torch.testing.assert_close(values[b], value[0], rtol=1e-12, atol=0)
        torch.testing.assert_close(grad[b, : lengths_l[b], : lengths_s[b]], own_grad[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(2, 10, 6), (2, 6, 10), (1, 8, 8)])
@pytest.mark.parametrize("band", [0, 1, 2])
def test_band_matches_brute_force(shape, band, kernel):
    cost = torch.rand(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    lengths_l = torch.tensor([shape[1], shape[1] - 2][: shape[0]])
    lengths_s = torch.tensor([shape[2], shape[2] - 1][: shape[0]])
    values, grad = value_and_grad(cost, 0.2, lengths_l=lengths_l, lengths_s=lengths_s, band=band, kernel=kernel)
    for b in range(shape[0]):
        rows, cols = int(lengths_l[b]), int(lengths_s[b])
        value, e = brute_soft_dtw(cost[b, :rows, :cols].numpy(), 0.2, band=band)
        if value == math.inf:  # band 0 leaves no path unless the sides are equal
            assert values[b].item() == math.inf
            continue
        expected = torch.zeros(shape[1:], dtype=torch.float64)
        expected[:rows, :cols] = torch.from_numpy(e)
        torch.testing.assert_close(values[b].item(), value, rtol=1e-6, atol=0)
        torch.testing.assert_close(grad[b], expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("shape", [(1, 4096, 64), (1, 64, 4096)])
def test_long_sequences(shape, kernel):
    cost = torch.rand(shape, generator=torch.Generator().manual_seed(7))
    values, grad = value_and_grad(cost, 0.1, kernel=kernel)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    # Every alignment starts at (1, 1) and ends at (L, S); each row is visited at least once.
    values64, grad64 = value_and_grad(cost.double(), 0.1, kernel=kernel)
    assert grad64[0, 0, 0].item() == pytest.approx(1.0, rel=1e-9)
    assert grad64[0, -1, -1].item() == pytest.approx(1.0, rel=1e-9)
    assert (grad64[0].sum(dim=1) >= 1 - 1e-9).all() and (grad64[0].sum(dim=0) >= 1 - 1e-9).all()
    torch.testing.assert_close(values.double(), values64, rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_agree(dtype):
    """The numba kernel against the torch wavefront on a padded, banded, mixed-length batch (values + grads)."""
    generator = torch.Generator().manual_seed(9)
    cost = torch.rand(5, 37, 23, dtype=dtype, generator=generator) * 3
    cost[1, 4, 6] = math.inf  # a forbidden cell inside the valid region
    kwargs = {"lengths_l": torch.tensor([37, 20, 1, 30, 12]), "lengths_s": torch.tensor([23, 23, 9, 5, 1]), "band": 3}
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0], dtype=dtype)
    results = {}
    for kernel in KERNELS:
        x = cost.clone().requires_grad_()
        values = soft_dtw(x, 0.3, kernel=kernel, **kwargs)
        (grad,) = torch.autograd.grad((values * weights).sum(), x)
        results[kernel] = values.detach(), grad
    (v_numba, g_numba), (v_wave, g_wave) = results["numba"], results["wavefront"]
    assert torch.isfinite(v_numba).all() and torch.isfinite(g_numba).all() and (g_numba[1, 4, 6] == 0)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-11, "atol": 1e-13}
    torch.testing.assert_close(v_numba, v_wave, **tol)
    torch.testing.assert_close(g_numba, g_wave, **tol)


@pytest.mark.parametrize("threads", [1, 2])
def test_auto_kernel_on_the_cpu(monkeypatch, threads):
    """"auto": numba below 1024 cells per anti-diagonal (B·min(L, S)) and numba thread, the wavefront from there."""
    calls = []
    for name in ("_SoftDTWNumba", "_SoftDTW"):
        monkeypatch.setattr(soft_dtw_module, name, type(name, (), {"apply": staticmethod(lambda *a, n=name: calls.append(n))}))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch, rows, cols in ((8, 300, 32), (8, 1200, 128), (8, 4800, 512), (1, 64, 4096), (2, 1024, 1024)):
            soft_dtw(torch.empty(batch, rows, cols), 0.1)
    finally:
        torch.set_num_threads(previous)
    numba_threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    per_sample, wavefront = "_SoftDTWNumba", "_SoftDTW"
    # 1200×128, B = 8: 1024 cells a diagonal, 1.2M cells: numba on two threads where it has two
    # (a one-CPU runner gives numba a single thread whatever torch is set to).
    assert calls == [per_sample, wavefront if numba_threads == 1 else per_sample, wavefront, per_sample, wavefront]


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2,
                    reason="numba has one thread here (NUMBA_NUM_THREADS): the parallel kernel would run serially")
def test_numba_parallel_equals_serial(monkeypatch):
    """Past _PARALLEL_MIN_CELLS the samples run on numba threads: same per-sample code, same bits."""
    cost = torch.rand(3, 50, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    lengths_l = torch.tensor([50, 31, 7])
    serial = value_and_grad(cost, 0.2, lengths_l=lengths_l, kernel="numba")
    assert soft_dtw_module._numba_threads(3, 50, 20) == 1
    monkeypatch.setattr(soft_dtw_module, "_PARALLEL_MIN_CELLS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert soft_dtw_module._numba_threads(3, 50, 20) == min(2, numba.config.NUMBA_NUM_THREADS)
        parallel = value_and_grad(cost, 0.2, lengths_l=lengths_l, kernel="numba")
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial[0], parallel[0]) and torch.equal(serial[1], parallel[1])


def test_importing_the_loss_loads_no_numba():
    """lcmr (imported by every lyra.model.lyra) pays for numba only when a kernel of it runs."""
    check = "import sys, lyra.losses.lcmr; print(sorted(m for m in sys.modules if m.split('.')[0] == 'numba'))"
    child = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=False)
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "[]"


CUDA_SIMULATOR_CHECK = textwrap.dedent(
    """
    import json, torch
    from lyra.losses.soft_dtw import soft_dtw
    generator = torch.Generator().manual_seed(11)
    cases = [((2, 7, 5), {}), ((3, 5, 9), {"lengths_l": [5, 3, 2], "lengths_s": [9, 4, 9], "band": 2}),
             ((2, 40, 3), {"lengths_l": [40, 17]})]
    report = []
    for dtype in (torch.float64, torch.float32):
        for shape, options in cases:
            cost = torch.rand(shape, dtype=dtype, generator=generator) * 2
            kwargs = {k: torch.tensor(v) if isinstance(v, list) else v for k, v in options.items()}
            weights = torch.linspace(-1.5, 2.0, shape[0], dtype=dtype)
            out = {}
            for kernel in ("cuda", "wavefront"):
                x = cost.clone().requires_grad_()
                values = soft_dtw(x, 0.3, kernel=kernel, **kwargs)
                (grad,) = torch.autograd.grad((values * weights).sum(), x)
                out[kernel] = values.detach(), grad
            (v_cuda, g_cuda), (v_wave, g_wave) = out["cuda"], out["wavefront"]
            report.append([str(dtype), shape, (v_cuda - v_wave).abs().max().item() / v_wave.abs().max().item(),
                           (g_cuda - g_wave).abs().max().item() / g_wave.abs().max().item()])
    print(json.dumps(report))
    """
)


def test_fused_cuda_kernel_in_the_simulator():
    """kernel='cuda' (one numba.cuda launch per pass) against the torch wavefront, run by numba's CUDA simulator."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    child = subprocess.run([sys.executable, "-c", CUDA_SIMULATOR_CHECK], env=env, capture_output=True, text=True, check=False)
    assert child.returncode == 0, child.stderr
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(report) == 6
    for dtype, shape, value_error, grad_error in report:
        limit = 1e-12 if dtype == "torch.float64" else 1e-5
        assert value_error <= limit and grad_error <= limit, (dtype, shape, value_error, grad_error)


def test_rejects_bad_arguments():
    cost = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match=r"\[B, L, S\]"):
        soft_dtw(cost[0], 0.1)
    with pytest.raises(TypeError, match="float32 or float64"):
        soft_dtw(cost.half(), 0.1)
    with pytest.raises(ValueError, match="gamma"):
        soft_dtw(cost, 0.0)
    with pytest.raises(ValueError, match=r"lengths_l must have shape \(2,\)"):
        soft_dtw(cost, 0.1, lengths_l=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"lengths_s must lie in \[1, 4\]"):
        soft_dtw(cost, 0.1, lengths_s=torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="band"):
        soft_dtw(cost, 0.1, band=-1)
    with pytest.raises(ValueError, match="kernel must be one of"):
        soft_dtw(cost, 0.1, kernel="gpu")
    with pytest.raises(ValueError, match="CPU tensors only"):
        soft_dtw(cost.to("meta"), 0.1, kernel="numba")
    with pytest.raises(ValueError, match=r"kernel='cuda' cannot run here \(CUDA tensors only, not cpu\)"):
        soft_dtw(cost, 0.1, kernel="cuda")


def hand_lcmr(xs: list[torch.Tensor], ys: list[torch.Tensor], config: LCMRConfig) -> float:
    total = 0.0
    for x, y in zip(xs, ys):
        cost = -torch.log_softmax(x.double() @ y.double().T / config.tau, dim=-1)
        value, _ = brute_soft_dtw(cost.detach().numpy(), config.gamma)
        total += value / (len(x) if config.normalize == "speech" else len(x) + len(y))
    return total / len(xs)


def lcmr_inputs(dtype=torch.float32) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(8)
    xs = [torch.randn(n, 6, dtype=dtype, generator=generator) * 0.3 for n in (7, 3, 11)]
    ys = [torch.randn(n, 6, dtype=dtype, generator=generator) * 0.3 for n in (4, 3, 2)]
    return xs, ys


@pytest.mark.parametrize("normalize", ["speech", "sum"])
def test_lcmr_matches_hand_computation(normalize):
    config = LCMRConfig(normalize=normalize)
    xs, ys = lcmr_inputs()
    loss = lcmr_loss(xs, ys, config)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(hand_lcmr(xs, ys, config), rel=1e-5)
    half = lcmr_loss([x.bfloat16() for x in xs], [y.bfloat16() for y in ys], config)
    assert half.dtype == torch.float32  # upcast, not computed in bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lcmr_loss(xs, ys, config).item() == pytest.approx(loss.item(), rel=1e-6)


@pytest.mark.parametrize("embedding_grad", [True, False])
def test_lcmr_gradients(embedding_grad):
    config = LCMRConfig(tau=0.5, gamma=0.3, embedding_grad=embedding_grad)
    xs, ys = lcmr_inputs(torch.float64)
    xs = [x.requires_grad_() for x in xs]
    ys = [y.requires_grad_() for y in ys]
    lcmr_loss(xs, ys, config).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in xs)
    if embedding_grad:
        assert all(y.grad is not None and y.grad.abs().sum() > 0 for y in ys)

        def loss(*tensors: torch.Tensor) -> torch.Tensor:
            return lcmr_loss(list(tensors[:3]), list(tensors[3:]), config)

        assert torch.autograd.gradcheck(loss, (*xs, *ys), fast_mode=True)
    else:
        assert all(y.grad is None for y in ys)


def test_lcmr_rejects_bad_inputs():
    xs, ys = lcmr_inputs()
    with pytest.raises(ValueError, match="at least one sample"):
        lcmr_loss([], [], LCMRConfig())
    with pytest.raises(ValueError, match="3 speech inputs and 2 transcripts"):
        lcmr_loss(xs, ys[:2], LCMRConfig())
    with pytest.raises(ValueError, match=r"sample 1: speech tokens \(3, 6\) and transcript embeddings \(3, 5\)"):
        lcmr_loss(xs, [ys[0], ys[1][:, :5], ys[2]], LCMRConfig())
