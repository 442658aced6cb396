"""Reference-checkpoint conversion (lyra/model/convert.py) on synthetic state dicts that
use the reference key names: LyraQwen2VLForCausalLM (LLaVA style), HF WhisperEncoder as
speech tower, `mm_speech_projector.linear1/2`, peft adapters saved from that model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lyra.model.convert import (
    convert_reference_adapter,
    convert_reference_adapter_config,
    convert_reference_checkpoint,
    convert_reference_state_dict,
    map_reference_key,
    map_reference_lora_key,
    map_reference_projector_key,
)

from conftest import load_script

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1024)
TARGETS = ["v_proj", "o_proj", "down_proj", "gate_proj", "q_proj", "k_proj", "up_proj"]  # reference train.py default
N_MELS, N_CTX, D_ENC, N_HEAD, N_LAYER = 8, 10, 32, 2, 2
K, PROJ_HIDDEN = 5, 16
ST, W = "model.speech_tower.speech_tower.", "speech_encoder.whisper."  # reference / our prefixes


def _qwen2vl_config() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=dict(**TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": [2, 1, 1]}),
        vision_config=dict(depth=2, embed_dim=32, num_heads=2, hidden_size=64, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
    )


def _lora_config(r: int = 4, alpha: int = 8) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.05, bias="none",
                      task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def ours() -> dict[str, torch.Tensor]:
    """State dict of our layout's modules at tiny size (the names the converter must hit)."""
    from whisper.model import AudioEncoder

    torch.manual_seed(0)
    backbone = Qwen2VLForConditionalGeneration(_qwen2vl_config())
    state = {"backbone." + k: v for k, v in backbone.state_dict().items()}
    encoder = AudioEncoder(N_MELS, N_CTX, D_ENC, N_HEAD, N_LAYER)
    state.update({W + k: v for k, v in encoder.state_dict().items()})
    state["speech_projector.fc1.weight"] = torch.zeros(PROJ_HIDDEN, K * D_ENC)
    state["speech_projector.fc1.bias"] = torch.zeros(PROJ_HIDDEN)
    state["speech_projector.fc2.weight"] = torch.zeros(TEXT["hidden_size"], PROJ_HIDDEN)
    state["speech_projector.fc2.bias"] = torch.zeros(TEXT["hidden_size"])
    return state


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """A reference full checkpoint: LLM as `model.*`, ViT under `model.vision_tower.vision_tower.`,
    HF Whisper encoder under `model.speech_tower.speech_tower.`, projector, speech generator."""
    torch.manual_seed(1)
    qwen = Qwen2VLForConditionalGeneration(_qwen2vl_config()).state_dict()
    state: dict[str, torch.Tensor] = {}
    for key, value in qwen.items():
        if key.startswith("model.language_model."):
            state["model." + key[len("model.language_model."):]] = torch.randn_like(value)
        elif key.startswith("model.visual."):
            state["model.vision_tower.vision_tower." + key[len("model.visual."):]] = torch.randn_like(value)
        else:
            state[key] = torch.randn_like(value)  # lm_head.weight
    whisper = WhisperEncoder(WhisperConfig(
        d_model=D_ENC, encoder_layers=N_LAYER, encoder_attention_heads=N_HEAD, encoder_ffn_dim=4 * D_ENC,
        num_mel_bins=N_MELS, max_source_positions=N_CTX, decoder_layers=1, decoder_attention_heads=2,
        decoder_ffn_dim=8, max_target_positions=4,
    ))
    for key, value in whisper.state_dict().items():
        state["model.speech_tower.speech_tower." + key] = torch.randn_like(value)
    state["model.mm_speech_projector.linear1.weight"] = torch.randn(PROJ_HIDDEN, K * D_ENC)
    state["model.mm_speech_projector.linear1.bias"] = torch.randn(PROJ_HIDDEN)
    state["model.mm_speech_projector.linear2.weight"] = torch.randn(TEXT["hidden_size"], PROJ_HIDDEN)
    state["model.mm_speech_projector.linear2.bias"] = torch.randn(TEXT["hidden_size"])
    state["speech_generator.input_proj.weight"] = torch.randn(8, TEXT["hidden_size"])
    state["speech_generator.layers.0.self_attn.q_proj.weight"] = torch.randn(8, 8)
    state["speech_generator.output_proj.weight"] = torch.randn(11, 8)
    return state


@pytest.fixture(scope="module")
def reference_adapter() -> dict[str, torch.Tensor]:
    """Adapter weights as the reference saved them: peft wrapping a causal LM whose decoder
    is `model.layers` (keys `base_model.model.model.layers.N.*.lora_{A,B}.weight`)."""
    torch.manual_seed(2)
    llm = Qwen2ForCausalLM(Qwen2Config(**TEXT))
    peft_model = get_peft_model(llm, _lora_config())
    state = get_peft_model_state_dict(peft_model)
    return {k: torch.randn_like(v) for k, v in state.items()}


@pytest.fixture(scope="module")
def non_lora() -> dict[str, torch.Tensor]:
    """`non_lora_trainables.bin`: PeftModel.base_model.named_parameters() -> `model.model.mm_speech_projector.*`."""
    torch.manual_seed(3)
    return {
        "model.model.mm_speech_projector.linear1.weight": torch.randn(PROJ_HIDDEN, K * D_ENC),
        "model.model.mm_speech_projector.linear1.bias": torch.randn(PROJ_HIDDEN),
        "model.model.mm_speech_projector.linear2.weight": torch.randn(TEXT["hidden_size"], PROJ_HIDDEN),
        "model.model.mm_speech_projector.linear2.bias": torch.randn(TEXT["hidden_size"]),
    }


# ---------------------------------------------------------------- full checkpoint keys


@pytest.mark.parametrize(("ref", "expected"), [
    ("model.embed_tokens.weight", "backbone.model.language_model.embed_tokens.weight"),
    ("model.layers.1.self_attn.q_proj.bias", "backbone.model.language_model.layers.1.self_attn.q_proj.bias"),
    ("model.layers.0.mlp.down_proj.weight", "backbone.model.language_model.layers.0.mlp.down_proj.weight"),
    ("model.layers.0.post_attention_layernorm.weight",
     "backbone.model.language_model.layers.0.post_attention_layernorm.weight"),
    ("model.norm.weight", "backbone.model.language_model.norm.weight"),
    ("lm_head.weight", "backbone.lm_head.weight"),
    ("model.vision_tower.vision_tower.patch_embed.proj.weight", "backbone.model.visual.patch_embed.proj.weight"),
    ("model.vision_tower.vision_tower.blocks.1.attn.qkv.weight", "backbone.model.visual.blocks.1.attn.qkv.weight"),
    ("model.vision_tower.vision_tower.merger.mlp.2.bias", "backbone.model.visual.merger.mlp.2.bias"),
    ("visual.merger.ln_q.weight", "backbone.model.visual.merger.ln_q.weight"),  # legacy Qwen2-VL layout
    (ST + "conv2.bias", W + "conv2.bias"),
    (ST + "embed_positions.weight", W + "positional_embedding"),
    (ST + "layers.1.self_attn.q_proj.weight", W + "blocks.1.attn.query.weight"),
    (ST + "layers.1.self_attn.k_proj.weight", W + "blocks.1.attn.key.weight"),
    (ST + "layers.0.self_attn.v_proj.bias", W + "blocks.0.attn.value.bias"),
    (ST + "layers.0.self_attn.out_proj.weight", W + "blocks.0.attn.out.weight"),
    (ST + "layers.0.self_attn_layer_norm.bias", W + "blocks.0.attn_ln.bias"),
    (ST + "layers.0.fc1.weight", W + "blocks.0.mlp.0.weight"),
    (ST + "layers.0.fc2.bias", W + "blocks.0.mlp.2.bias"),
    (ST + "layers.0.final_layer_norm.weight", W + "blocks.0.mlp_ln.weight"),
    (ST + "layer_norm.weight", W + "ln_post.weight"),
    ("model.mm_speech_projector.linear1.weight", "speech_projector.fc1.weight"),
    ("model.mm_speech_projector.linear2.bias", "speech_projector.fc2.bias"),
    ("model.rotary_emb.inv_freq", None),
    ("model.vision_tower.vision_tower.rotary_pos_emb.inv_freq", None),
    ("speech_generator.layers.0.self_attn.q_proj.weight", None),
])
def test_map_reference_key(ref: str, expected: str | None) -> None:
    assert map_reference_key(ref) == expected


def test_every_reference_key_lands_on_our_module(reference, ours) -> None:
    converted = convert_reference_state_dict(reference)
    assert set(converted) == set(ours)
    for key, tensor in converted.items():
        assert tensor.shape == ours[key].shape, key
    # values travel unchanged (same tensor objects)
    assert converted["speech_encoder.whisper.positional_embedding"] is \
        reference["model.speech_tower.speech_tower.embed_positions.weight"]
    assert converted["backbone.model.visual.blocks.0.attn.proj.weight"] is \
        reference["model.vision_tower.vision_tower.blocks.0.attn.proj.weight"]


@pytest.mark.parametrize("bad", [
    "model.mm_projector.0.weight",  # a linear vision projector: not in the released checkpoints
    ST + "layers.0.self_attn.rotary.weight",
    "model.audio_tower.encoder.weight",
    "model.layers_extra.0.weight",
    "optimizer.state",
])
def test_unknown_key_raises_naming_it(bad: str) -> None:
    with pytest.raises(KeyError, match=bad.replace(".", r"\.")):
        map_reference_key(bad)


# ---------------------------------------------------------------- adapters


def test_lora_and_projector_keys(reference_adapter, non_lora) -> None:
    assert map_reference_lora_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight") == \
        "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"
    assert map_reference_lora_key("model.layers.1.mlp.up_proj.lora_B.default.weight") == \
        "base_model.model.model.language_model.layers.1.mlp.up_proj.lora_B.weight"
    for bad in ("base_model.model.model.norm.lora_A.weight", "base_model.model.model.layers.0.self_attn.q_proj.weight",
                "base_model.model.model.speech_tower.speech_tower.layers.0.self_attn.q_proj.lora_A.weight"):
        with pytest.raises(KeyError, match=bad.replace(".", r"\.")):
            map_reference_lora_key(bad)
    assert map_reference_projector_key("model.model.mm_speech_projector.linear2.weight") == "fc2.weight"
    assert map_reference_projector_key("model.mm_speech_projector.linear1.bias") == "fc1.bias"
    with pytest.raises(KeyError, match="model.model.embed_tokens.weight"):
        map_reference_projector_key("model.model.embed_tokens.weight")

    lora, projector = convert_reference_adapter(reference_adapter, non_lora)
    assert len(lora) == len(reference_adapter) == 2 * 2 * len(TARGETS)
    assert all(k.startswith("base_model.model.model.language_model.layers.") for k in lora)
    assert set(projector) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert torch.equal(projector["fc2.bias"], non_lora["model.model.mm_speech_projector.linear2.bias"])


def _load_into_wrapped_backbone(lora: dict[str, torch.Tensor], config: LoraConfig) -> None:
    """Loads `lora` into peft-wrapped tiny Qwen2-VL; asserts nothing unexpected and all LoRA set."""
    wrapped = get_peft_model(Qwen2VLForConditionalGeneration(_qwen2vl_config()), config)
    result = set_peft_model_state_dict(wrapped, lora)
    assert result.unexpected_keys == []
    loaded = get_peft_model_state_dict(wrapped)
    assert set(loaded) == set(lora)
    for key, tensor in lora.items():
        assert torch.equal(loaded[key], tensor), key


def test_converted_adapter_loads_into_peft_wrapped_backbone(reference_adapter, non_lora) -> None:
    lora, _ = convert_reference_adapter(reference_adapter, non_lora)
    _load_into_wrapped_backbone(lora, _lora_config())


def test_adapter_config() -> None:
    reference = {"base_model_name_or_path": "model_zoo/LLM/Qwen2VL_7B_LLM", "bias": "none", "fan_in_fan_out": False,
                 "inference_mode": True, "init_lora_weights": True, "lora_alpha": 256, "lora_dropout": 0.05,
                 "peft_type": "LORA", "r": 128, "target_modules": TARGETS, "task_type": "CAUSAL_LM",
                 "revision": None, "some_old_peft_field": 1}
    out = convert_reference_adapter_config(reference)
    assert out["r"] == 128 and out["lora_alpha"] == 256 and out["lora_dropout"] == 0.05
    assert sorted(out["target_modules"]) == sorted(TARGETS)
    assert out["base_model_name_or_path"] is None and "some_old_peft_field" not in out
    json.dumps(out)
    with pytest.raises(ValueError, match="IA3"):
        convert_reference_adapter_config({**reference, "peft_type": "IA3"})


# ---------------------------------------------------------------- end to end


def _write_reference_dir(root: Path, reference, reference_adapter, non_lora) -> Path:
    src = root / "Lyra_Mini_3B"
    src.mkdir()
    keys = sorted(reference)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for name, part in shards.items():
        save_file({k: reference[k].contiguous() for k in part}, str(src / name))
        weight_map.update({k: name for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({"model_type": "Lyra_Qwen2VL_SpeechGenerator",
                                                 "mm_speech_projector_type": "simple_mlp"}))
    for folder, r, alpha in (("speech_lora", 4, 8), ("long_speech_lora", 8, 16)):
        adapter_dir = src / folder
        adapter_dir.mkdir()
        cfg = _lora_config(r, alpha).to_dict()
        cfg["target_modules"] = TARGETS
        cfg["peft_type"] = "LORA"
        cfg["base_model_name_or_path"] = "model_zoo/LLM/Qwen2VL_2B_LLM"
        (adapter_dir / "adapter_config.json").write_text(json.dumps(cfg))
        if folder == "speech_lora":
            save_file(reference_adapter, str(adapter_dir / "adapter_model.safetensors"))
            torch.save(non_lora, adapter_dir / "non_lora_trainables.bin")
        else:  # an older peft wrote .bin; r differs, so make matching weights
            torch.manual_seed(4)
            llm = Qwen2ForCausalLM(Qwen2Config(**TEXT))
            long = get_peft_model_state_dict(get_peft_model(llm, _lora_config(r, alpha)))
            torch.save({k: torch.randn_like(v) for k, v in long.items()}, adapter_dir / "adapter_model.bin")
            torch.save({k: v * 2 for k, v in non_lora.items()}, adapter_dir / "non_lora_trainables.bin")
    return src


def test_convert_reference_checkpoint_end_to_end(tmp_path, reference, reference_adapter, non_lora, ours) -> None:
    src = _write_reference_dir(tmp_path, reference, reference_adapter, non_lora)
    dst = tmp_path / "out" / "lyra-mini"
    convert_reference_checkpoint(src, dst)

    assert sorted(p.name for p in dst.parent.iterdir()) == ["lyra-mini"]  # no temp dir left behind
    assert (dst / "model.safetensors").is_file()
    model_state = load_file(str(dst / "model.safetensors"))
    assert set(model_state) == set(ours)
    expected = convert_reference_state_dict(reference)
    for key, tensor in model_state.items():
        assert torch.equal(tensor, expected[key]), key
    generator = load_file(str(dst / "speech_generator.safetensors"))
    assert torch.equal(generator["output_proj.weight"], reference["speech_generator.output_proj.weight"])
    assert json.loads((dst / "reference_config.json").read_text())["mm_speech_projector_type"] == "simple_mlp"

    for name, r, scale in (("speech", 4, 1), ("long_speech", 8, 2)):
        folder = dst / "adapters" / name
        assert sorted(p.name for p in folder.iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "projector.safetensors"]
        config = LoraConfig.from_pretrained(str(folder))
        assert config.r == r and set(config.target_modules) == set(TARGETS)
        projector = load_file(str(folder / "projector.safetensors"))
        assert torch.equal(projector["fc1.weight"], non_lora["model.model.mm_speech_projector.linear1.weight"] * scale)
        lora = load_file(str(folder / "adapter_model.safetensors"))
        if name == "speech":
            ref_key = "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"
            assert torch.equal(lora[ref_key.replace("model.model.layers", "model.model.language_model.layers")],
                               reference_adapter[ref_key])
        _load_into_wrapped_backbone(lora, config)


def test_convert_errors(tmp_path, reference, reference_adapter, non_lora) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_reference_checkpoint(tmp_path / "missing", tmp_path / "dst")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weights found"):
        convert_reference_checkpoint(tmp_path / "empty", tmp_path / "dst")

    src = _write_reference_dir(tmp_path, reference, reference_adapter, non_lora)
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError, match="taken"):
        convert_reference_checkpoint(src, tmp_path / "taken")

    torch.save({"model.mm_projector.weight": torch.zeros(2)}, src / "speech_lora" / "non_lora_trainables.bin")
    with pytest.raises(KeyError, match=r"speech_lora.*model\.mm_projector\.weight"):
        convert_reference_checkpoint(src, tmp_path / "dst")
    (src / "speech_lora" / "non_lora_trainables.bin").unlink()
    with pytest.raises(FileNotFoundError, match="non_lora_trainables.bin"):
        convert_reference_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_cli(tmp_path, reference, reference_adapter, non_lora) -> None:
    src = _write_reference_dir(tmp_path, reference, reference_adapter, non_lora)
    cli = load_script("convert_reference_checkpoint")
    cli.main(["--src", str(src), "--dst", str(tmp_path / "out"), "--dtype", "bf16"])
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert state["speech_projector.fc1.weight"].dtype == torch.bfloat16
    assert (tmp_path / "out" / "adapters" / "long_speech" / "projector.safetensors").is_file()


def test_whisper_weights_from_separate_checkpoint(tmp_path, reference, reference_adapter, non_lora) -> None:
    """A checkpoint saved without its speech tower takes the encoder from an openai-whisper `.pt`."""
    without_tower = {k: v for k, v in reference.items() if not k.startswith(ST)}
    src = _write_reference_dir(tmp_path, without_tower, reference_adapter, non_lora)
    encoder = {k: torch.randn_like(v) for k, v in convert_reference_state_dict(reference).items() if k.startswith(W)}
    pt = tmp_path / "tiny.pt"
    torch.save({"dims": {"n_mels": N_MELS}, "model_state_dict": {
        "encoder." + k[len(W):]: v for k, v in encoder.items()} | {"decoder.ln.weight": torch.zeros(2)}}, pt)
    convert_reference_checkpoint(src, tmp_path / "out", whisper=pt)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {k for k in state if k.startswith(W)} == set(encoder)
    assert torch.equal(state[W + "blocks.1.attn.key.weight"], encoder[W + "blocks.1.attn.key.weight"])
