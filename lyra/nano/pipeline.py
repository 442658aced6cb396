"""Lyra-Nano's training pipeline: the nano task's data, two pretraining phases, then four through the one recipe.

    phase  config                          trains                                  data
    vision lyra/nano/configs/vision.yaml  ViT from scratch, on generator labels   training images
    sound  lyra/nano/configs/sound.yaml   sound projector, on generator labels    training sound clips
    base   lyra/nano/configs/base.yaml    LLM (scratch) + ViT (+ sound projector)  text questions, sounds
    stage1 lyra/nano/configs/stage1.yaml  speech projector (+ LCMR)               spoken questions
    stage2 lyra/nano/configs/stage2.yaml  "speech" MLoRA adapter + projector      multi-turn, one spoken
    stage4 lyra/nano/configs/stage4.yaml  CTC speech generator (Piper phonemes)    one question, answer units

The vision and sound phases are `lyra.nano.vision` and `lyra.nano.sound`
(pretraining loops with throw-away linear heads) on one fresh model, saved after the sound phase
with its ViT and sound projector pretrained; the base phase starts there.
Every later phase is `lyra.train.recipe.build_trainer` + `train` on its YAML, with the data path,
output folder and the previous phase's `final/` filled in; every phase's model shares one
frame cache, so the frozen Whisper encoder hears each recording once per process. The result
is copied to `out/model` with `out/model/nano_build.json`, whose `hash` (of the task spec, the
generated data, the model preset and the resolved training configs) decides whether a later
run may reuse it instead of training again.

    python -m lyra.nano.pipeline [--out outputs/nano] [--seed 0] [--force]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from lyra.config import PRESETS, load_config, load_yaml_config
from lyra.memory import keep_freed_memory
from lyra.model.lyra import LyraForConditionalGeneration
from lyra.model.speech import FrameCache
from lyra.nano.sound import SoundPretrainConfig, pretrain_sound
from lyra.nano.task import NanoTask, NanoTaskSpec, build_nano_task
from lyra.nano.vision import VisionPretrainConfig, pretrain_vision
from lyra.tokenizer import load_tokenizer
from lyra.train.config import load_train_config
from lyra.train.recipe import build_trainer, train
from lyra.utils.io import atomic_directory

CONFIGS = files("lyra.nano") / "configs"  # shipped with the package
PHASES = ("base", "stage1", "stage2", "stage4")
PHASE_CONFIGS = {phase: CONFIGS / f"{phase}.yaml" for phase in (*PHASES, "stage3")}  # stage 3: reproduce (d)
VISION_CONFIG = CONFIGS / "vision.yaml"
SOUND_CONFIG = CONFIGS / "sound.yaml"
BUILD_FILE = "nano_build.json"
DEFAULT_OUT = Path("outputs") / "nano"


def config_name(config) -> str:
    """How a phase's packaged config is shown: its path in the source tree."""
    return f"lyra/nano/configs/{config.name}"


@dataclass
class PhaseReport:
    phase: str
    seconds: float  # wall clock, building the trainer included
    cpu_seconds: float  # this process's CPU time (all threads)
    steps: int
    samples: int
    train_loss: float | None
    last_logs: dict[str, float] = field(default_factory=dict)


def phase_configs(task: NanoTask, runs_dir: Path, seed: int = 0, overrides: dict[str, dict[str, Any]] | None = None,
                  phases: tuple[str, ...] = PHASES, init_from: str | None = None):
    """The resolved `TrainConfig` of each phase: data, output and `init_from` filled in, then
    `overrides[phase]` (dotted keys, as `--set` takes them) applied."""
    configs = {}
    previous = init_from
    for phase in phases:
        values: dict[str, Any] = {"data.path": str(task.files[phase]), "output_dir": str(runs_dir / phase),
                                  "seed": seed, "init_from": previous}
        values.update((overrides or {}).get(phase, {}))
        config = load_train_config(PHASE_CONFIGS[phase], values)
        configs[phase] = config
        previous = str(Path(config.output_dir) / "final")
    return configs


def build_hash(task: NanoTask, configs: dict[str, Any], vision=None, sound=None) -> str:
    """What decides whether a trained nano model can be reused: the task (spec and generated
    data), the model preset file, the vision and sound pretraining configs and every phase's
    resolved training config, without the paths that say where this checkout put them (so
    that two checkouts of the same code give the same hash)."""

    def settings(config) -> dict[str, Any]:
        values = dataclasses.asdict(config)
        values.pop("output_dir"), values.pop("init_from"), values["data"].pop("path")
        return values

    blob = {
        "task_spec": task.manifest["spec_hash"],
        "task_data": task.manifest["data_hash"],
        "model_preset": hashlib.sha256((PRESETS / "nano.yaml").read_bytes()).hexdigest(),
        "vision": dataclasses.asdict(vision) if vision is not None else None,
        "sound": dataclasses.asdict(sound) if sound is not None else None,
        "phases": {phase: settings(config) for phase, config in configs.items()},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_build(model_dir: Path, wanted_hash: str) -> dict[str, Any] | None:
    """The build record of `model_dir` if it holds a complete model made with `wanted_hash`."""
    record = model_dir / BUILD_FILE
    if not record.is_file() or not (model_dir / "config.json").is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except ValueError:
        return None
    return data if data.get("hash") == wanted_hash else None


def run_encoder_phases(task: NanoTask, output_dir: Path, vision, sound, seed: int = 0, progress: bool = True,
                       frame_cache=None) -> list[PhaseReport]:
    """A fresh nano model whose ViT (lyra/nano/vision.py), then sound projector
    (lyra/nano/sound.py) are pretrained, saved to `output_dir/final` with the tokenizer
    for the base phase to start from. The sound phase fills `frame_cache`."""
    from transformers import set_seed

    set_seed(seed)
    model_config = load_config("nano")
    model = LyraForConditionalGeneration.from_config(model_config)
    if frame_cache is not None:
        model.frame_cache = frame_cache
    reports = []
    for phase, pretrain, config, config_file in (("vision", pretrain_vision, vision, VISION_CONFIG),
                                                 ("sound", pretrain_sound, sound, SOUND_CONFIG)):
        print(f"\n==> nano {phase}: {config_name(config_file)}", flush=True)
        wall, cpu = time.perf_counter(), time.process_time()
        report = pretrain(model, task, config, seed=seed, progress=progress)
        print(f"{phase} probes on held-out media: {report['held_out_probe_accuracy_after']}", flush=True)
        reports.append(PhaseReport(
            phase=phase, seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu,
            steps=config.steps, samples=config.steps * config.batch_size, train_loss=report["final_loss"],
            last_logs={k: v for k, v in report.items() if k.startswith("held_out")}))
    model.save_pretrained(output_dir / "final", tokenizer=load_tokenizer(model_config.tokenizer))
    return reports


def run_phase(phase: str, config, frame_cache=None) -> PhaseReport:
    """Train one phase with the recipe; the model shares `frame_cache` (frozen Whisper outputs)."""
    wall, cpu = time.perf_counter(), time.process_time()
    print(f"\n==> nano {phase}: {config_name(PHASE_CONFIGS[phase])} -> {config.output_dir}", flush=True)
    trainer = build_trainer(config)
    if frame_cache is not None:
        trainer.model.frame_cache = frame_cache
    train(trainer, config)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    summary = next((e for e in reversed(trainer.state.log_history) if "train_loss" in e), {})
    return PhaseReport(
        phase=phase, seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu,
        steps=trainer.state.global_step, samples=trainer.state.global_step * config.optim.batch_size,
        train_loss=summary.get("train_loss"), last_logs=history[-1] if history else {},
    )


def shared_frame_cache():
    """One frame cache for every phase of a process, sized by the nano preset."""
    mib = load_config("nano").speech.frozen_encoder_cache_mib
    return FrameCache(mib) if mib > 0 else None


def publish(final_dir: Path, model_dir: Path, record: dict[str, Any]) -> None:
    """Copy a phase's `final/` to `model_dir` (replacing it whole) with its build record."""
    with atomic_directory(model_dir) as staging:
        shutil.copytree(final_dir, staging, dirs_exist_ok=True)
        (staging / BUILD_FILE).write_text(json.dumps(record, indent=1) + "\n")


def train_nano(out: str | Path = DEFAULT_OUT, spec: NanoTaskSpec | None = None, seed: int = 0,
               force: bool = False, frame_cache=None, progress: bool = True) -> tuple[Path, dict[str, Any], bool]:
    """Generate the task and train every phase, unless `out/model` already holds this build.

    Returns (model directory, build record, whether it was reused).
    """
    out = Path(out)
    started = time.perf_counter()
    task = build_nano_task(out / "data", spec or NanoTaskSpec(), progress=progress)
    data_seconds = time.perf_counter() - started
    vision = load_yaml_config(VisionPretrainConfig, VISION_CONFIG)
    sound = load_yaml_config(SoundPretrainConfig, SOUND_CONFIG)
    encoders_dir = out / "runs" / "encoders"
    configs = phase_configs(task, out / "runs", seed, init_from=str(encoders_dir / "final"))
    wanted = build_hash(task, configs, vision, sound)
    model_dir = out / "model"
    if not force:
        record = cached_build(model_dir, wanted)
        if record is not None:
            return model_dir, record, True
    cache = frame_cache if frame_cache is not None else shared_frame_cache()
    reports = run_encoder_phases(task, encoders_dir, vision, sound, seed, progress, cache)
    reports += [run_phase(phase, configs[phase], cache) for phase in PHASES]
    record = {
        "hash": wanted, "seed": seed, "task": task.manifest,
        "data_seconds": round(data_seconds, 1),
        "phases": [dataclasses.asdict(r) for r in reports],
        "configs": {"vision": config_name(VISION_CONFIG), "sound": config_name(SOUND_CONFIG),
                    **{phase: config_name(PHASE_CONFIGS[phase]) for phase in PHASES}},
        "trained_at": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    publish(Path(configs[PHASES[-1]].output_dir) / "final", model_dir, record)
    return model_dir, record, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lyra.nano.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="train again even if the build hash matches")
    args = parser.parse_args(argv)
    keep_freed_memory()
    model_dir, record, reused = train_nano(args.out, seed=args.seed, force=args.force)
    print(f"{'reused' if reused else 'trained'} {model_dir} (build {record['hash']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
