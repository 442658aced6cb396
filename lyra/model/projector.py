"""Audio projector: concatenate runs of encoder frames, then a two-layer MLP.

Whisper gives 1500 frames per 30 s window; concatenating k = 5 of them yields 300
LLM tokens per window (the paper's §3.4 choice), each of width 5 * d_enc.
"""

from __future__ import annotations

import torch
from torch import nn

from lyra.config import ProjectorConfig


class FrameConcatProjector(nn.Module):
    """`[N, T, d_enc]` encoder frames -> `[N, T // k, d_llm]` LLM embeddings."""

    def __init__(self, encoder_width: int, llm_width: int, config: ProjectorConfig):
        super().__init__()
        self.frames_per_token = config.frames_per_token
        self.fc1 = nn.Linear(encoder_width * config.frames_per_token, config.hidden_size)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(config.hidden_size, llm_width)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        n, t, d = frames.shape  # (N, T, d_enc)
        k = self.frames_per_token
        usable = t - t % k  # trailing frames that do not fill a run are dropped
        stacked = frames[:, :usable].reshape(n, usable // k, d * k)  # (N, T/k, k*d_enc)
        return self.fc2(self.act(self.fc1(stacked.to(self.fc1.weight.dtype))))
