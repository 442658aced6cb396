"""Reference-checkpoint conversion (lyra/model/convert.py) on synthetic state dicts that
use the reference key names: LyraQwen2VLForCausalLM (LLaVA style), HF WhisperEncoder as
speech tower, `mm_speech_projector.linear1/2`, peft adapters saved from that model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import soundfile as sf
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2VLConfig, Qwen2VLForConditionalGeneration, WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from lyra.config import LMMEConfig
from lyra.model.convert import (
    convert_reference_adapter,
    convert_reference_adapter_config,
    convert_reference_checkpoint,
    convert_reference_state_dict,
    map_reference_key,
    map_reference_lora_key,
    map_reference_projector_key,
)
from lyra.model.lyra import LyraForConditionalGeneration, read_checkpoint_config

from conftest import load_script, tone

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=1024)
MROPE = [2, 3, 3]  # sums to head_dim / 2 = 8
TARGETS = ["v_proj", "o_proj", "down_proj", "gate_proj", "q_proj", "k_proj", "up_proj"]  # reference train.py default
# A runnable Whisper: 1,500 positions (one 30 s window), 64-wide heads as every released Whisper has.
N_MELS, N_CTX, D_ENC, N_HEAD, N_LAYER = 80, 1500, 64, 1, 2
K, PROJ_HIDDEN = 5, 16
STD = 0.02  # the initialisers' scale, so a converted model gives finite, ordinary activations
ST, W = "model.speech_tower.speech_tower.", "speech_encoder.whisper."  # reference / our prefixes


def _qwen2vl_config() -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text_config=dict(**TEXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "mrope_section": MROPE}),
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


def _hf_whisper_encoder(width: int) -> WhisperEncoder:
    return WhisperEncoder(WhisperConfig(
        d_model=width, encoder_layers=N_LAYER, encoder_attention_heads=width // 64, encoder_ffn_dim=4 * width,
        num_mel_bins=N_MELS, max_source_positions=N_CTX, decoder_layers=1, decoder_attention_heads=1,
        decoder_ffn_dim=8, max_target_positions=4,
    ))


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """A reference full checkpoint: LLM as `model.*`, ViT under `model.vision_tower.vision_tower.`,
    HF Whisper encoder under `model.speech_tower.speech_tower.`, projector, speech generator."""
    torch.manual_seed(1)
    qwen = Qwen2VLForConditionalGeneration(_qwen2vl_config()).state_dict()  # random, initialiser-scaled
    state: dict[str, torch.Tensor] = {}
    for key, value in qwen.items():
        if key.startswith("model.language_model."):
            state["model." + key[len("model.language_model."):]] = value.clone()
        elif key.startswith("model.visual."):
            state["model.vision_tower.vision_tower." + key[len("model.visual."):]] = value.clone()
        else:
            state[key] = value.clone()  # lm_head.weight
    for key, value in _hf_whisper_encoder(D_ENC).state_dict().items():
        state["model.speech_tower.speech_tower." + key] = value.clone()
    state["model.mm_speech_projector.linear1.weight"] = torch.randn(PROJ_HIDDEN, K * D_ENC) * STD
    state["model.mm_speech_projector.linear1.bias"] = torch.randn(PROJ_HIDDEN) * STD
    state["model.mm_speech_projector.linear2.weight"] = torch.randn(TEXT["hidden_size"], PROJ_HIDDEN) * STD
    state["model.mm_speech_projector.linear2.bias"] = torch.randn(TEXT["hidden_size"]) * STD
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
    return {k: torch.randn_like(v) * STD for k, v in state.items()}


@pytest.fixture(scope="module")
def non_lora() -> dict[str, torch.Tensor]:
    """`non_lora_trainables.bin`: PeftModel.base_model.named_parameters() -> `model.model.mm_speech_projector.*`."""
    torch.manual_seed(3)
    return {
        "model.model.mm_speech_projector.linear1.weight": torch.randn(PROJ_HIDDEN, K * D_ENC) * STD,
        "model.model.mm_speech_projector.linear1.bias": torch.randn(PROJ_HIDDEN) * STD,
        "model.model.mm_speech_projector.linear2.weight": torch.randn(TEXT["hidden_size"], PROJ_HIDDEN) * STD,
        "model.model.mm_speech_projector.linear2.bias": torch.randn(TEXT["hidden_size"]) * STD,
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

# The release's config.json as transformers 4.4x wrote it for LyraQwen2VLForCausalLM: Qwen2-VL's
# keys, flat, plus the LLaVA-style keys of the authors' training script.
RELEASE_CONFIG = {
    "architectures": ["Lyra2SQwen2VLForCausalLM"], "model_type": "Lyra_Qwen2VL_SpeechGenerator",
    **TEXT, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 10000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": MROPE}, "tie_word_embeddings": False,
    "hidden_act": "silu", "attention_dropout": 0.0, "use_sliding_window": False, "max_window_layers": 2,
    "bos_token_id": 1000, "eos_token_id": 1002, "image_token_id": 1012, "video_token_id": 1013,
    "vision_start_token_id": 1009, "vision_end_token_id": 1010, "vision_token_id": 1011,
    "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": TEXT["hidden_size"], "mlp_ratio": 4,
                      "num_heads": 2, "in_chans": 3, "patch_size": 14, "spatial_merge_size": 2,
                      "temporal_patch_size": 2},
    "mm_vision_tower": "model_zoo/vision/Qwen2VL_2B_ViT", "mm_projector_type": "identity",
    "mm_speech_tower": "model_zoo/audio/whisper-large-v3-turbo", "mm_speech_projector_type": "simple_mlp",
    "mm_speech_hidden_size": D_ENC, "speech_encoder_ds_rate": K, "speech_encoder_hidden_size": D_ENC,
    "image_aspect_ratio": "qwen2vl", "unit_vocab_size": 1000, "ctc_decoder_config": "(2,4096,32,11008)",
    "ctc_upsample_factor": 25, "torch_dtype": "float32", "transformers_version": "4.45.2", "use_cache": True,
}
EOT, IM_END = 1000, 1002  # <|endoftext|>, <|im_end|> in the tiny tokenizer


def _write_release_tokenizer(folder: Path) -> None:
    """The tiny tokenizer saved as a release ships its Qwen2 tokenizer: without Lyra's own
    <|speech_pad|> / <|sound_pad|>, which loading adds after the vocabulary."""
    from lyra.tokenizer import LYRA_SPECIAL_TOKENS, build_tiny_tokenizer

    build_tiny_tokenizer().save_pretrained(str(folder))
    backend = json.loads((folder / "tokenizer.json").read_text())
    backend["added_tokens"] = [t for t in backend["added_tokens"] if t["content"] not in LYRA_SPECIAL_TOKENS]
    (folder / "tokenizer.json").write_text(json.dumps(backend))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [t for t in config["extra_special_tokens"] if t not in LYRA_SPECIAL_TOKENS]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _write_reference_dir(root: Path, reference, reference_adapter, non_lora, name: str = "Lyra_Mini_3B") -> Path:
    """Every file of a release folder: config.json, generation_config.json, tokenizer files, the
    sharded non-LoRA weights with their index, and speech_lora/ + long_speech_lora/."""
    src = root / name
    src.mkdir()
    keys = sorted(reference)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for shard, part in shards.items():
        save_file({k: reference[k].contiguous() for k in part}, str(src / shard))
        weight_map.update({k: shard for k in part})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps(RELEASE_CONFIG))
    (src / "generation_config.json").write_text(json.dumps({"bos_token_id": EOT, "eos_token_id": IM_END}))
    _write_release_tokenizer(src)
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
            torch.save({k: torch.randn_like(v) * STD for k, v in long.items()}, adapter_dir / "adapter_model.bin")
            torch.save({k: v * 2 for k, v in non_lora.items()}, adapter_dir / "non_lora_trainables.bin")
    return src


@pytest.fixture(scope="module")
def release(tmp_path_factory, reference, reference_adapter, non_lora) -> Path:
    return _write_reference_dir(tmp_path_factory.mktemp("release"), reference, reference_adapter, non_lora)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, release) -> Path:
    dst = tmp_path_factory.mktemp("converted") / "lyra-mini"
    convert_reference_checkpoint(release, dst)
    return dst


def _copy(release: Path, root: Path) -> Path:
    return Path(shutil.copytree(release, root / release.name))


def test_convert_reference_checkpoint_end_to_end(converted, reference, reference_adapter, non_lora, ours) -> None:
    dst = converted
    assert sorted(p.name for p in dst.parent.iterdir()) == ["lyra-mini"]  # no temp dir left behind
    assert sorted(p.name for p in dst.iterdir()) == [
        "adapters", "config.json", "model.safetensors", "reference_config.json", "speech_generator.safetensors",
        "tokenizer"]
    model_state = load_file(str(dst / "model.safetensors"))
    assert set(model_state) == set(ours)
    expected = convert_reference_state_dict(reference)
    for key, tensor in model_state.items():
        assert torch.equal(tensor, expected[key]), key
    generator = load_file(str(dst / "speech_generator.safetensors"))
    assert torch.equal(generator["output_proj.weight"], reference["speech_generator.output_proj.weight"])
    assert json.loads((dst / "reference_config.json").read_text()) == RELEASE_CONFIG

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


def test_converted_config_follows_the_release(converted) -> None:
    """config.json: dimensions from the release's config.json and its Whisper weights, and the
    release's behaviour (no sound path, its windowing, its stop tokens)."""
    config = read_checkpoint_config(converted)
    assert config.name == "Lyra_Mini_3B" and config.tokenizer is None
    assert (config.text.vocab_size, config.text.hidden_size, config.text.num_hidden_layers) == (1024, 64, 2)
    assert config.text.mrope_section == MROPE and config.text.rope_theta == 10000.0
    assert config.text.tie_word_embeddings is False and config.text.max_position_embeddings == 4096
    assert (config.vision.depth, config.vision.embed_dim, config.vision.num_heads) == (2, 32, 2)
    encoder = config.speech.encoder
    assert (encoder.n_mels, encoder.n_audio_ctx, encoder.n_audio_state, encoder.n_audio_head,
            encoder.n_audio_layer, encoder.checkpoint) == (N_MELS, N_CTX, D_ENC, 1, N_LAYER, None)
    assert (config.speech.projector.frames_per_token, config.speech.projector.hidden_size) == (K, PROJ_HIDDEN)
    assert config.speech.window_rule == "floor_plus_one" and config.sound.enabled is False
    # the tokenizer had no <|speech_pad|> / <|sound_pad|>: they follow its 1,014 tokens
    assert (config.tokens.speech, config.tokens.sound, config.tokens.image) == (1014, 1015, 1012)
    assert (config.tokens.eos, config.tokens.pad) == (IM_END, EOT)
    assert config.stop_token_ids == [IM_END, EOT]


def test_from_pretrained_loads_the_conversion_as_it_is(converted) -> None:
    from lyra.model import mlora

    model = LyraForConditionalGeneration.from_pretrained(converted)
    assert model.sound_projector is None and model.sound_encoder is None
    assert sorted(mlora.adapter_names(model)) == ["long_speech", "speech"]
    state = load_file(str(converted / "model.safetensors"))
    assert torch.equal(model.speech_encoder.whisper.blocks[1].attn.query.weight,
                       state["speech_encoder.whisper.blocks.1.attn.query.weight"])
    mlora.use_adapter(model, "long_speech")
    long = load_file(str(converted / "adapters" / "long_speech" / "projector.safetensors"))
    assert torch.equal(model.speech_projector.fc1.weight, long["fc1.weight"])
    with pytest.raises(ValueError, match="no sound path"):
        model.encode_sound([torch.zeros(16000)])


def _chat(capsys, *argv: str) -> tuple[int, dict | None, str]:
    from lyra import chat

    code = chat.main(["--max-new-tokens", "4", "--json", *argv])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if code == 0 else None), out.err


def test_chat_answers_with_the_converted_model(capsys, tmp_path, converted) -> None:
    """`python -m lyra.chat --model <converted> --speech q.wav --json`, and the release's windows:
    29.99 s is one window and the speech adapter, exactly 30.0 s and 30.01 s two windows and long_speech."""
    answers = {}
    for seconds in (2.0, 29.99, 30.0, 30.01):
        wav = tmp_path / f"q{seconds}.wav"
        sf.write(wav, tone(seconds), 16000)
        code, answers[seconds], _ = _chat(capsys, "--model", str(converted), "--speech", str(wav))
        assert code == 0
        assert answers[seconds]["untrained"] is False and isinstance(answers[seconds]["answer"], str)
        assert 1 <= answers[seconds]["new_tokens"] + (answers[seconds]["answer"] == "") <= 4
    assert [answers[s]["adapter"] for s in (2.0, 29.99, 30.0, 30.01)] == ["speech", "speech", "long_speech",
                                                                           "long_speech"]
    assert answers[29.99]["prompt_tokens"] == answers[2.0]["prompt_tokens"]
    for seconds in (30.0, 30.01):  # a second window
        assert answers[seconds]["prompt_tokens"] == answers[2.0]["prompt_tokens"] + N_CTX // K


def test_sound_input_to_a_model_without_a_sound_path_is_a_clear_error(capsys, tmp_path, converted) -> None:
    wav = tmp_path / "dog.wav"
    sf.write(wav, tone(1.0), 16000)
    code, _, err = _chat(capsys, "--model", str(converted), "--sound", str(wav), "--text", "what is this?")
    assert code == 2
    assert "has no sound path" in err and "sound.enabled is false" in err


@pytest.fixture(scope="module")
def says_endoftext(tmp_path_factory, reference, reference_adapter, non_lora) -> Path:
    """A converted release whose every next token is <|endoftext|>: embedding column 0 is large
    for every token, so the final hidden state points along it, and only <|endoftext|>'s output
    row reads that column."""
    state = {k: v.clone() for k, v in reference.items()}
    state["model.embed_tokens.weight"][:, 0] += 50.0
    state["lm_head.weight"][:, 0] = 0.0
    state["lm_head.weight"][EOT, 0] = 1.0
    root = tmp_path_factory.mktemp("endoftext")
    src = _write_reference_dir(root, state, reference_adapter, non_lora)
    convert_reference_checkpoint(src, root / "converted")
    return root / "converted"


@pytest.mark.parametrize("lmme", [None, LMMEConfig(enabled=True, blocks=2, keep=0.5, min_keep=1)])
def test_released_model_stops_on_endoftext(says_endoftext, lmme) -> None:
    """The release stops on <|endoftext|> as well as <|im_end|>: one token, not max_new_tokens."""
    from lyra.processing import LyraProcessor, collate
    from lyra.tokenizer import load_tokenizer

    model = LyraForConditionalGeneration.from_pretrained(says_endoftext).eval()
    processor = LyraProcessor(load_tokenizer(says_endoftext / "tokenizer"), model.config)
    batch = collate([processor([{"role": "user", "content": "Hello there"}])], model.config.tokens.pad, "left")
    new = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=8, lmme=lmme)
    assert new.tolist() == [[EOT]]


@pytest.fixture(scope="module")
def served(says_endoftext):
    """`python -m lyra.serve.api --model <converted>` on a free loopback port."""
    from lyra.inference import load_model
    from lyra.serve.api import ServerConfig, create_server

    server = create_server(*load_model(str(says_endoftext), "cpu", "fp32"), ServerConfig(port=0)).start()
    yield server
    server.close()


def _post_chat(server, content) -> tuple[int, dict]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"model": "converted", "messages": [{"role": "user", "content": content}], "max_tokens": 8}
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    reply = json.loads(response.read())
    connection.close()
    return response.status, reply


def test_served_released_model_stops_on_endoftext(served) -> None:
    """The server's batcher ends the answer at <|endoftext|>, not after max_tokens."""
    status, reply = _post_chat(served, "Hello")
    assert status == 200, reply
    assert reply["choices"][0]["finish_reason"] == "stop"
    assert reply["usage"]["completion_tokens"] == 0 and reply["choices"][0]["message"]["content"] == ""


def test_served_sound_input_without_a_sound_path_is_a_400(served) -> None:
    import base64
    import io

    wav = io.BytesIO()
    sf.write(wav, tone(1.0), 16000, format="WAV")
    sound = {"type": "input_sound", "input_sound": {"data": base64.b64encode(wav.getvalue()).decode(), "format": "wav"}}
    status, reply = _post_chat(served, [sound, {"type": "text", "text": "what is this?"}])
    assert status == 400, reply
    assert reply["error"]["code"] == "invalid_media" and "has no sound path" in reply["error"]["message"]


def test_reconverting_is_idempotent(tmp_path, release) -> None:
    """The same command twice: the second run replaces the first conversion with identical files."""
    dst = tmp_path / "out"
    convert_reference_checkpoint(release, dst)
    first = {p.relative_to(dst): p.read_bytes() for p in sorted(dst.rglob("*")) if p.is_file()}
    convert_reference_checkpoint(release, dst)
    second = {p.relative_to(dst): p.read_bytes() for p in sorted(dst.rglob("*")) if p.is_file()}
    assert first == second and len(first) >= 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_convert_errors(tmp_path, release) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_reference_checkpoint(tmp_path / "missing", tmp_path / "dst")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json is missing"):
        convert_reference_checkpoint(tmp_path / "empty", tmp_path / "dst")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(RELEASE_CONFIG))
    with pytest.raises(FileNotFoundError, match="no weights found"):
        convert_reference_checkpoint(tmp_path / "empty", tmp_path / "dst")

    src = _copy(release, tmp_path)
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


SHARD = "model-00002-of-00002.safetensors"


@pytest.mark.parametrize(("damage", "error", "message"), [
    (lambda src: (src / SHARD).write_bytes((src / SHARD).read_bytes()[:1000]), ValueError,
     rf"{SHARD} cannot be read.*download it again"),
    (lambda src: (src / SHARD).unlink(), FileNotFoundError, rf"{SHARD} is listed in .*index\.json but missing"),
    (lambda src: (src / "speech_lora" / "non_lora_trainables.bin").write_bytes(b"not a pickle"), ValueError,
     r"speech_lora/non_lora_trainables\.bin cannot be read"),
    (lambda src: (src / "long_speech_lora" / "adapter_config.json").unlink(), FileNotFoundError,
     r"long_speech_lora/adapter_config\.json is missing"),
    (lambda src: (src / "config.json").write_text("{not json"), ValueError, r"config\.json is not valid JSON"),
    (lambda src: [(src / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], FileNotFoundError,
     "has no tokenizer"),
])
def test_damaged_release_names_the_file(tmp_path, release, damage, error, message) -> None:
    src = _copy(release, tmp_path)
    damage(src)
    with pytest.raises(error, match=message):
        convert_reference_checkpoint(src, tmp_path / "dst")
    assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]  # nothing half-written


def test_whisper_folder_of_the_wrong_size_names_it(tmp_path, release) -> None:
    """An HF Whisper folder twice as wide as the one the projector was trained on."""
    from transformers import WhisperModel

    folder = tmp_path / "whisper-wide"
    encoder = _hf_whisper_encoder(2 * D_ENC)
    model = WhisperModel(encoder.config)
    model.encoder.load_state_dict(encoder.state_dict())
    model.save_pretrained(str(folder))
    with pytest.raises(ValueError, match=r"whisper-wide: a Whisper encoder 128 wide.*speech projector"):
        convert_reference_checkpoint(release, tmp_path / "dst", whisper=folder)
    assert not (tmp_path / "dst").exists()


def test_cli(tmp_path, release) -> None:
    cli = load_script("convert_reference_checkpoint")
    cli.main(["--src", str(release), "--dst", str(tmp_path / "out"), "--dtype", "bf16"])
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert state["speech_projector.fc1.weight"].dtype == torch.bfloat16
    assert (tmp_path / "out" / "adapters" / "long_speech" / "projector.safetensors").is_file()
    assert LyraForConditionalGeneration.from_pretrained(tmp_path / "out").speech_projector.fc1.weight.dtype == \
        torch.bfloat16


def test_whisper_weights_from_separate_checkpoint(tmp_path, reference, reference_adapter, non_lora) -> None:
    """A checkpoint saved without its speech tower takes the encoder from an openai-whisper `.pt`."""
    without_tower = {k: v for k, v in reference.items() if not k.startswith(ST)}
    src = _write_reference_dir(tmp_path, without_tower, reference_adapter, non_lora)
    with pytest.raises(ValueError, match="holds no speech tower weights.*--whisper"):
        convert_reference_checkpoint(src, tmp_path / "out")
    encoder = {k: torch.randn_like(v) for k, v in convert_reference_state_dict(reference).items() if k.startswith(W)}
    pt = tmp_path / "tiny.pt"
    torch.save({"dims": {"n_mels": N_MELS}, "model_state_dict": {
        "encoder." + k[len(W):]: v for k, v in encoder.items()} | {"decoder.ln.weight": torch.zeros(2)}}, pt)
    convert_reference_checkpoint(src, tmp_path / "out", whisper=pt)
    state = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {k for k in state if k.startswith(W)} == set(encoder)
    assert torch.equal(state[W + "blocks.1.attn.key.weight"], encoder[W + "blocks.1.attn.key.weight"])
