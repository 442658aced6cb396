"""One training step of a long speech sample, baseline against LMME(4, 0.7) (paper Table 4b, per step).

The stage-2 recipe as `configs/train/stage2_base.yaml` sets it up (speech LoRA r 64 and the
speech projector train, the LLM is frozen, gradient checkpointing on), applied by the
training code itself (`lyra.train.model_setup`) to a model with random weights. A sample
is N speech tokens (noise through the real Whisper encoder and projector: 30 s windows of
`speech_tokens_per_clip` tokens, as many as fit in N minus the text), a 64-token
instruction and a 64-token answer that carries the labels. A step is forward + backward
+ gradient clipping + AdamW, timed after warm-up steps, baseline and LMME alternating.
`--long-speech-lengths` runs the stage-3 recipe instead (`stage3_base.yaml`: the
"long_speech" adapter, r 128). LCMR is off (no transcript): the step is what LMME changes.

Per cell: ms per step (mean and sd over --repeats), peak memory (CUDA max allocated, or
the process's peak RSS on CPU), LMME's speedup and its ratio to the FLOP-model bound of the
LLM layers (`lyra.bench.flop_bound`, the one bench_lmme uses), and what the step ratio
predicts for a run (see RUN_PREDICTION). A cell that runs out of GPU memory is recorded as OOM.

    python scripts/bench_train_step.py                               # CPU: mid-size model, 4k and 8k
    python scripts/bench_train_step.py --preset base --dtype bf16 --device cuda \\
        --lengths 8192 16384 32768 --long-speech-lengths 25000        # GPU: Lyra-Base dimensions
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers

from lyra.bench import Meter, bench_config, device_name, flop_bound, markdown_table, random_model
from lyra.config import LMMEConfig, LyraConfig
from lyra.model.speech import CLIP_SAMPLES
from lyra.train.config import DTYPES, TrainConfig, load_train_config
from lyra.train.model_setup import configure_trainable, enable_gradient_checkpointing
from lyra.utils.io import atomic_write_json

INSTRUCTION_TOKENS = 64
ANSWER_TOKENS = 64
VARIANTS = {"baseline": LMMEConfig(enabled=False), "LMME(4,0.7)": LMMEConfig(True, 4, 0.7, 32)}
PAPER_TABLE_4B = {"Lyra-MM-1.5M (stage 2)": -0.38, "long speech (stage 3)": -0.54}
RUN_PREDICTION = (
    "The paper's -38 % / -54 % are whole training runs. A run made only of samples like a cell "
    "changes its time by at most step_ratio - 1 (predicted_run_change): data loading, logging and "
    "checkpointing do not shrink. Lyra-MM-1.5M mixes short samples (images, short speech) with "
    "long ones, and LMME saves little on short context, so its run change is the time-weighted mean "
    "of the step changes over its length mix, smaller than that of its longest cell. Long speech "
    "(stage 3, up to 25,000 tokens) is the case where one long cell stands for most of a run."
)

CPU_MEMORY_NOTE = ("; reset to the current RSS before each step, and the heap that earlier steps freed stays "
                   "resident, so on CPU it does not separate the variants")


@dataclass
class Sample:
    """One long training sample: `[1, L]` ids / mask / labels and its `[T]` waveform."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    speech: list[torch.Tensor]
    speech_tokens: int

    def inputs(self, settings: LMMEConfig) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels,
                "speech": self.speech, "lmme": settings, "return_logits": False}


def long_sample(config: LyraConfig, length: int, device: torch.device, seed: int = 0) -> Sample:
    """A sample of at most `length` tokens: whole 30 s windows of speech, then instruction and answer."""
    text = INSTRUCTION_TOKENS + ANSWER_TOKENS
    per_clip = config.speech_tokens_per_clip
    clips = (length - text) // per_clip
    if clips < 1:
        raise ValueError(f"--lengths {length}: too short for one 30 s window ({per_clip} tokens) plus {text} "
                         "text tokens; give a longer length")
    generator = torch.Generator().manual_seed(seed)
    speech_tokens = clips * per_clip
    words = torch.randint(0, min(config.text.vocab_size, config.tokens.pad), (text,), generator=generator)
    ids = torch.cat([torch.full((speech_tokens,), config.tokens.speech), words])[None]
    labels = torch.full_like(ids, -100)
    labels[0, -ANSWER_TOKENS:] = ids[0, -ANSWER_TOKENS:]
    waveform = 0.1 * torch.randn(clips * CLIP_SAMPLES, generator=generator)
    return Sample(ids.to(device), torch.ones_like(ids, device=device), labels.to(device), [waveform.to(device)],
                  speech_tokens)


@dataclass
class Setup:
    """A model set up by a stage's recipe, with its optimiser."""

    recipe: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    train_config: TrainConfig
    trainable: int


def set_up(config: LyraConfig, recipe: Path, device: torch.device, dtype: torch.dtype) -> Setup:
    """Random weights, then what the stage does: trainable parts, precision, checkpointing.
    In bf16 every weight is bf16, as DeepSpeed's bf16 mode casts the module."""
    train_config = load_train_config(recipe)
    model = random_model(config, device, dtype)
    configure_trainable(model, train_config)
    model.to(dtype)  # the new LoRA weights too
    enable_gradient_checkpointing(model, train_config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = train_config.optim
    optimizer = torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay,
                                  betas=(0.9, optim.adam_beta2))
    return Setup(recipe.stem, model, optimizer, train_config, sum(p.numel() for p in params))


def train_step(setup: Setup, sample: Sample, settings: LMMEConfig, dtype: torch.dtype) -> float:
    """Forward + backward + clip + AdamW step; returns the loss."""
    device_type = sample.input_ids.device.type
    # bf16 runs under autocast as the Trainer's do: the float32 log-mel meets bf16 conv weights
    with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        loss = setup.model(**sample.inputs(settings)).loss
    loss.backward()
    params = [p for group in setup.optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, setup.train_config.optim.max_grad_norm)
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def timed_step(setup: Setup, sample: Sample, settings: LMMEConfig, dtype: torch.dtype, meter: Meter) -> dict:
    """One step's seconds and peak memory, or `{"oom": True}` when the GPU runs out of memory."""
    meter.reset()
    start = time.perf_counter()
    try:
        loss = train_step(setup, sample, settings, dtype)
    except torch.OutOfMemoryError:
        setup.optimizer.zero_grad(set_to_none=True)
        if meter.device.type == "cuda":
            torch.cuda.empty_cache()
        return {"oom": True}
    meter.sync()
    return {"oom": False, "seconds": time.perf_counter() - start, "peak_gib": meter.peak_gib(), "loss": loss}


def llm_layer_params(setup: Setup) -> int:
    """Frozen weights of one LLM layer (LoRA excluded), what the FLOP model charges per token."""
    layer = setup.model.backbone.model.language_model.layers[0]
    return sum(p.numel() for name, p in layer.named_parameters() if "lora_" not in name)


def measure_cell(setup: Setup, length: int, args, meter: Meter, dtype: torch.dtype) -> list[dict]:
    """Rows for one (recipe, length): baseline and LMME, alternating, after warm-up steps."""
    config = setup.model.config
    sample = long_sample(config, length, meter.device)
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for name, settings in VARIANTS.items():
        for _ in range(args.warmup):
            timed_step(setup, sample, settings, dtype, meter)
    for _ in range(args.repeats):
        for name, settings in VARIANTS.items():  # alternate, so drift hits both alike
            if not any(run["oom"] for run in runs[name]):
                runs[name].append(timed_step(setup, sample, settings, dtype, meter))
    text = config.text
    rows = []
    for name, settings in VARIANTS.items():
        bound = flop_bound(text.num_hidden_layers, llm_layer_params(setup), text.hidden_size,
                           INSTRUCTION_TOKENS + ANSWER_TOKENS, sample.speech_tokens,
                           settings if settings.enabled else None)
        rows.append(summarise(setup, sample, name, runs[name], bound))
    base, lmme = rows
    if not (base["oom"] or lmme["oom"]):
        ratio = lmme["ms_per_step"] / base["ms_per_step"]
        lmme.update(step_ratio=round(ratio, 3), speedup=round(1 / ratio, 3),
                    speedup_over_bound=round(1 / ratio / lmme["flop_bound"], 3),
                    predicted_run_change=round(ratio - 1, 3))
        base.update(step_ratio=1.0, speedup=1.0, speedup_over_bound=1.0, predicted_run_change=0.0)
    for row in rows:
        print(row, flush=True)
    return rows


def summarise(setup: Setup, sample: Sample, name: str, runs: list[dict], bound: float) -> dict:
    row = {"recipe": setup.recipe, "tokens": int(sample.input_ids.shape[1]), "speech_tokens": sample.speech_tokens,
           "variant": name, "oom": any(run["oom"] for run in runs), "flop_bound": round(bound, 3)}
    if row["oom"]:
        return row
    ms = [1000 * run["seconds"] for run in runs]
    row.update(ms_per_step=round(statistics.mean(ms), 1), ms_sd=round(statistics.stdev(ms), 1) if len(ms) > 1 else 0.0,
               peak_gib=round(max(run["peak_gib"] for run in runs), 3), loss=round(runs[-1]["loss"], 4))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="model preset (default: bench_lmme's mid-size CPU config)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[4096, 8192], help="stage-2 sample lengths")
    parser.add_argument("--long-speech-lengths", type=int, nargs="*", default=[],
                        help="stage-3 (long speech) sample lengths, e.g. 25000")
    parser.add_argument("--stage2-config", type=Path, default=Path("configs/train/stage2_base.yaml"))
    parser.add_argument("--stage3-config", type=Path, default=Path("configs/train/stage3_base.yaml"))
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant and cell")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    parser.add_argument("--json", type=Path, default=Path("outputs/bench_train_step.json"))
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    started = time.perf_counter()
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    config = bench_config(args.preset)
    meter = Meter(device)
    rows = []
    for recipe, lengths in ((args.stage2_config, args.lengths), (args.stage3_config, args.long_speech_lengths)):
        if not lengths:
            continue
        setup = set_up(config, recipe, device, dtype)
        print(f"{recipe}: {setup.trainable:,} trainable parameters, gradient checkpointing "
              f"{setup.train_config.gradient_checkpointing}", flush=True)
        for length in lengths:
            rows.extend(measure_cell(setup, length, args, meter, dtype))
            write_json(args, argv, config, device, rows, started)  # after every cell: a run cut short keeps them
        del setup
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown_table(rows))
    print(f"wrote {args.json} ({time.perf_counter() - started:.1f} s)")
    return 0


def write_json(args, argv: list[str] | None, config: LyraConfig, device: torch.device, rows: list[dict],
               started: float) -> None:
    payload = {
        "device": device_name(device), "device_type": device.type, "dtype": args.dtype,
        "preset": args.preset or "mid-size", "text": asdict(config.text),
        "speech_tokens_per_clip": config.speech_tokens_per_clip,
        "instruction_tokens": INSTRUCTION_TOKENS, "answer_tokens": ANSWER_TOKENS,
        "warmup": args.warmup, "repeats": args.repeats,
        "peak_memory": Meter(device).kind + ("" if device.type == "cuda" else CPU_MEMORY_NOTE),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "command": "python scripts/bench_train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "wall_s": round(time.perf_counter() - started, 1),
        "paper_table_4b_run_change": PAPER_TABLE_4B, "run_prediction": RUN_PREDICTION, "rows": rows,
    }
    atomic_write_json(args.json, payload)


if __name__ == "__main__":
    sys.exit(main())
