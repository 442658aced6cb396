"""Light checkpoints (lyra/train/checkpoint.py): the base's hash, what is saved, what is gathered."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lyra.config import load_config
from lyra.model import mlora
from lyra.model.lyra import LyraForConditionalGeneration
from lyra.train.checkpoint import (
    BASE_FILE,
    TRAINABLE_FILE,
    BaseRecord,
    gather_trainable_state,
    load_trainable_state,
    trainable_names,
    write_trainable_state,
)
from lyra.utils.state_dict import weights_sha256


def built(seed: int = 0) -> LyraForConditionalGeneration:
    torch.manual_seed(seed)
    return LyraForConditionalGeneration.from_config(load_config("tiny"))


def projector_only(model: LyraForConditionalGeneration) -> LyraForConditionalGeneration:
    model.requires_grad_(False)
    model.speech_projector.requires_grad_(True)
    return model


def test_the_hash_is_the_weights():
    reference = weights_sha256(built(0))
    assert weights_sha256(built(0)) == reference  # rebuilt with the same seed: the same base
    assert weights_sha256(built(1)) != reference
    model = built(0)
    with torch.no_grad():  # one element of one frozen weight, by one step of its last bit
        weight = model.speech_encoder.whisper.blocks[0].attn.query.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(1.0))
    assert weights_sha256(model) != reference
    assert weights_sha256(built(0).to(torch.bfloat16)) != reference  # the dtype is part of the base
    mlora.add_adapter(model := built(0), "speech")
    with_adapter = weights_sha256(model)
    sampled = weights_sha256(model, samples=4)  # the evaluation's fingerprint
    model.adapter_projectors[mlora.BASE]["fc1.bias"] += 1.0  # a projector kept aside for an adapter counts too
    assert weights_sha256(model) != with_adapter
    assert weights_sha256(model, samples=4) != sampled
    assert weights_sha256(built(0), samples=4) == weights_sha256(built(0), samples=4) != weights_sha256(built(1), samples=4)
    assert weights_sha256(built(0).to(torch.bfloat16), samples=4) != weights_sha256(built(0), samples=4)


def test_a_light_checkpoint_round_trips(tmp_path):
    trained = projector_only(built(0))
    with torch.no_grad():
        for parameter in trained.speech_projector.parameters():
            parameter.add_(0.5)
    base = BaseRecord(source="preset tiny (random weights)", seed=0, sha256=weights_sha256(built(0)))
    state = gather_trainable_state(trained, zero3=False)
    assert set(state) == {n for n, p in trained.named_parameters() if p.requires_grad} | {
        "speech_encoder.whisper.positional_embedding"}  # the trainable parameters and the persistent buffers
    write_trainable_state(tmp_path, state, base)
    assert sorted(p.name for p in tmp_path.iterdir()) == [BASE_FILE, TRAINABLE_FILE]
    assert BaseRecord.read(tmp_path) == base

    resumed = projector_only(built(0))
    load_trainable_state(resumed, tmp_path)
    for (name, a), b in zip(trained.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    model = projector_only(built(0))
    write_trainable_state(tmp_path, gather_trainable_state(model, zero3=False),
                          BaseRecord(source="x", seed=0, sha256="0" * 64))
    other = built(0)
    other.requires_grad_(False)
    other.sound_projector.requires_grad_(True)  # another stage's trainable set
    with pytest.raises(ValueError, match=rf"{TRAINABLE_FILE} does not match what this run trains.*"
                                         r"Resume with the config the run was started with"):
        load_trainable_state(other, tmp_path)
    (tmp_path / TRAINABLE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"{TRAINABLE_FILE} is missing; the checkpoint is incomplete"):
        load_trainable_state(model, tmp_path)


def test_a_base_mismatch_names_both_hashes_and_the_fix(tmp_path):
    recorded = BaseRecord(source="/runs/stage1/final", seed=0, sha256="a" * 64)
    now = BaseRecord(source="/runs/other/final", seed=3, sha256="b" * 64)
    recorded.check_matches(BaseRecord(source="/moved/final", seed=0, sha256="a" * 64), tmp_path)  # moved is fine
    with pytest.raises(ValueError) as error:
        recorded.check_matches(now, tmp_path)
    message = str(error.value)
    for part in ("a" * 64, "b" * 64, "/runs/stage1/final", "/runs/other/final", "(seed 3)", str(tmp_path / BASE_FILE),
                 "Resume with the init_from/model and seed"):
        assert part in message


def test_an_old_or_damaged_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="is not a light checkpoint .*restart the stage from its init_from"):
        BaseRecord.read(tmp_path)
    (tmp_path / BASE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{BASE_FILE} is not a valid base record .*the checkpoint is damaged"):
        BaseRecord.read(tmp_path)
    (tmp_path / BASE_FILE).write_text('{"source": "x"}')
    with pytest.raises(ValueError, match="is not a valid base record"):
        BaseRecord.read(tmp_path)


def test_zero3_gathers_the_trainable_parameters_only(monkeypatch):
    """Under ZeRO-3 a parameter is a shard until gathered: a light checkpoint gathers exactly the
    ones it saves (a 2.9B-parameter base is never assembled for 16M trained ones)."""
    import deepspeed

    gathered = []

    @contextlib.contextmanager
    def recording(parameters, modifier_rank=None):
        assert modifier_rank is None  # read only: nothing is written back to the shards
        gathered.append(list(parameters))
        yield

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", recording)
    model = built(0)
    mlora.add_adapter(model, "speech")
    model.requires_grad_(False)
    model.speech_projector.requires_grad_(True)
    for name, parameter in model.named_parameters():
        if ".lora_" in name:
            parameter.requires_grad_(True)
    state = gather_trainable_state(model, zero3=True)
    assert len(gathered) == 1
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in gathered[0]} == {id(p) for p in trainable}
    assert len(gathered[0]) == len(trainable) < len(list(model.parameters())) / 2
    assert set(state) == set(trainable_names(model))


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_final_weights_gathered_as_views_of_one_buffer_are_saved(tmp_path, dtype):
    """ZeRO-3's gathered state dict holds views into one flat buffer; safetensors refuses those
    unless each gets a storage of its own. Kept as they are (fp32 training) or in bf16."""
    model = built(0)
    flat = torch.cat([v.reshape(-1) for v in model.state_dict().values()])
    views, offset = {}, 0
    for key, value in model.state_dict().items():
        views[key] = flat[offset:offset + value.numel()].view(value.shape)
        offset += value.numel()
    model.save_pretrained(tmp_path / "final", state_dict=views, dtype=dtype)
    loaded = LyraForConditionalGeneration.from_pretrained(tmp_path / "final")
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key].to(dtype or torch.float32)), key
