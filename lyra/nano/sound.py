"""Sound-projector pretraining for Lyra-Nano: the stand-in for the audio-text alignment a real
sound path has before instruction tuning (Qwen2-Audio's pretraining).

Trained only inside the base phase, with a from-scratch LLM, the sound projector never learned
the nano task's clips: the base phase spends few steps on sound, and the LLM answered every clip
alike (0 % held-out, docs/nano_results.md), although a linear probe on the frozen Whisper frames
of the same clips separates every class. This phase trains the projector (the Whisper encoder
stays frozen) on the generator's labels of each training clip -- how many beeps, their pitch,
and the kind of sound -- through linear heads on the mean of its tokens, which are then thrown
away. The clips' encoder frames go into the shared frame cache, so the base phase that follows
does not encode them again. Held-out clips (pitches and lengths no training clip has) are only
scored.

    config = load_yaml_config(SoundPretrainConfig, files("lyra.nano") / "configs" / "sound.yaml")
    report = pretrain_sound(model, task, config)  # trains model.sound_projector in place
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lyra.config import config_dataclass
from lyra.data.audio import load_audio
from lyra.nano.task import SOUNDS, NanoTask
from lyra.nano.vision import warmup_cosine

KINDS = ("beep", "rise", "fall", "noise")
PITCHES = ("low", "high")
NO_LABEL = -100  # the count and pitch of a sweep or a noise burst


@config_dataclass
class SoundPretrainConfig:
    steps: int = 80
    batch_size: int = 16  # clips per step
    lr: float = 2.0e-3
    warmup_steps: int = 8


def clip_labels(sound_class: str) -> tuple[int, int, int]:
    """(kind, beep count - 1, pitch) of a `SOUNDS` class; count and pitch only for beeps."""
    if sound_class not in SOUNDS:
        raise ValueError(f"unknown sound class {sound_class!r}; known: {sorted(SOUNDS)}")
    if sound_class.startswith("beep"):
        return KINDS.index("beep"), int(sound_class[4]) - 1, PITCHES.index(sound_class.split("_")[1])
    return KINDS.index(sound_class), NO_LABEL, NO_LABEL


class SoundProbes(torch.nn.Module):
    """Linear heads on the mean of a clip's projected tokens `[N, d]`: kind, beep count, pitch."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.kind = torch.nn.Linear(hidden_size, len(KINDS))
        self.count = torch.nn.Linear(hidden_size, 3)
        self.pitch = torch.nn.Linear(hidden_size, len(PITCHES))

    def loss_and_hits(self, pooled: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, list[bool]]]:
        """`pooled`: `[N, d]`; `labels`: `[N, 3]` (kind, count, pitch; `NO_LABEL` where none)."""
        losses, hits = [], {}
        for column, (name, head) in enumerate((("kind", self.kind), ("count", self.count), ("pitch", self.pitch))):
            target = labels[:, column]
            labelled = target != NO_LABEL
            if labelled.any():
                logits = head(pooled[labelled])
                losses.append(F.cross_entropy(logits, target[labelled]))
                hits[name] = (logits.argmax(-1) == target[labelled]).tolist()
        return torch.stack(losses).sum(), hits


def load_clips(task: NanoTask, split: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The waveforms of the task's `split` sound clips (read as the dataset reads them, so the
    frame cache keys match) and their `[N, 3]` labels."""
    media = task.media()
    paths = sorted(p for p, c in media.items() if c["kind"] == "sound" and p.startswith(f"sounds/{split}/"))
    waveforms = [torch.from_numpy(load_audio(task.root / p)) for p in paths]
    labels = torch.tensor([clip_labels(media[p]["class"]) for p in paths])
    return waveforms, labels


def pretrain_sound(model, task: NanoTask, config: SoundPretrainConfig, seed: int = 0,
                   progress: bool = True) -> dict[str, Any]:
    """Train `model.sound_projector` in place on the task's training clips; returns a report
    with the probes' accuracy on held-out clips before and after."""
    torch.manual_seed(seed)
    encoder = model.sound_encoder if model.sound_encoder is not None else model.speech_encoder
    trainable = [p.requires_grad for p in encoder.parameters()]
    encoder.requires_grad_(False)  # frozen, so its frames are cached once per clip
    train_clips, train_labels = load_clips(task, "train")
    eval_clips, eval_labels = load_clips(task, "eval")
    probes = SoundProbes(model.config.text.hidden_size)
    parameters = [*model.sound_projector.parameters(), *probes.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)

    def forward(waveforms, labels):
        pooled = torch.stack([tokens.mean(0) for tokens in model.encode_sound(waveforms)])
        return probes.loss_and_hits(pooled, labels)

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            _, hits = forward(eval_clips, eval_labels)
        return {name: round(sum(h) / len(h), 4) for name, h in hits.items()}

    with torch.no_grad():  # every training clip through the frozen encoder once, with a progress bar
        for clip in tqdm(train_clips, desc="nano sound: encoding clips (Whisper)", disable=not progress, leave=False):
            model.encode_sound([clip])
    before = evaluate()
    started = time.perf_counter()
    bar = tqdm(range(config.steps), desc="nano sound: projector pretraining", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = config.lr * warmup_cosine(step, config.steps, config.warmup_steps)
        batch = torch.randint(len(train_clips), (config.batch_size,), generator=generator)
        loss, _ = forward([train_clips[i] for i in batch.tolist()], train_labels[batch])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    for parameter, flag in zip(encoder.parameters(), trainable):
        parameter.requires_grad_(flag)
    return {"steps": config.steps, "seconds": round(time.perf_counter() - started, 1), "final_loss": loss.item(),
            "held_out_probe_accuracy_before": before, "held_out_probe_accuracy_after": evaluate()}
