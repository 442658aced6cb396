"""Strict weight loading with an error that says what does not fit, and where it came from."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


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
