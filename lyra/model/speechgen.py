"""CTC speech-unit generator on the LLM's hidden states (after LLaMA-Omni; paper App. B.4).

The LLM's final (normed) hidden states of the answer's text tokens `[B, T, d_llm]` are
upsampled by repetition (each state `upsample` times), projected to `hidden_size`,
run through `num_layers` Qwen2 decoder layers (transformers' `Qwen2DecoderLayer`,
1-D RoPE from `Qwen2RotaryEmbedding`, positions 0..F-1) and a linear head to
`num_units + 1` classes; the last class (id `num_units`) is the CTC blank.

Attention is causal, as in the references: LLaMA-Omni (`LlamaDecoderLayer`) and Lyra
(`Qwen2DecoderLayer`) both force `_attn_implementation = "flash_attention_2"`, whose
transformers 4.4x attention calls flash-attn with `is_causal=self.is_causal` (True),
the 2-D mask only removing right padding. Causality is also what makes streaming
exact: the frames of a new chunk never change the frames already decoded, so
`SpeechGeneratorStream` (KV cache over chunks) reproduces the full-sequence logits.

A consequence of causal attention over repeated states: the `upsample` frames of the
first text state are identical (each sees only copies of itself), so that state yields
at most one unit and the CTC alignment has to lag the text. On tiny overfitting runs this
makes random targets with about one unit per text state stick in local minima (3 rows
of 10 states with 6-8 or 10-12 units: 3 and 4 of 5 seeds short of an exact fit after 300
steps at lr 3e-3); with 4-5 units and lr 1e-2 all 10 seeds tried fit exactly
(tests/test_speechgen.py uses that setting).

Two optional additions (`frame_positions`, `input_norm`; both off for the references'
checkpoints) make the generator learn in a few hundred steps, which a stage 4 on a CPU needs
(measured on a small model's answer states, 300 steps of 32: with both, 2 % phoneme error; without the
frame positions 36 %, without the norm 34 %):
  * `frame_positions`: a learned embedding of each frame's index among the copies of its text
    state (0 .. upsample-1) is added after `input_proj`. The copies then differ, so one text
    state can yield all the units of its word (without it the first state yields at most one,
    see above, and the first consonants of an answer are lost).
  * `input_norm`: ActNorm (Kingma & Dhariwal, 2018) on the LLM states: a per-feature shift and
    scale, set from the first training batch so that its states have zero mean and unit
    variance, then trained. A small LLM's final states share a large common direction (the
    next-token prediction, e.g. `<|im_end|>` after every answer) that otherwise swamps what
    tells the answers apart.

Training (stage 4) minimises CTC with blank = `num_units`, `zero_infinity=True`, summed
over the batch and divided by the total number of target units (the reference's
`reduction="sum"` then `/= tgt_lens.sum()`). When a target is longer than the
upsampled text, the frame count is raised to the target length and each frame copies
text state `floor(frame * T / F)` (the reference's uniform assignment).

Prediction: per-frame argmax, then merge repeats, then drop blanks (the reference's
`ctc_postprocess` order: a blank between two equal labels keeps both).

State-dict keys equal the reference module's: `input_proj.*`, `layers.N.self_attn.
{q,k,v,o}_proj.*`, `layers.N.mlp.{gate,up,down}_proj.weight`, `layers.N.
{input,post_attention}_layernorm.weight`, `output_proj.*`. `reference_state_dict`
strips the checkpoint prefixes (`model.speech_generator.` / `speech_generator.`) and, for
LLaMA-Omni's bias-free Llama layers, adds zero q/k/v biases (the same function).
RoPE/eps: Lyra's layers copy the Qwen2-VL LLM config (theta 1e6; `Qwen2VLConfig` turns
"mrope" into plain 1-D "default" RoPE for a `Qwen2DecoderLayer`; eps 1e-6), our default;
LLaMA-Omni's copy Llama-3.1's (llama3-scaled RoPE, theta 5e5, eps 1e-5): pass
`rope_parameters` and `rms_norm_eps` to load it (tests/test_speechgen.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2RotaryEmbedding,
)

from lyra.config import SpeechGeneratorConfig
from lyra.data.units import check_unit_range
from lyra.utils.state_dict import check_state_dict

IGNORE_INDEX = -100  # padding value of target-unit tensors (the reference's collator)


class SpeechGenerator(nn.Module):
    """Upsample -> Linear -> Qwen2 decoder layers (causal) -> Linear to units + blank."""

    def __init__(
        self,
        llm_width: int,
        hidden_size: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        num_units: int,
        upsample: int,
        rope_parameters: dict[str, Any] | None = None,
        rms_norm_eps: float = 1e-6,
        attn_implementation: str = "sdpa",
        frame_positions: bool = False,
        input_norm: bool = False,
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"speech generator hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        if upsample < 1:
            raise ValueError(f"speech generator upsample must be >= 1, got {upsample}")
        # Lyra's generator inherits the Qwen2-VL LLM's rope theta (1e6) as plain 1-D RoPE.
        rope = dict(rope_parameters or {"rope_type": "default", "rope_theta": 1_000_000.0})
        self.layer_config = Qwen2Config(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,  # the references set kv heads = heads
            intermediate_size=intermediate_size,
            rms_norm_eps=rms_norm_eps,
            rope_parameters=rope,
            max_position_embeddings=32768,
            attention_dropout=0.0,
        )
        self.layer_config._attn_implementation = attn_implementation
        self.upsample = upsample
        self.num_units = num_units
        self.blank = num_units
        self.input_norm = ActNorm(llm_width) if input_norm else None
        self.input_proj = nn.Linear(llm_width, hidden_size)
        self.frame_embed = nn.Embedding(upsample, hidden_size) if frame_positions else None
        self.layers = nn.ModuleList(Qwen2DecoderLayer(self.layer_config, i) for i in range(num_layers))
        self.output_proj = nn.Linear(hidden_size, num_units + 1)
        self.rotary_emb = Qwen2RotaryEmbedding(self.layer_config)  # buffers only, not in the state dict

    @classmethod
    def from_config(cls, config: SpeechGeneratorConfig, llm_width: int, **kwargs: Any) -> SpeechGenerator:
        """Build from the `speech_generator:` section of a Lyra config; `kwargs` pass
        `rope_parameters`, `rms_norm_eps` or `attn_implementation` through."""
        return cls(
            llm_width=llm_width,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            num_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            num_units=config.num_units,
            upsample=config.upsample,
            frame_positions=config.frame_positions,
            input_norm=config.input_norm,
            **kwargs,
        )

    # ------------------------------------------------------------------ forward
    def upsample_states(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, min_frames: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pack the selected text states of each row and repeat them.

        Args:
            hidden: `[B, T, d_llm]` hidden states.
            mask: `[B, T]` bool, the positions to use (e.g. `labels != -100`); all if None.
            min_frames: `[B]` lower bound on each row's frame count (target lengths).

        Returns:
            frames `[B, F, d_llm]`, frame mask `[B, F]` (True = real frame) and each frame's
            index among the copies of its text state `[B, F]`.
        """
        batch, length, width = hidden.shape
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        mask = mask.bool()
        src_lens = mask.sum(dim=1)  # [B]
        if bool((src_lens == 0).any()):
            raise ValueError("speech generator: a row selects no text states (empty mask row)")
        # pack selected states to the left, in order
        order = torch.sort((~mask).int(), dim=1, stable=True).indices  # selected first
        packed = torch.gather(hidden, 1, order.unsqueeze(-1).expand(-1, -1, width))
        frame_lens = src_lens * self.upsample
        if min_frames is not None:
            frame_lens = torch.maximum(frame_lens, min_frames.to(frame_lens))
        total = int(frame_lens.max())
        t = torch.arange(total, device=hidden.device).unsqueeze(0)  # [1, F]
        frame_mask = t < frame_lens.unsqueeze(1)  # [B, F]
        # frame f copies text state floor(f * T / F): plain repetition when F = T * upsample
        index = (t * src_lens.unsqueeze(1)) // frame_lens.unsqueeze(1)
        index = index.masked_fill(~frame_mask, 0)
        frames = torch.gather(packed, 1, index.unsqueeze(-1).expand(-1, -1, width))
        frames = frames.masked_fill(~frame_mask.unsqueeze(-1), 0.0)
        # first frame of each state: f with index[f] != index[f-1]; offset = f - that frame
        starts = torch.ones_like(frame_mask)
        starts[:, 1:] = index[:, 1:] != index[:, :-1]
        first = torch.cummax(torch.where(starts, t.expand_as(index), 0), dim=1).values
        return frames, frame_mask, (t - first).masked_fill(~frame_mask, 0)

    def decode_frames(
        self,
        frames: torch.Tensor,
        offsets: torch.Tensor,
        frame_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """Frame logits `[B, F, num_units + 1]` for upsampled states `[B, F, d_llm]` whose
        indices among the copies of their text state are `offsets` `[B, F]`.

        With `cache`, `frames` continue the frames already in it (causal attention over
        cached + new frames, positions continuing); `frame_mask` must then be None.
        """
        batch, count, _ = frames.shape
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None and frame_mask is not None:
            raise ValueError("decode_frames: frame_mask is not supported together with a cache")
        if self.input_norm is not None:
            frames = self.input_norm(frames, frame_mask)
        x = self.input_proj(frames)  # (B, F, H)
        if self.frame_embed is not None:
            x = x + self.frame_embed(offsets.clamp(max=self.upsample - 1))
        position_ids = torch.arange(past, past + count, device=x.device).unsqueeze(0).expand(batch, -1)
        position_embeddings = self.rotary_emb(x, position_ids)
        attention_mask = _causal_mask(count, past, frame_mask, x.dtype, x.device)  # (B|1, 1, F, past + F)
        for layer in self.layers:
            x = layer(
                x,
                attention_mask=attention_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=cache is not None,
            )
        return self.output_proj(x)

    def forward(
        self, hidden: torch.Tensor, mask: torch.Tensor | None = None, min_frames: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits `[B, F, num_units + 1]` and frame mask `[B, F]` for text states `[B, T, d]`."""
        frames, frame_mask, offsets = self.upsample_states(hidden, mask, min_frames)
        return self.decode_frames(frames, offsets, frame_mask), frame_mask

    def loss(self, hidden: torch.Tensor, mask: torch.Tensor | None, target_units: torch.Tensor | list) -> torch.Tensor:
        """CTC loss (sum over the batch / total target units).

        Args:
            hidden: `[B, T, d_llm]` LLM hidden states.
            mask: `[B, T]` bool selecting the answer's text tokens (e.g. `labels != -100`).
            target_units: `[B, L]` unit ids padded with -100, or a list of 1-D tensors / lists.
        """
        targets = _pad_targets(target_units, hidden.device)
        target_lens = (targets != IGNORE_INDEX).sum(dim=1)
        check_unit_range(targets[targets != IGNORE_INDEX], self.num_units)
        logits, frame_mask = self.forward(hidden, mask, min_frames=target_lens)
        log_probs = F.log_softmax(logits.float(), dim=-1)
        flat = targets[targets != IGNORE_INDEX]
        loss = F.ctc_loss(
            log_probs.transpose(0, 1),  # (F, B, C)
            flat,
            frame_mask.sum(dim=1),
            target_lens,
            blank=self.blank,
            reduction="sum",
            zero_infinity=True,
        )
        return loss / target_lens.sum().clamp(min=1)

    @torch.no_grad()
    def predict(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy CTC units per row: argmax, merge repeats, drop blanks."""
        logits, frame_mask = self.forward(hidden, mask)
        labels = logits.argmax(dim=-1)
        return [ctc_collapse(row[m].tolist(), self.blank) for row, m in zip(labels, frame_mask)]

    def stream(self) -> SpeechGeneratorStream:
        """A streaming decoder for one utterance (see `SpeechGeneratorStream`)."""
        return SpeechGeneratorStream(self)

    # ------------------------------------------------------------------ checkpoints
    def load_reference_state_dict(self, state: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
        """Load a Lyra / LLaMA-Omni speech generator state (any of their key prefixes)."""
        state = reference_state_dict(state)
        check_state_dict(self.state_dict(), state, f"speech generator weights in {source}", "this generator",
                         " (check num_layers, the key prefix and the config's sizes)")
        self.load_state_dict(state)


REFERENCE_PREFIXES = ("model.speech_generator.", "speech_generator.", "base_model.model.speech_generator.")


def reference_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a reference checkpoint's speech-generator weights to our key names.

    Accepts a whole-model state dict (keeps only `*speech_generator.*` keys) or a bare
    generator state. Drops rotary `inv_freq` buffers (old transformers saved none, but
    some forks do) and gives bias-free attention projections (LLaMA-Omni's Llama
    layers) zero q/k/v biases, which leaves the function unchanged.
    """
    picked = {}
    for key, value in state.items():
        for prefix in REFERENCE_PREFIXES:
            if key.startswith(prefix):
                picked[key[len(prefix):]] = value
                break
    if not picked:
        picked = dict(state)
    out = {k: v for k, v in picked.items() if not k.endswith("rotary_emb.inv_freq")}
    for key in list(out):
        if key.endswith("self_attn.q_proj.weight"):
            stem = key[: -len("q_proj.weight")]
            for proj in ("q_proj", "k_proj", "v_proj"):
                bias = f"{stem}{proj}.bias"
                if bias not in out and f"{stem}{proj}.weight" in out:
                    weight = out[f"{stem}{proj}.weight"]
                    out[bias] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out


@dataclass
class SpeechGeneratorStream:
    """Chunk-by-chunk decoding of one utterance, identical to the full-sequence pass.

    `push(hidden)` takes the next text states `[T, d_llm]` and returns the newly decided
    units. The KV cache keeps the decoded frames; `last_label` (the previous chunk's
    final frame label, blank included) is carried so that a unit repeated across the
    chunk border is merged exactly as the full-sequence collapse would merge it.
    """

    generator: SpeechGenerator
    cache: DynamicCache | None = None
    last_label: int | None = None
    frames: int = 0

    def __post_init__(self) -> None:
        self.cache = DynamicCache()

    @torch.no_grad()
    def push(self, hidden: torch.Tensor) -> list[int]:
        if hidden.ndim != 2:
            raise ValueError(f"SpeechGeneratorStream.push expects [T, d_llm] text states, got {tuple(hidden.shape)}")
        if hidden.shape[0] == 0:
            return []
        upsample = self.generator.upsample
        frames = hidden.repeat_interleave(upsample, dim=0).unsqueeze(0)  # (1, T*up, d)
        offsets = torch.arange(upsample, device=hidden.device).repeat(hidden.shape[0]).unsqueeze(0)
        logits = self.generator.decode_frames(frames, offsets, cache=self.cache)
        labels = logits[0].argmax(dim=-1).tolist()
        units = ctc_collapse(labels, self.generator.blank, previous=self.last_label)
        self.last_label = labels[-1]
        self.frames += len(labels)
        return units


class ActNorm(nn.Module):
    """Per-feature `(x - shift) * scale`, with shift and scale set from the first batch seen in
    training mode (its real frames: zero mean, unit variance per feature), then learned."""

    def __init__(self, width: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width))
        self.scale = nn.Parameter(torch.ones(width))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and not bool(self.initialized):
            self.initialize(x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1]))
        return (x - self.shift) * self.scale

    @torch.no_grad()
    def initialize(self, real: torch.Tensor) -> None:
        """Statistics of `real` `[N, width]` (over every rank's batch, so that ranks agree)."""
        real = real.float()
        moments = torch.stack([real.sum(0), (real**2).sum(0), real.new_full((real.shape[1],), real.shape[0])])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(moments)
        total, squares, count = moments
        mean = total / count.clamp(min=1)
        std = (squares / count.clamp(min=1) - mean**2).clamp(min=0).sqrt()
        self.shift.copy_(mean)
        self.scale.copy_(1.0 / std.clamp(min=1e-3))
        self.initialized.fill_(True)


def ctc_collapse(labels: list[int], blank: int, previous: int | None = None) -> list[int]:
    """Greedy CTC decoding of frame labels: merge repeats, then drop blanks.

    `previous` is the label of the frame just before `labels` (streaming), so that a
    run continuing across the border is not emitted twice.
    """
    out = []
    for label in labels:
        if label != previous and label != blank:
            out.append(label)
        previous = label
    return out


def _causal_mask(
    count: int, past: int, frame_mask: torch.Tensor | None, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Additive mask `(B|1, 1, count, past + count)`: frame i sees cached frames and new
    frames <= i (and, with `frame_mask`, only real frames). Works for eager and sdpa."""
    query = torch.arange(count, device=device).unsqueeze(1) + past
    key = torch.arange(past + count, device=device).unsqueeze(0)
    allowed = (key <= query).unsqueeze(0)  # (1, Q, K)
    if frame_mask is not None:
        allowed = allowed & frame_mask.bool().unsqueeze(1)  # keys of padding frames hidden
        # padding queries would see nothing (NaN rows in sdpa): let them see frame 0
        allowed[..., 0] = True
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(1)


def _pad_targets(target_units: torch.Tensor | list, device: torch.device) -> torch.Tensor:
    if isinstance(target_units, torch.Tensor):
        if target_units.ndim != 2:
            raise ValueError(f"target_units must be [B, L] (padded with {IGNORE_INDEX}), got {tuple(target_units.shape)}")
        return target_units.to(device=device, dtype=torch.long)
    rows = [torch.as_tensor(list(u) if not isinstance(u, torch.Tensor) else u, dtype=torch.long) for u in target_units]
    return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=IGNORE_INDEX).to(device)
