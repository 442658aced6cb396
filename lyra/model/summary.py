"""Per-component parameter counts of a preset, built on the meta device (no memory).

    python -m lyra.model.summary --preset base
    python -m lyra.model.summary --preset pro --json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from lyra.config import LyraConfig, available_presets, load_config
from lyra.model.lyra import LyraForConditionalGeneration


def build_on_meta(config: LyraConfig) -> LyraForConditionalGeneration:
    with torch.device("meta"):
        return LyraForConditionalGeneration(config)


def component_parameters(model: LyraForConditionalGeneration) -> dict[str, int]:
    """Parameter counts per component; tied weights are counted once (in the LLM)."""
    def count(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    llm = count(model.backbone.model.language_model)
    if not model.config.text.tie_word_embeddings:
        llm += model.backbone.lm_head.weight.numel()
    counts = {
        "vit": count(model.backbone.model.visual),
        "llm": llm,
        "speech_encoder": count(model.speech_encoder),
        "sound_encoder": count(model.sound_encoder),
        "projectors": count(model.speech_projector) + count(model.sound_projector),
    }
    counts["total"] = sum({id(p): p.numel() for p in model.parameters()}.values())
    if sum(v for k, v in counts.items() if k != "total") != counts["total"]:
        raise AssertionError("component counts do not add up to the total")  # a module was left out
    return counts


def format_table(rows: dict[str, dict[str, int]]) -> str:
    columns = ["vit", "llm", "speech_encoder", "sound_encoder", "projectors", "total"]
    header = "| preset | " + " | ".join(columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for name, counts in rows.items():
        lines.append(f"| {name} | " + " | ".join(_human(counts[c]) for c in columns) + " |")
    return "\n".join(lines)


def _human(n: int) -> str:
    if n == 0:
        return "0"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}" if unit == "B" else f"{n / scale:.2f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", help="preset name or YAML path (repeatable); default: all")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    names = args.preset or available_presets()
    try:
        rows = {name: component_parameters(build_on_meta(load_config(name))) for name in names}
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rows[names[0]] if len(names) == 1 else rows, indent=2))
    else:
        print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
