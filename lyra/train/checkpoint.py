"""Light training checkpoints: what was trained, plus a record of the frozen base it applies to.

A stage trains a small part of the model (stage 1: the projector, 0.6 % of Lyra-Mini), so
`checkpoint-N/` holds only

    trainable.safetensors   the trainable parameters and the model's buffers (plain names)
    base.json               where the frozen base came from and the SHA-256 of its weights
    optimizer/scheduler/RNG/trainer state, as transformers' Trainer writes them

and `--resume` rebuilds the model from the same base (the stage's `init_from`, checkpoint or
preset and seed), checks that its weights hash to the recorded value and loads the trainable
state over it. A base whose weights changed since is an error, never a silent mix.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from lyra.utils.io import atomic_file, atomic_write_json
from lyra.utils.state_dict import check_state_dict

BASE_FILE = "base.json"
TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class BaseRecord:
    """The frozen base a checkpoint applies to: how it was built and what its weights hash to."""

    source: str  # the init_from / checkpoint directory, or "preset <name>" / "qwen2vl <dir> + whisper <file>"
    seed: int  # what random weights of a preset (and new LoRA matrices) were drawn with
    sha256: str  # of every tensor of the base as loaded (`weights_sha256`)

    def write(self, folder: Path) -> None:
        atomic_write_json(folder / BASE_FILE, asdict(self))

    @classmethod
    def read(cls, folder: Path) -> "BaseRecord":
        path = folder / BASE_FILE
        if not path.is_file():
            raise ValueError(f"{folder} is not a light checkpoint (no {BASE_FILE}): it was written by an older Lyra "
                             "that saved the whole model; restart the stage from its init_from instead of resuming")
        try:
            return cls(**json.loads(path.read_text()))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path} is not a valid base record ({error}); the checkpoint is damaged") from None

    def check_matches(self, built: "BaseRecord", checkpoint: Path) -> None:
        """Raise unless the base built now is the one the checkpoint was trained on."""
        if built.sha256 != self.sha256:
            raise ValueError(
                f"{checkpoint} was trained on the base {self.source} (seed {self.seed}), whose weights hash to "
                f"sha256 {self.sha256}, but the model built now from {built.source} (seed {built.seed}) hashes to "
                f"sha256 {built.sha256}: resuming would mix the trained weights with another base. Resume with the "
                f"init_from/model and seed recorded in {checkpoint / BASE_FILE}, or start a new run in another "
                "output_dir")


def trainable_names(model: nn.Module) -> list[str]:
    """State-dict names of what a light checkpoint holds: trainable parameters and persistent
    buffers (running statistics such as the speech generator's input norm live in buffers)."""
    names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    persistent = set(model.state_dict(keep_vars=True))
    return names + [name for name, _ in model.named_buffers() if name in persistent]


def gather_trainable_state(model: nn.Module, zero3: bool) -> dict[str, torch.Tensor]:
    """Copies of the trainable state on the CPU. Under ZeRO-3 only these parameters' shards are
    gathered (every rank must call this), never the frozen base's."""
    parameters = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    names = trainable_names(model)
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([parameters[n] for n in names if n in parameters], modifier_rank=None):
            return _copies(names, parameters, buffers)
    return _copies(names, parameters, buffers)


def _copies(names, parameters, buffers) -> dict[str, torch.Tensor]:
    return {n: (parameters.get(n) if n in parameters else buffers[n]).detach().to("cpu", copy=True).contiguous()
            for n in names}


def write_trainable_state(folder: Path, state: dict[str, torch.Tensor], base: BaseRecord) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / TRAINABLE_FILE) as temporary:
        save_file(state, str(temporary))
    base.write(folder)


def load_trainable_state(model: nn.Module, folder: Path) -> None:
    """Load `folder/trainable.safetensors` over the rebuilt base, in place. The keys must be
    exactly what this model trains: another stage's or config's checkpoint is an error."""
    from safetensors.torch import load_file

    path = folder / TRAINABLE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; the checkpoint is incomplete")
    state = load_file(str(path))
    live = model.state_dict()
    check_state_dict({name: live[name] for name in trainable_names(model)}, state, str(path),
                     "what this run trains", ". Resume with the config the run was started with")
    with torch.no_grad():
        for name, tensor in state.items():
            live[name].copy_(tensor)
