"""Batched soft-DTW over a precomputed cost matrix, with an analytic backward.

Recursion (Cuturi & Blondel, 2017), 1-based cells of one sample's L×S cost C:

    R[0, 0] = 0,   R[i, 0] = R[0, j] = +inf (i, j >= 1)
    R[i, j] = C[i, j] + softmin_γ(R[i-1, j], R[i, j-1], R[i-1, j-1])
    softmin_γ(a) = -γ log Σ exp(-a / γ)

and the value is R[L, S]. Its gradient with respect to C is the expected alignment
matrix E, whose recursion (the "E-matrix") runs from the last cell back to the first.

Three kernels compute the same thing (`soft_dtw(..., kernel=)`):

* "numba" (CPU): `soft_dtw_numba.py`, one sample's cells at a time, compiled; serial
  below _PARALLEL_MIN_CELLS cells, parallel over the samples above, on torch's intra-op
  thread count. It has no per-step cost, where the torch wavefront pays ~12 µs of op
  overhead per anti-diagonal (most of its time at 300×32). It never enters a torch
  parallel region: with 2 threads on a busy machine each one waits milliseconds for a
  descheduled thread, which made the wavefront take 110 ms at 300×32, B = 8, against
  13 ms on one thread. Memory: Q [B, L+1, S+1] kept for the backward, which writes E
  straight into the gradient.
* "wavefront" (any device): the torch anti-diagonal wavefront below, vectorised over the
  batch and the diagonal; three ops per anti-diagonal. Per cell its vectorised exp2 and
  log2 beat numba's scalar libm calls (one thread, CPU time: 23 against 35 ns a cell at
  4800×512, B = 8), so on the CPU "auto" takes it where a diagonal holds enough cells:
  B·min(L, S) ≥ 1024 per numba thread (`_resolve`; on one thread they tie near
  1000, and numba's threads divide its time where the wavefront's small ops run on one).
* "cuda" (the default on CUDA where numba.cuda works): `soft_dtw_cuda.py`, the same
  wavefront on the same buffers with each pass's loop fused into one launch.

How the wavefront is computed
-----------------------------
A cell on anti-diagonal d = i + j depends only on diagonals d-1 and d-2, so each pass
is L+S-1 sequential steps of three batched kernels over one whole diagonal of every
sample. The work is latency-bound; everything below keeps each step at those three
kernels, with no slicing, gathering or allocation inside the loops (but for one small
write per distinct sample end in the backward).

* Scaled, negated, base-2 domain: Q = -R / (γ ln 2) and K = -C / (γ ln 2), so the
  recursion is Q[i, j] = K[i, j] + log2(2^Q[i-1, j] + 2^Q[i, j-1] + 2^Q[i-1, j-1]):
  two `logaddexp2` and one `add` per step (base 2: `exp2` is several times faster
  than `exp` on CPU, and `logaddexp2` a little faster than `logaddexp`).
* The E-matrix as a second log-sum-exp pass: over the successors succ of (i, j),
  E[i, j] = Σ_succ E[succ] · 2^(Q[i, j] - Q[succ] + K[succ]).
  With G = log2 E - Q and H = G + K this is G[i, j] = log2 Σ_succ 2^H[succ]: the
  forward recursion run backwards, seeded with G[L, S] = log2 |upstream grad| - Q[L, S].
  Then grad = 2^(G + Q) (times the upstream sign), one pass over the whole buffer.
* Skewed (diagonal-major) storage: buffers are [B, L+S+1, W], row d holding diagonal d,
  W = min(L, S) + 2 (the cells of the shorter side plus one border slot each side).
  Each step reads rows d-1, d-2 (or d+1, d+2) at fixed slot offsets and writes row d,
  so every operand is a contiguous [B, W-2] view, made once per pass with `unbind`.
  Against the same algorithm on padded row-major storage, whose diagonals are strided
  views (stride S+1), it measured 2× faster at L×S = 300×32, 3× at 1200×128 and 4×
  at 4800×512 (B = 8, float32, one CPU thread).
* Infinities: borders, padding, out-of-band and out-of-matrix cells are -inf in K, so
  they are -inf in Q and H too; `logaddexp2(-inf, -inf)` is -inf, no step adds +inf to
  -inf, so no NaN appears, and their E is 2^-inf = 0 exactly.
* Precision: Q grows like R / γ, and G + Q is a small sum of large numbers rounded
  along L+S steps, so the float32 gradient's relative error grows with |R|/γ and L+S
  (measured: 0.06% of max E at 300×32, 0.7% at 1200×128, uniform [0, 1) costs,
  γ = 0.1; values stay within 2e-6 relative). Pass float64 costs where that matters.

Memory, with N = B·(L+S+1)·(min(L, S)+2) elements (≈ B·L·S when one side is much
longer): K and Q (2N) are kept for the backward, which adds G (N) and three rows for H.
G becomes the gradient, returned as a [B, L, S] strided view (no unskew copy).

numba and the kernel modules are imported by the calls that run them: importing this
module (as every `lyra.model.lyra` does, through `lcmr`) loads no numba.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["soft_dtw", "KERNELS"]

_NEG_INF = -math.inf
_LN2 = math.log(2.0)
KERNELS = ("auto", "numba", "cuda", "wavefront")
# "auto" on the CPU: the wavefront from this many cells per anti-diagonal (B·min(L, S)) and
# numba thread up.
_WAVEFRONT_MIN_CELLS_PER_THREAD = 1024
# Below this many cells (B·L·S) the numba kernel runs serially: ~30 ms of work, well above
# the cost of waking threads even on a busy machine, where a parallel region waits for a
# descheduled thread.
_PARALLEL_MIN_CELLS = 1 << 20


def soft_dtw(
    cost: Tensor,
    gamma: float,
    lengths_l: Tensor | None = None,
    lengths_s: Tensor | None = None,
    band: int | None = None,
    kernel: Literal["auto", "numba", "cuda", "wavefront"] = "auto",
) -> Tensor:
    """Soft-DTW value R[L_b, S_b] of each sample's cost matrix.

    Args:
        cost: [B, L, S] float32 or float64 cost; cell (i, j) is the cost of aligning
            step i of the first sequence with step j of the second (finite, or +inf
            for a forbidden cell). Computed in this dtype; any length.
        gamma: soft-min temperature γ > 0 (γ → 0 gives classic DTW).
        lengths_l: [B] int, valid rows per sample (1 ≤ L_b ≤ L); None: all L.
        lengths_s: [B] int, valid columns per sample (1 ≤ S_b ≤ S); None: all S.
        band: Sakoe–Chiba radius, or None for no band. With 1-based cells (i, j) of
            sample b, cell (i, j) is inside the band when
            |(i-1)·(S_b-1) - (j-1)·(L_b-1)| ≤ band · max(L_b-1, S_b-1),
            i.e. within `band` steps of the straight line from (1, 1) to (L_b, S_b),
            measured along the shorter side (for L_b = S_b: |i - j| ≤ band).
            band ≥ 1 always leaves a path; a smaller one may leave none (value +inf,
            and a meaningless gradient: NaN from the wavefronts, the upstream
            gradient at the last cell alone from numba).
        kernel: "numba" (CPU tensors only); "wavefront" (torch ops, any device); "cuda"
            (the wavefront fused into one numba.cuda launch per pass, CUDA tensors only);
            or "auto": on the CPU numba, or the wavefront where B·min(L, S) ≥ 1024 per
            thread numba would use; on CUDA "cuda" where numba.cuda works there, else
            the wavefront. All give the same values and gradients up to rounding.

    Returns:
        [B] values R[L_b, S_b]. Padding (i > L_b or j > S_b) and out-of-band cells are
        ignored, whatever they hold, and get exactly zero gradient. The wavefront's
        gradient is a [B, L, S] strided view into its backward's working buffer.
    """
    _check_cost(cost, gamma, band)
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    kernel, threads = _resolve(kernel, cost)
    batch, rows, cols = cost.shape
    ends_l = _check_lengths(lengths_l, batch, rows, "lengths_l", cost.device)
    ends_s = _check_lengths(lengths_s, batch, cols, "lengths_s", cost.device)
    if kernel == "numba":
        return _SoftDTWNumba.apply(cost, float(gamma), ends_l, ends_s, band, threads)
    return _SoftDTW.apply(cost, float(gamma), ends_l, ends_s, band, kernel == "cuda")


def _resolve(kernel: str, cost: Tensor) -> tuple[str, int]:
    """The kernel that runs on `cost` ("numba", "cuda" or "wavefront") and numba's thread count (else 1)."""
    device = cost.device.type
    if kernel == "numba" and device != "cpu":
        raise ValueError(f"kernel='numba' runs on CPU tensors only, cost is on {cost.device}: use 'wavefront'")
    if kernel == "cuda" or (kernel == "auto" and device != "cpu"):
        from lyra.losses import soft_dtw_cuda

        problem = soft_dtw_cuda.unavailable(device)
        if problem is None:
            return "cuda", 1
        if kernel == "cuda":
            raise ValueError(f"kernel='cuda' cannot run here ({problem}): use 'wavefront'")
        return "wavefront", 1
    if kernel == "wavefront":
        return "wavefront", 1
    batch, rows, cols = cost.shape
    threads = _numba_threads(batch, rows, cols)
    # "auto" on the CPU: the torch wavefront where a diagonal's ops are long enough to win
    if kernel == "auto" and batch * min(rows, cols) >= _WAVEFRONT_MIN_CELLS_PER_THREAD * threads:
        return "wavefront", 1
    return "numba", threads


def _check_cost(cost: Tensor, gamma: float, band: int | None) -> None:
    if cost.dim() != 3:
        raise ValueError(f"cost must be [B, L, S], got shape {tuple(cost.shape)}")
    if min(cost.shape) < 1:
        raise ValueError(f"cost must be non-empty, got shape {tuple(cost.shape)}")
    if cost.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cost must be float32 or float64, got {cost.dtype}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if band is not None and band < 0:
        raise ValueError(f"band must be >= 0 or None, got {band}")


def _check_lengths(lengths: Tensor | None, batch: int, size: int, name: str, device: torch.device) -> Tensor | None:
    """[B] lengths as a long tensor on the cost's device, or None when not given."""
    if lengths is None:
        return None
    if lengths.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) to match cost, got {tuple(lengths.shape)}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {lengths.dtype}")
    low, high = int(lengths.min()), int(lengths.max())
    if low < 1 or high > size:
        raise ValueError(f"{name} must lie in [1, {size}], got values in [{low}, {high}]")
    return lengths.to(device=device, dtype=torch.long)


def _block_cells(cells: Tensor, ends_l: Tensor | None, ends_s: Tensor | None, band: int | None) -> None:
    """Set padding and out-of-band cells of the [B, L, S] view `cells` to -inf, in place."""
    batch, rows, cols = cells.shape
    device = cells.device
    i = torch.arange(rows, device=device).view(1, rows, 1)  # 0-based: soft_dtw's i - 1
    j = torch.arange(cols, device=device).view(1, 1, cols)
    # Broadcast masks: no [B, L, S] mask for plain padding.
    if ends_l is not None:
        cells.masked_fill_(i >= ends_l.view(batch, 1, 1), _NEG_INF)
    if ends_s is not None:
        cells.masked_fill_(j >= ends_s.view(batch, 1, 1), _NEG_INF)
    if band is not None:
        len_l = (ends_l if ends_l is not None else torch.full((batch,), rows, device=device)).view(batch, 1, 1)
        len_s = (ends_s if ends_s is not None else torch.full((batch,), cols, device=device)).view(batch, 1, 1)
        offset = (i * (len_s - 1) - j * (len_l - 1)).abs()
        cells.masked_fill_(offset > band * torch.maximum(len_l - 1, len_s - 1), _NEG_INF)


class _Skew:
    """The diagonal-major layout of a [B, L, S] problem.

    Cell (i, j) (1-based, borders at 0) lives in row d = i + j, slot
    k = i - shift·d + base. With S ≤ L, shift = 1 and k = S+1-j (a row runs along j);
    otherwise shift = 0 and k = i (a row runs along i). Slots 1..width-2 hold cells;
    slots 0 and width-1 are the out-of-matrix neighbours that a step reads.
    """

    def __init__(self, batch: int, rows: int, cols: int) -> None:
        self.batch, self.rows, self.cols = batch, rows, cols
        self.shift = 1 if cols <= rows else 0
        self.base = self.shift * (cols + 1)
        self.span = cols if self.shift else rows  # cells per row
        self.width = self.span + 2
        self.diagonals = rows + cols + 1

    def empty(self, like: Tensor, fill: float | None = None) -> Tensor:
        shape = (self.batch, self.diagonals, self.width)
        return like.new_empty(shape) if fill is None else like.new_full(shape, fill)

    def slot(self, i: Tensor, d: Tensor) -> Tensor:
        return i - self.shift * d + self.base

    def cells(self, buffer: Tensor) -> Tensor:
        """[B, L, S] strided view of the matrix cells of a skewed buffer."""
        w = self.width
        step_i, step_j = w + 1 - self.shift, w - self.shift  # slot offsets of i + 1 and j + 1
        first = step_i + step_j + self.base  # cell (1, 1)
        return buffer.as_strided(
            (self.batch, self.rows, self.cols), (buffer.stride(0), step_i, step_j), buffer.storage_offset() + first
        )

    def rows_at(self, buffer: Tensor, start: int) -> tuple[Tensor, ...]:
        """Per diagonal, the [B, span] view of `buffer` starting at slot `start`."""
        return buffer[:, :, start : start + self.span].unbind(1)


def _forward_pass(k: Tensor, skew: _Skew, fused: bool) -> Tensor:
    """Skewed Q = -R/(γ ln 2) from skewed K = -C/(γ ln 2); border and out-of-matrix slots are -inf.

    fused: the loop below as one `soft_dtw_cuda` launch.
    """
    q = skew.empty(k)
    # The loop writes slots 1..span of rows 2..; the rest is border, -inf but for R[0, 0] = 0.
    q[:, :2] = _NEG_INF
    q[:, :, :: skew.width - 1] = _NEG_INF  # slots 0 and width-1
    q[:, 0, skew.base] = 0.0
    if fused:
        from lyra.losses import soft_dtw_cuda

        soft_dtw_cuda.forward(k, q, skew.span, skew.shift)
        return q
    s = skew.shift
    # Q[i-1, j] and Q[i, j-1] are neighbouring slots of row d-1, Q[i-1, j-1] is in row d-2;
    # the four slot offsets take two values, and each list of row views costs ~1 µs a row.
    at = {start: skew.rows_at(q, start) for start in {1, s, 1 + s, 2 * s}}
    up, left, diag, out = at[s], at[1 + s], at[2 * s], at[1]
    cost = skew.rows_at(k, 1)
    lse = k.new_empty(skew.batch, skew.span)
    for d in range(2, skew.diagonals):
        torch.logaddexp2(up[d - 1], left[d - 1], out=lse)
        torch.logaddexp2(lse, diag[d - 2], out=lse)
        torch.add(lse, cost[d], out=out[d])
    return q


def _backward_pass(k: Tensor, q: Tensor, skew: _Skew, seeds: dict[int, tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    """Skewed G = log2 E - Q (rows 2.., slots 1..span); seeds[d] sets G at the samples' last cells."""
    g = skew.empty(k)
    s = skew.shift
    # H = G + K for diagonals d, d+1, d+2 in rows d % 3: only those are ever read.
    h = k.new_full((3, skew.batch, skew.width), _NEG_INF)
    n = skew.span
    h_out = [h[r][:, 1 : 1 + n] for r in range(3)]
    # H[i+1, j] and H[i, j+1] are neighbouring slots of row d+1, H[i+1, j+1] is in row d+2.
    h_down = [h[(r + 1) % 3][:, 2 - s : 2 - s + n] for r in range(3)]
    h_right = [h[(r + 1) % 3][:, 1 - s : 1 - s + n] for r in range(3)]
    h_diag = [h[(r + 2) % 3][:, 2 - 2 * s : 2 - 2 * s + n] for r in range(3)]
    out, cost = skew.rows_at(g, 1), skew.rows_at(k, 1)
    lse = k.new_empty(skew.batch, n)
    for d in range(skew.diagonals - 1, 1, -1):
        r = d % 3
        torch.logaddexp2(h_down[r], h_right[r], out=lse)
        torch.logaddexp2(lse, h_diag[r], out=out[d])
        seed = seeds.get(d)
        if seed is not None:
            index_b, position, value = seed
            out[d][index_b, position] = value
        torch.add(out[d], cost[d], out=h_out[r])
    return g


def _seeds(skew: _Skew, ends_l: Tensor, ends_s: Tensor, value: Tensor) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """Diagonal d → (samples whose last cell is on d, its position in the row view, G there)."""
    ends_d = ends_l + ends_s
    positions = skew.slot(ends_l, ends_d) - 1  # row views start at slot 1
    diagonals = ends_d.tolist()
    seeds = {}
    for d in sorted(set(diagonals)):
        index_b = torch.tensor([b for b, e in enumerate(diagonals) if e == d], device=ends_l.device)
        seeds[d] = (index_b, positions[index_b], value[index_b])
    return seeds


class _SoftDTW(torch.autograd.Function):
    """values [B] = R[L_b, S_b]; backward: grad [B, L, S] = E · grad_values."""

    @staticmethod
    def forward(
        ctx, cost: Tensor, gamma: float, ends_l: Tensor | None, ends_s: Tensor | None, band: int | None, fused: bool
    ) -> Tensor:
        skew = _Skew(*cost.shape)
        k = skew.empty(cost, _NEG_INF)
        k_cells = skew.cells(k)
        torch.mul(cost, -1.0 / (gamma * _LN2), out=k_cells)
        if ends_l is not None or ends_s is not None or band is not None:
            _block_cells(k_cells, ends_l, ends_s, band)
        if ends_l is None:
            ends_l = torch.full((skew.batch,), skew.rows, dtype=torch.long, device=cost.device)
        if ends_s is None:
            ends_s = torch.full((skew.batch,), skew.cols, dtype=torch.long, device=cost.device)
        q = _forward_pass(k, skew, fused)
        ends_d = ends_l + ends_s
        q_end = q[torch.arange(skew.batch, device=q.device), ends_d, skew.slot(ends_l, ends_d)]
        ctx.save_for_backward(k, q, ends_l, ends_s, q_end)
        ctx.shape, ctx.fused = cost.shape, fused
        return q_end * -(gamma * _LN2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        k, q, ends_l, ends_s, q_end = ctx.saved_tensors
        skew = _Skew(*ctx.shape)
        grad_values = grad_values.to(q.dtype)
        # |grad_b| · E[L_b, S_b] = 2^(G + Q) there: the upstream factor rides in the seed.
        seed_value = grad_values.abs().log2() - q_end
        if ctx.fused:
            from lyra.losses import soft_dtw_cuda

            g = skew.empty(k)
            ends_d = ends_l + ends_s
            soft_dtw_cuda.backward(k, g, skew.span, skew.shift, ends_d, skew.slot(ends_l, ends_d), seed_value)
        else:
            g = _backward_pass(k, q, skew, _seeds(skew, ends_l, ends_s, seed_value))
        # E = 2^(G + Q), over all written rows at once: contiguous runs, unlike the cells' view.
        written = g[:, 2:, 1 : 1 + skew.span]
        written.add_(q[:, 2:, 1 : 1 + skew.span]).exp2_()
        if bool((grad_values < 0).any()):
            written.mul_(grad_values.sign().view(-1, 1, 1))
        return skew.cells(g), None, None, None, None, None


def _numba_threads(batch: int, rows: int, cols: int) -> int:
    """Threads for the numba kernel: torch's intra-op count, capped by samples; 1 below _PARALLEL_MIN_CELLS."""
    if batch * rows * cols < _PARALLEL_MIN_CELLS:
        return 1
    import numba

    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, batch))


def _run_numba(serial, parallel, threads: int, *args) -> None:
    """Run the serial kernel, or the parallel one on `threads` numba threads (restored after)."""
    if threads == 1:
        serial(*args)
        return
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        parallel(*args)
    finally:
        numba.set_num_threads(previous)


class _SoftDTWNumba(torch.autograd.Function):
    """The numba kernel on `threads` threads: values [B] = R[L_b, S_b]; backward: grad [B, L, S] = E · grad_values."""

    @staticmethod
    def forward(
        ctx, cost: Tensor, gamma: float, ends_l: Tensor | None, ends_s: Tensor | None, band: int | None, threads: int
    ) -> Tensor:
        from lyra.losses import soft_dtw_numba

        batch, rows, cols = cost.shape
        if ends_l is None:
            ends_l = torch.full((batch,), rows, dtype=torch.long)
        if ends_s is None:
            ends_s = torch.full((batch,), cols, dtype=torch.long)
        costs = cost.detach().contiguous()  # shares cost's version counter when already contiguous
        q = cost.new_empty(batch, rows + 1, cols + 1, requires_grad=False)
        scale = costs.numpy().dtype.type(-1.0 / (gamma * _LN2))
        band_arg = -1 if band is None else int(band)
        args = (costs.numpy(), scale, ends_l.numpy(), ends_s.numpy(), band_arg, q.numpy())
        _run_numba(soft_dtw_numba.forward_serial, soft_dtw_numba.forward_parallel, threads, *args)
        ctx.save_for_backward(costs, q, ends_l, ends_s)
        ctx.scale, ctx.threads = scale, threads
        return q[torch.arange(batch), ends_l, ends_s] * -(gamma * _LN2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_values: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        from lyra.losses import soft_dtw_numba

        costs, q, ends_l, ends_s = ctx.saved_tensors
        grad = torch.empty_like(costs)  # every cell written by the kernel
        upstream = grad_values.to(costs.dtype).contiguous().numpy()
        args = (costs.numpy(), ctx.scale, ends_l.numpy(), ends_s.numpy(), q.numpy(), upstream, grad.numpy())
        _run_numba(soft_dtw_numba.backward_serial, soft_dtw_numba.backward_parallel, ctx.threads, *args)
        return grad, None, None, None, None, None
