"""Stage 4 with everything but the speech generator frozen: each sample's answer states, once.

The speech generator reads the LLM's final hidden states of the answer tokens. When nothing
before it trains (LLM, adapters, encoders and projectors frozen, no dropout on their path), those
states are the same in every epoch, so they can be computed once per sample and reused: an epoch
then costs only the generator's own forward and backward. `cache_answer_states: true` in a
stage-4 config turns this on (12 epochs then cost about one). States
are kept in memory, keyed by the dataset index; `fill` computes every sample's up front (so that
the generator's input norm can start from the statistics of all of them), after which training
reads batches of cached states and target units (`dataset`, `collate`) and loads no media.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lyra.processing import IGNORE_INDEX


class AnswerStateCache:
    def __init__(self, model_inputs: Callable[[dict[str, Any]], dict[str, Any]]):
        self.model_inputs = model_inputs  # batch -> the keyword arguments of `answer_states`
        self.rows: dict[int, torch.Tensor] = {}  # dataset index -> [answer tokens, d]
        self.units: dict[int, torch.Tensor] = {}  # dataset index -> its target units

    @staticmethod
    def check_frozen(model: nn.Module) -> None:
        """Only the speech generator may train, or the cached states would go stale."""
        moving = sorted({name.split(".")[0] for name, p in model.named_parameters()
                         if p.requires_grad and not name.startswith("speech_generator.")})
        if moving:
            raise ValueError(f"cache_answer_states needs everything but the speech generator frozen; "
                             f"{moving} train too")

    def batch_states(self, model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The answer states `[B, A, d]` and mask `[B, A]` of a collated batch (computing the
        batch once if any sample is new)."""
        indices = batch["sample_indices"].tolist()
        if any(i not in self.rows for i in indices):
            states, mask = model.answer_states(**self.model_inputs(batch))
            for row, index in enumerate(indices):
                self.rows[index] = states[row, mask[row]].detach().float()  # the generator trains in fp32
                units = batch["tgt_units"][row]
                self.units[index] = units[units != IGNORE_INDEX]
        rows = [self.rows[i] for i in indices]
        states = nn.utils.rnn.pad_sequence(rows, batch_first=True)
        lengths = torch.tensor([len(r) for r in rows], device=states.device)
        return states, torch.arange(states.shape[1], device=states.device)[None] < lengths[:, None]

    def fill(self, model, batches: Iterable[dict[str, Any]], route: Callable[[dict[str, Any]], None]) -> None:
        """Compute the states of every sample in `batches` (each routed to its adapter first)."""
        for batch in batches:
            if batch.get("num_samples", 0):
                route(batch)
                self.batch_states(model, batch)

    def all_states(self) -> torch.Tensor:
        """Every cached answer state `[N, d]`."""
        return torch.cat(list(self.rows.values()))

    def dataset(self) -> list[int]:
        """The cached samples, as the indices that `collate` turns into batches."""
        return sorted(self.rows)

    def collate(self, indices: list[int]) -> dict[str, Any]:
        """A batch of cached samples: their indices and padded target units (no media)."""
        units = nn.utils.rnn.pad_sequence([self.units[i] for i in indices], batch_first=True,
                                          padding_value=IGNORE_INDEX)
        return {"sample_indices": torch.tensor(indices), "tgt_units": units, "num_samples": len(indices),
                "skipped": []}
