"""Strict weight loading with an error that says what does not fit, and where it came from;
the content hash that identifies a model's weights."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch
from torch import nn


def check_state_dict(expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str,
                     target: str = "this model", hint: str = "", optional: Iterable[str] = ()) -> None:
    """Raise a `ValueError` naming `source` when `state` lacks a key of `expected` (other than
    `optional` ones), has keys `expected` does not, or holds a tensor of another shape."""
    missing = sorted(set(expected) - set(state) - set(optional))
    unexpected = sorted(set(state) - set(expected))
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected:
        raise ValueError(f"{source} does not match {target}: {len(missing)} missing keys {_show(missing)}, "
                         f"{len(unexpected)} unexpected keys {_show(unexpected)}{hint}")
    if wrong:
        raise ValueError(f"{source}: tensors with other shapes than {target} has (key, file, model): "
                         f"{wrong[:4]}{hint}")


def _show(keys: list[str], n: int = 4) -> str:
    return str(keys[:n]) + (" ..." if len(keys) > n else "")


def weights_sha256(model: nn.Module, samples: int | None = None) -> str:
    """SHA-256 over every tensor of `model` (names, dtypes, shapes and bytes, in name order),
    plus the projector weights kept per MLoRA adapter. Reads each tensor once.

    With `samples`, a tensor contributes `samples` evenly spaced values rather than all of its
    bytes: a cheap fingerprint that still tells checkpoints, training steps and dtypes apart.
    """
    digest = hashlib.sha256()
    tensors = dict(model.state_dict())
    for adapter, state in getattr(model, "adapter_projectors", {}).items():
        tensors.update({f"adapter_projectors.{adapter}.{k}": v for k, v in state.items()})
    seen = set()  # tied weights (the LM head of a tied embedding) are read once
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        if (tensor.data_ptr(), tensor.shape) in seen and tensor.numel():
            continue
        seen.add((tensor.data_ptr(), tensor.shape))  # of the model's own storage, on any device
        flat = tensor.reshape(-1)
        if samples is not None:
            flat = flat[::max(1, flat.numel() // samples)][:samples]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(flat.contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()
