"""scripts/bench_train_step.py: its sample, the recipe's setup, and the step it times."""

from __future__ import annotations

import math
from argparse import Namespace

import pytest
import torch
from conftest import REPO_ROOT, load_script

from lyra.bench import Meter, bench_config
from lyra.config import LMMEConfig

bench = load_script("bench_train_step")
STAGE2 = REPO_ROOT / "configs/train/stage2_base.yaml"
STAGE3 = REPO_ROOT / "configs/train/stage3_base.yaml"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def config():
    """The tiny preset with 4 LLM layers, so LMME(4, .) has a block per layer."""
    return bench_config("tiny", {"text.num_hidden_layers": 4})


def test_long_sample_is_whole_windows_then_instruction_and_answer(config):
    per_clip = config.speech_tokens_per_clip
    sample = bench.long_sample(config, 3 * per_clip + 200, CPU)
    text = bench.INSTRUCTION_TOKENS + bench.ANSWER_TOKENS
    assert sample.speech_tokens == 3 * per_clip
    assert sample.input_ids.shape == (1, 3 * per_clip + text)
    assert int((sample.input_ids == config.tokens.speech).sum()) == 3 * per_clip
    assert bool((sample.labels[0, :-bench.ANSWER_TOKENS] == -100).all())
    assert torch.equal(sample.labels[0, -bench.ANSWER_TOKENS:], sample.input_ids[0, -bench.ANSWER_TOKENS:])
    model = bench.set_up(config, STAGE2, CPU, torch.float32).model
    with torch.no_grad():  # the waveform gives exactly as many speech tokens as the ids hold
        assert model.encode_speech(sample.speech)[0].shape[0] == sample.speech_tokens
    with pytest.raises(ValueError, match="too short"):
        bench.long_sample(config, per_clip + text - 1, CPU)


@pytest.mark.parametrize("recipe, adapter, rank", [(STAGE2, "speech", 64), (STAGE3, "long_speech", 128)])
def test_set_up_trains_what_the_stage_trains(config, recipe, adapter, rank):
    setup = bench.set_up(config, recipe, CPU, torch.float32)
    trainable = {name for name, p in setup.model.named_parameters() if p.requires_grad}
    assert trainable and all(f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n or n.startswith("speech_projector.")
                             for n in trainable)
    assert any(n.startswith("speech_projector.") for n in trainable)
    lora_a = next(p for n, p in setup.model.named_parameters() if f".lora_A.{adapter}." in n)
    assert lora_a.shape[0] == rank
    layers = setup.model.backbone.model.language_model.layers
    assert all(layer.gradient_checkpointing for layer in layers) and setup.model.training
    assert setup.trainable == sum(p.numel() for p in setup.model.parameters() if p.requires_grad)


def test_step_updates_only_trainable_weights(config):
    setup = bench.set_up(config, STAGE2, CPU, torch.float32)
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters()}
    sample = bench.long_sample(config, 2 * config.speech_tokens_per_clip + 128, CPU)
    loss = bench.train_step(setup, sample, LMMEConfig(True, 4, 0.7, 32), torch.float32)
    assert math.isfinite(loss)
    changed = {n for n, p in setup.model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    assert any(".lora_B.speech." in n for n in changed)  # B starts at zero: the LoRA really trained


def test_lmme_keeping_everything_steps_like_the_baseline(config):
    """The LMME path the bench times is the training forward: keeping every token gives the same loss."""
    sample = bench.long_sample(config, 2 * config.speech_tokens_per_clip + 128, CPU)
    losses = []
    for settings in (LMMEConfig(enabled=False), LMMEConfig(True, 4, 1.0, 32)):
        torch.manual_seed(0)  # same random weights and LoRA dropout masks
        setup = bench.set_up(config, STAGE2, CPU, torch.float32)
        losses.append(bench.train_step(setup, sample, settings, torch.float32))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_measure_cell_rows(config):
    setup = bench.set_up(config, STAGE2, CPU, torch.float32)
    args = Namespace(warmup=0, repeats=2)
    rows = bench.measure_cell(setup, 2 * config.speech_tokens_per_clip + 128, args, Meter(CPU), torch.float32)
    base, lmme = rows
    assert [r["variant"] for r in rows] == list(bench.VARIANTS) and not base["oom"] and not lmme["oom"]
    assert base["flop_bound"] == 1.0 and lmme["flop_bound"] > 1.0
    assert lmme["step_ratio"] == pytest.approx(lmme["ms_per_step"] / base["ms_per_step"], rel=1e-2)
    assert lmme["predicted_run_change"] == pytest.approx(lmme["step_ratio"] - 1, abs=1e-3)
    assert base["peak_gib"] > 0 and base["ms_sd"] >= 0

