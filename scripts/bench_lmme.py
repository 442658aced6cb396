"""LMME against the unpruned forward at a preset's real size, next to the paper's Table 4a.

Builds the LLM of a preset alone (decoder layers and LM head, random weights: created on
`meta`, then materialised on the device in the chosen dtype, so Lyra-Base costs no host
memory), fills the context with N speech-type tokens followed by 64 instruction tokens and,
for each length, alternates baseline / LMME(4,0.8) / LMME(4,0.7) over the repeats (medians):

- prefill seconds (to the first new token: the forward, the LM head on the last row, argmax);
- greedy decode tokens/s over `--decode-tokens` new tokens (embedding, forward, LM head, argmax);
- peak memory over prefill and decode: CUDA's `max_memory_allocated`, on a CPU the process's
  resident-set high-water mark (`VmHWM`, which also counts the Python process itself);
- the kept fraction, the FLOP-model bound on the prefill speedup (DESIGN.md §6), the measured
  speedup over that bound, and the share of prefill spent scoring.

Before measuring it checks that LMME at rho = 1 gives the library forward's logits (prefill
and teacher-forced decode steps) and prints the difference. An out-of-memory cell is recorded
as "oom" and the run goes on (longer lengths of that variant are then recorded as oom, untried);
with `--time-budget`, a cell whose predicted time no longer fits is recorded as "skipped".
Where an LMME variant's speedup falls below `--profile-below` of its bound, one prefill at the
longest such length runs under torch.profiler. Writes OUT.json (rows, the paper's Table 4a,
the comparison), OUT.png (ours against Table 4a) and OUT_profile.txt; the JSON is rewritten
after every length, so a run cut short keeps what it measured.

    python scripts/bench_lmme.py --lengths 8192 16384 --repeats 3 --decode-tokens 32   # CPU, mid-size
    python scripts/bench_lmme.py --preset nano --lengths 256 512 1024 --out docs/dryrun/bench_lmme_nano_cpu
    python scripts/bench_lmme.py --preset base --dtype bf16 --device cuda --time-budget 330 \\
        --lengths 2048 4096 8192 16384 32768 65536 131072     # scripts/gpu_session_lmme.sh runs this
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import DynamicCache
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding, Qwen2VLTextModel

from lyra.bench import Meter, bench_config, device_name, flop_bound, markdown_table, prefill_flops
from lyra.config import LMMEConfig, LyraConfig
from lyra.model.backbone import qwen2vl_config
from lyra.model.lmme import SPEECH, TEXT, lmme_decode, lmme_prefill
from lyra.train.config import DTYPES
from lyra.utils.io import atomic_file, atomic_write_json, atomic_write_text

INSTRUCTION_TOKENS = 64
INIT_STD = 0.02  # Qwen2's initializer_range
VARIANTS: dict[str, LMMEConfig | None] = {
    "baseline": None,
    "LMME(4,0.8)": LMMEConfig(True, 4, 0.8, 32),
    "LMME(4,0.7)": LMMEConfig(True, 4, 0.7, 32),
}
# max |logit difference| / max |logit| allowed at rho = 1: rounding of the dtype, nothing more
RHO1_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# The paper's Table 4a (Lyra-Base, one A100; /work/shared/paper/lyra-paper.txt): None = OOM.
# Memory is in the paper's "G"; TPS is its decode tokens per second.
PAPER_TABLE_4A = {
    "lengths": [2**11, 2**12, 2**13, 2**14, 2**15, 2**16, 2**17],
    "prefill_s": {
        "baseline": [0.19, 0.33, 0.65, 1.47, 2.99, None, None],
        "LMME(4,0.8)": [0.17, 0.24, 0.44, 0.76, 1.60, 4.24, 10.2],
        "LMME(4,0.7)": [0.16, 0.21, 0.37, 0.59, 1.23, 3.05, 7.75],
    },
    "decode_tok_s": {
        "baseline": [32.6, 30.8, 27.3, 25.3, 16.6, None, None],
        "LMME(4,0.8)": [32.7, 31.5, 31.8, 28.6, 22.7, 14.1, 8.37],
        "LMME(4,0.7)": [33.8, 33.3, 32.5, 30.1, 25.3, 16.6, 10.1],
    },
    "memory_g": {
        "baseline": [20, 23, 30, 41, 60, None, None],
        "LMME(4,0.8)": [17, 18, 19, 21, 24, 33, 49],
        "LMME(4,0.7)": [17, 18, 19, 21, 24, 33, 49],
    },
}


# --------------------------------------------------------------------------- the model
@dataclass
class LanguageModel:
    """A preset's LLM alone: `decoder` (a `Qwen2VLTextModel`, what LMME runs) and `head`."""

    decoder: Qwen2VLTextModel
    head: nn.Linear
    config: LyraConfig

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype


def build_language_model(config: LyraConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> LanguageModel:
    """Random weights at `config`'s dimensions, allocated once, directly on `device` in `dtype`:
    matrices ~ N(0, 0.02), norm weights 1, biases 0; the rotary tables are built afresh in fp32."""
    text_config = qwen2vl_config(config).text_config
    width, vocab = config.text.hidden_size, config.text.vocab_size
    with torch.device("meta"):
        decoder = Qwen2VLTextModel(text_config).to(dtype)
        head = nn.Linear(width, vocab, bias=False, dtype=dtype)
    decoder.to_empty(device=device)
    head.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, parameter in [*decoder.named_parameters(), ("head.weight", head.weight)]:
            if parameter.dim() > 1:
                parameter.normal_(0.0, INIT_STD, generator=generator)
            elif "norm" in name:
                parameter.fill_(1.0)
            else:
                parameter.zero_()
    if config.text.tie_word_embeddings:
        head.weight = decoder.embed_tokens.weight
    with torch.device(device):
        decoder.rotary_emb = Qwen2VLRotaryEmbedding(text_config)  # its buffers were left uninitialised
    stray = [name for name, _ in decoder.named_buffers() if not name.startswith("rotary_emb.")]
    if stray:
        raise RuntimeError(f"buffers {stray} of Qwen2VLTextModel are not initialised by build_language_model; "
                           "recompute them there")
    return LanguageModel(decoder.eval(), head.eval(), config)


@dataclass
class Prompt:
    """One sample: `embeds` [1, N, d] (random token ids, embedded), `positions` [3, 1, N],
    `mask` [1, N], `types` [1, N] (N - 64 speech tokens, then 64 instruction tokens)."""

    embeds: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor
    types: torch.Tensor


def make_prompt(lm: LanguageModel, context: int, seed: int) -> Prompt:
    device, total = lm.device, context + INSTRUCTION_TOKENS
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, lm.config.text.vocab_size, (1, total), generator=generator, device=device)
    with torch.inference_mode():
        embeds = lm.decoder.embed_tokens(ids)
    positions = torch.arange(total, device=device).view(1, 1, -1).expand(3, 1, -1)
    mask = torch.ones(1, total, dtype=torch.long, device=device)
    types = torch.full((1, total), SPEECH, dtype=torch.int8, device=device)
    types[:, context:] = TEXT
    return Prompt(embeds, positions, mask, types)


def prefill(lm: LanguageModel, prompt: Prompt, settings: LMMEConfig | None, cache: DynamicCache,
            all_rows: bool = False):
    """Logits `[1, 1 or N', V]` of the last row (all rows with `all_rows`) and the LMME output
    (None for the library forward)."""
    if settings is None:
        out = lm.decoder(inputs_embeds=prompt.embeds, position_ids=prompt.positions, attention_mask=prompt.mask,
                         cache=cache, use_cache=True)
        hidden, result = out.last_hidden_state, None
    else:
        result = lmme_prefill(lm.decoder, prompt.embeds, prompt.positions, prompt.mask, prompt.types, settings,
                              cache=cache, time_scoring=True)
        hidden = result.hidden_states
    return lm.head(hidden if all_rows else hidden[:, -1:]), result


def decode(lm: LanguageModel, logits: torch.Tensor, prompt: Prompt, result, cache: DynamicCache,
           steps: int, feed: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`steps` decoding steps after a prefill; returns each step's logits `[1, 1, V]`.
    Greedy (argmax of the previous logits) unless `feed` `[1, steps]` gives the tokens."""
    next_position = prompt.positions[:, :, -1:] + 1
    out = []
    for step in range(steps):
        token = feed[:, step:step + 1] if feed is not None else logits[:, -1:].argmax(-1)
        embeds = lm.decoder.embed_tokens(token)
        if result is None:
            hidden = lm.decoder(inputs_embeds=embeds, position_ids=next_position + step, cache=cache,
                                use_cache=True).last_hidden_state
        else:
            hidden = lmme_decode(lm.decoder, embeds, result.state, cache)
        logits = lm.head(hidden)
        out.append(logits)
    return out


# --------------------------------------------------------------------------- rho = 1 check
@dataclass
class EquivalenceCheck:
    """LMME(4, keep) against the library forward on one prompt, prefill rows and decode steps."""

    context_tokens: int
    keep: float
    decode_steps: int
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float

    @property
    def relative_diff(self) -> float:
        return self.max_abs_diff / max(self.max_abs_logit, 1e-30)

    @property
    def passed(self) -> bool:
        return self.relative_diff <= self.tolerance

    def to_json(self) -> dict:
        return {**asdict(self), "relative_diff": self.relative_diff, "passed": self.passed}


def check_equivalence(lm: LanguageModel, context: int = 512, keep: float = 1.0, decode_steps: int = 4) -> EquivalenceCheck:
    """At keep = 1 LMME must reproduce the library's logits (every prefill row, then
    `decode_steps` steps fed the same tokens); keep < 1 shows what a real difference reads."""
    prompt = make_prompt(lm, context, seed=1)
    feed = torch.randint(0, lm.config.text.vocab_size, (1, decode_steps),
                         generator=torch.Generator(device=lm.device).manual_seed(2), device=lm.device)
    logits = {}
    with torch.inference_mode():
        for name, settings in (("library", None), ("lmme", LMMEConfig(True, 4, keep, 32))):
            cache = DynamicCache(config=lm.decoder.config)
            rows, result = prefill(lm, prompt, settings, cache, all_rows=True)
            steps = decode(lm, rows, prompt, result, cache, decode_steps, feed)
            logits[name] = (rows[:, -1:].float(), torch.cat(steps, 1).float(), rows.float())
    library, lmme = logits["library"], logits["lmme"]
    diffs = [(library[0] - lmme[0]).abs().max(), (library[1] - lmme[1]).abs().max()]
    if library[2].shape == lmme[2].shape:  # every prefill row, when none was dropped
        diffs.append((library[2] - lmme[2]).abs().max())
    return EquivalenceCheck(context, keep, decode_steps, float(max(diffs)), float(library[2].abs().max()),
                            RHO1_TOLERANCE[lm.dtype])


# --------------------------------------------------------------------------- measuring
def measure(lm: LanguageModel, prompt: Prompt, settings: LMMEConfig | None, meter: Meter, decode_tokens: int) -> dict:
    """One prefill + greedy decode: seconds, tokens/s, peak GiB, kept fraction, scoring share."""
    meter.reset()
    with torch.inference_mode():
        start = time.perf_counter()
        cache = DynamicCache(config=lm.decoder.config)
        logits, result = prefill(lm, prompt, settings, cache)
        logits.argmax(-1)  # the first new token is part of the time to it
        meter.sync()
        prefill_s = time.perf_counter() - start
        start = time.perf_counter()
        decode(lm, logits, prompt, result, cache, decode_tokens)
        meter.sync()
        decode_s = time.perf_counter() - start
    peak = meter.peak_gib()
    del cache
    return {
        "prefill_s": prefill_s, "decode_tok_s": decode_tokens / decode_s, "peak_gib": peak,
        "kept_fraction": result.retention.kept_fraction()[-1] if result is not None else 1.0,
        "scoring_share": result.scoring_seconds / prefill_s if result is not None else 0.0,
    }


@dataclass
class Budget:
    """Wall-clock allowance of the whole run in seconds (None: unlimited), counted from creation."""

    seconds: float | None
    clock: Callable[[], float] = time.perf_counter
    start: float = field(init=False)

    def __post_init__(self) -> None:
        self.start = self.clock()

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - (self.clock() - self.start)


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_table(lengths: list[int], variants: list[str], repeats: int, run_one: Callable[[int, str], dict],
              budget: Budget, cost: Callable[[int, str], float],
              on_length: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Measure every (length, variant) cell, alternating the variants within each repeat.

    `run_one(length, variant)` returns one measurement and raises `torch.OutOfMemoryError`
    when it runs out; `cost(length, variant)` scales the last run of that variant to predict a
    new one (a cell that no longer fits `budget` is skipped). Returns one row per cell with
    `status` "ok" (medians over `runs`), "oom" or "skipped"; `on_length` sees the rows so far.
    """
    rows: list[dict] = []
    last_run: dict[str, tuple[int, float]] = {}  # variant -> (length, seconds) of its latest run
    oom_at: dict[str, int] = {}
    for length in lengths:
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        status = {name: "ok" for name in variants}
        notes = {name: "" for name in variants}
        for name in variants:
            if name in oom_at:
                status[name], notes[name] = "oom", f"not tried: out of memory at {oom_at[name]} tokens"
        for _ in range(repeats):
            for name in variants:
                if status[name] != "ok":
                    continue
                if name in last_run:
                    previous, seconds = last_run[name]
                    predicted = seconds * cost(length, name) / cost(previous, name)
                    if predicted > budget.left():
                        if not runs[name]:
                            status[name], notes[name] = "skipped", f"time budget: predicted {predicted:.1f} s"
                        continue
                started = budget.clock()
                try:
                    runs[name].append(run_one(length, name))
                except torch.OutOfMemoryError as error:
                    status[name], notes[name] = "oom", str(error).splitlines()[0][:200]
                    oom_at[name] = length
                    runs[name].clear()
                if status[name] == "oom":
                    release_memory()  # outside the handler: the traceback no longer pins tensors
                else:
                    last_run[name] = (length, budget.clock() - started)
        for name in variants:
            rows.append(summarise(length, name, status[name], notes[name], runs[name]))
        if on_length is not None:
            on_length(rows)
    return rows


def summarise(length: int, variant: str, status: str, note: str, runs: list[dict]) -> dict:
    row = {"context_tokens": length, "variant": variant, "status": status, "runs": len(runs), "note": note}
    if runs:
        row.update({
            "prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
            "peak_gib": max(r["peak_gib"] for r in runs),
            "kept_fraction": runs[0]["kept_fraction"],
            "scoring_share": statistics.median(r["scoring_share"] for r in runs),
        })
    return row


def add_ratios(rows: list[dict], bound: Callable[[int, str], float]) -> None:
    """Speedup over the same length's baseline, the FLOP-model bound and their ratio."""
    baseline = {r["context_tokens"]: r for r in rows if r["variant"] == "baseline" and r["status"] == "ok"}
    for row in rows:
        row["flop_bound"] = bound(row["context_tokens"], row["variant"])
        reference = baseline.get(row["context_tokens"])
        ok = row["status"] == "ok" and reference is not None
        row["prefill_speedup"] = reference["prefill_s"] / row["prefill_s"] if ok else None
        row["speedup_over_bound"] = row["prefill_speedup"] / row["flop_bound"] if ok else None


# --------------------------------------------------------------------------- the paper
def paper_value(metric: str, variant: str, length: int) -> float | None:
    table = PAPER_TABLE_4A
    if length not in table["lengths"]:
        return None
    return table[metric][variant][table["lengths"].index(length)]


def compare_with_paper(rows: list[dict]) -> dict:
    """The ratios that survive a change of GPU: prefill speedup per length, memory at 2^15 and
    the longest context each variant reaches (ours: measured, paper: Table 4a)."""
    lengths = PAPER_TABLE_4A["lengths"]
    speedup = {}
    for variant in ("LMME(4,0.8)", "LMME(4,0.7)"):
        paper = {n: paper_value("prefill_s", "baseline", n) / paper_value("prefill_s", variant, n)
                 for n in lengths if paper_value("prefill_s", "baseline", n) is not None}
        ours = {r["context_tokens"]: r["prefill_speedup"] for r in rows if r["variant"] == variant}
        speedup[variant] = [{"context_tokens": n, "ours": ours.get(n), "paper": paper.get(n)}
                            for n in sorted(set(ours) | set(paper))]
    memory = {variant: {"ours_gib": next((r.get("peak_gib") for r in rows if r["variant"] == variant
                                          and r["context_tokens"] == 2**15), None),
                        "paper_g": paper_value("memory_g", variant, 2**15)} for variant in VARIANTS}
    longest = {}
    for variant in VARIANTS:
        mine = [r for r in rows if r["variant"] == variant]
        reached = [r["context_tokens"] for r in mine if r["status"] == "ok"]
        paper = [n for n in lengths if paper_value("prefill_s", variant, n) is not None]
        longest[variant] = {"ours": max(reached, default=None), "ours_longest_tried": max(r["context_tokens"] for r in mine),
                            "ours_first_failure": next(({"context_tokens": r["context_tokens"], "status": r["status"]}
                                                        for r in mine if r["status"] != "ok"), None),
                            "paper": max(paper)}
    return {"prefill_speedup": speedup, "memory_at_32768": memory, "longest_context": longest}


# --------------------------------------------------------------------------- profiling
def profile_target(rows: list[dict], threshold: float) -> dict | None:
    """The LMME row to profile: the longest length where a variant's speedup / bound < threshold
    (the lowest ratio there)."""
    slow = [r for r in rows if r["variant"] != "baseline" and r["speedup_over_bound"] is not None
            and r["speedup_over_bound"] < threshold]
    return min(slow, key=lambda r: (-r["context_tokens"], r["speedup_over_bound"]), default=None)


def profile_prefill(lm: LanguageModel, prompt: Prompt, settings: LMMEConfig) -> tuple[dict, str]:
    """One prefill under torch.profiler: where its time goes (the lmme.score / lmme.repad ranges
    of lyra/model/lmme.py, attention, the KV-cache appends, the top ops) and the full table."""
    from torch.profiler import ProfilerActivity, profile

    cuda = lm.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        start = time.perf_counter()
        prefill(lm, prompt, settings, DynamicCache(config=lm.decoder.config))
        if cuda:
            torch.cuda.synchronize(lm.device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()

    def self_ms(event) -> float:
        return (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3

    def total_ms(event) -> float:
        return (event.device_time_total if cuda else event.cpu_time_total) / 1e3

    clock = "device (CUDA kernels)" if cuda else "CPU"
    ranges = {e.key: round(total_ms(e), 3) for e in averages if e.key in ("lmme.score", "lmme.repad")}
    attention = sum(self_ms(e) for e in averages if "attention" in e.key.lower() or "flash" in e.key.lower())
    copies = sum(self_ms(e) for e in averages if e.key in ("aten::cat", "aten::copy_", "aten::gather"))
    ops = sorted(averages, key=self_ms, reverse=True)[:12]
    summary = {
        "clock": clock, "wall_ms": round(wall * 1e3, 3), "ranges_ms": ranges,
        "attention_self_ms": round(attention, 3), "cat_copy_gather_self_ms": round(copies, 3),
        "top_ops": [{"op": e.key, "self_ms": round(self_ms(e), 3), "calls": e.count} for e in ops],
    }
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    return summary, averages.table(sort_by=sort, row_limit=30)


def run_profile(lm: LanguageModel, rows: list[dict], threshold: float, budget: Budget, out: Path) -> dict:
    """Profile the `profile_target` row if it fits the budget; write OUT_profile.txt; the JSON part."""
    target = profile_target(rows, threshold)
    if target is None:
        return {"skipped": f"every LMME speedup measured is at least {threshold} of its FLOP bound"}
    where = {"context_tokens": target["context_tokens"], "variant": target["variant"],
             "speedup_over_bound": target["speedup_over_bound"]}
    if 2 * target["prefill_s"] > budget.left():  # the profiler slows it down
        return {"skipped": "time budget", **where}
    try:
        summary, table = profile_prefill(lm, make_prompt(lm, target["context_tokens"], seed=0), VARIANTS[target["variant"]])
    except torch.OutOfMemoryError:
        summary = None
    if summary is None:
        release_memory()
        return {"skipped": "out of memory under the profiler", **where}
    heading = f"{target['variant']} prefill at {target['context_tokens']} context tokens, {summary['clock']} time\n"
    atomic_write_text(out.parent / f"{out.name}_profile.txt", heading + json.dumps(summary, indent=1) + "\n\n" + table + "\n")
    print(heading + json.dumps(summary, indent=1), flush=True)
    return {**where, **summary}


# --------------------------------------------------------------------------- output
COLUMNS = ("context_tokens", "variant", "status", "prefill_s", "prefill_speedup", "flop_bound", "speedup_over_bound",
           "scoring_share", "decode_tok_s", "peak_gib", "kept_fraction")


COLOURS = {"baseline": (0, 0, 0), "LMME(4,0.8)": (49, 130, 189), "LMME(4,0.7)": (230, 85, 13)}


def draw_png(rows: list[dict], path: Path, title: str) -> None:
    """Four panels (prefill speedup, prefill s, decode tok/s, peak memory) against log2 context:
    ours thick with dots, the paper's Table 4a thin with squares; ours' OOM / skipped marked."""
    from PIL import Image, ImageDraw

    panels = (("prefill speedup over baseline", "prefill_speedup", None), ("prefill s", "prefill_s", "prefill_s"),
              ("decode tokens/s", "decode_tok_s", "decode_tok_s"), ("peak memory (ours GiB, paper G)", "peak_gib", "memory_g"))
    size, pad = (520, 340), 50
    picture = Image.new("RGB", (2 * size[0], 2 * size[1] + 40), "white")
    draw = ImageDraw.Draw(picture)
    draw.text((10, 10), title, fill="black")
    lengths = sorted({r["context_tokens"] for r in rows} | set(PAPER_TABLE_4A["lengths"]))
    low, high = math.log2(lengths[0]), math.log2(lengths[-1])
    for number, (label, ours_key, paper_key) in enumerate(panels):
        left, top = (number % 2) * size[0], 40 + (number // 2) * size[1]
        series = []
        for variant in VARIANTS:
            ours = [(r["context_tokens"], r.get(ours_key)) for r in rows if r["variant"] == variant]
            if paper_key is None:
                base = PAPER_TABLE_4A["prefill_s"]["baseline"]
                paper = [(n, b / v if b is not None else None) for n, b, v in
                         zip(PAPER_TABLE_4A["lengths"], base, PAPER_TABLE_4A["prefill_s"][variant])]
            else:
                paper = list(zip(PAPER_TABLE_4A["lengths"], PAPER_TABLE_4A[paper_key][variant]))
            series += [(variant, ours, True), (variant, paper, False)]
        peak = max((v for _, points, _ in series for _, v in points if v is not None), default=1.0) * 1.15

        def xy(length: int, value: float) -> tuple[float, float]:
            x = left + pad + (size[0] - 2 * pad) * (math.log2(length) - low) / max(1e-9, high - low)
            return x, top + size[1] - pad - (size[1] - 2 * pad) * value / peak

        draw.text((left + pad, top + 8), f"{label} (top {peak:.3g})", fill="black")
        draw.line(((left + pad, top + size[1] - pad), (left + size[0] - pad, top + size[1] - pad)), fill="black")
        draw.line(((left + pad, top + pad), (left + pad, top + size[1] - pad)), fill="black")
        for length in lengths:
            x, y = xy(length, 0)
            draw.text((x - 8, y + 4), f"2^{int(math.log2(length))}", fill="black")
        for variant, points, ours in series:
            colour = COLOURS[variant]
            placed = [xy(n, v) for n, v in points if v is not None]
            if len(placed) > 1:
                draw.line(placed, fill=colour, width=3 if ours else 1)
            for x, y in placed:
                if ours:
                    draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
                else:
                    draw.rectangle((x - 3, y - 3, x + 3, y + 3), outline=colour)
        for row in rows:
            if row["status"] != "ok" and ours_key != "prefill_speedup":
                x, _ = xy(row["context_tokens"], 0)
                offset = list(VARIANTS).index(row["variant"]) * 12
                draw.text((x - 10, top + pad + offset), row["status"].upper(), fill=COLOURS[row["variant"]])
    for index, variant in enumerate(VARIANTS):
        draw.text((size[0] + 110 * index, 10), variant, fill=COLOURS[variant])
    draw.text((size[0] + 330, 10), "thick, dots: ours; thin, squares: paper", fill="black")
    with atomic_file(path) as temporary:
        picture.save(temporary, format="PNG")


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (default: a mid-size 8-layer config)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384],
                        help="context tokens (64 instruction tokens come on top)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds for the whole run: cells predicted not to fit are recorded as skipped")
    parser.add_argument("--check-tokens", type=int, default=512, help="context of the rho = 1 check")
    parser.add_argument("--profile-below", type=float, default=0.9,
                        help="profile one length where an LMME speedup / FLOP bound is below this")
    parser.add_argument("--out", default="outputs/bench_lmme", help="writes OUT.json, OUT.png, OUT_profile.txt")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.decode_tokens < 1:
        parser.error("--repeats and --decode-tokens must be at least 1")
    if min(args.lengths) < 1:
        parser.error("--lengths must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.time_budget)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    config = bench_config(args.preset)
    reach = max(args.lengths) + INSTRUCTION_TOKENS + args.decode_tokens
    if reach > config.text.max_position_embeddings:  # base caps it at 32,768; the rotary tables go further
        config = bench_config(args.preset, {"text.max_position_embeddings": reach})
    if config.text.num_hidden_layers < 4:
        raise SystemExit(f"preset {args.preset!r} has {config.text.num_hidden_layers} layers; LMME(4, rho) needs at least 4")
    lm = build_language_model(config, device, dtype)
    out = Path(args.out)
    text = config.text
    params_per_layer = sum(p.numel() for p in lm.decoder.layers[0].parameters())
    total_params = sum(p.numel() for p in lm.decoder.parameters()) + (0 if text.tie_word_embeddings else lm.head.weight.numel())
    print(f"{device_name(device)}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.preset or 'mid-size'} LLM, {total_params / 1e9:.2f} B parameters, {args.dtype}, "
          f"attention {config.attn_implementation}", flush=True)

    check = check_equivalence(lm, args.check_tokens)
    print(f"rho=1 check ({check.context_tokens} context tokens + {check.decode_steps} decode steps): "
          f"max |logit diff| {check.max_abs_diff:.3g} = {check.relative_diff:.3g} of max |logit| "
          f"(tolerance {check.tolerance:g}): {'PASS' if check.passed else 'FAIL'}", flush=True)
    release_memory()

    meter = Meter(device)
    prompts: dict[int, Prompt] = {}

    def run_one(length: int, name: str) -> dict:
        if length not in prompts:
            prompts.clear()  # one length's prompt at a time
            release_memory()
            prompts[length] = make_prompt(lm, length, seed=length)
        return measure(lm, prompts[length], VARIANTS[name], meter, args.decode_tokens)

    def bound(length: int, name: str) -> float:
        return flop_bound(text.num_hidden_layers, params_per_layer, text.hidden_size, INSTRUCTION_TOKENS, length, VARIANTS[name])

    def cost(length: int, name: str) -> float:
        return prefill_flops(text.num_hidden_layers, params_per_layer, text.hidden_size, INSTRUCTION_TOKENS, length,
                             VARIANTS[name])

    warm_up = min(args.lengths)
    for name in VARIANTS:  # kernels, allocator and autotuning, before anything is timed
        run_one(warm_up, name)

    payload = {
        "device": device_name(device), "device_type": device.type, "dtype": args.dtype,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "preset": args.preset or "mid-size", "text": vars(config.text), "parameters": total_params,
        "attention": config.attn_implementation, "instruction_tokens": INSTRUCTION_TOKENS,
        "decode_tokens": args.decode_tokens, "repeats": args.repeats, "time_budget_s": args.time_budget,
        "memory": meter.kind, "command": "python scripts/bench_lmme.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rho1_check": check.to_json(), "paper_table_4a": PAPER_TABLE_4A,
    }

    def write(rows: list[dict]) -> None:
        add_ratios(rows, bound)
        payload.update(rows=rows, comparison=compare_with_paper(rows), wall_s=round(budget.clock() - budget.start, 1))
        atomic_write_json(out.with_suffix(".json"), payload)
        draw_png(rows, out.with_suffix(".png"), f"LMME on {payload['device']}, {payload['preset']} {args.dtype} "
                                                f"vs paper Table 4a (Lyra-Base, A100)")

    def report(rows: list[dict]) -> None:
        write(rows)
        for row in rows[-len(VARIANTS):]:
            print(json.dumps({k: row.get(k) for k in COLUMNS}), flush=True)

    rows = run_table(args.lengths, list(VARIANTS), args.repeats, run_one, budget, cost, on_length=report)
    prompts.clear()
    release_memory()
    print(markdown_table(rows, COLUMNS, "{:.3f}"))

    payload["profile"] = run_profile(lm, rows, args.profile_below, budget, out)
    write(rows)
    print(json.dumps(payload["comparison"], indent=1))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} in {payload['wall_s']} s")
    return 0 if check.passed else 1


if __name__ == "__main__":
    sys.exit(main())
