"""Convert the authors' released Lyra checkpoints (Lyra_Mini_3B, Lyra_Base_9B) to our layout.

Reference layout (LLaVA style, `LyraQwen2VLForCausalLM` / `Lyra2SQwen2VLForCausalLM` on
transformers 4.4x, where `Qwen2VLModel` was the text decoder only):

    model.embed_tokens.* / model.layers.N.* / model.norm.*   Qwen2-VL LLM
    lm_head.weight                                           (absent when tied: Mini)
    model.vision_tower.vision_tower.*                        Qwen2-VL ViT (patch_embed, blocks, merger)
    model.speech_tower.speech_tower.*                        HF `WhisperEncoder` (whisper-large-v3[-turbo])
    model.mm_speech_projector.linear{1,2}.*                  "simple_mlp" speech projector
    speech_generator.*                                       CTC speech generator (stage 4)

    speech_lora/, long_speech_lora/:
        adapter_config.json          peft LoraConfig (q,k,v,o,gate,up,down)
        adapter_model.safetensors    base_model.model.model.layers.N.<proj>.lora_{A,B}.weight
        non_lora_trainables.bin      model.model.mm_speech_projector.linear{1,2}.*

Our layout (`LyraForConditionalGeneration`):

    backbone.model.language_model.*, backbone.model.visual.*, backbone.lm_head.weight
    speech_encoder.whisper.*        openai-whisper `AudioEncoder` names
    speech_projector.fc{1,2}.*
    adapters/<speech|long_speech>/{adapter_config.json, adapter_model.safetensors,
                                   projector.safetensors}

The converted folder is a complete checkpoint for `LyraForConditionalGeneration.from_pretrained`
and `python -m lyra.chat --model`: its `config.json` is derived from the release's config.json
(LLM and ViT dimensions, projector stride) and the Whisper encoder's weights (its dimensions),
with the release's behaviour recorded: no sound path (`sound.enabled: false`), the release's
audio windowing (`speech.window_rule: floor_plus_one`) and its stop tokens
(`generation.stop_token_ids`: <|im_end|>, <|endoftext|>). The release's tokenizer files are
copied to `tokenizer/`. The speech generator, which `LyraForConditionalGeneration` does not
hold, is written on its own to `speech_generator.safetensors` (keys relative to the module)
when present.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from lyra.config import LyraConfig
from lyra.model.speech import CLIP_FRAMES, load_whisper_encoder_state, map_whisper_encoder_key
from lyra.utils.io import atomic_directory
from lyra.utils.state_dict import check_state_dict

logger = logging.getLogger(__name__)

# Our adapter name -> the reference sub-folder holding it.
REFERENCE_ADAPTER_DIRS: dict[str, str] = {"speech": "speech_lora", "long_speech": "long_speech_lora"}

SPEECH_GENERATOR_FILE = "speech_generator.safetensors"
REFERENCE_CONFIG_SOURCE = "config.json"
REFERENCE_CONFIG_FILE = "reference_config.json"
PROJECTOR_FILE = "projector.safetensors"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# The release's tokenizer files (a fast tokenizer.json and/or the slow vocab.json + merges.txt).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "chat_template.json", "chat_template.jinja")
# What the released code passes to `generate` (lyra/serve/cli.py there): eos_token_id=[<|im_end|>, <|endoftext|>].
RELEASE_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")
RELEASE_WINDOW_RULE = "floor_plus_one"  # the release cuts audio into len // 480000 + 1 windows

_REF_VISION = "model.vision_tower.vision_tower."
_REF_SPEECH = "model.speech_tower.speech_tower."
_REF_GENERATOR = "speech_generator."

# Reference modules without weights in our model, dropped on purpose: rotary caches
# (recomputed from the config) and the speech generator (exported separately).
_DROPPED = re.compile(r"(^|\.)(rotary_emb|rotary_pos_emb)\.inv_freq$")

_LORA_SEGMENTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

_VISION_PARTS = re.compile(r"(patch_embed\.proj\.weight|blocks\.\d+\.\S+|merger\.\S+)")
_LLM_PARTS = re.compile(r"(embed_tokens\.weight|layers\.\d+\.\S+|norm\.weight)")
_PROJECTOR_KEY = re.compile(r"(?:base_model\.model\.)?(?:model\.)*mm_speech_projector\.linear([12])\.(weight|bias)")


def _map_backbone_key(key: str) -> str | None:
    """A reference key relative to the reference causal LM -> relative to our
    `Qwen2VLForConditionalGeneration` backbone; None when it is not a backbone key.

    Accepts the Lyra layout (`model.layers`, `model.vision_tower.vision_tower`), the
    legacy Qwen2-VL layout (`visual.*`) and the transformers 5.x layout as it is.
    """
    if key == "lm_head.weight":
        return key
    for prefix in (_REF_VISION, "visual.", "model.visual."):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            return "model.visual." + rest if _VISION_PARTS.fullmatch(rest) else None
    for prefix in ("model.language_model.", "model."):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            return "model.language_model." + rest if _LLM_PARTS.fullmatch(rest) else None
    return None


def map_reference_key(key: str) -> str | None:
    """Name in our full-model state dict of a key of the reference full checkpoint.

    Returns None for keys dropped on purpose (rotary `inv_freq` caches, the
    `speech_generator.*` module, which `convert_reference_checkpoint` exports on its own).
    Raises `KeyError` naming the key for anything not understood (e.g. a linear vision
    projector `model.mm_projector.*` or an ImageBind sound tower, which the released
    Qwen2-VL checkpoints do not have), so no weight is ever lost silently.
    """
    if _DROPPED.search(key) or key.startswith(_REF_GENERATOR):
        return None
    if key.startswith(_REF_SPEECH):
        rest = key[len(_REF_SPEECH):]
        try:
            return "speech_encoder.whisper." + map_whisper_encoder_key(rest)
        except KeyError:
            raise KeyError(
                f"unknown key '{key}' in the reference speech tower (expected HF WhisperEncoder names)"
            ) from None
    match = _PROJECTOR_KEY.fullmatch(key)
    if match:
        return f"speech_projector.fc{match.group(1)}.{match.group(2)}"
    mapped = _map_backbone_key(key)
    if mapped is not None:
        return "backbone." + mapped
    raise KeyError(
        f"unknown key '{key}' in the reference Lyra checkpoint: it is neither the Qwen2-VL LLM/ViT "
        f"(model.layers/embed_tokens/norm, lm_head, {_REF_VISION}*), the Whisper speech tower "
        f"({_REF_SPEECH}*), the speech projector (model.mm_speech_projector.linear1/2) nor the speech "
        f"generator ({_REF_GENERATOR}*)"
    )


def _convert(sd: Mapping[str, Tensor], mapper: Callable[[str], str | None], what: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    for key, tensor in sd.items():
        new_key = mapper(key)
        if new_key is None:
            continue
        if new_key in out:
            raise ValueError(f"{what}: keys '{sources[new_key]}' and '{key}' both map to '{new_key}'")
        out[new_key] = tensor
        sources[new_key] = key
    return out


def convert_reference_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a reference full-checkpoint state dict to our layout (tensors are shared,
    not copied). Dropped keys are those `map_reference_key` maps to None."""
    return _convert(sd, map_reference_key, "reference checkpoint")


def extract_speech_generator(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The reference `speech_generator.*` tensors (CTC unit generator: `input_proj`,
    `layers.N.*` Qwen2 decoder layers, `output_proj`), keys relative to the module."""
    return {k[len(_REF_GENERATOR):]: v for k, v in sd.items() if k.startswith(_REF_GENERATOR)}


def map_reference_lora_key(key: str) -> str:
    """Name of a reference LoRA adapter weight when the LoRA wraps our `backbone`.

    `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` ->
    `base_model.model.model.language_model.layers.3.self_attn.q_proj.lora_A.weight`.
    Keys without the `base_model.model.` prefix (transformers' adapter format) and with
    an adapter-name segment (`lora_A.default.weight`, a raw `named_parameters` dump)
    are accepted; the output is always peft's saved form. Raises `KeyError` otherwise.
    """
    parts = key.split(".")
    where = next((i for i, part in enumerate(parts) if part in _LORA_SEGMENTS), None)
    if where is None or where == 0:
        raise KeyError(f"'{key}' is not a LoRA weight (no lora_A/lora_B segment)")
    module = ".".join(parts[:where]).removeprefix("base_model.model.")
    after = parts[where + 1:]  # [adapter name]? then weight/bias, or nothing (ParameterDict entries)
    tail = after[-1:] if after and after[-1] in ("weight", "bias") else []
    if len(after) - len(tail) > 1:
        raise KeyError(f"unexpected LoRA key layout '{key}'")
    mapped = _map_backbone_key(module + ".weight")
    if mapped is None or mapped == "model.language_model.norm.weight":
        raise KeyError(
            f"LoRA key '{key}' targets '{module}', which is not a linear layer of the Qwen2-VL backbone; "
            f"our adapters only wrap `backbone`"
        )
    new_module = mapped.removesuffix(".weight")
    return ".".join(["base_model.model." + new_module, parts[where], *tail])


def map_reference_projector_key(key: str) -> str:
    """`non_lora_trainables.bin` / `mm_speech_projector.bin` key -> our projector's own
    key (`fc1.*`, `fc2.*`). Any number of leading `model.` (and a `base_model.model.`)
    is accepted. Raises `KeyError` for anything else."""
    match = _PROJECTOR_KEY.fullmatch(key)
    if match is None:
        raise KeyError(
            f"unknown key '{key}' in non_lora_trainables: only the speech projector "
            f"(…mm_speech_projector.linear1/linear2.weight/bias) is expected"
        )
    return f"fc{match.group(1)}.{match.group(2)}"


def convert_reference_adapter(
    adapter_sd: Mapping[str, Tensor], non_lora_trainables: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Convert one reference adapter folder's tensors.

    Returns `(adapter, projector)`: the LoRA weights named for a peft wrap of our
    `backbone` (load with `set_peft_model_state_dict`) and the projector weights trained
    with it (`fc1.*`, `fc2.*`, load into `speech_projector`).
    """
    adapter = _convert(adapter_sd, map_reference_lora_key, "adapter")
    projector = _convert(non_lora_trainables, map_reference_projector_key, "non_lora_trainables")
    return adapter, projector


def convert_reference_adapter_config(config: Mapping[str, object]) -> dict[str, object]:
    """A reference `adapter_config.json` as a peft `LoraConfig` dict for our backbone.

    Keys this peft version does not know are dropped (with a warning);
    `base_model_name_or_path` (a path on the authors' cluster) is cleared.
    """
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise ValueError(f"adapter_config.json: peft_type is {peft_type!r}, expected 'LORA'")
    unknown = sorted(set(config) - known)
    if unknown:
        logger.warning("adapter_config.json: dropping keys unknown to this peft version: %s", unknown)
    kept = {k: v for k, v in config.items() if k in known and k not in ("peft_type", "auto_mapping", "peft_version")}
    kept["base_model_name_or_path"] = None
    lora = LoraConfig(**kept)  # validates the values
    out = lora.to_dict()
    for key, value in out.items():
        if isinstance(value, set):
            out[key] = sorted(value)
    out["peft_type"] = "LORA"
    return out


# ---------------------------------------------------------------------- config


def reference_lyra_config(
    reference: Mapping[str, object], state: Mapping[str, Tensor], tokenizer, name: str, source: str,
    encoder_source: str | None = None,
) -> LyraConfig:
    """Our `LyraConfig` for a release: its config.json `reference` (Qwen2-VL keys, flat as
    transformers 4.4x wrote them or nested as 5.x does, plus Lyra's `speech_encoder_ds_rate`),
    the converted weights `state` (Whisper and projector dimensions) and the loaded release
    tokenizer (special-token ids). `source` names the release in errors, `encoder_source` the
    Whisper weights when they come from elsewhere (`--whisper`)."""
    from transformers import Qwen2VLConfig

    from lyra.model.lyra import copy_backbone_dims, encoder_config_from_state
    from lyra.tokenizer import PAD_TOKEN, special_token_ids

    config = LyraConfig(name=name, tokenizer=None)
    try:
        copy_backbone_dims(Qwen2VLConfig.from_dict(dict(reference)), config)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{source}/config.json is not a Qwen2-VL-based Lyra config: {error}") from None
    encoder = {k[len("speech_encoder.whisper."):]: v for k, v in state.items() if k.startswith("speech_encoder.whisper.")}
    encoder_source = encoder_source or f"the speech tower of {source}"
    config.speech.encoder = encoder_config_from_state(encoder, encoder_source)
    config.speech.encoder.checkpoint = None  # its weights are in model.safetensors
    if config.speech.encoder.n_audio_ctx != CLIP_FRAMES // 2:
        raise ValueError(f"{encoder_source}: a Whisper encoder with {config.speech.encoder.n_audio_ctx} positions, "
                         f"but a 30 s window gives {CLIP_FRAMES // 2} frames; use the release's Whisper weights")
    fc1 = state.get("speech_projector.fc1.weight")
    if fc1 is None:
        raise ValueError(f"{source} holds no speech projector (model.mm_speech_projector.linear1/2)")
    frames = int(reference.get("speech_encoder_ds_rate", config.speech.projector.frames_per_token))
    width = config.speech.encoder.n_audio_state
    if fc1.shape[1] != frames * width:
        raise ValueError(
            f"{encoder_source}: a Whisper encoder {width} wide, but the speech projector of {source} takes "
            f"{fc1.shape[1]} inputs = speech_encoder_ds_rate {frames} x {fc1.shape[1] // frames}: these are not the "
            f"Whisper weights the release was trained with (its config.json names mm_speech_tower "
            f"{reference.get('mm_speech_tower')!r})"
        )
    config.speech.projector.frames_per_token = frames
    config.speech.projector.hidden_size = fc1.shape[0]
    config.speech.window_rule = RELEASE_WINDOW_RULE
    config.sound.enabled = False

    ids = special_token_ids(tokenizer)
    from_config = {"image": config.tokens.image, "video": config.tokens.video,
                   "vision_start": config.tokens.vision_start, "vision_end": config.tokens.vision_end}
    differ = {key: (value, ids[key]) for key, value in from_config.items() if ids[key] != value}
    if differ:
        raise ValueError(f"{source}: config.json and the tokenizer disagree on token ids (config, tokenizer): {differ}")
    vocab = tokenizer.get_vocab()
    for key in ("vision_start", "vision_end", "image", "video", "speech", "sound"):
        setattr(config.tokens, key, ids[key])
    config.tokens.eos, config.tokens.pad = ids["im_end"], vocab[PAD_TOKEN]
    config.generation.stop_token_ids = [vocab[token] for token in RELEASE_STOP_TOKENS]
    config.validate()
    return config


def _check_fits(config: LyraConfig, state: Mapping[str, Tensor],
                adapters: Mapping[str, tuple[dict, dict[str, Tensor], dict[str, Tensor]]], source: Path) -> None:
    """The converted weights against the model `config` builds (on the meta device: no memory)."""
    from accelerate import init_empty_weights

    from lyra.model.lyra import LyraForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        model = LyraForConditionalGeneration(config)
    check_state_dict(model.state_dict(), state, f"the converted weights of {source}", "the model of its config.json",
                     optional=model.tied_keys())
    projector = model.speech_projector.state_dict()
    for name, (_, _, trained) in adapters.items():
        where = source / REFERENCE_ADAPTER_DIRS[name] / "non_lora_trainables.bin"
        check_state_dict(projector, trained, str(where), "the speech projector of the release")


# ---------------------------------------------------------------------- file I/O


def _load_bin(path: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: pickle, zip and torch errors alike
        raise ValueError(f"{path} cannot be read ({type(error).__name__}: {error}); the file is damaged or "
                         f"incomplete, download it again") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (a dict of tensors), got {type(state).__name__}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def _load_weight_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as error:  # SafetensorError: bad header, truncated data
            raise ValueError(f"{path} cannot be read ({error}); the file is damaged or incomplete, "
                             f"download it again") from None
    return _load_bin(path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); download it again") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def load_reference_state_dict(src_dir: Path) -> dict[str, Tensor]:
    """All tensors of a reference checkpoint directory: `model.safetensors[.index.json]`,
    else `pytorch_model.bin[.index.json]` / `pytorch_model*.bin` (loaded without pickle code)."""
    src_dir = Path(src_dir)
    files: list[Path] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = src_dir / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not weight_map:
                raise ValueError(f"{index}: no 'weight_map'; the index file is damaged, download it again")
            files = [src_dir / name for name in sorted(set(weight_map.values()))]
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"{file} is listed in {index} but missing; download the full checkpoint")
            break
    else:
        if (src_dir / "model.safetensors").is_file():
            files = [src_dir / "model.safetensors"]
        else:
            files = sorted(src_dir.glob("model-*.safetensors")) or sorted(src_dir.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(
            f"no weights found in {src_dir}: expected model.safetensors[.index.json] or pytorch_model*.bin; "
            f"point --src at the downloaded Lyra_Mini_3B / Lyra_Base_9B directory"
        )
    state: dict[str, Tensor] = {}
    for file in files:
        part = _load_weight_file(file)
        overlap = set(part) & set(state)
        if overlap:
            raise ValueError(f"{file}: tensors also found in another shard: {sorted(overlap)[:5]}")
        state.update(part)
    return state


def load_reference_adapter(adapter_dir: Path) -> tuple[dict[str, object], dict[str, Tensor], dict[str, Tensor]]:
    """`(adapter_config, adapter weights, non_lora_trainables)` of a reference adapter folder."""
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / ADAPTER_CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; the adapter folder {adapter_dir} is incomplete")
    config = _read_json(config_path)
    for name in (ADAPTER_WEIGHTS_FILE, "adapter_model.bin"):
        weights_path = adapter_dir / name
        if weights_path.is_file():
            weights = _load_weight_file(weights_path)
            break
    else:
        raise FileNotFoundError(
            f"no adapter weights in {adapter_dir}: expected adapter_model.safetensors or adapter_model.bin"
        )
    non_lora_path = adapter_dir / "non_lora_trainables.bin"
    if not non_lora_path.is_file():
        raise FileNotFoundError(
            f"{non_lora_path} is missing: it holds the speech projector trained with this adapter"
        )
    return config, weights, _load_bin(non_lora_path)


def _with_context(path: Path, error: KeyError) -> KeyError:
    message = error.args[0] if error.args else str(error)
    return KeyError(f"{path}: {message}. The file is not a Lyra checkpoint this converter knows; "
                    f"extend lyra/model/convert.py if the reference layout changed")


def _save_tensors(state: Mapping[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def _cast(state: dict[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _copy_tokenizer(src_dir: Path, out: Path):
    """Copy the release's tokenizer files into `out` and load them as `lyra.chat` will
    (`load_tokenizer`, which adds <|speech_pad|> / <|sound_pad|> after the vocabulary when missing)."""
    from lyra.tokenizer import load_tokenizer

    present = [name for name in TOKENIZER_FILES if (src_dir / name).is_file()]
    if not any(name in present for name in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(
            f"{src_dir} has no tokenizer (tokenizer.json or tokenizer_config.json with vocab.json and merges.txt); "
            f"the release ships one next to config.json: download the full folder"
        )
    out.mkdir()
    for name in present:
        shutil.copyfile(src_dir / name, out / name)
    try:
        return load_tokenizer(out)
    except ValueError as error:
        raise ValueError(f"the tokenizer files of {src_dir} ({', '.join(present)}) do not load: {error}") from None


def _is_conversion_of(dst_dir: Path, src_dir: Path) -> bool:
    """Whether `dst_dir` is an earlier conversion of this release (its reference config, byte for byte)."""
    earlier = dst_dir / REFERENCE_CONFIG_FILE
    return (dst_dir / "config.json").is_file() and earlier.is_file() and \
        earlier.read_bytes() == (src_dir / REFERENCE_CONFIG_SOURCE).read_bytes()


def convert_reference_checkpoint(
    src_dir: Path,
    dst_dir: Path,
    *,
    whisper: Path | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> LyraConfig:
    """Convert a released Lyra checkpoint directory into a checkpoint `from_pretrained` loads.

    Writes `dst_dir/config.json` (see `reference_lyra_config`), `model.safetensors`
    (sharded with an index when large), `tokenizer/` (the release's tokenizer files),
    `adapters/<speech|long_speech>/{adapter_config.json, adapter_model.safetensors,
    projector.safetensors}`, `reference_config.json` (the release's config.json) and, when
    the release holds one, `speech_generator.safetensors`. Everything is checked against the
    model the config describes and written into a temporary sibling directory that replaces
    `dst_dir` at the end. Converting the same release again into the same `dst_dir` replaces
    the earlier conversion with identical files.

    Args:
        src_dir: the downloaded release directory.
        dst_dir: output directory; must not exist unless it holds a conversion of the same
            release, or `overwrite`.
        whisper: optional Whisper weights (openai-whisper `.pt` or an HF whisper
            directory) for the speech encoder, used instead of the checkpoint's own
            speech tower; needed when the checkpoint was saved without it.
        dtype: cast floating tensors to this dtype (default: keep the stored dtype;
            the reference trained in bf16 and runs in fp16).
        overwrite: replace an existing `dst_dir` whatever it holds.

    Returns:
        The config written to `dst_dir/config.json`.
    """
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"reference checkpoint directory {src_dir} does not exist")
    reference_config_path = src_dir / REFERENCE_CONFIG_SOURCE
    if not reference_config_path.is_file():
        raise FileNotFoundError(f"{reference_config_path} is missing: the model's dimensions are read from it; "
                                f"download the full release folder")
    reference_config = _read_json(reference_config_path)
    if dst_dir.exists() and not overwrite and not _is_conversion_of(dst_dir, src_dir):
        raise FileExistsError(f"{dst_dir} already exists and is not a conversion of {src_dir}; remove it or pass "
                              f"overwrite=True (--overwrite)")

    reference = load_reference_state_dict(src_dir)
    try:
        state = convert_reference_state_dict(reference)
    except KeyError as error:
        raise _with_context(src_dir, error) from None
    generator = extract_speech_generator(reference)
    del reference

    if whisper is not None:
        encoder = load_whisper_encoder_state(whisper)
        state = {k: v for k, v in state.items() if not k.startswith("speech_encoder.")}
        state.update({"speech_encoder.whisper." + map_whisper_encoder_key(k): v for k, v in encoder.items()})
    if not any(k.startswith("speech_encoder.") for k in state):
        raise ValueError(
            f"{src_dir} holds no speech tower weights (model.speech_tower.speech_tower.*); pass the Whisper "
            f"weights its config.json names (mm_speech_tower: {reference_config.get('mm_speech_tower')!r}) "
            f"with --whisper"
        )
    if "backbone.lm_head.weight" not in state:
        logger.info("no lm_head.weight in %s: the output embedding is tied to the input embedding", src_dir)

    adapters: dict[str, tuple[dict[str, object], dict[str, Tensor], dict[str, Tensor]]] = {}
    for name, folder in REFERENCE_ADAPTER_DIRS.items():
        adapter_dir = src_dir / folder
        if not adapter_dir.is_dir():
            logger.warning("%s has no %s/ folder: adapter '%s' is not converted", src_dir, folder, name)
            continue
        config, weights, non_lora = load_reference_adapter(adapter_dir)
        try:
            lora, projector = convert_reference_adapter(weights, non_lora)
        except KeyError as error:
            raise _with_context(adapter_dir, error) from None
        adapters[name] = (convert_reference_adapter_config(config), lora, projector)

    from huggingface_hub import save_torch_state_dict

    from lyra.model.lyra import CONFIG_FILE, MODEL_TYPE, TOKENIZER_DIR

    with atomic_directory(dst_dir) as tmp_dir:  # an existing dst_dir is replaced only once all is written
        tokenizer = _copy_tokenizer(src_dir, tmp_dir / TOKENIZER_DIR)
        lyra_config = reference_lyra_config(reference_config, state, tokenizer, src_dir.name, str(src_dir),
                                            str(whisper) if whisper is not None else None)
        _check_fits(lyra_config, state, adapters, src_dir)
        with open(tmp_dir / CONFIG_FILE, "w") as f:
            json.dump({"model_type": MODEL_TYPE, "lyra": lyra_config.to_dict()}, f, indent=2)
        save_torch_state_dict(_cast(state, dtype), tmp_dir)
        if generator:
            _save_tensors(_cast(generator, dtype), tmp_dir / SPEECH_GENERATOR_FILE)
        for name, (config, lora, projector) in adapters.items():
            out = tmp_dir / "adapters" / name
            out.mkdir(parents=True)
            with open(out / ADAPTER_CONFIG_FILE, "w") as f:
                json.dump(config, f, indent=2, sort_keys=True)
            _save_tensors(_cast(lora, dtype), out / ADAPTER_WEIGHTS_FILE)
            _save_tensors(_cast(projector, dtype), out / PROJECTOR_FILE)
        shutil.copyfile(reference_config_path, tmp_dir / REFERENCE_CONFIG_FILE)
    logger.info("converted %s -> %s (%d tensors, adapters: %s)", src_dir, dst_dir, len(state), sorted(adapters))
    return lyra_config
