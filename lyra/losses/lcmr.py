"""LCMR, the latent cross-modality regulariser (paper §3.1): soft-DTW between the speech
tokens and the LLM embeddings of their transcript.

For one sample with speech tokens X [L, d] and transcript embeddings Y [S, d]:

    C[l, s] = -log softmax_s(X_l · Y_s / τ)          (softmax over the transcript axis)
    loss    = softDTW_γ(C) / L     ("speech", the reference)   or   / (L + S)   ("sum", the paper)

and the batch loss is the mean over samples. All samples go through one batched
`soft_dtw` call on padded [B, L_max, S_max] costs with per-sample lengths.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from lyra.config import LCMRConfig
from lyra.losses.soft_dtw import soft_dtw

__all__ = ["lcmr_loss"]


def lcmr_loss(speech_tokens: list[Tensor], transcript_embeds: list[Tensor], config: LCMRConfig) -> Tensor:
    """Mean over samples of soft-DTW(speech tokens, transcript) / normaliser.

    Args:
        speech_tokens: B tensors [L_i, d], the projected speech tokens of each sample.
        transcript_embeds: B tensors [S_i, d], the LLM input embeddings of each sample's
            transcript, in the same order. Detached when `config.embedding_grad` is false.
        config: τ (`tau`), γ (`gamma`), `normalize` ("speech": divide by L_i, "sum": by
            L_i + S_i) and `embedding_grad`. `weight` is the caller's business.

    Returns:
        Scalar loss, in float32 (float64 if the inputs are float64); half-precision inputs
        are upcast, since soft-DTW values grow with L + S.
    """
    _check_inputs(speech_tokens, transcript_embeds, config)
    dtype = torch.promote_types(speech_tokens[0].dtype, torch.float32)
    device = speech_tokens[0].device
    if not config.embedding_grad:
        transcript_embeds = [y.detach() for y in transcript_embeds]
    x = pad_sequence([t.to(dtype) for t in speech_tokens], batch_first=True)  # [B, L, d]
    y = pad_sequence([t.to(dtype) for t in transcript_embeds], batch_first=True)  # [B, S, d]
    lengths_l = torch.tensor([t.shape[0] for t in speech_tokens], device=device)
    lengths_s = torch.tensor([t.shape[0] for t in transcript_embeds], device=device)
    padding_s = torch.arange(y.shape[1], device=device) >= lengths_s[:, None]  # [B, S]
    # Under autocast the matmul would run in half precision, and 1/τ magnifies its error.
    with torch.autocast(device_type=device.type, enabled=False):
        logits = torch.bmm(x, y.transpose(1, 2)) / config.tau  # [B, L, S]
        # The softmax runs over each sample's own transcript, not its padding.
        logits = logits.masked_fill(padding_s[:, None, :], float("-inf"))
        cost = -torch.log_softmax(logits, dim=-1)  # +inf on padded columns: soft_dtw ignores them
    values = soft_dtw(cost, config.gamma, lengths_l, lengths_s)  # [B]
    normaliser = lengths_l if config.normalize == "speech" else lengths_l + lengths_s
    return (values / normaliser.to(dtype)).mean()


def _check_inputs(speech_tokens: list[Tensor], transcript_embeds: list[Tensor], config: LCMRConfig) -> None:
    if len(speech_tokens) == 0:
        raise ValueError("lcmr_loss needs at least one sample, got empty lists")
    if len(speech_tokens) != len(transcript_embeds):
        raise ValueError(
            f"lcmr_loss needs one transcript per speech input, got {len(speech_tokens)} speech inputs "
            f"and {len(transcript_embeds)} transcripts"
        )
    if config.normalize not in ("speech", "sum"):
        raise ValueError(f"lcmr normalize must be 'speech' or 'sum', got {config.normalize!r}")
    device, width = speech_tokens[0].device, speech_tokens[0].shape[-1]
    for index, (x, y) in enumerate(zip(speech_tokens, transcript_embeds)):
        if x.dim() != 2 or y.dim() != 2 or x.shape[1] != width or y.shape[1] != width or 0 in (len(x), len(y)):
            raise ValueError(
                f"sample {index}: speech tokens {tuple(x.shape)} and transcript embeddings {tuple(y.shape)} "
                f"must be non-empty [L, d] and [S, d] with d = {width} (that of sample 0)"
            )
        if x.device != device or y.device != device:
            raise ValueError(
                f"sample {index}: speech tokens on {x.device} and transcript embeddings on {y.device}, "
                f"expected both on {device}"
            )
