"""LMME speed and memory against the unpruned forward (the paper's Table 4a, in small).

Builds the LLM of a config with random weights, fills the context with N speech-type
tokens followed by 64 instruction tokens, and measures in one process, alternating
baseline / LMME(4, 0.8) / LMME(4, 0.7) and taking medians of repeats:
prefill seconds, decode tokens/s over 32 new tokens, peak memory, kept fraction, the
FLOP-model bound on the prefill speedup (DESIGN.md §6) and the time spent scoring.

    python scripts/bench_lmme.py --lengths 2048 4096 8192 16384 --json outputs/bench_lmme.json
    python scripts/bench_lmme.py --preset base --dtype bf16 --lengths 8192 ... 131072   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from lyra.utils.io import atomic_write_json
from lyra.config import LMMEConfig, load_config
from lyra.memory import reset_peak_rss, status_mib
from lyra.model.lmme import SPEECH, TEXT, block_ranges, keep_count, lmme_decode, lmme_prefill
from lyra.model.lyra import LyraForConditionalGeneration

INSTRUCTION_TOKENS = 64
DECODE_TOKENS = 32
MID_SIZE = {  # a mid-size CPU config: Qwen2-shaped, 8 layers of width 512
    "text.vocab_size": 4096, "text.hidden_size": 512, "text.intermediate_size": 1536, "text.num_hidden_layers": 8,
    "text.num_attention_heads": 8, "text.num_key_value_heads": 2, "text.mrope_section": [8, 12, 12],
    "text.max_position_embeddings": 262144,
}


class Meter:
    """Peak memory of one measured call: CUDA's allocator peak, else the process VmHWM."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()

    def peak_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() / 2**30
        return status_mib("VmHWM") / 1024

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def flop_bound(num_layers: int, params_per_layer: int, width: int, text: int, context: int,
               settings: LMMEConfig | None) -> float:
    """Prefill FLOPs of the pruned forward relative to the baseline's inverse: the best speedup."""
    def cost(tokens: int) -> float:
        return 2 * tokens * params_per_layer + 2 * tokens * tokens * width  # linear + causal attention

    baseline = num_layers * cost(text + context)
    if settings is None:
        return 1.0
    pruned, kept = 0.0, context
    for block in block_ranges(num_layers, settings.blocks):
        pruned += len(block) * cost(text + kept)
        kept = keep_count(kept, settings)
    return baseline / pruned


def run_prefill(language_model, embeds, positions, mask, types, settings, cache):
    if settings is None:
        out = language_model(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, cache=cache,
                             use_cache=cache is not None)
        return out.last_hidden_state, None
    result = lmme_prefill(language_model, embeds, positions, mask, types, settings, cache=cache, time_scoring=True)
    return result.hidden_states, result


def measure(model, length: int, settings: LMMEConfig | None, meter: Meter, dtype) -> dict:
    language_model = model.backbone.model.language_model
    device = meter.device
    width = model.config.text.hidden_size
    total = length + INSTRUCTION_TOKENS
    generator = torch.Generator(device="cpu").manual_seed(length)
    embeds = (torch.randn(1, total, width, generator=generator) * 0.02).to(device, dtype)
    positions = torch.arange(total, device=device).view(1, 1, -1).expand(3, 1, -1)
    mask = torch.ones(1, total, dtype=torch.long, device=device)
    types = torch.full((1, total), SPEECH, dtype=torch.int8, device=device)
    types[:, length:] = TEXT

    meter.reset()
    meter.sync()
    start = time.perf_counter()
    with torch.inference_mode():
        cache = DynamicCache(config=model.backbone.config.text_config)
        hidden, result = run_prefill(language_model, embeds, positions, mask, types, settings, cache)
        meter.sync()
        prefill = time.perf_counter() - start
        peak = meter.peak_gib()
        token = hidden[:, -1:]
        start = time.perf_counter()
        for step in range(DECODE_TOKENS):
            if settings is None:
                out = language_model(inputs_embeds=token, position_ids=positions[:, :, -1:] + step + 1,
                                     cache=cache, use_cache=True)
                token = out.last_hidden_state
            else:
                token = lmme_decode(language_model, token, result.state, cache)
        meter.sync()
        decode = time.perf_counter() - start
    kept = result.retention.kept_fraction()[-1] if result is not None else 1.0
    return {"prefill_s": prefill, "decode_tok_s": DECODE_TOKENS / decode, "peak_gib": peak,
            "kept_fraction": kept, "scoring_s": result.scoring_seconds if result is not None else 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (default: a mid-size 8-layer config)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default="outputs/bench_lmme.json")
    parser.add_argument("--png", default="outputs/bench_lmme.png")
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    config = load_config(args.preset) if args.preset else load_config("tiny", overrides=MID_SIZE)
    with torch.device(device):
        model = LyraForConditionalGeneration(config).to(dtype).eval()
    meter = Meter(device)
    text = config.text
    layer = model.backbone.model.language_model.layers[0]
    params_per_layer = sum(p.numel() for p in layer.parameters())
    variants = {"baseline": None, "LMME(4,0.8)": LMMEConfig(True, 4, 0.8, 32), "LMME(4,0.7)": LMMEConfig(True, 4, 0.7, 32)}
    rows = []
    for length in args.lengths:
        runs = {name: [] for name in variants}
        measure(model, min(length, 1024), None, meter, dtype)  # warm-up
        for _ in range(args.repeats):
            for name, settings in variants.items():  # alternate, so drift hits all alike
                runs[name].append(measure(model, length, settings, meter, dtype))
        base_prefill = statistics.median(r["prefill_s"] for r in runs["baseline"])
        for name, settings in variants.items():
            prefill = statistics.median(r["prefill_s"] for r in runs[name])
            bound = flop_bound(text.num_hidden_layers, params_per_layer, text.hidden_size,
                               INSTRUCTION_TOKENS, length, settings)
            speedup = base_prefill / prefill
            rows.append({
                "context_tokens": length, "variant": name,
                "prefill_s": round(prefill, 4),
                "decode_tok_s": round(statistics.median(r["decode_tok_s"] for r in runs[name]), 2),
                "peak_gib": round(max(r["peak_gib"] for r in runs[name]), 3),
                "kept_fraction": round(runs[name][0]["kept_fraction"], 4),
                "prefill_speedup": round(speedup, 3),
                "flop_bound": round(bound, 3),
                "speedup_over_bound": round(speedup / bound, 3),
                "scoring_share": round(statistics.median(r["scoring_s"] / r["prefill_s"] for r in runs[name]), 4),
            })
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    write_outputs(rows, args, config)
    return 0


def print_table(rows: list[dict]) -> None:
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")


def write_outputs(rows: list[dict], args, config) -> None:
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"device": args.device, "dtype": args.dtype, "preset": args.preset or "mid-size",
               "text": vars(config.text), "instruction_tokens": INSTRUCTION_TOKENS, "rows": rows}
    atomic_write_json(out, payload)
    draw_png(rows, Path(args.png))
    print(f"wrote {out} and {args.png}")


def draw_png(rows: list[dict], path: Path) -> None:
    """Prefill seconds against context length, one line per variant (PIL, log-2 x axis)."""
    from PIL import Image, ImageDraw

    width, height, margin = 720, 420, 60
    picture = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(picture)
    lengths = sorted({r["context_tokens"] for r in rows})
    top = max(r["prefill_s"] for r in rows) * 1.1
    colours = {"baseline": (0, 0, 0), "LMME(4,0.8)": (49, 130, 189), "LMME(4,0.7)": (230, 85, 13)}

    def xy(length: int, seconds: float) -> tuple[float, float]:
        span = max(1, len(lengths) - 1)
        x = margin + (width - 2 * margin) * lengths.index(length) / span
        return x, height - margin - (height - 2 * margin) * seconds / top

    draw.line(((margin, height - margin), (width - margin, height - margin)), fill="black")
    draw.line(((margin, margin), (margin, height - margin)), fill="black")
    for length in lengths:
        x, _ = xy(length, 0)
        draw.text((x - 14, height - margin + 6), str(length), fill="black")
    draw.text((margin, 20), f"prefill seconds (max {top:.2f}) vs context tokens", fill="black")
    for number, (name, colour) in enumerate(colours.items()):
        points = [xy(r["context_tokens"], r["prefill_s"]) for r in rows if r["variant"] == name]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3)
        draw.text((width - 200, margin + 16 * number), name, fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)


if __name__ == "__main__":
    sys.exit(main())
