"""lyra/bench.py, what the benchmark scripts share: the FLOP model's known values, the meter,
the configs, the Markdown table."""

from __future__ import annotations

import mmap

import pytest
import torch

from lyra.bench import MID_SIZE, Meter, bench_config, flop_bound, markdown_table
from lyra.config import LMMEConfig


def test_flop_bound_known_values():
    """DESIGN.md §6: with all tokens context, LMME(4, 0.7) does x0.633 of the linear work and
    x0.462 of the attention work; keep = 1 does all of it."""
    seventy = LMMEConfig(True, 4, 0.7, 32)
    linear_only = flop_bound(28, 10**9, 0, 0, 10**6, seventy)
    attention_only = flop_bound(28, 0, 3584, 0, 10**6, seventy)
    assert linear_only == pytest.approx(4 / (1 + 0.7 + 0.7**2 + 0.7**3), rel=1e-5)
    assert 1 / linear_only == pytest.approx(0.633, abs=1e-3) and 1 / attention_only == pytest.approx(0.462, abs=1e-3)
    assert flop_bound(28, 10**6, 3584, 64, 4096, LMMEConfig(True, 4, 1.0, 32)) == pytest.approx(1.0)
    assert flop_bound(28, 10**6, 3584, 64, 4096, None) == 1.0
    halve = LMMEConfig(True, 4, 0.5, 1)
    # attention only (no weights, width 1): 8 context tokens kept 8, 4, 2, 1 over four one-layer blocks
    assert flop_bound(4, 0, 1, 0, 8, halve) == pytest.approx(4 * 64 / (64 + 16 + 4 + 1))
    # weights only: cost linear in tokens; 8 text tokens are never dropped
    assert flop_bound(4, 10, 0, 8, 8, halve) == pytest.approx(4 * 16 / (16 + 12 + 10 + 9))
    assert flop_bound(4, 10, 4, 8, 8, None) == 1.0
    assert flop_bound(4, 10, 4, 8, 8, LMMEConfig(True, 4, 1.0, 1)) == 1.0


def test_meter_times_a_call_and_reads_its_peak_above_the_baseline():
    meter = Meter(torch.device("cpu"))
    meter.reset()
    assert meter.baseline_gib > 0
    # An anonymous mapping gets fresh pages; a torch tensor may reuse free heap pages that are
    # already resident after other tests, and then the RSS does not move.
    seconds, block = meter.timed(lambda: touched_mapping(64 * 2**20))
    assert seconds > 0 and len(block) == 64 * 2**20
    assert (meter.peak_gib() - meter.baseline_gib) * 1024 >= 60


def touched_mapping(size: int) -> mmap.mmap:
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    return block


def test_bench_config_mid_size_or_preset_with_overrides():
    mid = bench_config(None, {"text.num_hidden_layers": 4})
    assert (mid.text.hidden_size, mid.text.num_hidden_layers) == (MID_SIZE["text.hidden_size"], 4)
    tiny = bench_config("tiny", {"text.max_position_embeddings": 99_999})
    assert tiny.text.hidden_size != MID_SIZE["text.hidden_size"] and tiny.text.max_position_embeddings == 99_999


def test_markdown_table_columns_missing_values_and_floats():
    rows = [{"n": 1, "variant": "baseline", "ms": 12.5}, {"n": 2, "variant": "LMME", "ms": None}, {"n": 3}]
    assert markdown_table(rows) == "\n".join([
        "| n | variant | ms |", "|---|---|---|",
        "| 1 | baseline | 12.5 |", "| 2 | LMME | - |", "| 3 | - | - |",
    ])
    assert markdown_table(rows[:1], ("ms", "n"), "{:.3f}") == "| ms | n |\n|---|---|\n| 12.500 | 1 |"
