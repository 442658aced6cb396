"""Numba CPU kernels for `lyra.losses.soft_dtw`: one sample's recursion at a time.

Same scaled base-2 domain as the torch wavefront (`soft_dtw.py`): with K = -C / (γ ln 2),
Q[i, j] = K[i, j] + log2(2^Q[i-1, j] + 2^Q[i, j-1] + 2^Q[i-1, j-1]), and R = -γ ln 2 · Q.
Q is stored row-major with a border: q[b] is [L+1, S+1], q[b, 0, 0] = 0, the rest of row
and column 0 is -inf. The backward is the E-matrix recursion in the plain domain,

    E[i, j] = Σ_succ E[succ] · 2^(Q[i, j] + K[succ] - Q[succ]),   E[L_b, S_b] = upstream grad,

every weight in [0, 1] (so no overflow, and a negative upstream gradient needs nothing
special). K is recomputed from the cost in both passes rather than stored.

Why strips: in row order each cell waits for its left neighbour's exp2/log2 (a chain of
libm calls, ~25 ns a cell). Walking a strip of STRIP rows along its anti-diagonals makes
the STRIP cells of one step independent, so their calls overlap (~16 ns a cell here).

Per-sample lengths and the band are handled in the loops: only cells (i ≤ L_b, j ≤ S_b)
are visited, out-of-band cells get Q = -inf, so E there is 0; padding gets E = 0.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["forward_parallel", "forward_serial", "backward_parallel", "backward_serial", "compile_all"]

STRIP = 8  # rows walked together; 4..32 measured alike, 1 is 1.5x slower


@njit(cache=True, nogil=True)
def _forward_one(cost, scale, rows, cols, band, q):
    """Q of one sample. cost [L, S] (only [:rows, :cols] read), q [L+1, S+1] written on [:rows+1, :cols+1]."""
    neg_inf = q.dtype.type(-np.inf)
    one = q.dtype.type(1.0)
    q[0, 0] = 0.0
    q[0, 1 : cols + 1] = neg_inf
    reach = band * max(rows - 1, cols - 1)
    for top in range(1, rows + 1, STRIP):
        height = min(STRIP, rows + 1 - top)
        q[top : top + height, 0] = neg_inf
        # Step t visits cells (top + r, t - r + 1): an anti-diagonal of the strip.
        for t in range(cols + height - 1):
            for r in range(max(0, t + 1 - cols), min(height, t + 1)):
                i = top + r
                j = t - r + 1
                up, left, diag = q[i - 1, j], q[i, j - 1], q[i - 1, j - 1]
                high = max(up, max(left, diag))
                if high == neg_inf or (band >= 0 and abs((i - 1) * (cols - 1) - (j - 1) * (rows - 1)) > reach):
                    q[i, j] = neg_inf
                    continue
                # 2^(high - high) = 1: two exp2 instead of three (min and median of the three).
                low = min(up, min(left, diag))
                middle = max(min(up, left), min(max(up, left), diag))
                total = one + np.exp2(middle - high) + np.exp2(low - high)
                q[i, j] = cost[i - 1, j - 1] * scale + high + np.log2(total)


@njit(cache=True, nogil=True)
def _backward_one(cost, scale, rows, cols, q, grad, e):
    """E of one sample times grad into every cell of e [L, S] (0 on padding), in reverse row order."""
    neg_inf = q.dtype.type(-np.inf)
    zero = e.dtype.type(0.0)
    # Zeroed here, not by the caller: a torch fill of a large tensor is a parallel region,
    # which on a busy machine waits milliseconds for a descheduled thread.
    e[rows:, :] = zero
    e[:rows, cols:] = zero
    # Unlike the forward, a cell's dependence on its right neighbour is one multiply-add
    # (the exp2 calls do not wait on it), so plain row order is as fast as strips here.
    for i in range(rows, 0, -1):
        for j in range(cols, 0, -1):
            here = q[i, j]
            total = zero
            if i == rows and j == cols:
                total = grad
            elif here > neg_inf:
                # Successors that are -inf (blocked or unreachable) have E = 0: skipped, not 0 · inf.
                if i < rows and q[i + 1, j] > neg_inf:
                    total += e[i, j - 1] * np.exp2(here + cost[i, j - 1] * scale - q[i + 1, j])
                if j < cols and q[i, j + 1] > neg_inf:
                    total += e[i - 1, j] * np.exp2(here + cost[i - 1, j] * scale - q[i, j + 1])
                if i < rows and j < cols and q[i + 1, j + 1] > neg_inf:
                    total += e[i, j] * np.exp2(here + cost[i, j] * scale - q[i + 1, j + 1])
            e[i - 1, j - 1] = total


# Batch drivers. cost [B, L, S]; scale = -1/(γ ln 2) in cost's dtype; ends_l, ends_s [B] int64
# (1-based last cell); band >= 0, or -1 for none; q [B, L+1, S+1]; grad [B]; e [B, L, S] (any contents).
# The serial pair never starts a thread: small problems are dominated by thread wake-ups.


@njit(cache=True, nogil=True)
def forward_serial(cost, scale, ends_l, ends_s, band, q):
    for b in range(cost.shape[0]):
        _forward_one(cost[b], scale, ends_l[b], ends_s[b], band, q[b])


@njit(cache=True, nogil=True, parallel=True)
def forward_parallel(cost, scale, ends_l, ends_s, band, q):
    for b in prange(cost.shape[0]):
        _forward_one(cost[b], scale, ends_l[b], ends_s[b], band, q[b])


@njit(cache=True, nogil=True)
def backward_serial(cost, scale, ends_l, ends_s, q, grad, e):
    for b in range(cost.shape[0]):
        _backward_one(cost[b], scale, ends_l[b], ends_s[b], q[b], grad[b], e[b])


@njit(cache=True, nogil=True, parallel=True)
def backward_parallel(cost, scale, ends_l, ends_s, q, grad, e):
    for b in prange(cost.shape[0]):
        _backward_one(cost[b], scale, ends_l[b], ends_s[b], q[b], grad[b], e[b])


def compile_all() -> None:
    """Compile (or load from numba's cache) every driver for float32 and float64, and start the
    parallel ones' threads, on a 2 × 2 × 2 problem: the first real call then pays no JIT."""
    ends = np.full(2, 2, dtype=np.int64)
    for dtype in (np.float32, np.float64):
        cost = np.zeros((2, 2, 2), dtype=dtype)
        q = np.empty((2, 3, 3), dtype=dtype)
        e = np.empty_like(cost)
        scale, grad = dtype(-1.0), np.ones(2, dtype=dtype)
        for forward, backward in ((forward_serial, backward_serial), (forward_parallel, backward_parallel)):
            forward(cost, scale, ends, ends, -1, q)
            backward(cost, scale, ends, ends, q, grad, e)
