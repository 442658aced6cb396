"""`make reproduce-nano`: the paper's claims in miniature, on Lyra-Nano and the nano task.

Starts from the demo's build (`python -m lyra.nano.demo`, trained here if missing) and writes
docs/nano_results.md (tables, with the command that made each) and a JSON of every number:

  (a) Table 3 -- stage 1 with CE only vs CE + lambda * LCMR: spoken- vs text-question accuracy;
  (b) Table 6 -- stage 2 on speech-only data, MLoRA vs a full fine-tune of the LLM: does the full
      fine-tune forget image-text skills that MLoRA keeps?
  (c) Tables 4/8 -- LMME(4, 0.7) vs no pruning: accuracy and prefill time (real decoding);
  (d) Fig. 6 -- a spoken question hidden in long real speech (needle), length x depth heatmap:
      the demo model's "speech" adapter, then stage 3's "long_speech" adapter (trained here).

(a) and (b) retrain the stage over `--seeds` and report mean and spread; seed 0 of (a)'s
paper setting (LCMR on) is the demo's own stage 1.

    python -m lyra.nano.reproduce [--out outputs/nano] [--seeds 0,1,2] [--doc docs/nano_results.md]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lyra.config import LMMEConfig
from lyra.data.audio import load_audio, write_wav
from lyra.data.vision import VisionLimits
from lyra.eval.needle import build_haystack, draw_heatmap, grid_scores, load_background, trial_id
from lyra.inference import load_model
from lyra.memory import keep_freed_memory
from lyra.model import mlora
from lyra.nano.evaluate import evaluate_nano, generate_answers
from lyra.nano.long_speech import LongSpeechSpec, build_long_speech
from lyra.nano.pipeline import DEFAULT_OUT, PHASE_CONFIGS, phase_configs, run_phase, shared_frame_cache, train_nano
from lyra.nano.task import NanoTaskSpec, all_spoken, build_nano_task
from lyra.processing import LyraProcessor, collate
from lyra.train.config import load_train_config
from lyra.utils.io import atomic_write_text

COMMAND = "python -m lyra.nano.reproduce"


def mean_spread(values: list[float]) -> str:
    """'mean ± sd (n)' in percent."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f} (n=1)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n={len(values)})"


def evaluate(model_dir: Path, task, cache, variants: tuple[str, ...]) -> dict:
    model, tokenizer, _ = load_model(str(model_dir), device="cpu", dtype="fp32")
    model.frame_cache = cache
    accuracy = evaluate_nano(model, tokenizer, task.files["eval"], variants=variants, batch_size=32, progress=False)
    return accuracy.as_dict()


def train_variant(task, runs: Path, phase: str, seed: int, init_from: str, overrides: dict, cache) -> Path:
    """One phase, trained once per (name, seed): reused when its `final/` exists."""
    config = phase_configs(task, runs, seed, {phase: overrides}, phases=(phase,), init_from=init_from)[phase]
    final = Path(config.output_dir) / "final"
    if not (final / "config.json").is_file():
        run_phase(phase, config, cache)
    return final


def lcmr_ablation(task, out: Path, work: Path, seeds: list[int], cache) -> dict:
    """Stage 1 from the demo's base model with lambda = 0 and the config's lambda."""
    weight = load_train_config(PHASE_CONFIGS["stage1"]).lcmr_weight
    base = str(out / "runs" / "base" / "final")
    text = evaluate(Path(base), task, cache, ("text",))["text"]["image"]  # stage 1 leaves the LLM as it is
    rows = {}
    for name, lam in (("CE only", 0.0), (f"CE + {weight} LCMR", weight)):
        results = []
        for seed in seeds:
            if lam == weight and seed == 0:
                final = out / "runs" / "stage1" / "final"
            else:
                final = train_variant(task, work / f"lcmr{lam:g}_seed{seed}", "stage1", seed, base,
                                      {"lcmr_weight": lam}, cache)
            acc = evaluate(final, task, cache, ("speech", "voice"))
            results.append({"seed": seed, "speech": acc["speech"]["image"], "voice": acc["voice"]["image"],
                            "speech_by_type": acc["speech"]["by_type"]})
        rows[name] = {"lambda": lam, "runs": results}
    return {"text_image_accuracy": text, "rows": rows}


def speech_only_stage2(task, work: Path) -> Path:
    """Stage 2's records with every question asked in speech: training on them alone gives a full
    fine-tune of the LLM nothing that holds its text-question skills in place."""
    path = work / "stage2_speech_only.json"
    if not path.is_file():
        atomic_write_text(path, json.dumps([all_spoken(r) for r in task.records("stage2")], indent=0) + "\n")
    return path


def mlora_ablation(task, out: Path, work: Path, seeds: list[int], cache, full_lr: float, epochs: int) -> dict:
    """Stage 2 from the demo's stage 1 on speech-only data for `epochs` epochs: the "speech" LoRA
    adapter vs training the whole LLM. What a full fine-tune forgets shows as text-question accuracy
    below the base model's; MLoRA's text answers are the base model's by construction."""
    stage1 = str(out / "runs" / "stage1" / "final")
    base_text = evaluate(out / "runs" / "base" / "final", task, cache, ("text",))["text"]
    data = {"data.path": str(speech_only_stage2(task, work)), "data.root": str(task.root), "optim.epochs": epochs}
    rows = {}
    settings = (("mlora", "MLoRA (speech adapter, r=16)", data),
                ("full", f"full fine-tune of the LLM (lr {full_lr:g})",
                 {**data, "trainable.adapter": None, "trainable.llm": True, "optim.lr": full_lr}))
    for key, name, overrides in settings:
        results = []
        for seed in seeds:
            final = train_variant(task, work / f"stage2_speech_only_{key}_seed{seed}", "stage2", seed, stage1,
                                  overrides, cache)
            acc = evaluate(final, task, cache, ("text", "speech"))
            results.append({"seed": seed, "text": acc["text"]["image"], "speech": acc["speech"]["image"],
                            "text_by_type": acc["text"]["by_type"]})
        rows[name] = {"overrides": {k: v for k, v in overrides.items() if not k.startswith("data.")}, "runs": results}
    return {"base_text": base_text["image"], "base_text_by_type": base_text["by_type"], "epochs": epochs,
            "records": len(task.records("stage2")), "rows": rows}


def lmme_comparison(task, model_dir: Path, cache, limit: int) -> dict:
    model, tokenizer, _ = load_model(str(model_dir), device="cpu", dtype="fp32")
    model.frame_cache = cache
    rows = {}
    for name, lmme in (("no pruning", None), ("LMME(4, 0.7)", LMMEConfig.parse("4,0.7"))):
        row = {}
        for variant in ("text", "speech"):
            accuracy, prefill = generate_answers(model, tokenizer, task.files["eval"], variants=(variant,), lmme=lmme,
                                                 limit=limit, progress=False)
            row[variant] = {"accuracy": accuracy.value(variant), "asked": accuracy.count(variant),
                            "prefill_ms_median": 1000 * statistics.median(prefill)}
        rows[name] = row
    return rows


def background_speech() -> Path:
    """The real 30 s two-speaker call shipped with pyannote.audio (installed by `make setup`)."""
    spec = importlib.util.find_spec("pyannote.audio")
    path = Path(spec.submodule_search_locations[0]) / "sample" / "sample.wav" if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError("the needle background is pyannote.audio's sample.wav; run `make setup` to install it")
    return path


def long_speech_stage(task, work: Path, model_dir: Path, cache) -> tuple[Path, dict]:
    """Stage 3 from the demo model: the "long_speech" adapter on questions hidden in chatter
    (lyra/nano/long_speech.py); reused while its config, data spec and the build match."""
    spec = LongSpeechSpec()
    data = build_long_speech(task, spec)
    key = hashlib.sha256(PHASE_CONFIGS["stage3"].read_bytes() + spec.fingerprint().encode()).hexdigest()[:12]
    config = load_train_config(PHASE_CONFIGS["stage3"], {"data.path": str(data), "init_from": str(model_dir),
                                                         "output_dir": str(work / f"stage3-{key}")})
    final = Path(config.output_dir) / "final"
    if not (final / "config.json").is_file():
        run_phase("stage3", config, cache)
    return final, {"records": spec.records, "clean_records": spec.clean_records,
                   "seconds": [spec.min_seconds, spec.max_seconds], "epochs": config.optim.epochs}


def needle_grid(task, model_dir: Path, cache, lengths: list[float], depths: list[float], samples: int,
                image_path: Path, adapter: str = "speech") -> dict:
    """A held-out spoken question, hidden at `depth` in `length` seconds of a real conversation,
    about a held-out image, heard through MLoRA `adapter`; a trial scores when the greedy answer
    is the right one."""
    model, tokenizer, _ = load_model(str(model_dir), device="cpu", dtype="fp32")
    model.frame_cache = cache
    mlora.use_adapter(model, adapter)
    processor = LyraProcessor(tokenizer, model.config, VisionLimits())
    background = load_background([background_speech()])
    questions = [r for r in task.records("eval") if r["id"].endswith("-last-speech") and r.get("image")]
    records, clean = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for record in questions[:samples]:  # the same questions, clean, for reference
            clean.append(_ask(model, processor, tokenizer, task.root / record["image"],
                              task.root / record["speech"][0]) == record["meta"]["answers"][0])
        for length in lengths:
            for depth in depths:
                for k, record in enumerate(questions[:samples]):
                    needle = load_audio(task.root / record["speech"][0])
                    audio, at = build_haystack(background, needle, length, depth, offset_seconds=7.0 * k)
                    wav = Path(tmp) / f"{trial_id(length, depth, k)}.wav"
                    write_wav(wav, audio)
                    reply = _ask(model, processor, tokenizer, task.root / record["image"], wav)
                    records.append({"length": length, "depth": depth, "sample": k, "needle_at": round(at, 2),
                                    "score": float(reply == record["meta"]["answers"][0]), "reply": reply,
                                    "answer": record["meta"]["answers"][0]})
    scores = grid_scores(records, lengths, depths)
    image = draw_heatmap(scores, lengths, depths, title=f"Lyra-Nano, {adapter} adapter: spoken question in long speech")
    image.save(image_path)
    return {"adapter": adapter, "lengths": lengths, "depths": depths, "samples": samples, "scores": scores,
            "trials": records, "clean_accuracy": sum(clean) / len(clean)}


def _ask(model, processor, tokenizer, image: Path, speech) -> str:
    messages = [{"role": "user", "content": "<image>\n<speech>"}]
    sample = processor(messages, images=[image], speech=[speech])
    batch = collate([sample], model.config.tokens.pad, padding_side="left")
    with torch.no_grad():
        new = model.generate(**batch, max_new_tokens=8)
    return tokenizer.decode(new[0], skip_special_tokens=True).strip()


def write_doc(path: Path, report: dict, argv: str) -> None:
    a, b, c, d, long = report["lcmr"], report["mlora"], report["lmme"], report["needle"], report["needle_long"]
    lines = [
        "# Lyra-Nano: the paper's claims in miniature",
        "",
        f"Made by `{argv}` in {report['seconds'] / 60:.1f} min on {report['machine']}. Model: the demo's build "
        f"`{report['build']}` (`make demo`); every number is held-out accuracy (exact match of the greedy answer) "
        "on content never seen in training (lyra/nano/task.py). Image questions = colour, shape, count, "
        "word, ink. Spread is the standard deviation over seeds.",
        "",
        "## (a) LCMR (paper Table 3): stage 1 with and without the latent cross-modality regularizer",
        "",
        f"Stage 1 (speech projector only, `lyra/nano/configs/stage1.yaml`) from the same base model, seeds "
        f"{report['seeds']}. Text questions go through the frozen base LLM: {100 * a['text_image_accuracy']:.1f} %.",
        "",
        "| stage 1 loss | spoken, training voices | spoken, held-out voice | gap to text (training voices) |",
        "|---|---|---|---|",
    ]
    for name, row in a["rows"].items():
        speech = [r["speech"] for r in row["runs"]]
        voice = [r["voice"] for r in row["runs"]]
        gap = [a["text_image_accuracy"] - s for s in speech]
        lines.append(f"| {name} | {mean_spread(speech)} | {mean_spread(voice)} | {mean_spread(gap)} |")
    lines += [
        "",
        "## (b) MLoRA vs full fine-tune (paper Table 6): is image-text ability kept?",
        "",
        f"Stage 2 (`lyra/nano/configs/stage2.yaml`) from the same stage-1 model, seeds {report['seeds']}, on "
        f"speech-only data: its {b['records']} records with every question asked in speech, {b['epochs']} epochs "
        "(the demo's stage 2 mixes text and spoken turns for 1 epoch, which gives a full fine-tune little to "
        f"forget). The base model answers text questions about images at {100 * b['base_text']:.1f} %. With "
        "MLoRA, text requests run with the adapter off, so they are the base model's answers by construction; "
        "the full fine-tune's text column shows what training the LLM on speech alone does to them.",
        "",
        "| stage 2 | text questions (image) | spoken questions (image) |",
        "|---|---|---|",
    ]
    for name, row in b["rows"].items():
        lines.append(f"| {name} | {mean_spread([r['text'] for r in row['runs']])} | "
                     f"{mean_spread([r['speech'] for r in row['runs']])} |")
    lines += [
        "",
        "## (c) LMME (paper Tables 4 and 8): accuracy and prefill time",
        "",
        "Real greedy decoding with the demo model, batch 1, on the first held-out questions; prefill = time to "
        "the first new token (median). Nano prompts are short (9 image tokens, 150 per 30 s of speech), so "
        "pruning has little to save here; `scripts/bench_lmme.py` measures long contexts.",
        "",
        "| setting | text: accuracy | text: prefill ms | spoken: accuracy | spoken: prefill ms |",
        "|---|---|---|---|---|",
    ]
    for name, row in c.items():
        t, s = row["text"], row["speech"]
        lines.append(f"| {name} | {100 * t['accuracy']:.1f} % ({t['asked']}) | {t['prefill_ms_median']:.1f} | "
                     f"{100 * s['accuracy']:.1f} % ({s['asked']}) | {s['prefill_ms_median']:.1f} |")
    lines += [
        "",
        "## (d) Needle in long speech (paper Fig. 6)",
        "",
        f"A held-out spoken question (training voice) is hidden at a depth of a real two-speaker call "
        f"(pyannote.audio's sample, cycled), and asked together with its held-out image; {d['samples']} questions "
        "per cell, heard through one MLoRA adapter for the whole grid. The demo model's \"speech\" adapter "
        "only ever trained on spoken questions alone in one 30 s window. Stage 3 "
        "(`lyra/nano/configs/stage3.yaml`, from the demo model) trains the \"long_speech\" adapter on "
        f"{long['training']['records']} training questions hidden in {long['training']['seconds'][0]:g}-"
        f"{long['training']['seconds'][1]:g} s of TTS chatter (`lyra/nano/long_speech.py`) and "
        f"{long['training']['clean_records']} of stage 2's records, {long['training']['epochs']} epoch(s); the real "
        "call is never trained on.",
    ]
    for grid, picture in ((d, "nano_needle.png"), (long, "nano_needle_long.png")):
        lines += [
            "",
            f"**{grid['adapter']} adapter** (the same questions, clean: {100 * grid['clean_accuracy']:.0f} % right)",
            "",
            f"![needle heatmap, {grid['adapter']} adapter]({picture})",
            "",
            "| depth \\ length (s) | " + " | ".join(f"{x:g}" for x in grid["lengths"]) + " |",
            "|---|" + "---|" * len(grid["lengths"]),
        ]
        for depth, row in zip(grid["depths"], grid["scores"]):
            lines.append(f"| {depth:g} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in row) + " |")
    lines += ["", "## Reading the results", "", report.get("discussion", ""), ""]

    atomic_write_text(path, "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--seeds", default="0,1,2", help="three seeds: ~20 min on 2 cores")
    parser.add_argument("--full-ft-lr", type=float, default=2e-4)
    parser.add_argument("--forgetting-epochs", type=int, default=2,
                        help="epochs of speech-only stage 2 in (b), MLoRA vs full fine-tune")
    parser.add_argument("--lmme-limit", type=int, default=150, help="held-out questions per variant for (c)")
    parser.add_argument("--needle-lengths", default="10,30,60,120,240")
    parser.add_argument("--needle-depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--needle-samples", type=int, default=2)
    parser.add_argument("--doc", default="docs/nano_results.md", help="where the results page is written")
    parser.add_argument("--json", default=None, help="default: <out>/reproduce_nano.json")
    args = parser.parse_args(argv)
    keep_freed_memory()
    started = time.perf_counter()
    out = Path(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]

    model_dir, build, _ = train_nano(out)
    task = build_nano_task(out / "data", NanoTaskSpec())
    cache = shared_frame_cache()
    doc = Path(args.doc)
    report = {"build": build["hash"], "seeds": seeds, "machine": _machine()}
    work = out / "ablations" / build["hash"]  # variants trained from this build only
    print("==> (a) LCMR ablation (stage 1)", flush=True)
    report["lcmr"] = lcmr_ablation(task, out, work, seeds, cache)
    print("==> (b) MLoRA vs full fine-tune (stage 2)", flush=True)
    report["mlora"] = mlora_ablation(task, out, work, seeds, cache, args.full_ft_lr, args.forgetting_epochs)
    print("==> (c) LMME", flush=True)
    report["lmme"] = lmme_comparison(task, model_dir, cache, args.lmme_limit)
    print("==> (d) needle in long speech", flush=True)
    grid = ([float(x) for x in args.needle_lengths.split(",")], [float(x) for x in args.needle_depths.split(",")],
            args.needle_samples)
    report["needle"] = needle_grid(task, model_dir, cache, *grid, doc.parent / "nano_needle.png")
    print("==> (d) stage 3: the long_speech adapter, then the needle again", flush=True)
    stage3, training = long_speech_stage(task, work, model_dir, cache)
    report["needle_long"] = needle_grid(task, stage3, cache, *grid, doc.parent / "nano_needle_long.png",
                                        adapter="long_speech")
    report["needle_long"]["training"] = training
    report["seconds"] = time.perf_counter() - started
    report["discussion"] = discussion(report)
    json_path = Path(args.json) if args.json else out / "reproduce_nano.json"
    json_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    write_doc(doc, report, " ".join([COMMAND, *(argv if argv is not None else sys.argv[1:])]))
    print(doc.read_text())
    print(f"wrote {doc} and {json_path} ({report['seconds'] / 60:.1f} min)")
    return 0


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def effect(label: str, first: list[float], second: list[float]) -> str:
    """`label` named as an effect only when the means differ by more than their spreads:
    "X ± a % vs Y ± b %", then "higher"/"lower", or "within the spread over N seeds"."""
    (m1, s1), (m2, s2) = mean_sd(first), mean_sd(second)
    shown = f"{100 * m2:.1f} ± {100 * s2:.1f} % vs {100 * m1:.1f} ± {100 * s1:.1f} %"
    if abs(m2 - m1) <= s1 + s2:
        return f"{label}: {shown}, a difference within the spread over {len(first)} seeds (no effect shown)"
    return f"{label}: {shown}, {'higher' if m2 > m1 else 'lower'} by more than the spread over {len(first)} seeds"


def discussion(report: dict) -> str:
    """What each ablation shows, computed from the numbers (never written by hand): an effect is
    named only when it exceeds the spread over seeds."""
    a, b, c = report["lcmr"]["rows"], report["mlora"]["rows"], report["lmme"]
    needle = {key: report[key] for key in ("needle", "needle_long")}
    ce, lc = list(a.values())
    ml, ft = list(b.values())
    base = report["mlora"]["base_text"]
    full, pruned = c["no pruning"], c["LMME(4, 0.7)"]
    prefill = (full["speech"]["prefill_ms_median"], pruned["speech"]["prefill_ms_median"])
    return "\n".join([
        "- (a) " + effect("LCMR, spoken-question accuracy after stage 1 (LCMR vs CE only)",
                          [r["speech"] for r in ce["runs"]], [r["speech"] for r in lc["runs"]]) + ".",
        "- (b) " + effect("After speech-only stage 2, text questions about images (full fine-tune vs MLoRA)",
                          [r["text"] for r in ml["runs"]], [r["text"] for r in ft["runs"]])
        + f"; base {100 * base:.1f} %. MLoRA keeps the base's text accuracy by construction (its adapter is "
        "off for text questions), so this comparison measures only what a full fine-tune forgets. "
        + effect("Spoken questions (full fine-tune vs MLoRA)",
                 [r["speech"] for r in ml["runs"]], [r["speech"] for r in ft["runs"]]) + ".",
        f"- (c) LMME(4, 0.7) changes accuracy by {100 * (pruned['speech']['accuracy'] - full['speech']['accuracy']):+.1f} "
        f"points on spoken questions and {100 * (pruned['text']['accuracy'] - full['text']['accuracy']):+.1f} on text "
        f"(one run); prefill {prefill[0]:.1f} -> {prefill[1]:.1f} ms (spoken): "
        + ("faster" if prefill[1] < 0.9 * prefill[0] else "no speed-up at nano's prompt lengths") + ".",
        "- (d) Needle found (mean over the grid; per length " + ", ".join(f"{x:g}" for x in needle["needle"]["lengths"])
        + " s): " + "; ".join(f"{grid['adapter']} adapter {100 * _grid_mean(grid['scores']):.0f} % ("
                             + ", ".join(f"{100 * v:.0f}" for v in _column_means(grid['scores'])) + ")"
                             for grid in needle.values()) + ".",
    ])


def _column_means(scores: list[list[float | None]]) -> list[float]:
    return [statistics.mean(v for v in column if v is not None) for column in zip(*scores)]


def _grid_mean(scores: list[list[float | None]]) -> float:
    return statistics.mean(v for row in scores for v in row if v is not None)


def _machine() -> str:
    return f"{platform.machine()} CPU, {os.cpu_count()} cores"


if __name__ == "__main__":
    sys.exit(main())
