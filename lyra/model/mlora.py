"""MLoRA: one LoRA adapter per audio modality on the frozen Qwen2-VL LLM.

The strong vision-language model stays as it is. Speech gets adapter "speech"
(stage 2), long speech gets "long_speech" (stage 3, trained from the base LLM); each
adapter is saved with the speech projector weights it was trained with. At inference
the adapter is chosen per request: no audio -> all adapters off (pure Qwen2-VL, so its
text/image/video scores are kept), speech -> "speech", audio that takes more 30 s windows
than `long_speech_seconds` fill -> "long_speech".

Adapters are peft named adapters injected into the backbone with
`peft.inject_adapter_in_model` and switched on each LoRA layer (`set_adapter`,
`enable_adapters`), as transformers' peft integration does (that integration wants a
peft release newer than any published, so it is not used). On disk, one folder each:
`adapters/<name>/adapter_config.json`, `adapter_model.safetensors` (peft's key
names), `projector.safetensors` (`fc1.*`, `fc2.*`).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lyra.model.speech import is_long_speech
from lyra.utils.io import atomic_directory

ADAPTER_DIR = "adapters"
BASE = "base"  # projector slot used while every adapter is off
# The LLM's linear layers; the ViT (model.visual) never gets LoRA.
LLM_LINEAR_PATTERN = r".*model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


@dataclass
class AdapterSpec:
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05


# The reference's ranks: r 64 / alpha 16 for speech (stage 2), r 128 / alpha 256 for long speech (stage 3).
DEFAULT_ADAPTERS = {"speech": AdapterSpec(64, 16, 0.05), "long_speech": AdapterSpec(128, 256, 0.05)}


def lora_config(spec: AdapterSpec):
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, bias="none",
                      target_modules=LLM_LINEAR_PATTERN)


def adapter_names(model) -> list[str]:
    return list(model.adapter_configs)


def _lora_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.backbone.modules() if isinstance(m, BaseTunerLayer)]


def _inject(model, name: str, config) -> None:
    from peft import inject_adapter_in_model

    with warnings.catch_warnings():  # several named adapters on one model is the point here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        inject_adapter_in_model(config, model.backbone, adapter_name=name)
    model.adapter_configs[name] = config


def add_adapter(model, name: str, spec: AdapterSpec | None = None) -> None:
    """Add a fresh adapter `name` to the LLM and make it the active one."""
    if name in adapter_names(model) or name == BASE:
        raise ValueError(f"adapter '{name}' already exists (or is reserved)")
    model.adapter_projectors[model.active_adapter or BASE] = _projector_state(model)
    _inject(model, name, lora_config(spec or DEFAULT_ADAPTERS.get(name, AdapterSpec())))
    model.adapter_projectors[name] = _projector_state(model)  # starts from the projector in use
    use_adapter(model, name)


def use_adapter(model, name: str | None) -> None:
    """Activate adapter `name` and its projector weights, or turn every adapter off (None)."""
    names = adapter_names(model)
    if name is not None and name not in names:
        raise ValueError(f"no adapter '{name}' loaded; available: {names or 'none'}")
    model.adapter_projectors[model.active_adapter or BASE] = _projector_state(model)  # keep what it trained
    for layer in _lora_layers(model):
        if name is None:
            layer.enable_adapters(False)
        else:
            layer.enable_adapters(True)
            layer.set_adapter(name)
    with torch.no_grad():
        for key, tensor in model.speech_projector.state_dict().items():
            tensor.copy_(model.adapter_projectors[name or BASE][key])
    model.active_adapter = name


def adapter_for_audio(model, speech_samples: list[int]) -> str | None:
    """The adapter a request should use, from the sample counts of its 16 kHz speech inputs:
    none without speech, "long_speech" when any input takes more windows than
    `speech.long_speech_seconds` fill (`lyra.model.speech.is_long_speech`, the windows that set
    its token count) and that adapter exists, else "speech" (if loaded)."""
    names = adapter_names(model)
    if not speech_samples:
        return None
    if "long_speech" in names and any(is_long_speech(n, model.config.speech) for n in speech_samples):
        return "long_speech"
    return "speech" if "speech" in names else None


def _projector_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.speech_projector.state_dict().items()}


def save_adapter(model, name: str, directory: str | Path, state: dict[str, torch.Tensor] | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write `directory/adapters/<name>/` (atomically: temp dir, then rename).

    `state`: the full model state dict to take the weights from (e.g. gathered from
    ZeRO-3 shards); default the model's own. `dtype`: write the tensors in it."""
    from peft import get_peft_model_state_dict

    state = state if state is not None else model.state_dict()
    projector = model.adapter_projectors[name]
    if name == model.active_adapter:  # it trained in place: the live projector is its own
        projector = {k.removeprefix("speech_projector."): v for k, v in state.items()
                     if k.startswith("speech_projector.")}
    target = Path(directory) / ADAPTER_DIR / name
    with atomic_directory(target) as staging:
        config = model.adapter_configs[name]
        (staging / "adapter_config.json").write_text(json.dumps(config.to_dict(), indent=2, default=list))
        backbone_state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        weights = get_peft_model_state_dict(model.backbone, state_dict=backbone_state, adapter_name=name)
        save_file({f"base_model.model.{k}": _as(v, dtype) for k, v in weights.items()},
                  str(staging / "adapter_model.safetensors"))
        save_file({k: _as(v, dtype) for k, v in projector.items()}, str(staging / "projector.safetensors"))
    return target


def _as(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor).contiguous()


def _adapter_folders(directory: str | Path) -> list[Path]:
    root = Path(directory) / ADAPTER_DIR
    folders = sorted(p for p in root.glob("*") if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        for required in ("adapter_config.json", "adapter_model.safetensors", "projector.safetensors"):
            if not (folder / required).is_file():
                raise FileNotFoundError(f"adapter folder {folder} lacks {required}; re-save or re-convert it")
    return folders


def _load_adapter_weights(model, folder: Path) -> None:
    from peft import set_peft_model_state_dict

    weights = load_file(str(folder / "adapter_model.safetensors"))
    weights = {k.removeprefix("base_model.model."): v for k, v in weights.items()}
    result = set_peft_model_state_dict(model.backbone, weights, adapter_name=folder.name)
    if result.unexpected_keys:
        raise ValueError(f"{folder}: adapter weights do not fit this model, e.g. {result.unexpected_keys[:3]}")
    model.adapter_projectors[folder.name] = load_file(str(folder / "projector.safetensors"))


def load_adapters(model, directory: str | Path) -> list[str]:
    """Add every `directory/adapters/<name>/` to the model; returns the names (adapters stay off).
    Call right after loading the base weights (the live projector is then the base one)."""
    from peft import LoraConfig

    folders = _adapter_folders(directory)
    for folder in folders:
        _inject(model, folder.name, LoraConfig.from_pretrained(str(folder)))
        _load_adapter_weights(model, folder)
    if folders:
        use_adapter(model, None)
    return [f.name for f in folders]


def merge_adapter(model, name: str) -> None:
    """Fold adapter `name` into the LLM weights (and its projector into the model's);
    every adapter is then removed, leaving a dense model that needs no peft."""
    from peft.tuners.lora import LoraLayer

    use_adapter(model, name)
    for module in model.backbone.modules():
        if isinstance(module, LoraLayer):
            module.merge(adapter_names=[name])
    _remove_lora_layers(model)
    model.adapter_projectors.clear()
    model.active_adapter = None  # the merged projector now lives in speech_projector


def _remove_lora_layers(model) -> None:
    """Swap every LoRA wrapper back for its (possibly merged) base layer."""
    from peft.tuners.lora import LoraLayer

    backbone = model.backbone
    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoraLayer):
            parent_name, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent_name), child, module.get_base_layer())
    model.adapter_configs.clear()


def base_state_dict(model, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's own weights (from `state`, default the model's) without any LoRA tensor,
    under the plain (un-wrapped) names, with the projector used while adapters are off."""
    state = state if state is not None else model.state_dict()
    state = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    if model.active_adapter is not None and BASE in model.adapter_projectors:
        for key, tensor in model.adapter_projectors[BASE].items():
            state[f"speech_projector.{key}"] = tensor
    return state
