"""The training stages on the tiny model: chaining, over-fitting, resuming, MLoRA's promise."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import REPO_ROOT
from lyra import chat
from support.sample_set import make_sample_set
from lyra.model.lyra import LyraForConditionalGeneration
from lyra.model import mlora
from lyra.train.checkpoint import BASE_FILE, TRAINABLE_FILE, BaseRecord
from lyra.train.config import load_train_config
from lyra.train.recipe import build_trainer, run, train
from lyra.train.trainer import COMPLETE_MARKER, last_complete_checkpoint

CONFIGS = REPO_ROOT / "configs" / "train"
SPEECH = str(REPO_ROOT / "data" / "demo" / "question.wav")


@pytest.fixture(scope="module")
def sample_data(tmp_path_factory):
    return make_sample_set(tmp_path_factory.mktemp("data"), num_samples=8, long_speech_seconds=35.0)


def stage_config(stage: int, data, out, **overrides):
    values = {"data.path": str(data), "output_dir": str(out), "report_to": "none", "logging_steps": 1,
              "optim.max_steps": 2, "save_steps": 100, **overrides}
    return load_train_config(CONFIGS / f"stage{stage}_tiny.yaml", values)


def losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def with_units(data):
    """The sample set's text-only records, each with target speech units (stage 4 data)."""
    records = [dict(r, tgt_unit="".join(f"<{(7 * i + k) % 50}>" for k in range(12)))
               for i, r in enumerate(json.loads(data.read_text())) if not any(
                   key in r for key in ("image", "video", "speech", "long_speech", "sound"))]
    path = data.parent / "speechgen.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def chain(sample_data, tmp_path_factory):
    """Stages 1 -> 2 -> 3 -> 4, each reading the previous one's final/."""
    root = tmp_path_factory.mktemp("runs")
    outputs = {}
    previous = None
    for stage in (1, 2, 3, 4):
        extra = {"init_from": str(previous)} if previous else {}
        data = with_units(sample_data) if stage == 4 else sample_data
        config = stage_config(stage, data, root / f"stage{stage}", **extra)
        trainer = build_trainer(config)
        assert train(trainer, config) == 0
        previous = root / f"stage{stage}" / "final"
        outputs[stage] = (previous, trainer)
    return outputs


def test_stages_chain_and_train_what_table7_says(chain):
    final1, trainer1 = chain[1]
    final2, trainer2 = chain[2]
    final3, _ = chain[3]
    trainable1 = {n for n, p in trainer1.model.named_parameters() if p.requires_grad}
    assert trainable1 and all(n.startswith("speech_projector.") for n in trainable1)
    trainable2 = {n for n, p in trainer2.model.named_parameters() if p.requires_grad}
    assert all(n.startswith("speech_projector.") or ".lora_" in n and ".speech." in n for n in trainable2)
    assert any(".lora_" in n for n in trainable2)
    assert not (final1 / "adapters").exists()
    assert sorted(p.name for p in (final3 / "adapters").iterdir()) == ["long_speech", "speech"]
    model = LyraForConditionalGeneration.from_pretrained(final3)
    assert sorted(mlora.adapter_names(model)) == ["long_speech", "speech"]
    final4, trainer4 = chain[4]
    trainable4 = {n for n, p in trainer4.model.named_parameters() if p.requires_grad}
    assert trainable4 and all(n.startswith("speech_generator.") for n in trainable4)
    assert any("speech_generator_loss" in entry for entry in trainer4.state.log_history)
    assert LyraForConditionalGeneration.from_pretrained(final4).speech_generator is not None


def chat_json(capsys, model, *argv: str) -> dict:
    capsys.readouterr()
    assert chat.main(["--model", str(model), "--max-new-tokens", "2", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_each_stage_final_answers_in_chat(chain, capsys):
    adapters = {1: None, 2: "speech", 3: "speech", 4: "speech"}  # a short question takes the speech adapter
    for stage, (final, _) in chain.items():
        reply = chat_json(capsys, final, "--speech", SPEECH, "--text", "answer briefly")
        assert reply["adapter"] == adapters[stage] and not reply["untrained"] and reply["new_tokens"] >= 1


def safetensors_dtypes(folder) -> dict[str, torch.dtype]:
    dtypes = {}
    for path in folder.rglob("*.safetensors"):
        with safe_open(str(path), "pt") as file:
            dtypes.update({f"{path.relative_to(folder)}:{key}": file.get_slice(key).get_dtype() for key in file.keys()})
    return dtypes


def test_bf16_stages_write_final_in_bf16_and_chain_from_it(sample_data, tmp_path, capsys):
    previous = None
    for stage in (1, 2):
        config = stage_config(stage, sample_data, tmp_path / f"stage{stage}", precision="bf16",
                              **({"init_from": str(previous)} if previous else {}))
        trainer = build_trainer(config)
        assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # autocast computes in bf16
        assert train(trainer, config) == 0
        previous = tmp_path / f"stage{stage}" / "final"
        dtypes = safetensors_dtypes(previous)
        assert set(dtypes.values()) == {"BF16"}, {k: v for k, v in dtypes.items() if v != "BF16"}
    assert any(key.startswith("adapters/speech/") for key in dtypes)
    reply = chat_json(capsys, previous, "--speech", SPEECH)
    assert reply["adapter"] == "speech"

    merge = runpy.run_path(str(REPO_ROOT / "scripts" / "merge_lora.py"))["main"]  # one dense folder, still bf16
    assert merge(["--model", str(previous), "--adapter", "speech", "--out", str(tmp_path / "merged")]) == 0
    assert set(safetensors_dtypes(tmp_path / "merged").values()) == {"BF16"}
    assert chat_json(capsys, tmp_path / "merged", "--speech", SPEECH)["adapter"] is None
    adapter, merged = LyraForConditionalGeneration.from_pretrained(previous), \
        LyraForConditionalGeneration.from_pretrained(tmp_path / "merged")
    mlora.use_adapter(adapter, "speech")
    ids = torch.randint(0, 900, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(ids).logits, adapter.eval()(ids).logits, atol=0.05, rtol=0.05)


def test_mlora_keeps_the_stage1_model_with_adapters_off(chain):
    before = LyraForConditionalGeneration.from_pretrained(chain[1][0]).eval()
    after = LyraForConditionalGeneration.from_pretrained(chain[2][0]).eval()
    ids = torch.randint(0, 900, (1, 16))
    with torch.no_grad():
        assert torch.equal(before(ids).logits, after(ids).logits)  # adapters load switched off
        mlora.use_adapter(after, "speech")
        assert not torch.equal(before(ids).logits, after(ids).logits)


def test_loss_falls_when_overfitting(sample_data, chain, tmp_path):
    # The tiny model's random, frozen LM head (std 0.02 over 64 dims) caps how far logits can move
    # through LoRA alone (CE stays near log 1024); training the LLM too shows the recipe learns.
    records = [r for r in json.loads(sample_data.read_text()) if r.get("speech") and not r.get("image")][:2]
    small = sample_data.parent / "overfit.json"
    small.write_text(json.dumps(records))
    config = stage_config(2, small, tmp_path / "overfit", init_from=str(chain[1][0]),
                          **{"optim.max_steps": 15, "optim.lr": 5e-3, "trainable.llm": True,
                             "optim.batch_size": 2, "lcmr_weight": 0.0, "group_by_modality_length": False})
    trainer = build_trainer(config)
    train(trainer, config)
    history = list(losses(trainer).values())
    assert sum(history[-5:]) / 5 < 0.6 * sum(history[:5]) / 5


def test_resume_after_kill_9_continues_exactly(sample_data, chain, tmp_path, capsys):
    """SIGKILL at step 4, after the light checkpoint of step 3: resuming gives the losses of the
    run that was never interrupted, bit for bit (LoRA dropout on, so the RNG state matters too)."""
    overrides = {"data.path": str(sample_data), "report_to": "none", "logging_steps": 1, "optim.max_steps": 6,
                 "save_steps": 3, "optim.lr": 1e-3, "trainable.adapter_dropout": 0.1, "init_from": str(chain[1][0])}
    config_a = load_train_config(CONFIGS / "stage2_tiny.yaml", {**overrides, "output_dir": str(tmp_path / "a")})
    straight = build_trainer(config_a)
    train(straight, config_a)
    reference = losses(straight)

    killed_dir = tmp_path / "b"
    killed = subprocess.run([sys.executable, str(REPO_ROOT / "tests" / "support" / "killed_run.py"),
                             str(CONFIGS / "stage2_tiny.yaml"), json.dumps({**overrides, "output_dir": str(killed_dir)}),
                             "4"], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoint = last_complete_checkpoint(killed_dir)
    assert checkpoint.name == "checkpoint-3"
    # Light: the trainable state, the base record and the Trainer's own state, no model weights.
    assert {p.name for p in checkpoint.iterdir()} == {
        TRAINABLE_FILE, BASE_FILE, COMPLETE_MARKER, "optimizer.pt", "scheduler.pt", "rng_state.pth",
        "trainer_state.json"}
    assert BaseRecord.read(checkpoint) == straight.base
    with safe_open(str(checkpoint / TRAINABLE_FILE), "pt") as saved:
        trained = {n for n, p in straight.model.named_parameters() if p.requires_grad}
        assert trained <= set(saved.keys()) and all(".lora_" in n or "projector" in n for n in trained)

    config_b = load_train_config(CONFIGS / "stage2_tiny.yaml", {**overrides, "output_dir": str(killed_dir)})
    resumed = build_trainer(config_b)
    train(resumed, config_b, resume="auto")
    after = losses(resumed)
    assert sorted(after) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's trainer state
    assert [after[s] for s in (4, 5, 6)] == [reference[s] for s in (4, 5, 6)]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name

    # The same run resumed over another base (one frozen weight changed) is refused, naming both hashes.
    other = LyraForConditionalGeneration.from_pretrained(chain[1][0])
    with torch.no_grad():
        other.backbone.model.language_model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    other.save_pretrained(tmp_path / "other_base")
    record_before = (killed_dir / "train_config.yaml").read_text()
    argv = ["--config", str(CONFIGS / "stage2_tiny.yaml"), "--resume",
            *[f"--set={k}={v}" for k, v in {**overrides, "output_dir": str(killed_dir),
                                            "init_from": str(tmp_path / "other_base")}.items()]]
    capsys.readouterr()
    assert run(2, argv) == 2
    error = capsys.readouterr().err
    assert straight.base.sha256 in error and "hashes to sha256" in error and "Resume with the init_from" in error
    assert str(tmp_path / "other_base") in error
    assert (killed_dir / "train_config.yaml").read_text() == record_before


def test_incomplete_checkpoint_is_not_resumed_from(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / COMPLETE_MARKER).write_text("2")
    (tmp_path / "checkpoint-4").mkdir()  # killed while saving: no marker
    assert last_complete_checkpoint(tmp_path).name == "checkpoint-2"


def test_bad_samples_are_skipped_and_counted(sample_data, tmp_path):
    records = json.loads(sample_data.read_text())
    records[1]["image"] = "images/missing.png"
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(records))
    config = stage_config(1, broken, tmp_path / "bad", **{"data.root": str(sample_data.parent),  # a whole epoch
                                                          "optim.max_steps": -1, "data.max_bad_fraction": 0.5})
    trainer = build_trainer(config)
    train(trainer, config)
    assert trainer.tracker.by_code["missing_file"] >= 1  # the sampler may repeat it to fill a group
    assert set(trainer.tracker.by_code) == {"missing_file"}


def test_cli_errors_are_clear(tmp_path, capsys):
    assert run(1, ["--config", str(tmp_path / "none.yaml")]) == 2
    assert "training config not found" in capsys.readouterr().err
    assert run(2, ["--config", str(CONFIGS / "stage1_tiny.yaml")]) == 2
    assert "is a stage-1 config; run scripts/train_stage1.py" in capsys.readouterr().err
    assert run(1, ["--config", str(CONFIGS / "stage1_tiny.yaml"), "--set", "data.path=/nonexistent.json",
                   "--output-dir", str(tmp_path / "x")]) == 2
    assert "data file not found: /nonexistent.json" in capsys.readouterr().err


def test_grouped_sampler_gives_every_step_one_modality():
    from lyra.train.trainer import ModalityLengthGroupedSampler

    modalities = ["text"] * 7 + ["speech"] * 5 + ["image+speech"] * 2
    lengths = list(range(14))
    sampler = ModalityLengthGroupedSampler(lengths, modalities, group=4, seed=0)
    order = list(sampler)
    assert len(order) == len(sampler) == 8 + 8 + 4  # each modality filled up to whole groups
    assert set(order) == set(range(14))
    for start in range(0, len(order), 4):
        assert len({modalities[i] for i in order[start:start + 4]}) == 1
    assert order == list(ModalityLengthGroupedSampler(lengths, modalities, group=4, seed=0))
    sampler.set_epoch(1)
    assert list(sampler) != order


def with_units_everywhere(data):
    """Every record of the sample set (speech and long speech included) with target units."""
    records = [dict(r, tgt_unit="".join(f"<{(5 * i + k) % 50}>" for k in range(6)))
               for i, r in enumerate(json.loads(data.read_text()))]
    path = data.parent / "speechgen_all.json"
    path.write_text(json.dumps(records))
    return path


def test_stage4_batches_run_with_the_adapter_inference_would_use(sample_data, chain, tmp_path):
    config = stage_config(4, with_units_everywhere(sample_data), tmp_path / "routed", init_from=str(chain[3][0]))
    trainer = build_trainer(config)
    assert trainer.route_adapters
    seen = {}
    for batch in trainer.get_train_dataloader():
        trainer.route(batch)
        seconds = max((w.shape[-1] / 16000 for w in batch.get("speech") or []), default=None)
        seen[trainer.model.active_adapter] = seconds
    assert seen[None] is None  # no speech: every adapter off
    assert seen["speech"] <= 30 < seen["long_speech"]


def test_stage4_answer_state_cache_gives_the_forward_loss(sample_data, chain, tmp_path):
    data = with_units_everywhere(sample_data)
    config = stage_config(4, data, tmp_path / "cached", init_from=str(chain[3][0]), cache_answer_states=True,
                          **{"optim.max_steps": 4})
    trainer = build_trainer(config)
    model = trainer.model.eval()
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.route(batch)
    cached = trainer.compute_loss(model, batch)
    from lyra.train.trainer import model_inputs

    with torch.no_grad():
        direct = model(**model_inputs(batch), return_logits=False).speech_generator_loss
    assert float(cached.detach()) == pytest.approx(float(direct), rel=1e-5)
    assert float(trainer.compute_loss(model, batch).detach()) == pytest.approx(float(direct), rel=1e-5)  # from the cache
    model.train()
    assert train(trainer, config) == 0
    assert len(trainer.answer_states.rows) == len(json.loads(data.read_text()))  # each sample computed once
    assert LyraForConditionalGeneration.from_pretrained(tmp_path / "cached" / "final").speech_generator is not None

    moving = stage_config(4, data, tmp_path / "moving", init_from=str(chain[3][0]), cache_answer_states=True,
                          **{"trainable.speech_projector": True})
    with pytest.raises(ValueError, match=r"cache_answer_states needs .* \['speech_projector'\] train too"):
        build_trainer(moving)
