"""The one training recipe behind `scripts/train_stage{1,2,3,4}.py`.

    deepspeed scripts/train_stage2.py --config configs/train/stage2_base.yaml      # GPUs
    deepspeed --num_gpus 2 scripts/train_stage2.py --config configs/train/stage2_tiny.yaml   # 2 CPU processes
    python scripts/train_stage2.py --config configs/train/stage2_tiny.yaml --resume

Stage k starts from stage k-1's `final/` (set `init_from`). The run writes
`output_dir/checkpoint-N/` (light: what trains, optimiser and RNG state, and the base's hash;
`--resume` rebuilds the base and checks it, lyra/train/checkpoint.py), `output_dir/final/`
(what inference loads: config.json, safetensors in the training precision, adapters/,
tokenizer) and `output_dir/train_config.yaml`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from lyra.config import LMMEConfig, load_config, parse_overrides
from lyra.data.collate import BadSampleTracker, LyraCollator
from lyra.data.dataset import LyraDataset
from lyra.data.vision import VisionLimits
from lyra.memory import keep_freed_memory
from lyra.model import mlora
from lyra.model.lyra import LyraForConditionalGeneration, checkpoint_tokenizer_source
from lyra.processing import LyraProcessor
from lyra.tokenizer import load_tokenizer
from lyra.train.answer_states import AnswerStateCache
from lyra.train.checkpoint import BaseRecord
from lyra.train.config import DTYPES, STAGES, TrainConfig, dump_train_config, load_train_config
from lyra.train.model_setup import configure_trainable, enable_gradient_checkpointing, train_in_fp32
from lyra.train.trainer import (
    LyraTrainer,
    last_complete_checkpoint,
    model_inputs,
    single_process_distributed_env,
    trainable_table,
)
from lyra.utils.state_dict import weights_sha256

logger = logging.getLogger("lyra.train")


def checkpoint_source(config: TrainConfig) -> str | None:
    """The checkpoint folder a stage starts from (`init_from`, or `model` naming a folder), if any."""
    return config.init_from or (config.model if Path(config.model).is_dir() else None)


def base_source(config: TrainConfig) -> str:
    """Where a stage's frozen base comes from, in words (recorded in every checkpoint)."""
    source = checkpoint_source(config)
    if source:
        return str(Path(source).resolve())
    if config.qwen2vl:
        return f"qwen2vl {Path(config.qwen2vl).resolve()} + whisper {Path(config.whisper or '').resolve()}"
    return f"preset {config.model} (random weights)"


def build_model(config: TrainConfig) -> LyraForConditionalGeneration:
    """The model a stage starts from: the previous stage's output, a checkpoint, real
    Qwen2-VL + Whisper weights, or a preset with random weights."""
    source = checkpoint_source(config)
    if source:
        model = LyraForConditionalGeneration.from_pretrained(source)
    elif config.qwen2vl:
        if not config.whisper:
            raise ValueError("qwen2vl is set but whisper is not: give the Whisper checkpoint too")
        model = LyraForConditionalGeneration.from_qwen2vl(config.qwen2vl, config.whisper,
                                                          base_config=load_config(config.model))
    else:
        model = LyraForConditionalGeneration.from_config(load_config(config.model))
    if config.lcmr_weight is not None:
        model.config.lcmr.weight = config.lcmr_weight
    if config.lmme:
        model.config.lmme = LMMEConfig.parse(config.lmme)
    return model


def answer_state_inputs(batch: dict) -> dict:
    """What `LyraForConditionalGeneration.answer_states` takes from a collated batch."""
    inputs = model_inputs(batch)
    for key in ("transcript_ids", "transcript_speech_index", "tgt_units"):
        inputs.pop(key, None)
    return inputs


def training_arguments(config: TrainConfig, report_to: str):
    from transformers import TrainingArguments

    optim = config.optim
    return TrainingArguments(
        output_dir=config.output_dir,
        per_device_train_batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.grad_accum,
        learning_rate=optim.lr,
        weight_decay=optim.weight_decay,
        warmup_steps=optim.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type=optim.scheduler,
        num_train_epochs=optim.epochs,
        max_steps=optim.max_steps,
        max_grad_norm=optim.max_grad_norm,
        adam_beta2=optim.adam_beta2,
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        bf16=config.precision == "bf16",
        deepspeed=config.deepspeed,
        report_to=[] if report_to == "none" else [report_to],
        run_name=config.run_name or Path(config.output_dir).name,
        seed=config.seed,
        data_seed=config.seed,
        dataloader_num_workers=config.data.workers,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # every trainable parameter has a gradient each step (trainer.py)
        use_cpu=not torch.cuda.is_available(),
    )


def parse_args(stage: int, argv: list[str] | None):
    parser = argparse.ArgumentParser(prog=f"train_stage{stage}.py",
                                     description=f"Lyra stage {stage}: {STAGES[stage]}. " + __doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config", required=True, help="a configs/train/*.yaml")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="resume from the newest complete checkpoint in output_dir (or the one given)")
    parser.add_argument("--report-to", default=None, help="wandb (offline by default) | tensorboard | none")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.max_steps=10 (YAML syntax)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed
    return parser.parse_args(argv)


def run(stage: int, argv: list[str] | None = None) -> int:
    args = parse_args(stage, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not torch.cuda.is_available():
        keep_freed_memory()  # CPU training: no page faults on every large tensor (lyra/memory.py)
    try:
        overrides = parse_overrides(args.set)
        if args.output_dir:
            overrides["output_dir"] = args.output_dir
        config = load_train_config(args.config, overrides)
        if config.stage != stage:
            raise ValueError(f"{args.config} is a stage-{config.stage} config; run scripts/train_stage{config.stage}.py")
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report_to = args.report_to or config.report_to
    if report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    if config.deepspeed and "RANK" not in os.environ:
        single_process_distributed_env()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not config.group_by_modality_length:
        print("error: with several processes set group_by_modality_length: true, so that every rank runs "
              "the same modules in a step (gradient reduction depends on it)", file=sys.stderr)
        return 2
    try:
        trainer = build_trainer(config, report_to)
        checkpoint = resume_point(trainer, Path(config.output_dir), args.resume)
    except (ValueError, FileNotFoundError) as error:  # bad config, data or checkpoint: say which and stop
        print(f"error: {error}", file=sys.stderr)
        return 2
    return train(trainer, config, checkpoint)


def build_trainer(config: TrainConfig, report_to: str = "none") -> LyraTrainer:
    """Model, data and trainer for a stage, with the trainable-parameter table printed."""
    from transformers import set_seed

    set_seed(config.seed)  # new weights (a preset, LoRA A matrices) are the same on every run
    model = build_model(config)
    base = BaseRecord(source=base_source(config), seed=config.seed, sha256=weights_sha256(model))
    configure_trainable(model, config)
    train_in_fp32(model)
    enable_gradient_checkpointing(model, config)
    source = checkpoint_source(config)
    tokenizer_source = checkpoint_tokenizer_source(source, model.config) if source else model.config.tokenizer
    tokenizer = load_tokenizer(tokenizer_source)
    data = config.data
    limits = VisionLimits(image_max_pixels=data.image_max_pixels, video_max_pixels=data.video_max_pixels,
                          video_min_pixels=min(VisionLimits().video_min_pixels, data.video_max_pixels))
    processor = LyraProcessor(tokenizer, model.config, limits)
    dataset = LyraDataset(data.path, processor, root=data.root, image_root=data.image_root,
                          audio_root=data.audio_root, model_max_length=data.model_max_length,
                          on_bad_sample=data.on_bad_sample)
    answer_states = None
    if config.cache_answer_states:
        AnswerStateCache.check_frozen(model)
        answer_states = AnswerStateCache(answer_state_inputs)
    print(f"Lyra stage {config.stage}: {STAGES[config.stage]}\n{trainable_table(model)}", flush=True)
    return LyraTrainer(
        model=model, args=training_arguments(config, report_to), train_dataset=dataset,
        data_collator=LyraCollator.from_processor(processor), tokenizer=tokenizer,
        projector_lr=config.optim.projector_lr, tracker=BadSampleTracker(max_fraction=data.max_bad_fraction),
        group_by_modality_length=config.group_by_modality_length,
        route_adapters=bool(mlora.adapter_names(model)) and not (config.trainable.adapter or config.trainable.llm),
        answer_states=answer_states, base=base,
    )


def resume_point(trainer: LyraTrainer, output_dir: Path, resume: str | Path | None) -> Path | None:
    """The checkpoint to resume from ("auto": the newest complete one in `output_dir`), checked
    to be light and trained on the base this trainer's model was built from."""
    if resume is None:
        return None
    if resume == "auto":
        checkpoint = last_complete_checkpoint(output_dir)
        if checkpoint is None:
            print(f"--resume: no complete checkpoint in {output_dir}; starting from scratch", flush=True)
            return None
    else:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise FileNotFoundError(f"--resume: checkpoint folder not found: {checkpoint}")
    trainer.check_checkpoint_base(checkpoint)
    return checkpoint


def train(trainer: LyraTrainer, config: TrainConfig, resume: str | Path | None = None) -> int:
    """Train (optionally resuming: "auto" or a checkpoint folder) and write `output_dir/final/`:
    the whole model in the training precision, loadable by `from_pretrained` and `lyra.chat`.
    Afterwards the model is in that precision too (without DeepSpeed)."""
    output_dir = Path(config.output_dir)
    model = trainer.model
    checkpoint = resume_point(trainer, output_dir, resume)
    if trainer.args.should_save:  # only now: a refused resume leaves the run's record as it was
        dump_train_config(config, output_dir / "train_config.yaml")
    if trainer.answer_states is not None:  # (on resume, the checkpoint's input norm replaces the one set here)
        trainer.prepare_answer_states()
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    dtype = DTYPES[config.precision]
    # Cast in place, tensor by tensor: a cast copy of every weight beside the fp32 ones would
    # add half the model's fp32 size to the peak memory. Under ZeRO-3 every rank holds a shard:
    # gather the full weights (all ranks take part).
    if trainer.is_deepspeed_enabled:
        state = trainer.accelerator.get_state_dict(trainer.deepspeed)
        for key, tensor in state.items():
            state[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    else:
        state = None
        model.to(dtype)
    if trainer.args.should_save:
        model.save_pretrained(output_dir / "final", state_dict=state, tokenizer=trainer.tokenizer_to_save,
                              dtype=dtype)
        print(f"{trainer.tracker.summary()}\nsaved {output_dir / 'final'}", flush=True)
    return 0
