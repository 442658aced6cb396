"""Whisper's audio encoder as a plain module, with openai-whisper's parameter names.

Lyra only needs the encoder half of Whisper, so it owns that network here instead of
importing it: building a model (on any device, `meta` included) then needs neither
openai-whisper nor its triton requirement. The parameter names are openai-whisper's
`AudioEncoder`'s (`conv1`, `blocks.N.attn.query`, `blocks.N.mlp.0`, `ln_post`, ...), so its
checkpoints and ours load into each other unchanged; `tests/test_model.py` checks the
outputs against openai-whisper's own encoder.

    log-mel [N, n_mels, 3000] -> conv (stride 2) -> [N, 1500, width] -> blocks -> LayerNorm
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.audio_utils import mel_filter_bank

from lyra.data.audio import SAMPLE_RATE

N_FFT = 400  # 25 ms window at 16 kHz


def mel_filterbank(n_mels: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`[n_mels, N_FFT // 2 + 1]` Slaney mel filters: the same numbers openai-whisper ships (and
    librosa's `filters.mel` computes; transformers' numpy version spares the model librosa and numba)."""
    filters = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                              max_frequency=SAMPLE_RATE / 2, sampling_rate=SAMPLE_RATE, norm="slaney",
                              mel_scale="slaney")
    return torch.from_numpy(np.ascontiguousarray(filters.T, dtype=np.float32)).to(device)


def sinusoids(length: int, channels: int, max_timescale: float = 10_000.0) -> torch.Tensor:
    """`[length, channels]` fixed positional embedding: sines then cosines over log-spaced periods."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inverse = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inverse[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _LayerNorm(nn.LayerNorm):
    """LayerNorm in float32 whatever the activations' and the weights' dtype (as Whisper was
    trained); a model cast to bf16 as a whole (DeepSpeed's bf16 mode) has bf16 weights here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention; the key projection has no bias (Whisper's layout)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width, bias=False)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, C/H)
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: self-attention, then a 4x GELU MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.attn_ln = _LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.mlp_ln = _LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class WhisperAudioEncoder(nn.Module):
    """Whisper's encoder: `[N, n_mels, 2 * n_ctx]` log-mel -> `[N, n_ctx, width]` frames."""

    def __init__(self, n_mels: int, n_ctx: int, width: int, heads: int, layers: int):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, width, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(width, width, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, width))
        self.blocks = nn.ModuleList(EncoderBlock(width, heads) for _ in range(layers))
        self.ln_post = _LayerNorm(width)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (N, n_ctx, width)
        if x.shape[1:] != self.positional_embedding.shape:
            raise ValueError(f"log-mel of {mel.shape[-1]} frames gives {x.shape[1]} positions; "
                             f"this encoder takes {2 * self.positional_embedding.shape[0]} frames (30 s)")
        x = x + self.positional_embedding.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)
