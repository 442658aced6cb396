"""Typed training configuration, one YAML per stage and size in `configs/train/`.

Defaults follow the paper's Table 7. YAML is strict (lyra/config.py): an unknown key or a value
of the wrong type is an error naming it; overrides are dotted (`--set optim.lr=1e-4`). The
resolved configuration is written next to every run as `train_config.yaml`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch
import yaml

from lyra.config import ConfigError, config_dataclass, load_yaml_config
from lyra.utils.io import atomic_write_text

STAGES = {
    0: "base model from scratch (models without pretrained weights, e.g. the small presets): LLM + ViT on text/image data",
    1: "speech-text alignment: projector only (+ LCMR)",
    2: "multi-modal SFT: speech projector + LLM through the 'speech' MLoRA adapter (+ LCMR)",
    3: "long speech: a 'long_speech' adapter from the base LLM + its projector",
    4: "speech generation: the CTC speech generator only",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # `precision` (and the benchmarks' --dtype) -> dtype


@config_dataclass
class DataSection:
    path: str = ""  # LLaVA-style JSON / JSONL
    root: str | None = None  # base of relative media paths (default: the JSON's folder)
    image_root: str | None = None
    audio_root: str | None = None
    model_max_length: int = 8192
    on_bad_sample: str = "skip"  # skip (logged, counted) | raise
    max_bad_fraction: float = 0.05  # stop the run when more samples than this are bad
    image_max_pixels: int = 1280 * 28 * 28
    video_max_pixels: int = 768 * 28 * 28
    workers: int = 2


@config_dataclass
class TrainableSection:
    """What a stage trains; everything else is frozen."""

    speech_projector: bool = True
    sound_projector: bool = False
    adapter: str | None = None  # MLoRA adapter to add and train: "speech" | "long_speech"
    adapter_r: int = 64
    adapter_alpha: int = 16
    adapter_dropout: float = 0.05
    llm: bool = False  # full fine-tune of the LLM (the MLoRA ablation; not a paper stage)
    vit: bool = False  # the vision tower (only for models trained from scratch)
    speech_generator: bool = False


@config_dataclass
class OptimSection:
    lr: float = 2e-4
    projector_lr: float | None = None  # None: same as lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 1  # per device
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    adam_beta2: float = 0.999  # lower (0.98) for short runs from scratch: the step size adapts faster


@config_dataclass
class TrainConfig:
    stage: int = 1
    model: str = "tiny"  # a preset, or a checkpoint directory
    init_from: str | None = None  # the previous stage's output directory (its `final/`)
    qwen2vl: str | None = None  # build from a local Qwen2-VL checkpoint (stage 1) ...
    whisper: str | None = None  # ... and Whisper weights
    output_dir: str = "outputs/run"
    data: DataSection = field(default_factory=DataSection)
    trainable: TrainableSection = field(default_factory=TrainableSection)
    optim: OptimSection = field(default_factory=OptimSection)
    lcmr_weight: float | None = None  # overrides the model config's lcmr.weight
    lmme: str | None = None  # e.g. "4,0.7": prune context tokens while training
    precision: str = "fp32"  # fp32 | bf16 (fp16 does not exist on CPU); final/ is written in it
    gradient_checkpointing: bool = False
    # Stage 4 with only the speech generator training: compute each sample's answer states once
    # and reuse them every epoch (lyra/train/answer_states.py); memory grows with the data.
    cache_answer_states: bool = False
    deepspeed: str | None = None  # a configs/deepspeed/*.json
    group_by_modality_length: bool = True
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    seed: int = 42
    report_to: str = "wandb"  # wandb (offline unless WANDB_MODE says otherwise) | tensorboard | none
    run_name: str | None = None

    def validate(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {sorted(STAGES)}, got {self.stage}")
        if self.precision not in DTYPES:
            raise ValueError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if not self.data.path:
            raise ValueError("data.path is required: the training JSON")
        if self.stage > 1 and not (self.init_from or Path(self.model).is_dir()):
            raise ValueError(f"stage {self.stage} starts from stage {self.stage - 1}'s output: set init_from")


def load_train_config(path: str | Path | Traversable, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """A stage's config from its YAML with dotted `overrides` (`{"optim.lr": 1e-4}`), checked."""
    source = Path(path) if isinstance(path, str) else path
    if not source.is_file():
        raise FileNotFoundError(f"training config not found: {path}")
    config = load_yaml_config(TrainConfig, source, overrides)
    try:
        config.validate()
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    return config


def dump_train_config(config: TrainConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
