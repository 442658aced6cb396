"""Unit HiFi-GAN vocoder: fairseq's "code HiFi-GAN" generator, without fairseq.

Architecture (fairseq `models/text_to_speech/codehifigan.py` + `hifigan.py`, the
speech-resynthesis `examples/speech_to_speech_translation` vocoder):

    units [T] -> dict (Embedding num_embeddings x embedding_dim) -> [1, C, T]
      (dur_prediction) dur_predictor: Conv1d(k)+ReLU, LayerNorm, Conv1d(k, padding 1)+ReLU,
        LayerNorm, Linear -> log duration; frames per unit = max(1, round(exp(d) - 1));
        each unit's embedding is repeated that many times
    conv_pre Conv1d(model_in_dim -> upsample_initial_channel, 7)
    for each upsample stage i: leaky_relu(0.1) -> ups[i] ConvTranspose1d(stride u_i,
        kernel k_i, padding (k_i - u_i) // 2, channels halved) -> mean of the
        len(resblock_kernel_sizes) ResBlock1 outputs (resblocks[i * n + j])
    leaky_relu (slope 0.01, torch's default) -> conv_post Conv1d(ch -> 1, 7) -> tanh

Every conv of the generator is weight-normalised (fairseq checkpoints store
`weight_g` / `weight_v`); the duration predictor's are not. One frame yields
prod(upsample_rates) samples: 320 for [5, 4, 4, 2, 2], i.e. 50 frames/s at 16 kHz,
HuBERT's frame rate. With de-duplicated units (what Lyra's speech generator emits) the
references call it with duration prediction on (`vocoder(x, True)` in Lyra's
`serve/cli.py`; fairseq's `generate_waveform_from_code.py --dur-prediction`).

Loading: `load_code_hifigan(g_00500000, config.json)` reads the checkpoint with
`torch.load(..., weights_only=True)`, takes its `generator` state dict (fairseq key
names, loaded exactly as stored), then folds the weight norm for inference
(`remove_weight_norm`, as fairseq's `CodeHiFiGANVocoder` does).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

from lyra.utils.state_dict import check_state_dict

LRELU_SLOPE = 0.1  # inside the generator; the last activation uses torch's default 0.01
_WN = "parametrizations.weight.original"  # original0 = g (magnitude), original1 = v (direction)


@dataclass
class VocoderConfig:
    """The generator hyper-parameters of a code HiFi-GAN `config.json` (fairseq names)."""

    upsample_rates: list[int]
    upsample_kernel_sizes: list[int]
    upsample_initial_channel: int
    resblock_kernel_sizes: list[int]
    resblock_dilation_sizes: list[list[int]]
    num_embeddings: int
    embedding_dim: int
    model_in_dim: int = 80
    dur_predictor_params: dict[str, Any] | None = None
    sampling_rate: int = 16000
    resblock: str = "1"
    extra: dict[str, Any] = field(default_factory=dict)  # training-only keys, kept for reference

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> VocoderConfig:
        required = ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                    "resblock_kernel_sizes", "resblock_dilation_sizes", "num_embeddings", "embedding_dim")
        missing = [k for k in required if k not in data]
        if missing:
            raise ValueError(f"{source}: not a code HiFi-GAN config, missing keys {missing}")
        for key in ("multispkr", "embedder_params", "f0", "f0_quant_num_bin", "multistyle"):
            if data.get(key):
                raise ValueError(f"{source}: '{key}' vocoders (speaker/f0/style conditioning) are not supported")
        if str(data.get("resblock", "1")) != "1":
            raise ValueError(f"{source}: only resblock '1' (ResBlock1) is supported, got {data['resblock']!r}")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        cfg = cls(**{k: data[k] for k in known if k in data}, extra={k: v for k, v in data.items() if k not in known})
        cfg.resblock = str(cfg.resblock)
        if len(cfg.upsample_rates) != len(cfg.upsample_kernel_sizes):
            raise ValueError(f"{source}: upsample_rates and upsample_kernel_sizes differ in length")
        if cfg.model_in_dim != cfg.embedding_dim:
            raise ValueError(f"{source}: model_in_dim {cfg.model_in_dim} must equal embedding_dim {cfg.embedding_dim}")
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> VocoderConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"vocoder config not found: {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f), source=str(path))

    @property
    def hop_length(self) -> int:
        """Output samples per (unit) frame: the product of the upsample rates."""
        return math.prod(self.upsample_rates)


class ResBlock1(nn.Module):
    """Three (dilated conv, conv) pairs with leaky-ReLU pre-activations and residuals."""

    def __init__(self, channels: int, kernel_size: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=(kernel_size * d - d) // 2))
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            weight_norm(nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2))
            for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            xt = conv1(F.leaky_relu(x, LRELU_SLOPE))
            xt = conv2(F.leaky_relu(xt, LRELU_SLOPE))
            x = xt + x
        return x


class DurationPredictor(nn.Module):
    """fairseq's `VariancePredictor` (FastSpeech 2): log(1 + frames) per unit."""

    def __init__(self, encoder_embed_dim: int, var_pred_hidden_dim: int, var_pred_kernel_size: int,
                 var_pred_dropout: float = 0.5):
        super().__init__()
        k = var_pred_kernel_size
        self.conv1 = nn.Sequential(nn.Conv1d(encoder_embed_dim, var_pred_hidden_dim, k, padding=(k - 1) // 2), nn.ReLU())
        self.ln1 = nn.LayerNorm(var_pred_hidden_dim)
        self.conv2 = nn.Sequential(nn.Conv1d(var_pred_hidden_dim, var_pred_hidden_dim, k, padding=1), nn.ReLU())
        self.ln2 = nn.LayerNorm(var_pred_hidden_dim)
        self.proj = nn.Linear(var_pred_hidden_dim, 1)
        self.dropout = nn.Dropout(var_pred_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, C) -> (B, T)
        x = self.conv1(x.transpose(1, 2)).transpose(1, 2)
        x = self.dropout(self.ln1(x))
        x = self.conv2(x.transpose(1, 2)).transpose(1, 2)
        x = self.dropout(self.ln2(x))
        return self.proj(x).squeeze(-1)


class CodeHiFiGAN(nn.Module):
    """Unit-to-waveform generator; module names match fairseq's `CodeGenerator`."""

    def __init__(self, config: VocoderConfig):
        super().__init__()
        self.config = config
        self.num_kernels = len(config.resblock_kernel_sizes)
        self.dict = nn.Embedding(config.num_embeddings, config.embedding_dim)
        ch = config.upsample_initial_channel
        self.conv_pre = weight_norm(nn.Conv1d(config.model_in_dim, ch, 7, padding=3))
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for i, (u, k) in enumerate(zip(config.upsample_rates, config.upsample_kernel_sizes)):
            self.ups.append(weight_norm(nn.ConvTranspose1d(ch // 2**i, ch // 2 ** (i + 1), k, u, padding=(k - u) // 2)))
            for rk, rd in zip(config.resblock_kernel_sizes, config.resblock_dilation_sizes):
                self.resblocks.append(ResBlock1(ch // 2 ** (i + 1), rk, rd))
        self.conv_post = weight_norm(nn.Conv1d(ch // 2 ** len(config.upsample_rates), 1, 7, padding=3))
        params = config.dur_predictor_params
        self.dur_predictor = DurationPredictor(**params) if params else None

    @property
    def sample_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def hop_length(self) -> int:
        return self.config.hop_length

    @property
    def weight_norm_folded(self) -> bool:
        return not parametrize.is_parametrized(self.conv_pre)

    # ------------------------------------------------------------------ inference
    def _codes(self, units: torch.Tensor | list[int]) -> torch.Tensor:
        units = torch.as_tensor(units, dtype=torch.long, device=self.dict.weight.device)
        if units.ndim == 2:
            if units.shape[0] != 1:
                raise ValueError(f"the vocoder synthesises one utterance at a time, got a batch of {units.shape[0]}")
            units = units[0]
        units = units[units >= 0]  # fairseq drops invalid (negative) codes
        if units.numel() == 0:
            raise ValueError("the vocoder got no units to synthesise")
        if int(units.max()) >= self.config.num_embeddings:
            raise ValueError(f"unit id {int(units.max())} is outside the vocoder's {self.config.num_embeddings} codes")
        return units

    @torch.no_grad()
    def durations(self, units: torch.Tensor | list[int]) -> torch.Tensor:
        """Frames per unit `[T]` from the duration predictor (needs `dur_predictor_params`)."""
        if self.dur_predictor is None:
            raise ValueError("this vocoder has no duration predictor (its config has no dur_predictor_params)")
        x = self.dict(self._codes(units)).unsqueeze(0)  # (1, T, C)
        log_dur = self.dur_predictor(x)[0]
        return torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1)

    def generate(self, x: torch.Tensor) -> torch.Tensor:
        """HiFi-GAN on frame features `[B, model_in_dim, F]` -> `[B, F * hop_length]`."""
        x = self.conv_pre(x)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            x = sum(block(x) for block in blocks) / self.num_kernels
        x = self.conv_post(F.leaky_relu(x))
        return torch.tanh(x)[:, 0]

    @torch.no_grad()
    def synthesize(self, units: torch.Tensor | list[int], durations: torch.Tensor | None = None) -> torch.Tensor:
        """Waveform `[sum(durations) * hop_length]` for `units` `[T]`, each held
        `durations[i]` frames (1 frame each when None)."""
        units = self._codes(units)
        x = self.dict(units).T.unsqueeze(0)  # (1, C, T)
        if durations is not None:
            durations = torch.as_tensor(durations, dtype=torch.long, device=x.device)
            if durations.shape != units.shape or bool((durations < 1).any()):
                raise ValueError("durations must be one positive frame count per unit")
            x = torch.repeat_interleave(x, durations, dim=2)
        return self.generate(x)[0]

    def forward(self, units: torch.Tensor | list[int], dur_prediction: bool = False) -> torch.Tensor:
        """fairseq's `CodeHiFiGANVocoder(x, dur_prediction)`: 16 kHz waveform `[samples]`."""
        durations = self.durations(units) if dur_prediction else None
        return self.synthesize(units, durations)

    # ------------------------------------------------------------------ weights
    def remove_weight_norm(self) -> CodeHiFiGAN:
        """Fold every weight norm into a plain weight (same outputs, faster inference)."""
        for module in self.modules():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return self

    def load_fairseq_state_dict(self, state: dict[str, torch.Tensor], source: str = "<state dict>") -> None:
        """Load a fairseq generator state (`weight_g`/`weight_v` or already-folded
        `weight`), exactly: values are copied, never re-normalised."""
        own = self.state_dict()
        converted: dict[str, torch.Tensor] = {}
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            if key.endswith((".weight_g", ".weight_v")):
                pairs.setdefault(key[: -len(".weight_g")], {})[key[-1]] = value
            else:
                converted[key] = value
        for stem, gv in pairs.items():
            if set(gv) != {"g", "v"}:
                converted[f"{stem}.weight_{next(iter(gv))}"] = next(iter(gv.values()))  # reported below
            elif f"{stem}.{_WN}0" in own:
                converted[f"{stem}.{_WN}0"], converted[f"{stem}.{_WN}1"] = gv["g"], gv["v"]
            else:
                converted[f"{stem}.weight"] = torch._weight_norm(gv["v"], gv["g"], 0)
        for key in list(converted):  # a folded checkpoint into a model that still has weight norm
            stem = key[: -len(".weight")]
            if key.endswith(".weight") and f"{stem}.{_WN}1" in own and key not in own:
                weight = converted.pop(key)
                converted[f"{stem}.{_WN}1"] = weight
                converted[f"{stem}.{_WN}0"] = torch.linalg.vector_norm(
                    weight, dim=tuple(range(1, weight.ndim)), keepdim=True)
        check_state_dict(own, converted, source, "a code HiFi-GAN generator of this config.json",
                         " (expected fairseq names such as conv_pre.weight_g, ups.0.weight_v, resblocks.0.convs1.0.bias, "
                         f"dict.weight{', dur_predictor.proj.weight' if self.dur_predictor is not None else ''})")
        self.load_state_dict(converted)

    def fairseq_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under fairseq's key names (`weight_g`/`weight_v` while
        the weight norm is unfolded)."""
        out = {}
        for key, value in self.state_dict().items():
            key = key.replace(f"{_WN}0", "weight_g").replace(f"{_WN}1", "weight_v")
            out[key] = value.detach().clone()
        return out

    # ------------------------------------------------------------------ streaming support
    def receptive_field_frames(self) -> int:
        """Frames on either side of a frame that can change its samples (an upper bound)."""
        cfg = self.config
        radius = 3.0  # conv_pre, kernel 7, at the frame rate
        rate = 1  # samples per frame at the current stage
        for u, k in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
            radius += ((k - 1) // u + 1) / rate  # a transposed-conv output reads inputs within this span
            rate *= u
            block = max(sum((rk - 1) // 2 * d + (rk - 1) // 2 for d in rd)
                        for rk, rd in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
            radius += block / rate
        radius += 3 / rate  # conv_post
        return math.ceil(radius)

    def receptive_field_units(self, dur_prediction: bool) -> int:
        """Units on either side that can change a unit's audio: every unit lasts at least
        one frame; the duration predictor (two convs) reads units within its own span."""
        units = self.receptive_field_frames()
        if dur_prediction and self.dur_predictor is not None:
            k = self.dur_predictor.conv1[0].kernel_size[0]
            units = max(units, 2 * ((k - 1) // 2))
        return units


class StreamingVocoder:
    """Vocode a growing unit sequence chunk by chunk.

    Each `push(units)` synthesises a window of units: `context_units` already-emitted
    units on the left, the new units, and returns the audio of all but the last
    `lookahead_units` of them; those are held back until the next push (or `flush`),
    when their right context exists. Units at the window's edges do not enter the
    returned samples, so with `context_units` and `lookahead_units` >= the vocoder's
    receptive field (`receptive_field_units`, the default) the concatenated chunks
    equal the one-shot synthesis of the whole sequence (up to float rounding of
    different convolution sizes). The bound is conservative: on the mHuBERT/LJ
    architecture a unit's change reaches about 10 frames either way (measured with
    random weights), and 8 units of look-ahead already matched to 3e-7. Smaller values
    trade exactness at chunk borders for less held-back audio; `lookahead_units=0`
    emits everything at once and the samples before each border lack their right
    context.
    """

    def __init__(self, vocoder: CodeHiFiGAN, dur_prediction: bool = True,
                 context_units: int | None = None, lookahead_units: int | None = None):
        if dur_prediction and vocoder.dur_predictor is None:
            raise ValueError("dur_prediction=True needs a vocoder with a duration predictor")
        field_units = vocoder.receptive_field_units(dur_prediction)
        self.vocoder = vocoder
        self.dur_prediction = dur_prediction
        self.context_units = field_units if context_units is None else context_units
        self.lookahead_units = field_units if lookahead_units is None else lookahead_units
        self.units: list[int] = []
        self.emitted = 0  # units whose audio has been returned

    def push(self, units: list[int]) -> np.ndarray:
        """Add units; return the audio that is now final (possibly empty)."""
        self.units.extend(int(u) for u in units)
        return self._emit(len(self.units) - self.lookahead_units, len(self.units))

    def flush(self) -> np.ndarray:
        """Return the audio of every unit not yet emitted (end of the utterance)."""
        return self._emit(len(self.units), len(self.units))

    def _emit(self, ready: int, available: int) -> np.ndarray:
        if ready <= self.emitted:
            return np.zeros(0, dtype=np.float32)
        start = max(0, self.emitted - self.context_units)
        window = self.units[start:available]
        if self.dur_prediction:
            durations = self.vocoder.durations(window)
        else:
            durations = torch.ones(len(window), dtype=torch.long)
        wave = self.vocoder.synthesize(window, durations)
        hop = self.vocoder.hop_length
        frame_end = torch.cumsum(durations, 0).tolist()
        first = frame_end[self.emitted - start - 1] if self.emitted > start else 0
        last = frame_end[ready - start - 1]
        self.emitted = ready
        return wave[first * hop:last * hop].float().cpu().numpy()


def load_code_hifigan(checkpoint: str | Path, config: str | Path | dict[str, Any], fold_weight_norm: bool = True,
                 device: str | torch.device = "cpu") -> CodeHiFiGAN:
    """Build the vocoder from its `config.json` and load `g_00500000` (its `generator`)."""
    cfg = VocoderConfig.from_dict(config) if isinstance(config, dict) else VocoderConfig.from_json(config)
    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise FileNotFoundError(f"vocoder checkpoint not found: {checkpoint}")
    try:
        payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle with objects beyond tensors/containers
        raise ValueError(f"{checkpoint} cannot be read as plain tensors (weights_only=True): {error}") from error
    if isinstance(payload, dict) and "generator" in payload:
        state = payload["generator"]
    elif isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        state = payload
    else:
        keys = list(payload)[:6] if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{checkpoint} has no 'generator' state dict (top-level keys: {keys})")
    model = CodeHiFiGAN(cfg)
    model.load_fairseq_state_dict(state, source=str(checkpoint))
    if fold_weight_norm:
        model.remove_weight_norm()
    return model.eval().to(device)
