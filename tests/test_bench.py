"""lyra/bench.py, what the benchmark scripts share: the Markdown table."""

from __future__ import annotations

from lyra.bench import markdown_table


def test_markdown_table_columns_missing_values_and_floats():
    rows = [{"n": 1, "variant": "baseline", "ms": 12.5}, {"n": 2, "variant": "LMME", "ms": None}, {"n": 3}]
    assert markdown_table(rows) == "\n".join([
        "| n | variant | ms |", "|---|---|---|",
        "| 1 | baseline | 12.5 |", "| 2 | LMME | - |", "| 3 | - | - |",
    ])
    assert markdown_table(rows[:1], ("ms", "n"), "{:.3f}") == "| ms | n |\n|---|---|\n| 12.500 | 1 |"
