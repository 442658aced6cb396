"""Streaming text + speech generation (paper App. B.4, after LLaMA-Omni).

`stream_speech` decodes text token by token with an explicit KV-cache loop on the
Qwen2-VL backbone (prefill with the spliced speech/sound/vision inputs, then one
token per step), hands every `chunk_tokens` new hidden states to the CTC speech
generator and the resulting units to the vocoder, so the first audio arrives after
`chunk_tokens` tokens rather than after the whole answer.

Hidden states: the backbone's final normed hidden state at each generated token's own
position (`hidden_alignment="token"`), which is what the reference trains the
generator on (`hidden_states[-1]` at the positions where `labels != -100`, i.e. the
answer tokens). The references' inference instead feeds the state that *predicted*
each token (last prompt position, then generated tokens 0..n-2) - one position earlier
than in training; `hidden_alignment="previous"` reproduces that. "token" costs one more
decoder step at the end (the last token has to be fed to get its state).

Chunk borders:
  * text -> units is exact: the generator's attention is causal and keeps a KV cache
    across chunks, and the label of each chunk's last frame is carried so a unit
    running across the border is merged once (`SpeechGeneratorStream`). The units of
    the concatenated chunks equal `SpeechGenerator.predict` on all states at once.
  * units -> audio goes through the vocoder's own stream (`UnitVocoder.stream`,
    lyra/model/vocoder.py). The code HiFi-GAN's holds back the units whose right context
    has not arrived, so its chunks equal the one-shot synthesis within float rounding
    (tests/test_vocoder.py); a Piper voice's voices every complete word as soon as the
    next word starts, so its borders fall between words (lyra/model/piper_vocoder.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import DynamicCache

from lyra.data.audio import write_wav
from lyra.model.speechgen import SpeechGenerator
from lyra.model.vocoder import UnitVocoder

_VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")
_GENERATE_KEYS = {"max_new_tokens", "do_sample", "temperature", "top_k", "eos_token_id", "hidden_alignment"}


class SpeechEvent(NamedTuple):
    """One step of `stream_speech`: new text token ids, new units, audio that became final, and
    the seconds this step spent in the speech generator and the vocoder."""

    tokens: list[int]
    units: list[int]
    audio: np.ndarray
    speech_seconds: float = 0.0


@dataclass
class SpeechOutput:
    """Non-streaming result: text tokens, their hidden states, units and waveform."""

    tokens: list[int]
    states: torch.Tensor  # (n, d_llm)
    units: list[int]
    audio: np.ndarray  # float32 at the vocoder's sample rate
    timings: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def decode_events(
    model,
    batch: dict[str, Any],
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    eos_token_id: int | list[int] | None = None,
    hidden_alignment: str = "token",
) -> Iterator[tuple[str, Any]]:
    """Incremental decoding of one prompt; yields ("token", id) as soon as a token is
    chosen and ("state", hidden [d_llm]) when that token's hidden state exists.

    `batch` is a `collate` output for one sample (`input_ids`, `attention_mask`,
    `speech`, `sound`, vision tensors). `eos_token_id=None` means the model's stop
    tokens (`config.stop_token_ids`); pass -1 to never stop early. The prefill goes through
    `model.prepare_inputs` (embeddings with media spliced in, M-RoPE positions) and the
    LLM directly; LMME token pruning is not applied here.
    """
    if hidden_alignment not in ("token", "previous"):
        raise ValueError(f"hidden_alignment must be 'token' or 'previous', got {hidden_alignment!r}")
    input_ids = batch["input_ids"]
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"streaming speech decodes one prompt at a time, got input_ids {tuple(input_ids.shape)}")
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = batch.get("attention_mask")
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    stop = set(model.config.stop_token_ids) if eos_token_id is None else set(np.atleast_1d(eos_token_id).tolist())
    media = {k: batch[k].to(device) for k in _VISION_KEYS if batch.get(k) is not None}
    language_model = model.backbone.model.language_model
    lm_head = model.backbone.lm_head

    # prefill: speech/sound/vision spliced in, M-RoPE positions from the processor's layout
    embeds, position_ids, _ = model.prepare_inputs(input_ids, attention_mask, batch.get("speech"),
                                                   batch.get("sound"), **media)
    cache = DynamicCache(config=model.backbone.config.text_config)
    out = language_model(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                         cache=cache, use_cache=True)
    next_position = int(position_ids[:, 0][:, attention_mask[0].bool()].max()) + 1  # text continues after it
    state = out.last_hidden_state[:, -1]  # (1, d): the state that predicts the first token
    for step in range(max_new_tokens):
        token = _choose(lm_head(state)[0].float(), do_sample, temperature, top_k)
        yield "token", token
        if hidden_alignment == "previous":
            yield "state", state[0]
        last = token in stop or step == max_new_tokens - 1
        if last and hidden_alignment == "previous":
            return
        # feed the token (a text token: the same position on the three M-RoPE axes)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(1, 1)], dim=1)
        position = torch.full((3, 1, 1), next_position, dtype=torch.long, device=device)
        next_position += 1
        token_embed = language_model.embed_tokens(torch.tensor([[token]], device=device))
        out = language_model(inputs_embeds=token_embed, position_ids=position, attention_mask=attention_mask,
                             cache=cache, use_cache=True)
        state = out.last_hidden_state[:, -1]
        if hidden_alignment == "token":
            yield "state", state[0]
        if last:
            return


def stream_speech(
    model,
    generator: SpeechGenerator,
    vocoder: UnitVocoder,
    batch: dict[str, Any],
    chunk_tokens: int = 10,
    **generate_kwargs: Any,
) -> Iterator[SpeechEvent]:
    """Generate text and speech together, as a stream of `SpeechEvent`s.

    An event is yielded for every new text token (its id; no units, no audio) and for every
    chunk of `chunk_tokens` hidden states (the units they gave and the float32 samples, at
    `vocoder.sample_rate`, that became final); the last event flushes the rest. Concatenating
    the events' audio gives the utterance, and their units the generator's whole unit sequence
    (see the module docstring for what happens at chunk borders).

    `generate_kwargs`: max_new_tokens, do_sample, temperature, top_k, eos_token_id,
    hidden_alignment (see `decode_events`).
    """
    unknown = set(generate_kwargs) - _GENERATE_KEYS
    if unknown:
        raise TypeError(f"stream_speech got unsupported generation options {sorted(unknown)}; "
                        f"supported: {sorted(_GENERATE_KEYS)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    units_stream = generator.stream()
    audio_stream = vocoder.stream()
    pending: list[torch.Tensor] = []
    empty = np.zeros(0, dtype=np.float32)
    for kind, value in decode_events(model, batch, **generate_kwargs):
        if kind == "token":
            yield SpeechEvent([value], [], empty)
            continue
        pending.append(value)
        if len(pending) == chunk_tokens:
            started = time.perf_counter()
            units = units_stream.push(_states(pending, generator))
            audio = audio_stream.push(units)
            pending = []
            yield SpeechEvent([], units, audio, time.perf_counter() - started)
    started = time.perf_counter()
    units = units_stream.push(_states(pending, generator)) if pending else []
    audio = np.concatenate([audio_stream.push(units), audio_stream.flush()])
    yield SpeechEvent([], units, audio, time.perf_counter() - started)


@torch.no_grad()
def generate_speech(
    model,
    generator: SpeechGenerator,
    vocoder: UnitVocoder,
    batch: dict[str, Any],
    **generate_kwargs: Any,
) -> SpeechOutput:
    """The non-streaming counterpart: all text first, then units and audio in one pass."""
    unknown = set(generate_kwargs) - _GENERATE_KEYS
    if unknown:
        raise TypeError(f"generate_speech got unsupported options {sorted(unknown)}")
    tokens, states = [], []
    start = time.perf_counter()
    for kind, value in decode_events(model, batch, **generate_kwargs):
        (tokens if kind == "token" else states).append(value)
    text_done = time.perf_counter()
    stacked = torch.stack(states)
    units = generator.predict(_states(states, generator).unsqueeze(0))[0]
    units_done = time.perf_counter()
    audio = vocoder.synthesize(units)
    end = time.perf_counter()
    timings = {"text_s": text_done - start, "units_s": units_done - text_done, "vocoder_s": end - units_done}
    return SpeechOutput(tokens, stacked, units, audio, timings)


def write_speech(chunks: Iterable[np.ndarray | SpeechEvent], path: str | Path, sample_rate: int) -> Path:
    """Audio chunks (arrays, or `stream_speech`'s events) as one 16-bit WAV, written atomically."""
    pieces = [np.asarray(c.audio if isinstance(c, SpeechEvent) else c, dtype=np.float32).reshape(-1) for c in chunks]
    return write_wav(path, np.concatenate(pieces) if pieces else np.zeros(0, np.float32), sample_rate)


def _states(states: list[torch.Tensor], generator: SpeechGenerator) -> torch.Tensor:
    """Stack hidden states `[n, d]` in the generator's dtype and device."""
    weight = generator.input_proj.weight
    return torch.stack(states).to(device=weight.device, dtype=weight.dtype)


def _choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None) -> int:
    if not do_sample:
        return int(logits.argmax())
    logits = logits / max(temperature, 1e-5)
    if top_k:
        threshold = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1))
