"""The nano task generator (lyra/nano/task.py) and the demo's build cache (lyra/nano/pipeline.py).

Small specs and no TTS, so the whole file runs in seconds; the full nano model is never trained here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lyra.nano import pipeline as nano
from lyra.nano import task as nano_task
from lyra.nano.task import (
    COLOURS,
    DISTRACTOR_INKS,
    HELD_OUT_OBJECTS,
    HELD_OUT_SIGNS,
    SOUND_RANGES,
    NanoTaskSpec,
    answer_question,
    build_nano_task,
    render_sound,
)

SMALL = dict(train_scenes=40, train_signs=12, train_distractor_signs=6, train_sound_clips=1, eval_scenes=12, eval_signs=6, eval_sound_clips=1,
             base_records=60, stage1_records=0, stage2_records=0, speech=False)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return build_nano_task(tmp_path_factory.mktemp("nano") / "data", NanoTaskSpec(**SMALL), progress=False)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(task, tmp_path):
    again = build_nano_task(tmp_path / "again", NanoTaskSpec(**SMALL), progress=False)
    assert again.fingerprint == task.fingerprint
    first, second = _tree(task.root), _tree(again.root)
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first), "a file differs between two builds"
    other = build_nano_task(tmp_path / "other", NanoTaskSpec(**{**SMALL, "seed": 1}), progress=False)
    assert other.fingerprint != task.fingerprint


def test_a_matching_build_is_reused_and_a_changed_spec_rebuilds(task, tmp_path):
    root = tmp_path / "cached"
    first = build_nano_task(root, NanoTaskSpec(**SMALL), progress=False)
    marker = root / "images" / "train" / "scene_00000.png"
    stamp = marker.stat().st_mtime_ns
    reused = build_nano_task(root, NanoTaskSpec(**SMALL), progress=False)
    assert reused.fingerprint == first.fingerprint and marker.stat().st_mtime_ns == stamp
    changed = build_nano_task(root, NanoTaskSpec(**{**SMALL, "train_scenes": 41}), progress=False)
    assert changed.manifest["spec_hash"] != first.manifest["spec_hash"]
    assert (root / "images" / "train" / "scene_00040.png").is_file()


def test_the_split_is_by_content(task):
    media = task.media()
    train_paths = {r.get("image") or r.get("sound") for phase in ("base", "stage1", "stage2")
                   for r in task.records(phase)}
    eval_paths = {r.get("image") or r.get("sound") for r in task.records("eval")}
    assert train_paths and eval_paths and not train_paths & eval_paths
    for paths, held in ((train_paths, False), (eval_paths, True)):
        for path in paths:
            content = media[path]
            if content["kind"] == "scene":
                assert all(((o["colour"], o["shape"]) in HELD_OUT_OBJECTS) == held for o in content["objects"]), path
            elif content["kind"] == "sign":
                assert ((content["word"], content["ink"]) in HELD_OUT_SIGNS) == held, path
            else:
                assert path.startswith("sounds/eval/" if held else "sounds/train/"), path


def test_distractor_signs_are_read_but_never_asked_their_ink(task):
    from lyra.nano.vision import image_targets

    media = task.media()
    distractors = {p: c for p, c in media.items() if c["kind"] == "sign" and c["ink"] not in COLOURS}
    assert len(distractors) == SMALL["train_distractor_signs"]
    for path, content in distractors.items():
        assert path.startswith("images/train/") and content["ink"] in DISTRACTOR_INKS
        pixels = np.asarray(Image.open(task.root / path).convert("RGB"), dtype=float)
        distance = np.abs(pixels - np.array(DISTRACTOR_INKS[content["ink"]])).max(-1)
        assert (distance < 30).sum() > 60, path  # the word is drawn in that ink
        assert image_targets(content)["ink"] is None  # no ink label for the vision probe either
    asked = [(r["image"], t) for phase in ("base", "eval") for r in task.records(phase) if r.get("image") in distractors
             for t in r["meta"]["types"]]
    assert asked and all(qtype == "word" for _, qtype in asked)


@pytest.mark.parametrize("kind", ["beep2_high", "beep1_low", "noise"])
def test_held_out_sounds_have_unseen_parameters(kind):
    """The pitch (beeps) or the sounding length (noise) of a clip lies in its split's range,
    and the held-out ranges do not overlap the training ones."""
    def dominant(clip):
        spectrum = np.abs(np.fft.rfft(clip))
        return np.fft.rfftfreq(len(clip), 1 / 16000)[spectrum.argmax()]

    for split in ("train", "eval"):
        ranges = SOUND_RANGES[split]
        for seed in range(5):
            clip = render_sound(kind, nano_task._rng(seed, kind), split)
            assert clip.dtype == np.float32 and clip.shape == (24000,)
            if kind.startswith("beep"):
                low, high = ranges[kind.split("_")[1]]
                assert low - 5 <= dominant(clip) <= high + 5, (split, dominant(clip))
            else:
                loud = np.convolve(np.abs(clip) > 0.05, np.ones(160) / 160, "same") > 0.2
                assert ranges["noise"][0] - 0.03 <= loud.mean() * 1.5 <= ranges["noise"][1] + 0.03
    assert SOUND_RANGES["train"]["high"][1] < SOUND_RANGES["eval"]["high"][0]
    assert SOUND_RANGES["train"]["low"][1] < SOUND_RANGES["eval"]["low"][0]


def test_answers_match_the_generated_content(task):
    media = task.media()
    checked = 0
    for phase in ("base", "eval"):
        for record in task.records(phase):
            content = media[record.get("image") or record.get("sound")]
            meta = record["meta"]
            answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
            assert answers == meta["answers"]
            for question, answer in zip(meta["questions"], answers):
                assert answer_question(content, question) == answer, (record["id"], question)
                checked += 1
    assert checked > 100


def test_scene_images_show_their_objects(task):
    """Each object's cell is dominated by its colour; empty cells are background."""
    media = task.media()
    for path, content in media.items():
        if content["kind"] != "scene":
            continue
        pixels = np.asarray(Image.open(task.root / path).convert("RGB")).astype(int)
        filled = {o["cell"]: o for o in content["objects"]}
        for cell in range(9):
            row, col = divmod(cell, 3)
            block = pixels[row * 28 + 4:(row + 1) * 28 - 4, col * 28 + 4:(col + 1) * 28 - 4].reshape(-1, 3)
            distance = np.abs(block - np.array(nano_task.COLOURS.get(filled[cell]["colour"], (0, 0, 0))
                                               if cell in filled else block.mean(0))).sum(1)
            if cell in filled:
                assert (distance < 60).mean() > 0.2, (path, cell, filled[cell])
            else:
                assert block.std() < 12, (path, cell)


def test_records_load_through_the_training_dataset(task):
    from lyra.config import load_config
    from lyra.data.dataset import LyraDataset
    from lyra.data.vision import VisionLimits
    from lyra.processing import LyraProcessor
    from lyra.tokenizer import load_tokenizer

    config = load_config("tiny")
    processor = LyraProcessor(load_tokenizer("tiny"), config, VisionLimits(image_max_pixels=84 * 84))
    dataset = LyraDataset(task.files["base"], processor, on_bad_sample="raise")
    for index in range(min(8, len(dataset))):
        sample = dataset[index]
        assert (sample.labels != -100).any()
        if sample.pixel_values is not None:
            assert sample.image_grid_thw.tolist() == [[1, 6, 6]]  # 84 x 84: 3 x 3 merged tokens


def test_build_hash_decides_reuse(task, tmp_path):
    from lyra.nano.sound import SoundPretrainConfig
    from lyra.nano.vision import VisionPretrainConfig

    configs = nano.phase_configs(task, tmp_path / "runs", seed=0)
    wanted = nano.build_hash(task, configs, VisionPretrainConfig())
    assert wanted != nano.build_hash(task, configs, VisionPretrainConfig(steps=7))
    assert wanted != nano.build_hash(task, configs, VisionPretrainConfig(), SoundPretrainConfig())
    assert wanted == nano.build_hash(task, nano.phase_configs(task, tmp_path / "runs", seed=0), VisionPretrainConfig())
    # where a checkout puts its runs does not matter, only what they are
    assert wanted == nano.build_hash(task, nano.phase_configs(task, tmp_path / "elsewhere", seed=0),
                                     VisionPretrainConfig())
    assert wanted != nano.build_hash(task, nano.phase_configs(task, tmp_path / "runs", seed=1), VisionPretrainConfig())
    changed = nano.phase_configs(task, tmp_path / "runs", seed=0, overrides={"stage2": {"optim.lr": 1.0e-4}})
    assert wanted != nano.build_hash(task, changed, VisionPretrainConfig())

    model_dir = tmp_path / "model"
    assert nano.cached_build(model_dir, wanted) is None  # nothing there yet
    final = tmp_path / "final"
    final.mkdir()
    (final / "config.json").write_text("{}")
    nano.publish(final, model_dir, {"hash": wanted})
    assert nano.cached_build(model_dir, wanted) == {"hash": wanted}
    assert nano.cached_build(model_dir, "0" * 16) is None  # another build: train again
    (model_dir / nano.BUILD_FILE).write_text("not json")
    assert nano.cached_build(model_dir, wanted) is None
    other_task = build_nano_task(tmp_path / "data2", NanoTaskSpec(**{**SMALL, "seed": 3}), progress=False)
    assert nano.build_hash(other_task, nano.phase_configs(other_task, tmp_path / "runs", seed=0),
                           VisionPretrainConfig()) != wanted
    json.dumps(configs["base"].optim.__dict__)  # the configs are plain data


def test_vision_targets_follow_the_scene():
    from lyra.nano.vision import EMPTY_COLOUR, EMPTY_SHAPE, image_targets

    content = {"kind": "scene", "objects": [{"colour": "blue", "shape": "cross", "cell": 0},
                                            {"colour": "blue", "shape": "cross", "cell": 8}]}
    targets = image_targets(content)
    assert targets["colour"].tolist() == [2] + [EMPTY_COLOUR] * 7 + [2]
    assert targets["shape"].tolist() == [3] + [EMPTY_SHAPE] * 7 + [3]
    assert targets["count"].item() == 2
    assert image_targets({"kind": "sign", "word": "sun", "ink": "green"}) == {"kind": "sign", "word": 2, "ink": 1}


def test_vision_pretraining_learns_the_cells(task):
    """A few dozen steps on the nano ViT (small vocabulary): the per-cell colour probe beats
    "every cell is empty" on held-out scenes (colour x shape pairs it never saw)."""
    import torch

    from lyra.config import load_config
    from lyra.model.lyra import LyraForConditionalGeneration
    from lyra.nano.vision import VisionPretrainConfig, pretrain_vision

    torch.manual_seed(0)
    config = load_config("nano", {"text": {"vocab_size": 1024}, "tokens": load_config("tiny").tokens.__dict__})
    model = LyraForConditionalGeneration.from_config(config, load_encoder_weights=False)
    settings = VisionPretrainConfig(steps=100, batch_size=16, lr=2e-3, warmup_steps=5, eval_images=12)
    report = pretrain_vision(model, task, settings, progress=False)
    held_out = task.media()
    empty = [1 - len(c["objects"]) / 9 for p, c in sorted(held_out.items()) if p.startswith("images/eval/scene")]
    assert report["held_out_probe_accuracy_after"]["cell colour"] > sum(empty) / len(empty) + 0.1


def test_sound_labels_follow_the_class():
    from lyra.nano.sound import KINDS, NO_LABEL, clip_labels

    assert clip_labels("beep3_low") == (KINDS.index("beep"), 2, 0)
    assert clip_labels("beep1_high") == (KINDS.index("beep"), 0, 1)
    assert clip_labels("fall") == (KINDS.index("fall"), NO_LABEL, NO_LABEL)
    with pytest.raises(ValueError, match="unknown sound class"):
        clip_labels("whistle")


def test_sound_pretraining_separates_held_out_clips(task):
    """The real frozen Whisper tiny.en encoder, a fresh projector: after a few dozen steps on one
    clip per class the probes name the kind of held-out clips (pitches and lengths no
    training clip has), and every clip was encoded once into the frame cache."""
    import torch

    from lyra.config import load_config
    from lyra.model.lyra import LyraForConditionalGeneration
    from lyra.model.speech import FrameCache
    from lyra.nano.sound import SoundPretrainConfig, pretrain_sound

    torch.manual_seed(0)
    config = load_config("nano", {"text": {"vocab_size": 1024}, "tokens": load_config("tiny").tokens.__dict__})
    model = LyraForConditionalGeneration.from_config(config)
    model.frame_cache = FrameCache(256)
    report = pretrain_sound(model, task, SoundPretrainConfig(steps=40, batch_size=9, lr=2e-3, warmup_steps=4),
                            progress=False)
    assert report["held_out_probe_accuracy_before"]["kind"] < 0.9
    assert report["held_out_probe_accuracy_after"]["kind"] >= 8 / 9  # every beep is a "beep": 6 / 9
    assert len(model.frame_cache.entries) == 2 * len(nano_task.SOUNDS)
    assert all(p.requires_grad for p in model.speech_encoder.parameters())  # the flags are given back


def test_all_spoken_asks_every_question_in_the_spoken_turns_voice():
    qas = [{"question": "What shape are they?", "answer": "square", "type": "shape"},
           {"question": "Which colour do you see?", "answer": "purple", "type": "colour"}]
    record = nano_task._record("r", "image", "images/a.png", qas, {1}, ["piper-joe"], "<image>")
    spoken = nano_task.all_spoken(record)
    assert [turn["value"] for turn in spoken["conversations"]] == ["<image>\n<speech>", "square", "<speech>", "purple"]
    assert spoken["speech"] == [nano_task.utterance_name(qa["question"], "piper-joe") for qa in qas]
    assert spoken["speech_asr"] == [qa["question"] for qa in qas]
    assert spoken["meta"]["spoken"] == [True, True] and spoken["meta"]["answers"] == record["meta"]["answers"]
    sound = nano_task._record("s", "sound", "sounds/a.wav", qas[:1], {0}, ["piper-amy"], "<sound>")
    assert nano_task.all_spoken(sound)["conversations"] == sound["conversations"]
