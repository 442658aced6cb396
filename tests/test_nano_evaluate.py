"""The nano task's teacher-forced accuracy (lyra/nano/evaluate.py) against real greedy decoding."""

from __future__ import annotations

import torch

from lyra.config import load_config
from lyra.data.collate import LyraCollator
from lyra.data.dataset import LyraDataset
from lyra.data.vision import VisionLimits
from lyra.model.lyra import LyraForConditionalGeneration
from lyra.nano.evaluate import evaluate_nano, generate_answers
from lyra.nano.task import NanoTaskSpec, build_nano_task
from lyra.processing import LyraProcessor
from lyra.tokenizer import load_tokenizer
from lyra.train.trainer import model_inputs

SPEC = dict(train_scenes=40, train_signs=12, train_distractor_signs=6, train_sound_clips=1, eval_scenes=10,
            eval_signs=4, eval_sound_clips=1, base_records=80, stage1_records=0, stage2_records=0, speech=False)


def briefly_trained_model(task) -> tuple[LyraForConditionalGeneration, object]:
    """The tiny model after 30 steps on the evaluation records themselves (what is measured here is
    agreement, not generalisation): its answers are right on some questions and wrong on others,
    and end with <|im_end|>, which a random model's rarely do."""
    torch.manual_seed(0)
    tokenizer = load_tokenizer("tiny")
    model = LyraForConditionalGeneration.from_config(load_config("tiny"), load_encoder_weights=False)
    processor = LyraProcessor(tokenizer, model.config, VisionLimits())
    dataset = LyraDataset(task.files["eval"], processor, on_bad_sample="raise")
    collator = LyraCollator.from_processor(processor)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-3)
    order = torch.randperm(len(dataset)).tolist()
    model.train()
    for step in range(30):
        indices = [order[(8 * step + k) % len(order)] for k in range(8)]
        loss = model(**model_inputs(collator([dataset[i] for i in indices]))).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tokenizer


def test_teacher_forced_accuracy_is_greedy_decoding(tmp_path):
    task = build_nano_task(tmp_path / "data", NanoTaskSpec(**SPEC), progress=False)
    model, tokenizer = briefly_trained_model(task)
    forced = evaluate_nano(model, tokenizer, task.files["eval"], variants=("text",), batch_size=5, progress=False)
    decoded, _ = generate_answers(model, tokenizer, task.files["eval"], variants=("text",), progress=False,
                                  batch_size=3)
    by_turn = {(t["id"], t["turn"]): t["correct"] for t in forced.turns}
    assert len(by_turn) == len(decoded.turns) > 20
    for turn in decoded.turns:
        assert by_turn[(turn["id"], turn["turn"])] == turn["correct"], turn
    right = sum(by_turn.values())
    assert 0 < right < len(by_turn), "the check needs both right and wrong answers"


def test_an_ablation_is_named_an_effect_only_beyond_its_spread():
    from lyra.nano.reproduce import effect

    overlapping = effect("LCMR", [0.57, 0.595, 0.62], [0.57, 0.605, 0.64])
    assert "no effect shown" in overlapping and "60.5 ± 3.5 % vs 59.5 ± 2.5 %" in overlapping
    separated = effect("full fine-tune", [0.93, 0.94, 0.95], [0.80, 0.81, 0.82])
    assert "lower by more than the spread over 3 seeds" in separated
