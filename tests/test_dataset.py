"""Training data: records -> samples (ids, labels, media) -> batches; truncation; bad samples;
grouping info; long-speech data preparation."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from lyra.data.collate import BadSampleTracker, LyraCollator
from lyra.data.dataset import LyraDataset, TrainingSample
from lyra.data.records import BadSampleError, DataFileError, SkippedSample
from lyra.data.long_speech import (
    Transcript,
    parse_qa_response,
    prepare_long_speech,
    read_transcript,
    rule_based_qa,
)
from lyra.data.vision import VisionLimits
from lyra.processing import IGNORE_INDEX, LyraProcessor

from conftest import tone
from support.sample_set import make_sample_set

IGNORE = IGNORE_INDEX
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture()
def processor(tiny_tokenizer, tiny_config):
    limits = VisionLimits(
        image_min_pixels=56 * 56, image_max_pixels=112 * 112,
        video_min_pixels=56 * 56, video_max_pixels=56 * 56, video_total_pixels=56 * 56 * 4,
    )
    return LyraProcessor(tiny_tokenizer, tiny_config, limits)


@pytest.fixture()
def enc(tiny_tokenizer):
    return lambda text: tiny_tokenizer.encode(text, add_special_tokens=False)


@pytest.fixture()
def ids(tiny_config):
    return tiny_config.tokens


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def make_media(root: Path) -> None:
    """112x84 image, 8-frame 64x48 video at 4 fps, 44.1 kHz stereo speech, 8 kHz sound, 65 s long speech."""
    Image.new("RGB", (112, 84), "red").save(root / "img.png")
    with av.open(str(root / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for f in range(8):
            frame = np.full((48, 64, 3), 25 * f, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    sf.write(root / "speech.wav", np.stack([tone(2.0, 44100), tone(2.0, 44100, 300.0)], axis=1), 44100)
    sf.write(root / "sound.wav", tone(4.0, 8000, 800.0), 8000)
    sf.write(root / "long.wav", tone(65.0, 16000, 150.0), 16000)


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def load_one(tmp_path, processor, record, **kwargs) -> TrainingSample:
    dataset = LyraDataset(write_json(tmp_path / "d.json", [record]), processor, on_bad_sample="raise", **kwargs)
    return dataset[0]


# ----------------------------------------------------------------------------- exact ids and labels
def test_text_multi_turn_ids_and_labels(tmp_path, processor, enc, ids):
    record = {"id": "t", "conversations": [turn("human", "Hi there"), turn("gpt", "Hello!"),
                                           turn("human", "More?"), turn("gpt", "No.")]}
    sample = load_one(tmp_path, processor, record)
    head1 = enc(SYSTEM + "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    head2 = enc("<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n")
    newline = enc("\n")
    expected = head1 + enc("Hello!") + [ids.eos] + newline + head2 + enc("No.") + [ids.eos] + newline
    labels = ([IGNORE] * len(head1) + enc("Hello!") + [ids.eos] + [IGNORE] * len(newline)
              + [IGNORE] * len(head2) + enc("No.") + [ids.eos] + [IGNORE] * len(newline))
    assert sample.input_ids.tolist() == expected
    assert sample.labels.tolist() == labels
    assert sample.modality == "text" and sample.speech == [] and sample.pixel_values is None


def test_image_placeholder_expansion(tmp_path, processor, enc, ids):
    make_media(tmp_path)
    record = {"id": "i", "image": "img.png", "conversations": [turn("human", "<image>\nWhat?"), turn("gpt", "Red.")]}
    sample = load_one(tmp_path, processor, record)
    # 112x84 -> grid 1x6x8 patches of 14 px -> 48 / (2x2 merge) = 12 tokens
    head = enc(SYSTEM + "<|im_start|>user\n") + [ids.vision_start] + [ids.image] * 12 + [ids.vision_end]
    head += enc("\nWhat?<|im_end|>\n<|im_start|>assistant\n")
    assert sample.input_ids.tolist() == head + enc("Red.") + [ids.eos] + enc("\n")
    assert sample.labels.tolist() == [IGNORE] * len(head) + enc("Red.") + [ids.eos] + [IGNORE] * len(enc("\n"))
    assert sample.image_grid_thw.tolist() == [[1, 6, 8]]
    assert sample.pixel_values.shape == (48, 3 * 2 * 14 * 14)
    assert sample.mm_token_type_ids.tolist() == [1 if i == ids.image else 0 for i in head + enc("Red.") + [ids.eos] + enc("\n")]


def test_video_placeholder_expansion(tmp_path, processor, enc, ids):
    make_media(tmp_path)
    record = {"id": "v", "video": "clip.mp4", "conversations": [turn("human", "<video>\nWhat moves?"), turn("gpt", "Light.")]}
    sample = load_one(tmp_path, processor, record)
    # 2 s at 2 fps -> 4 frames -> 2 temporal patches; 64x48 -> 56x56 -> 4x4 patches -> 2*16/4 = 8 tokens
    head = enc(SYSTEM + "<|im_start|>user\n") + [ids.vision_start] + [ids.video] * 8 + [ids.vision_end]
    head += enc("\nWhat moves?<|im_end|>\n<|im_start|>assistant\n")
    assert sample.input_ids.tolist() == head + enc("Light.") + [ids.eos] + enc("\n")
    assert sample.labels.tolist() == [IGNORE] * len(head) + enc("Light.") + [ids.eos] + [IGNORE] * len(enc("\n"))
    assert sample.video_grid_thw.tolist() == [[2, 4, 4]]
    assert int((sample.mm_token_type_ids == 2).sum()) == 8


def test_speech_any_rate_and_channels_with_transcript(tmp_path, processor, enc, ids):
    make_media(tmp_path)
    record = {"id": "s", "speech": "speech.wav", "speech_asr": "what is this",
              "conversations": [turn("human", "<speech>"), turn("gpt", "A tone.")]}
    sample = load_one(tmp_path, processor, record)
    head = enc(SYSTEM + "<|im_start|>user\n") + [ids.speech] * 300 + enc("<|im_end|>\n<|im_start|>assistant\n")
    assert sample.input_ids.tolist() == head + enc("A tone.") + [ids.eos] + enc("\n")
    assert sample.labels.tolist() == [IGNORE] * len(head) + enc("A tone.") + [ids.eos] + [IGNORE] * len(enc("\n"))
    assert len(sample.speech) == 1 and sample.speech[0].shape == (32000,)  # 2 s of 44.1 kHz stereo -> 16 kHz mono
    assert sample.transcripts[0].tolist() == enc("what is this")


def test_sound_placeholder_expansion(tmp_path, processor, enc, ids):
    make_media(tmp_path)
    record = {"id": "a", "sound": "sound.wav", "conversations": [turn("human", "<sound>\nWhat is it?"), turn("gpt", "A beep.")]}
    sample = load_one(tmp_path, processor, record)
    head = enc(SYSTEM + "<|im_start|>user\n") + [ids.sound] * 300 + enc("\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")
    assert sample.input_ids.tolist() == head + enc("A beep.") + [ids.eos] + enc("\n")
    assert sample.labels.tolist() == [IGNORE] * len(head) + enc("A beep.") + [ids.eos] + [IGNORE] * len(enc("\n"))
    assert sample.sound[0].shape == (64000,) and sample.speech == []


def test_long_speech_uses_the_speech_placeholder(tmp_path, processor, enc, ids):
    make_media(tmp_path)
    record = {"id": "l", "long_speech": "long.wav", "conversations": [turn("human", "<speech>\nSummarize."), turn("gpt", "A hum.")]}
    sample = load_one(tmp_path, processor, record)
    assert int((sample.input_ids == ids.speech).sum()) == 900  # 65 s -> 3 clips of 30 s
    assert sample.modality == "long_speech" and sample.speech[0].shape == (65 * 16000,)


def test_mixed_multi_turn_and_batch(tmp_path, processor, enc, ids):
    make_media(tmp_path)
    records = [
        {"id": "m", "image": "img.png", "speech": "speech.wav", "speech_asr": "and the colour",
         "conversations": [turn("human", "<image>\nWhat?"), turn("gpt", "Red."), turn("human", "<speech>"), turn("gpt", "Bright.")]},
        {"id": "t", "conversations": [turn("human", "Hi"), turn("gpt", "Yo.")]},
        {"id": "s", "speech": "speech.wav", "conversations": [turn("human", "<speech>"), turn("gpt", "Ok.")]},
    ]
    dataset = LyraDataset(write_json(tmp_path / "d.json", records), processor)
    sample = dataset[0]
    head1 = (enc(SYSTEM + "<|im_start|>user\n") + [ids.vision_start] + [ids.image] * 12 + [ids.vision_end]
             + enc("\nWhat?<|im_end|>\n<|im_start|>assistant\n"))
    head2 = enc("<|im_start|>user\n") + [ids.speech] * 300 + enc("<|im_end|>\n<|im_start|>assistant\n")
    nl = enc("\n")
    assert sample.input_ids.tolist() == head1 + enc("Red.") + [ids.eos] + nl + head2 + enc("Bright.") + [ids.eos] + nl
    assert sample.labels.tolist() == ([IGNORE] * len(head1) + enc("Red.") + [ids.eos] + [IGNORE] * len(nl)
                                      + [IGNORE] * len(head2) + enc("Bright.") + [ids.eos] + [IGNORE] * len(nl))
    assert sample.modality == "image+speech"

    batch = LyraCollator.from_processor(processor)([dataset[0], dataset[1], dataset[2]])
    n = [len(dataset[i].input_ids) for i in range(3)]
    assert batch["input_ids"].shape == (3, max(n))
    assert batch["attention_mask"].sum(1).tolist() == n
    assert batch["input_ids"][1, n[1]:].eq(ids.pad).all() and batch["labels"][1, n[1]:].eq(IGNORE).all()
    assert batch["labels"][0].tolist() == sample.labels.tolist()
    assert len(batch["speech"]) == 2 and batch["speech_sample_index"].tolist() == [0, 2]
    assert [t.tolist() for t in batch["transcript_ids"]] == [enc("and the colour")]
    assert batch["transcript_speech_index"].tolist() == [0]  # pairs with batch["speech"][0]
    assert batch["image_grid_thw"].tolist() == [[1, 6, 8]] and batch["mm_token_type_ids"].shape == (3, max(n))
    assert batch["sample_ids"] == ["m", "t", "s"] and batch["num_samples"] == 3 and batch["skipped"] == []


def test_turn_by_turn_ids_equal_the_inference_prompt_with_the_real_tokenizer(tiny_config):
    from lyra.config import load_config
    from lyra.tokenizer import load_tokenizer

    config = load_config("mini")
    processor = LyraProcessor(load_tokenizer(None), config)
    messages = [
        {"role": "user", "content": "<speech>\n What's 2+2?  \n"}, {"role": "assistant", "content": " It is 4.\n\n"},
        {"role": "user", "content": "And  in words?"}, {"role": "assistant", "content": "Four — «quatre»."},
    ]
    audio = [tone(1.0)]
    trained = processor.for_training(messages, speech=audio)
    prompt = processor(messages, speech=audio, add_generation_prompt=False)
    assert trained.input_ids.tolist() == prompt.input_ids.tolist()
    learned = processor.tokenizer.decode([i for i in trained.labels.tolist() if i != IGNORE])
    assert learned == " It is 4.\n\n<|im_end|>Four — «quatre».<|im_end|>"


def test_tgt_units_and_released_format_quirks(tmp_path, processor, ids):
    make_media(tmp_path)
    Image.new("RGB", (56, 56), "blue").save(tmp_path / "ocr.png")  # the record says ocr.jpg
    (tmp_path / "frames").mkdir()
    for k in range(6):
        Image.new("RGB", (56, 56), (40 * k, 0, 0)).save(tmp_path / "frames" / f"{k:03d}.jpg")
    grid = Image.new("RGB", (4 * 56 + 20, 4 * 56 + 20), "white")
    for k in range(16):
        grid.paste(Image.new("RGB", (56, 56), (10 * k, 100, 0)), (10 + 56 * (k % 4), 10 + 56 * (k // 4)))
    grid.save(tmp_path / "grid.jpg")
    records = [
        {"id": "u1", "speech": "speech.wav", "tgt_unit": "<12><7><981>", "conversations": [turn("human", "<speech>"), turn("gpt", "Hi.")]},
        {"id": "u2", "image": "ocr.jpg", "tgt_unit": "<3>", "conversations": [turn("human", "<image>"), turn("gpt", "Blue.")]},
        {"id": "f", "video": "frames", "conversations": [turn("human", "<video>"), turn("gpt", "Frames.")]},
        {"id": "g", "video": "grid.jpg", "conversations": [turn("human", "<video>"), turn("gpt", "Grid.")]},
    ]
    dataset = LyraDataset(write_json(tmp_path / "d.json", records), processor, on_bad_sample="raise")
    batch = LyraCollator.from_processor(processor)([dataset[0], dataset[1]])
    assert batch["tgt_units"].tolist() == [[12, 7, 981], [3, IGNORE, IGNORE]]
    assert dataset[2].video_grid_thw.tolist() == [[3, 4, 4]]  # 6 frames -> 3 temporal patches
    assert dataset[3].video_grid_thw.tolist() == [[8, 4, 4]]  # 16 tiles of the grid image -> 8 temporal patches


def test_collated_batch_runs_through_the_model(tmp_path, processor, tiny_model):
    make_media(tmp_path)
    records = [
        {"id": "m", "image": "img.png", "speech": "speech.wav", "speech_asr": "the colour",
         "conversations": [turn("human", "<image>\nWhat?"), turn("gpt", "Red."), turn("human", "<speech>"), turn("gpt", "Bright.")]},
        {"id": "v", "video": "clip.mp4", "sound": "sound.wav",
         "conversations": [turn("human", "<video><sound>\nWhat?"), turn("gpt", "Light.")]},
    ]
    dataset = LyraDataset(write_json(tmp_path / "d.json", records), processor)
    batch = LyraCollator.from_processor(processor)([dataset[0], dataset[1]])
    model_keys = ("input_ids", "attention_mask", "labels", "speech", "sound", "pixel_values", "image_grid_thw",
                  "pixel_values_videos", "video_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        out = tiny_model(**{k: batch[k] for k in model_keys})
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------- truncation
def long_conversation(turns: int, words: int = 30) -> list[dict]:
    text = " ".join(["word"] * words)
    convs = []
    for k in range(turns):
        convs += [turn("human", f"Question {k}: {text}"), turn("gpt", f"Answer {k}: {text}")]
    return convs


def test_truncation_drops_whole_trailing_turns(tmp_path, processor):
    record = {"id": "x", "conversations": long_conversation(4)}
    full = load_one(tmp_path, processor, record)
    per_pair = (len(full.input_ids) - 20) // 4
    sample = load_one(tmp_path, processor, record, model_max_length=len(full.input_ids) - per_pair // 2)
    assert sample.dropped_turns == 2 and sample.truncated_tokens == 0
    assert sample.input_ids.tolist() == full.input_ids[: len(sample.input_ids)].tolist()
    assert sample.input_ids[-2].item() == processor.tokens.eos  # still ends with a whole answer
    text = processor.tokenizer.decode(sample.input_ids)
    assert "Answer 2" in text and "Question 3" not in text


def test_truncation_cuts_text_after_the_media_only(tmp_path, processor, ids):
    make_media(tmp_path)
    record = {"id": "x", "speech": "speech.wav",
              "conversations": [turn("human", "<speech>"), turn("gpt", " ".join(["word"] * 200))] + long_conversation(1)}
    sample = load_one(tmp_path, processor, record, model_max_length=400)
    assert sample.input_ids.shape[0] == 400 and sample.dropped_turns == 2 and sample.truncated_tokens > 0
    assert int((sample.input_ids == ids.speech).sum()) == 300  # the speech block is whole
    assert (sample.labels != IGNORE).sum() > 0


def test_media_over_the_budget_is_a_bad_sample(tmp_path, processor):
    make_media(tmp_path)
    record = {"id": "big", "long_speech": "long.wav", "conversations": [turn("human", "<speech>\nSum up."), turn("gpt", "Hum.")]}
    with pytest.raises(BadSampleError, match="over model_max_length=600") as info:
        load_one(tmp_path, processor, record, model_max_length=600)
    assert info.value.code == "over_length"
    record = {"id": "na", "conversations": [turn("human", " ".join(["word"] * 300)), turn("gpt", "Yes.")]}
    with pytest.raises(BadSampleError) as info:
        load_one(tmp_path, processor, record, model_max_length=100)
    assert info.value.code == "no_answer"


# ----------------------------------------------------------------------------- bad samples
def bad_and_good(tmp_path: Path) -> Path:
    make_media(tmp_path)
    (tmp_path / "broken.wav").write_bytes(b"RIFF....WAVEfmt nonsense" * 8)
    records = [
        {"id": "ok", "conversations": [turn("human", "Hi"), turn("gpt", "Yo.")]},
        {"id": "missing", "image": "nope.png", "conversations": [turn("human", "<image>"), turn("gpt", "?")]},
        {"id": "corrupt", "speech": "broken.wav", "conversations": [turn("human", "<speech>"), turn("gpt", "?")]},
        {"id": "roles", "conversations": [turn("gpt", "Hi"), turn("human", "Yo.")]},
        {"id": "ok2", "speech": "speech.wav", "conversations": [turn("human", "<speech>"), turn("gpt", "Yo.")]},
    ]
    return write_json(tmp_path / "d.json", records)


def test_bad_samples_are_skipped_logged_and_counted(tmp_path, processor, caplog):
    dataset = LyraDataset(bad_and_good(tmp_path), processor)
    with caplog.at_level(logging.WARNING, logger="lyra.data"):
        items = [dataset[i] for i in range(len(dataset))]
    assert [type(i).__name__ for i in items] == ["TrainingSample", "SkippedSample", "SkippedSample", "SkippedSample", "TrainingSample"]
    assert [i.code for i in items if isinstance(i, SkippedSample)] == ["missing_file", "corrupt_audio", "bad_roles"]
    assert "skipping bad sample #1 (id 'missing'" in caplog.text
    assert dataset.bad_sample_counts == {"missing_file": 1, "corrupt_audio": 1, "bad_roles": 1}

    batch = LyraCollator.from_processor(processor)(items)
    assert batch["num_samples"] == 2 and batch["sample_ids"] == ["ok", "ok2"]
    assert [s["id"] for s in batch["skipped"]] == ["missing", "corrupt", "roles"]
    tracker = BadSampleTracker()
    assert tracker.update(batch) == 3 and tracker.skipped == 3 and tracker.seen == 5
    empty = LyraCollator.from_processor(processor)([items[1]])
    assert empty == {"num_samples": 0, "skipped": [items[1].as_dict()]}
    with pytest.raises(RuntimeError, match="3 of 5 samples were bad"):
        BadSampleTracker(max_fraction=0.5, min_samples=1).update(batch)


def test_bad_samples_are_counted_across_dataloader_workers(tmp_path, processor):
    dataset = LyraDataset(bad_and_good(tmp_path), processor)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2,
                                         collate_fn=LyraCollator.from_processor(processor))
    tracker = BadSampleTracker()
    good = sum(batch["num_samples"] for batch in tracker.track(loader))
    assert good == 2 and tracker.skipped == 3
    assert tracker.by_code == {"missing_file": 1, "corrupt_audio": 1, "bad_roles": 1}


def test_raise_mode_raises(tmp_path, processor):
    dataset = LyraDataset(bad_and_good(tmp_path), processor, on_bad_sample="raise")
    with pytest.raises(BadSampleError, match="image file not found") as info:
        dataset[1]
    assert info.value.code == "missing_file" and info.value.sample_id == "missing"


def test_jsonl_is_lazy_and_a_bad_line_is_a_bad_sample(tmp_path, processor):
    good = json.dumps({"id": "a", "conversations": [turn("human", "Hi"), turn("gpt", "Yo.")]})
    (tmp_path / "d.jsonl").write_text(good + "\n\n" + '{"id": "b", "conversations": [}' + "\n" + good + "\n")
    dataset = LyraDataset(tmp_path / "d.jsonl", processor)
    assert len(dataset) == 3
    bad = dataset[1]
    assert isinstance(bad, SkippedSample) and bad.code == "malformed_json"
    assert "line 3, column 31" in bad.reason  # the "}" after "["
    assert isinstance(dataset[2], TrainingSample)


def test_malformed_json_list_reports_line_and_column(tmp_path, processor):
    (tmp_path / "d.json").write_text('[\n {"id": "a", "conversations": []},\n {"id": "b" "x": 1}\n]')
    with pytest.raises(DataFileError, match="line 3, column 13") as info:
        LyraDataset(tmp_path / "d.json", processor)
    assert (info.value.line, info.value.column) == (3, 13)


# ----------------------------------------------------------------------------- grouping info
def test_lengths_and_modalities_without_decoding(tmp_path, processor):
    path = make_sample_set(tmp_path, num_samples=16)
    dataset = LyraDataset(path, processor, info_cache=tmp_path / "info.json")
    lengths = dataset.lengths
    assert dataset.modalities[:8] == ["text", "image", "video", "speech", "speech", "sound", "image+speech", "long_speech"]
    actual = [len(dataset[i].input_ids) for i in range(len(dataset))]
    assert lengths == actual  # metadata estimates are exact for these files
    again = LyraDataset(path, processor, info_cache=tmp_path / "info.json")
    again._estimate_media_tokens = None  # a cache hit must not probe files
    assert again.lengths == lengths
    capped = LyraDataset(path, processor, model_max_length=500)
    assert max(capped.lengths) == 500  # the 65 s long speech (900 tokens) is capped
    blind = capped.sample_info(probe_media=False)  # no file opened: fixed per-kind estimates
    assert [i.modality for i in blind] == dataset.modalities and min(i.length for i in blind) > 0


# ----------------------------------------------------------------------------- long speech data
TALK = ("Good morning everyone. Today Maria and John will present the budget for the garden project. "
        "The garden needs new tomatoes, beans and herbs, and the pond needs cleaning before summer. "
        "Maria thinks the budget is too small, but John says the volunteers can help with the work. "
        "We will meet again on Monday to decide about the garden and the budget.")


def test_transcript_formats(tmp_path):
    (tmp_path / "a.srt").write_text("1\n00:00:01,000 --> 00:00:04,500\nHello there\n\n2\n00:01:02,000 --> 00:01:05,000\n<i>General</i> Kenobi\n")
    t = read_transcript(tmp_path / "a.srt")
    assert t.text == "Hello there General Kenobi" and [s.start for s in t.segments] == [1.0, 62.0] and t.duration == 65.0
    (tmp_path / "b.stm").write_text("talk 1 spk 0.50 3.20 <o,f0,male> it 's a test {COUGH}\ntalk 1 spk 3.20 6.00 <o,f0,male> of stm\n")
    t = read_transcript(tmp_path / "b.stm")
    assert t.text == "it's a test of stm" and t.segments[1].start == 3.2


def test_rule_based_qa_is_grounded_and_deterministic():
    transcript = Transcript(TALK, [], 600.0)
    pairs = rule_based_qa(transcript, seed=1)
    assert len(pairs) == 5 and pairs[0][0] == "Summarize the content of this recording."
    assert "budget" in pairs[0][1] and "garden" in pairs[0][1]
    assert pairs == rule_based_qa(transcript, seed=1)
    questions = {q for seed in range(10) for q, _ in rule_based_qa(transcript, seed=seed)}
    assert any(q.startswith("Which names") for q in questions)
    answers = {a for seed in range(10) for q, a in rule_based_qa(transcript, seed=seed) if q.startswith("Which names")}
    assert all("Maria" in a and "John" in a for a in answers)


def test_llm_reply_formats():
    figure = '```json\n{\n  [\n    {\n      "Question": "What is it about?", "Answer": "A garden.",\n      "Question": "Who?", "Answer": "Maria."\n    }\n  ]\n}\n```'
    assert parse_qa_response(figure) == [("What is it about?", "A garden."), ("Who?", "Maria.")]
    assert parse_qa_response('{"Question": "a?", "Answer": "b", "Question": "c?", "Answer": "d"}') == [("a?", "b"), ("c?", "d")]
    assert parse_qa_response('[{"question": "a?", "answer": "b"}]') == [("a?", "b")]
    assert parse_qa_response("1. Q: what?\nA: that.\n2. Q: who?\nA: him.") == [("what?", "that."), ("who?", "him.")]


def test_prepare_long_speech_with_an_llm_endpoint_and_load_it(tmp_path, processor):
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, self.headers.get("Authorization"), body))
            reply = '```json\n{"Question": "Summarize the recording.", "Answer": "A budget meeting.", ' \
                    '"Question": "Who presents?", "Answer": "Maria and John."}\n```'
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        audio = tmp_path / "talks"
        audio.mkdir()
        sf.write(audio / "talk1.wav", tone(45.0), 16000)
        (audio / "talk1.txt").write_text(TALK)
        sf.write(audio / "short.wav", tone(5.0), 16000)
        (audio / "short.txt").write_text(TALK)
        items = [(audio / "talk1.wav", audio / "talk1.txt"), (audio / "short.wav", audio / "short.txt")]
        out = tmp_path / "long.json"
        endpoint = f"http://127.0.0.1:{server.server_port}/v1"
        stats = prepare_long_speech(items, out, generator="llm", endpoint=endpoint, model="m", api_key="k", progress=False)
        assert stats.recordings == 1 and stats.samples == 1 and len(stats.skipped) == 1
        path, auth, body = requests[0]
        assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "m"
        prompt = body["messages"][0]["content"]
        assert "The first question should be about summarizing" in prompt and TALK in prompt
        assert "Generate 5 question-answer pairs" in prompt
        again = prepare_long_speech(items, out, generator="llm", endpoint=endpoint, model="m", progress=False)
        assert again.cached == 1 and len(requests) == 1  # answers are cached per recording
    finally:
        server.shutdown()
    records = json.loads(out.read_text())
    assert records[0]["long_speech"] == "talks/talk1.wav"
    assert [t["value"] for t in records[0]["conversations"]] == [
        "<speech>\nSummarize the recording.", "A budget meeting.", "Who presents?", "Maria and John."]
    sample = LyraDataset(out, processor, on_bad_sample="raise")[0]
    assert sample.modality == "long_speech" and int((sample.input_ids == processor.tokens.speech).sum()) == 600


def test_prepare_long_speech_rules_one_pair_per_sample(tmp_path):
    sf.write(tmp_path / "t.wav", tone(40.0), 16000)
    out = tmp_path / "o.json"
    stats = prepare_long_speech([(tmp_path / "t.wav", TALK)], out, one_per_sample=True, progress=False)
    records = json.loads(out.read_text())
    assert stats.samples == 5 and len(records) == 5
    assert all(r["conversations"][0]["value"].startswith("<speech>\n") for r in records)


def test_prepare_long_speech_cli(tmp_path):
    import subprocess
    import sys

    sf.write(tmp_path / "talk.flac", tone(35.0), 16000)
    (tmp_path / "talk.srt").write_text("1\n00:00:00,000 --> 00:00:20,000\n" + TALK + "\n")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"audio": "talk.flac", "text": TALK}) + "\n")
    result = subprocess.run(
        [sys.executable, "scripts/prepare_long_speech.py", "--audio-dir", str(tmp_path), "--out",
         str(tmp_path / "out" / "ls.json"), "--root", str(tmp_path), "--quiet"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "1 sample(s) from 1 recording(s)" in result.stdout
    record = json.loads((tmp_path / "out" / "ls.json").read_text())[0]
    assert record["long_speech"] == "talk.flac" and len(record["conversations"]) == 10
