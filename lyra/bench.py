"""Pieces shared by the benchmark scripts in `scripts/`: the mid-size CPU model, timing and
peak-memory readings, the device's name, Markdown tables, the FLOP model of an LMME forward
(DESIGN.md §6), and a random-weight Lyra built on its device."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

from lyra.config import LMMEConfig, LyraConfig, load_config
from lyra.memory import reset_peak_rss, status_mib
from lyra.model.lmme import block_ranges, keep_count

if TYPE_CHECKING:  # imported where a whole Lyra is built: the LLM-only benchmarks skip its speech stack
    from lyra.model.lyra import LyraForConditionalGeneration

T = TypeVar("T")
MID_SIZE = {  # a mid-size CPU config: Qwen2-shaped, 8 layers of width 512
    "text.vocab_size": 4096, "text.hidden_size": 512, "text.intermediate_size": 1536, "text.num_hidden_layers": 8,
    "text.num_attention_heads": 8, "text.num_key_value_heads": 2, "text.mrope_section": [8, 12, 12],
    "text.max_position_embeddings": 262144,
}


def bench_config(preset: str | None, overrides: dict | None = None) -> LyraConfig:
    """A preset's config, or the mid-size one (`preset` None), with dotted `overrides`."""
    if preset:
        return load_config(preset, overrides=overrides)
    return load_config("tiny", overrides={**MID_SIZE, **(overrides or {})})


def random_model(config: LyraConfig, device: torch.device, dtype: torch.dtype) -> LyraForConditionalGeneration:
    """A whole Lyra of `config` with random weights (no encoder checkpoint loaded), initialised
    on `device`: a Lyra-Base never passes through host memory."""
    from lyra.model.lyra import LyraForConditionalGeneration

    with torch.device(device):
        return LyraForConditionalGeneration(config).to(dtype)


class Meter:
    """Peak memory of one measured call: CUDA's allocator peak, else the process VmHWM; and
    synchronised wall time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process RSS high-water mark (VmHWM)"
        self.baseline_gib = 0.0

    def reset(self) -> None:
        """Count the peak from now; `baseline_gib` is the memory in use now (allocated, or RSS)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_gib = torch.cuda.memory_allocated(self.device) / 2**30
        else:
            reset_peak_rss()
            self.baseline_gib = status_mib("VmRSS") / 1024

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return status_mib("VmHWM") / 1024

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def timed(self, fn: Callable[[], T]) -> tuple[float, T]:
        """Seconds that `fn()` takes (its queued CUDA work included) and what it returned."""
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return time.perf_counter() - start, out


def prefill_flops(num_layers: int, params_per_layer: int, width: int, text: int, context: int,
                  settings: LMMEConfig | None) -> float:
    """FLOPs of one prefill by the model of DESIGN.md §6: 2·params per token per layer, plus
    causal attention 2·n²·width per layer; LMME's block b sees the context kept after b steps."""
    def cost(tokens: int) -> float:
        return 2 * tokens * params_per_layer + 2 * tokens * tokens * width

    if settings is None:
        return num_layers * cost(text + context)
    total, kept = 0.0, context
    for block in block_ranges(num_layers, settings.blocks):
        total += len(block) * cost(text + kept)
        kept = keep_count(kept, settings)
    return total


def flop_bound(num_layers: int, params_per_layer: int, width: int, text: int, context: int,
               settings: LMMEConfig | None) -> float:
    """The best prefill speedup the FLOP model allows: baseline FLOPs / pruned FLOPs. A training
    step's backward and recomputation cost a fixed multiple of each layer's forward, so the same
    ratio bounds the step's LLM layers."""
    args = (num_layers, params_per_layer, width, text, context)
    return prefill_flops(*args, None) / prefill_flops(*args, settings)


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None, float_format: str = "{}") -> str:
    """`rows` as a Markdown table of `columns` (default: the first row's keys, in order); a value
    a row lacks or holds as None reads "-", a float is written by `float_format`."""
    columns = list(rows[0]) if columns is None else list(columns)

    def cell(value) -> str:
        if value is None:
            return "-"
        return float_format.format(value) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU model (builds differ across CPUs: their float kernels round differently)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}, {torch.get_num_threads()} threads)"
