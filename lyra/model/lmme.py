"""LMME: the latent multi-modality extractor (token pruning inside the LLM forward).

LMME(n, rho) splits the LLM's decoder layers into n equal blocks. After the last layer
of every block but the final one it scores each *context* token (image, video, speech,
sound) by the attention the *instruction* tokens pay to it at that layer, and keeps
the top ceil(rho * count) (at least `min_keep`; all when there are fewer) for the rest
of the forward. Text is never dropped. A dropped token leaves the hidden states, the
labels, the attention mask and the position ids; kept tokens keep their original
M-RoPE positions on all three axes, so rotary phases stay right.

This module owns the decoder-layer loop over transformers' Qwen2-VL layers (the only
place in Lyra that does): it calls the library's layers, rotary embedding, mask
builder and cache as they are. With every token kept it computes exactly what
`Qwen2VLTextModel.forward` computes (tested).

Scores use that layer's rotated q for the instruction rows only and k for all keys,
chunked over heads, so the |instruction| x |all| probabilities are the most ever held
and the attention backend (eager, SDPA, flash) is free to be anything.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.profiler import record_function
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

from lyra.config import LMMEConfig, TokenIds
from lyra.utils.io import atomic_write_json

TEXT, IMAGE, VIDEO, SPEECH, SOUND = range(5)  # context_types values
MODALITY_NAMES = {IMAGE: "image", VIDEO: "video", SPEECH: "speech", SOUND: "sound"}
SCORE_BUDGET_BYTES = 256 * 2**20  # fp32 probabilities held at once while scoring


def context_types(input_ids: torch.Tensor, tokens: TokenIds) -> torch.Tensor:
    """`[B, N]` modality of each token: 0 text, 1 image, 2 video, 3 speech, 4 sound."""
    types = torch.zeros_like(input_ids, dtype=torch.int8)
    for value, token_id in ((IMAGE, tokens.image), (VIDEO, tokens.video), (SPEECH, tokens.speech), (SOUND, tokens.sound)):
        types[input_ids == token_id] = value
    return types


def block_ranges(num_layers: int, blocks: int) -> list[range]:
    """Split `num_layers` into `blocks` contiguous ranges whose sizes differ by at most one."""
    if not 1 <= blocks <= num_layers:
        raise ValueError(f"lmme.blocks must be between 1 and the number of layers ({num_layers}), got {blocks}")
    bounds = [round(i * num_layers / blocks) for i in range(blocks + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(blocks)]


def keep_count(num_context: int, config: LMMEConfig) -> int:
    return min(num_context, max(math.ceil(config.keep * num_context), config.min_keep))


# --------------------------------------------------------------------------- scoring
def _rotated_query_key(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       query_index: torch.Tensor, keys: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's rotated q for `query_index` rows `[H, n_q, hd]` and k for all rows `[H_kv, N, hd]`,
    recomputed from the layer's input exactly as its attention computes them (`keys`: the
    layer's rotated keys when a KV cache already holds them)."""
    attn = layer.self_attn
    n_q, head_dim = query_index.shape[0], attn.head_dim
    q = attn.q_proj(layer.input_layernorm(hidden[query_index])).view(n_q, -1, head_dim).transpose(0, 1)
    q, _ = apply_rotary_pos_emb(q, q, cos[query_index], sin[query_index], unsqueeze_dim=0)
    if keys is None:
        k = attn.k_proj(layer.input_layernorm(hidden)).view(hidden.shape[0], -1, head_dim).transpose(0, 1)
        keys, _ = apply_rotary_pos_emb(k, k, cos, sin, unsqueeze_dim=0)
    return q, keys


def _head_chunks(num_heads: int, n_q: int, n_keys: int) -> int:
    return max(1, min(num_heads, SCORE_BUDGET_BYTES // max(1, n_q * n_keys * 4)))


def _probabilities(q: torch.Tensor, k: torch.Tensor, heads: slice, groups: int, scaling: float,
                   allowed: torch.Tensor) -> torch.Tensor:
    """Causal softmax of `q[heads] . k^T` in fp32: `[h, n_q, N]`."""
    kv_heads = torch.arange(heads.start, heads.stop, device=q.device) // groups
    scores = torch.matmul(q[heads].float(), k[kv_heads].float().transpose(1, 2)) * scaling
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)


def instruction_attention(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                          query_index: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    """Attention probabilities of the rows `query_index` at `layer`, `[H, n_q, N]` (one sample).

    Equal to the rows of the layer's own (eager) attention matrix; used by the tests.
    """
    q, k = _rotated_query_key(layer, hidden, cos, sin, query_index)
    allowed = _allowed(query_index, key_valid)
    attn = layer.self_attn
    return _probabilities(q, k, slice(0, q.shape[0]), attn.num_key_value_groups, attn.scaling, allowed)


def _allowed(query_index: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(key_valid.shape[0], device=key_valid.device)
    return key_valid[None, :] & (positions[None, :] <= query_index[:, None])  # (n_q, N)


def context_scores(layer: nn.Module, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   query_index: torch.Tensor, key_valid: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
    """Mean attention (over heads and instruction rows) each token receives, `[N]` (one sample).

    Chunked over heads so at most SCORE_BUDGET_BYTES of probabilities exist at once.
    `keys`: the layer's rotated keys `[H_kv, N, hd]` if a KV cache holds them (no recompute).
    """
    q, k = _rotated_query_key(layer, hidden, cos, sin, query_index, keys)
    allowed = _allowed(query_index, key_valid)
    attn = layer.self_attn
    num_heads, n_q = q.shape[0], q.shape[1]
    step = _head_chunks(num_heads, n_q, k.shape[1])
    total = torch.zeros(k.shape[1], dtype=torch.float32, device=q.device)
    for start in range(0, num_heads, step):
        heads = slice(start, min(num_heads, start + step))
        total += _probabilities(q, k, heads, attn.num_key_value_groups, attn.scaling, allowed).sum(dim=(0, 1))
    return total / (num_heads * n_q)


# --------------------------------------------------------------------------- records
@dataclass
class RetentionRecord:
    """Which context tokens each pruning step kept, by original sequence position.

    `context[b]` lists `(modality, start, end)` runs of context tokens of sample b;
    `kept[k][b]` the original positions still present after the k-th pruning step.
    """

    layers: list[int] = field(default_factory=list)  # layer index after which each step pruned
    kept: list[list[list[int]]] = field(default_factory=list)
    context: list[list[tuple[str, int, int]]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"layers": self.layers, "kept": self.kept, "context": self.context}

    def save(self, path: str | Path) -> None:
        atomic_write_json(path, self.to_json(), indent=None)

    @classmethod
    def load(cls, path: str | Path) -> "RetentionRecord":
        data = json.loads(Path(path).read_text())
        return cls(data["layers"], data["kept"], [[tuple(run) for run in runs] for runs in data["context"]])

    def kept_fraction(self) -> list[float]:
        """Fraction of all context tokens (over the batch) kept after each step."""
        total = sum(end - start for runs in self.context for _, start, end in runs)
        return [sum(len(sample) for sample in step) / max(1, total) for step in self.kept]


def _context_runs(types: torch.Tensor) -> list[tuple[str, int, int]]:
    runs, start = [], None
    values = types.tolist()
    for i, value in enumerate(values + [TEXT]):
        if start is not None and (i == len(values) or value != values[start]):
            runs.append((MODALITY_NAMES[values[start]], start, i))
            start = None
        if start is None and i < len(values) and value != TEXT:
            start = i
    return runs


# --------------------------------------------------------------------------- the loop
@dataclass
class DecodeState:
    """What decoding needs after an LMME prefill: each block's 2-D key mask (it grows by
    one column per step) and the next M-RoPE position of every sample."""

    blocks: list[range]
    key_masks: list[torch.Tensor]  # [B, keys seen by the block]
    next_positions: torch.Tensor  # [B]


@dataclass
class LMMEOutput:
    hidden_states: torch.Tensor  # [B, N', d] after the final norm
    kept_index: torch.Tensor  # [B, N'] original position of each row, -1 for padding
    attention_mask: torch.Tensor  # [B, N']
    shifted_labels: torch.Tensor | None  # [B, N'] next-token targets of the kept rows
    retention: RetentionRecord
    state: DecodeState | None
    scoring_seconds: float = 0.0  # only measured with time_scoring=True


def _layer_mask(language_model: nn.Module, hidden: torch.Tensor, key_mask: torch.Tensor,
                cache: Cache | None, layer_idx: int):
    return create_causal_mask(
        config=language_model.config, inputs_embeds=hidden, attention_mask=key_mask, cache=cache,
        position_ids=None, layer_idx=layer_idx,
    )


def _run_block(language_model, block: range, hidden, key_mask, cos, sin, cache, last_input: bool = False):
    """Run the layers of `block`; with `last_input`, also return the last layer's input."""
    mask = _layer_mask(language_model, hidden, key_mask, cache, block.start)
    layer_input = hidden
    for i in block:
        layer_input = hidden
        hidden = language_model.layers[i](
            hidden, attention_mask=mask, position_embeddings=(cos, sin), position_ids=None,
            cache=cache, use_cache=cache is not None,
        )
    return (hidden, layer_input) if last_input else hidden


def lmme_prefill(
    language_model: nn.Module,
    inputs_embeds: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    types: torch.Tensor,
    config: LMMEConfig,
    labels: torch.Tensor | None = None,
    cache: Cache | None = None,
    time_scoring: bool = False,
) -> LMMEOutput:
    """Forward through `language_model` (a `Qwen2VLTextModel`) with pruning between blocks.

    Args:
        inputs_embeds: `[B, N, d]`; position_ids: `[3, B, N]` M-RoPE positions;
        attention_mask: `[B, N]` 1 for real tokens; types: `[B, N]` from `context_types`;
        labels: `[B, N]` (training) — answer tokens; they also mark what is not instruction;
        cache: a DynamicCache to fill for decoding (each layer keeps only what it saw).
        time_scoring: measure the seconds spent scoring (synchronising the device; benchmarks).
    """
    batch, length, _ = inputs_embeds.shape
    device = inputs_embeds.device
    blocks = block_ranges(len(language_model.layers), config.blocks)
    cos, sin = language_model.rotary_emb(inputs_embeds, position_ids)
    valid = attention_mask.bool()
    is_context = (types != TEXT) & valid
    first_context = torch.where(is_context.any(1), is_context.float().argmax(1), torch.full((batch,), length, device=device))
    positions = torch.arange(length, device=device)
    instruction = valid & ~is_context & (positions[None, :] >= first_context[:, None])
    shifted = None
    if labels is not None:
        instruction &= labels == -100
        shifted = torch.cat([labels[:, 1:], labels.new_full((batch, 1), -100)], dim=1)

    retention = RetentionRecord(context=[_context_runs(torch.where(v, t, 0)) for t, v in zip(types, valid)])
    index = torch.where(valid, positions[None, :].expand(batch, -1), -1)  # original position of each row
    hidden, key_mask = inputs_embeds, attention_mask
    key_masks = []
    scoring_seconds = 0.0
    for block_number, block in enumerate(blocks):
        key_masks.append(key_mask)
        if block_number == len(blocks) - 1:
            hidden = _run_block(language_model, block, hidden, key_mask, cos, sin, cache)
            break
        hidden, layer_input = _run_block(language_model, block, hidden, key_mask, cos, sin, cache, last_input=True)
        started = _clock(time_scoring, hidden.device)
        cached_keys = cache.layers[block.stop - 1].keys if cache is not None else None
        with record_function("lmme.score"):  # named ranges for torch.profiler (scripts/bench_lmme.py)
            keep = _select(language_model.layers[block.stop - 1], layer_input, cos, sin, key_mask.bool(),
                           is_context, instruction, config, cached_keys)
        scoring_seconds += _clock(time_scoring, hidden.device) - started
        with record_function("lmme.repad"):
            rows = _repad(keep, key_mask)
            hidden, cos, sin = _gather(hidden, rows), _gather(cos, rows), _gather(sin, rows)
            is_context, instruction = _gather(is_context, rows, False), _gather(instruction, rows, False)
            index = _gather(index, rows, -1)
            key_mask = (rows >= 0).long()
            if shifted is not None:
                shifted = _gather(shifted, rows, -100)
        retention.layers.append(block.stop - 1)
        retention.kept.append([idx[ctx].tolist() for idx, ctx in zip(index, is_context)])  # one copy per sample

    hidden = language_model.norm(hidden)
    state = None
    if cache is not None:
        next_positions = torch.where(valid, position_ids.amax(0), -1).amax(1) + 1
        state = DecodeState(blocks, key_masks, next_positions)
    return LMMEOutput(hidden, index, key_mask, shifted, retention, state, scoring_seconds)


def _clock(enabled: bool, device: torch.device) -> float:
    if not enabled:
        return 0.0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _select(layer, layer_input, cos, sin, key_valid, is_context, instruction, config,
            cached_keys: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Per sample, the sorted row indices to keep: every text row plus the top context rows
    (`cached_keys` `[B, H_kv, N, hd]`: the scoring layer's keys from the KV cache)."""
    keep = []
    for b in range(layer_input.shape[0]):
        context_rows = is_context[b].nonzero().squeeze(1)
        query_rows = instruction[b].nonzero().squeeze(1)
        text_rows = (key_valid[b] & ~is_context[b]).nonzero().squeeze(1)
        count = keep_count(context_rows.numel(), config)
        if count == context_rows.numel() or query_rows.numel() == 0:
            kept_context = context_rows  # nothing to drop, or no instruction to score with
        else:
            keys = cached_keys[b] if cached_keys is not None else None
            scores = context_scores(layer, layer_input[b], cos[b], sin[b], query_rows, key_valid[b], keys)
            kept_context = context_rows[scores[context_rows].topk(count).indices]
        keep.append(torch.cat([text_rows, kept_context]).sort().values)
    return keep


def _repad(keep: list[torch.Tensor], key_mask: torch.Tensor) -> torch.Tensor:
    """`[B, N']` row indices (-1 = padding), padded on the side the batch was padded on."""
    left = bool((key_mask[:, -1] == 1).all() and (key_mask[:, 0] == 0).any())
    width = max(k.numel() for k in keep)
    rows = torch.full((len(keep), width), -1, dtype=torch.long, device=key_mask.device)
    for b, k in enumerate(keep):
        if left:
            rows[b, width - k.numel():] = k
        else:
            rows[b, : k.numel()] = k
    return rows


def _gather(tensor: torch.Tensor, rows: torch.Tensor, fill=0) -> torch.Tensor:
    """Rows of `[B, N, ...]` selected by `rows` `[B, N']`; -1 rows get `fill`."""
    safe = rows.clamp(min=0)
    view = safe.view(*safe.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:])
    out = torch.gather(tensor, 1, view)
    return out.masked_fill((rows < 0).view(*rows.shape, *([1] * (tensor.dim() - 2))), fill)


def lmme_decode(language_model: nn.Module, inputs_embeds: torch.Tensor, state: DecodeState, cache: Cache) -> torch.Tensor:
    """One decoding step `[B, 1, d]` -> final hidden `[B, 1, d]`; each block attends to its own
    (pruned) cache, positions continue from the unpruned sequence."""
    batch = inputs_embeds.shape[0]
    positions = state.next_positions.view(1, batch, 1).expand(3, -1, -1)
    cos, sin = language_model.rotary_emb(inputs_embeds, positions)
    hidden = inputs_embeds
    ones = torch.ones(batch, 1, dtype=state.key_masks[0].dtype, device=inputs_embeds.device)
    for number, block in enumerate(state.blocks):
        state.key_masks[number] = torch.cat([state.key_masks[number], ones], dim=1)
        hidden = _run_block(language_model, block, hidden, state.key_masks[number], cos, sin, cache)
    state.next_positions = state.next_positions + 1
    return language_model.norm(hidden)
