"""Fused CUDA kernels (numba.cuda) for the soft-DTW wavefront in `soft_dtw.py`.

They run exactly the recursions of `_forward_pass` and `_backward_pass`, on the same
skewed buffers, but the whole anti-diagonal loop is one launch instead of three torch
ops per diagonal (each ~5 µs of launch overhead, against well under 1 µs of GPU work for
a diagonal of 8 × 1024 cells). One block per sample walks its anti-diagonals, each thread
taking every blockDim-th slot of a diagonal, with a block barrier between diagonals
(a diagonal reads only the previous two, written by the same block). The rows' border
slots and the seeds are prepared by the caller as for the torch loop.

`numba.config.ENABLE_CUDASIM` (NUMBA_ENABLE_CUDASIM=1 before numba is imported) runs the
same kernels on the CPU, on numpy arrays: that is how the tests check them without a GPU.
"""

from __future__ import annotations

import functools
import math
import warnings

import numba
import torch
from numba import cuda
from torch import Tensor

__all__ = ["unavailable", "forward", "backward"]

_MAX_THREADS = 1024


def unavailable(device_type: str) -> str | None:
    """None when these kernels can run on tensors of this device type here, else why not."""
    if numba.config.ENABLE_CUDASIM:
        return None if device_type == "cpu" else "the numba CUDA simulator is on: CPU tensors only"
    if device_type != "cuda":
        return f"CUDA tensors only, not {device_type}"
    return _cuda_problem()


@functools.cache
def _cuda_problem() -> str | None:
    """Why numba.cuda cannot compile and run a kernel on torch's tensors here, or None: probed once."""
    if not cuda.is_available():
        return "numba.cuda finds no CUDA driver or device"
    try:
        k = torch.zeros(1, 4, 3, device="cuda")
        q = torch.zeros_like(k)
        forward(k, q, 1, 1)
        torch.cuda.synchronize()
    except Exception as error:  # a missing NVVM or an old numba-cuda shows up only here
        problem = f"numba.cuda failed on a probe kernel: {type(error).__name__}: {error}"
        warnings.warn(problem + "; soft_dtw falls back to the torch wavefront", RuntimeWarning, stacklevel=3)
        return problem
    return None


@cuda.jit(device=True)
def _logaddexp2(a, b):
    """log2(2^a + 2^b), -inf when both are -inf (as torch.logaddexp2)."""
    high = max(a, b)
    if high == -math.inf:
        return high
    return high + math.log2(1 + math.exp((min(a, b) - high) * 0.6931471805599453))


@cuda.jit(cache=True)
def _forward_kernel(k, q, span, shift):
    b = cuda.blockIdx.x
    for d in range(2, q.shape[1]):
        for slot in range(1 + cuda.threadIdx.x, span + 1, cuda.blockDim.x):
            # Q[i-1, j] and Q[i, j-1] in row d-1, Q[i-1, j-1] in row d-2 (slot offsets as in _forward_pass).
            up = q[b, d - 1, slot - 1 + shift]
            left = q[b, d - 1, slot + shift]
            diag = q[b, d - 2, slot - 1 + 2 * shift]
            q[b, d, slot] = _logaddexp2(_logaddexp2(up, left), diag) + k[b, d, slot]
        cuda.syncthreads()


@cuda.jit(device=True)
def _h(g, k, b, d, slot, span):
    """H = G + K at (d, slot); -inf past the last diagonal and on the border slots."""
    if d >= g.shape[1] or slot < 1 or slot > span:
        return -math.inf
    return g[b, d, slot] + k[b, d, slot]


@cuda.jit(cache=True)
def _backward_kernel(k, g, span, shift, seed_d, seed_slot, seed_value):
    b = cuda.blockIdx.x
    for d in range(g.shape[1] - 1, 1, -1):
        for slot in range(1 + cuda.threadIdx.x, span + 1, cuda.blockDim.x):
            # H[i+1, j] and H[i, j+1] in row d+1, H[i+1, j+1] in row d+2 (offsets as in _backward_pass).
            down = _h(g, k, b, d + 1, slot + 1 - shift, span)
            right = _h(g, k, b, d + 1, slot - shift, span)
            diag = _h(g, k, b, d + 2, slot + 1 - 2 * shift, span)
            value = _logaddexp2(_logaddexp2(down, right), diag)
            if d == seed_d[b] and slot == seed_slot[b]:
                value = seed_value[b]
            g[b, d, slot] = value
        cuda.syncthreads()


def _launch(kernel, tensors: tuple[Tensor, ...], *scalars, span: int) -> None:
    """One block per sample (the first tensor's dim 0), threads covering a diagonal's span, on torch's stream."""
    threads = min(_MAX_THREADS, 32 * math.ceil(span / 32))
    blocks = tensors[0].shape[0]
    if numba.config.ENABLE_CUDASIM:
        arrays = [t.numpy() for t in tensors]
        launch = kernel[blocks, threads]
    else:
        arrays = [cuda.as_cuda_array(t.detach()) for t in tensors]
        launch = kernel[blocks, threads, cuda.external_stream(torch.cuda.current_stream(tensors[0].device).cuda_stream)]
    launch(*arrays[:2], *scalars, *arrays[2:])


def forward(k: Tensor, q: Tensor, span: int, shift: int) -> None:
    """Fill rows 2.. of skewed Q [B, D, W] from skewed K; q's rows 0-1 and border slots set by the caller."""
    _launch(_forward_kernel, (k, q), span, shift, span=span)


def backward(k: Tensor, g: Tensor, span: int, shift: int, seed_d: Tensor, seed_slot: Tensor, seed_value: Tensor) -> None:
    """Fill rows 2.. (slots 1..span) of skewed G; sample b's G at (seed_d[b], seed_slot[b]) is seed_value[b]."""
    _launch(_backward_kernel, (k, g, seed_d, seed_slot, seed_value), span, shift, span=span)
