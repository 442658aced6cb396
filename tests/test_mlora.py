"""MLoRA: per-modality adapters keep the base model, save, load, merge and route."""

from __future__ import annotations

import pytest
import torch

from lyra.config import load_config
from lyra.model import mlora
from lyra.model.lyra import LyraForConditionalGeneration

from conftest import tone
from test_model import vision_inputs

SMALL = mlora.AdapterSpec(r=4, alpha=8, dropout=0.0)


def speech_batch(config):
    n = config.speech_tokens_per_clip
    ids = torch.cat([torch.randint(0, 900, (4,)), torch.full((n,), config.tokens.speech), torch.randint(0, 900, (6,))])[None]
    labels = ids.clone()
    labels[:, : n + 4] = -100
    return {"input_ids": ids, "labels": labels, "speech": [torch.from_numpy(tone(2.0))]}


def train_adapter(model, name, steps=3):
    mlora.add_adapter(model, name, SMALL)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [p for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n]
    trainable += list(model.speech_projector.parameters())
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    torch.manual_seed(1)
    batch = speech_batch(model.config)
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return batch


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return LyraForConditionalGeneration.from_config(load_config("tiny")).eval()


def logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_adapters_off_keep_the_base_model_exactly(model):
    text = {"input_ids": torch.randint(0, 900, (1, 12))}
    image_ids, image_extra = vision_inputs(model.config, "image")
    image = {"input_ids": image_ids, **image_extra}
    before_text, before_image = logits(model, **text), logits(model, **image)
    batch = train_adapter(model, "speech")
    mlora.use_adapter(model, None)
    assert torch.equal(logits(model, **text), before_text)
    assert torch.equal(logits(model, **image), before_image)
    mlora.use_adapter(model, "speech")
    assert not torch.allclose(logits(model, **text), before_text)
    speech_inputs = {k: v for k, v in batch.items() if k != "labels"}
    on = logits(model, **speech_inputs)
    mlora.use_adapter(model, None)
    assert not torch.allclose(logits(model, **speech_inputs), on)  # projector and LoRA both switched


def test_lora_targets_only_llm_linears(model):
    mlora.add_adapter(model, "speech", SMALL)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert len(wrapped) == 7 * model.config.text.num_hidden_layers
    assert all(".language_model.layers." in n for n in wrapped)


def test_save_load_round_trip_with_adapters(tmp_path, model):
    batch = train_adapter(model, "speech")
    mlora.add_adapter(model, "long_speech", SMALL)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    expected = {}
    for name in (None, "speech", "long_speech"):
        mlora.use_adapter(model, name)
        expected[name] = logits(model, **inputs)
    mlora.use_adapter(model, "speech")  # saving while an adapter is active must still save the base projector
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt" / "adapters").iterdir()) == ["long_speech", "speech"]
    loaded = LyraForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.active_adapter is None
    for name in (None, "speech", "long_speech"):
        mlora.use_adapter(loaded, name)
        assert torch.allclose(logits(loaded, **inputs), expected[name], atol=1e-6), name


def test_adapter_choice_per_request(model):
    seconds = 16000  # samples per second
    assert mlora.adapter_for_audio(model, []) is None
    assert mlora.adapter_for_audio(model, [10 * seconds]) is None  # nothing loaded
    mlora.add_adapter(model, "speech", SMALL)
    assert mlora.adapter_for_audio(model, [10 * seconds]) == "speech"
    assert mlora.adapter_for_audio(model, [600 * seconds]) == "speech"  # no long_speech adapter yet
    mlora.add_adapter(model, "long_speech", SMALL)
    assert mlora.adapter_for_audio(model, [10 * seconds, 600 * seconds]) == "long_speech"
    with pytest.raises(ValueError, match="no adapter 'music' loaded"):
        mlora.use_adapter(model, "music")


# (rule, samples at 16 kHz, windows): exactly 30.0 s is one window for "ceil" and two for the
# released code's "floor_plus_one"; 29.99 s and 30.01 s fall on the same side for both.
WINDOW_CASES = [("ceil", 479_840, 1), ("ceil", 480_000, 1), ("ceil", 480_160, 2),
                ("floor_plus_one", 479_840, 1), ("floor_plus_one", 480_000, 2), ("floor_plus_one", 480_160, 2)]


@pytest.mark.parametrize(("rule", "samples", "windows"), WINDOW_CASES)
def test_window_count_and_adapter_follow_one_rule(tiny_tokenizer, rule, samples, windows):
    """29.99 s, 30.0 s, 30.01 s: the prompt's speech tokens, the encoder's output rows and the
    adapter all come from the same window count of the unrounded sample count."""
    from lyra.processing import LyraProcessor

    config = load_config("tiny", {"speech.window_rule": rule})
    torch.manual_seed(0)
    model = LyraForConditionalGeneration.from_config(config).eval()
    mlora.add_adapter(model, "speech", SMALL)
    mlora.add_adapter(model, "long_speech", SMALL)
    waveform = torch.from_numpy(tone(samples / 16000))
    assert waveform.shape[0] == samples
    sample = LyraProcessor(tiny_tokenizer, config)([{"role": "user", "content": "<speech>"}], speech=[waveform])
    tokens = int((sample.input_ids == config.tokens.speech).sum())
    assert tokens == windows * config.speech_tokens_per_clip
    with torch.no_grad():
        assert model.encode_speech([waveform])[0].shape[0] == tokens
    assert mlora.adapter_for_audio(model, [samples]) == ("long_speech" if windows > 1 else "speech")


def test_window_settings_are_checked():
    with pytest.raises(ValueError, match="window_rule 'round'"):
        load_config("tiny", {"speech.window_rule": "round"})
    with pytest.raises(ValueError, match="multiple of speech.clip_seconds"):
        load_config("tiny", {"speech.long_speech_seconds": 45})


def test_merge_equals_adapter_on(tmp_path, model):
    batch = train_adapter(model, "speech")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with_adapter = logits(model, **inputs)
    mlora.merge_adapter(model, "speech")
    assert mlora.adapter_names(model) == []
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert torch.allclose(logits(model, **inputs), with_adapter, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    reloaded = LyraForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(logits(reloaded, **inputs), with_adapter, atol=1e-5)


def test_merge_script(tmp_path, model):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    batch = train_adapter(model, "speech")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with_adapter = logits(model, **inputs)
    model.save_pretrained(tmp_path / "ckpt")
    script = str(REPO_ROOT / "scripts" / "merge_lora.py")
    done = subprocess.run([sys.executable, script, "--model", str(tmp_path / "ckpt"), "--adapter", "speech",
                           "--out", str(tmp_path / "merged")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    merged = LyraForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    assert mlora.adapter_names(merged) == []
    assert torch.allclose(logits(merged, **inputs), with_adapter, atol=1e-5)
    bad = subprocess.run([sys.executable, script, "--model", str(tmp_path / "ckpt"), "--adapter", "music",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "no adapter 'music' loaded" in bad.stderr
