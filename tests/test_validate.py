"""`python -m lyra.data.validate`: each kind of problem is caught, reported and counted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from lyra.config import load_config
from lyra.data.validate import main
from lyra.model.speechgen import SpeechGenerator

from conftest import tone

REPO = Path(__file__).resolve().parent.parent


def turn(role: str, value: str) -> dict:
    return {"from": role, "value": value}


def problem_set(root: Path) -> Path:
    """One good sample, then one sample per problem kind, in this order."""
    Image.new("RGB", (56, 56), "green").save(root / "good.png")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    sf.write(root / "good.wav", tone(1.0), 16000)
    (root / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage garbage garbage")
    sf.write(root / "empty.wav", np.zeros(0, np.float32), 16000)
    sf.write(root / "long.wav", tone(95.0), 16000)
    records = [
        {"id": "good", "image": "good.png", "speech": "good.wav",
         "conversations": [turn("human", "<image>\n<speech>"), turn("gpt", "Fine.")]},
        {"id": "missing", "image": "gone.png", "conversations": [turn("human", "<image>"), turn("gpt", "?")]},
        {"id": "corrupt-audio", "speech": "corrupt.wav", "conversations": [turn("human", "<speech>"), turn("gpt", "?")]},
        {"id": "empty-audio", "speech": "empty.wav", "conversations": [turn("human", "<speech>"), turn("gpt", "?")]},
        {"id": "corrupt-image", "image": "bad.png", "conversations": [turn("human", "<image>"), turn("gpt", "?")]},
        {"id": "mismatch", "image": ["good.png", "good.png"], "conversations": [turn("human", "<image> one"), turn("gpt", "?")]},
        {"id": "roles", "conversations": [turn("human", "a"), turn("human", "b"), turn("gpt", "c")]},
        {"id": "too-long", "long_speech": "long.wav", "conversations": [turn("human", "<speech>"), turn("gpt", "Hum.")]},
    ]
    path = root / "data.json"
    path.write_text(json.dumps(records, indent=1))
    return path


EXPECTED = {
    1: "missing_file", 2: "corrupt_audio", 3: "empty_audio", 4: "corrupt_image",
    5: "placeholder_mismatch", 6: "bad_roles", 7: "over_length",
}


def test_every_problem_kind_is_caught(tmp_path, capsys):
    data = problem_set(tmp_path)
    report = tmp_path / "report.json"
    code = main([str(data), "--tokenizer", "tiny", "--model-max-length", "1000", "--fix-report", str(report), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    result = json.loads(report.read_text())
    by_index = {p["index"]: p["code"] for p in result["problems"]}
    assert by_index == EXPECTED
    assert result["bad_indices"] == sorted(EXPECTED)
    assert result["counts"] == {code: 1 for code in EXPECTED.values()}
    for code in EXPECTED.values():  # the table lists each kind with its count
        assert any(line.split()[:3] == [code, "error", "1"] for line in out.splitlines()), (code, out)
    assert "8 sample(s) checked: 7 with errors" in out
    missing = next(p for p in result["problems"] if p["code"] == "missing_file")
    assert missing["file"] == "gone.png" and missing["sample_id"] == "missing" and missing["line"] == 17
    assert "gone.png" in missing["message"] and missing["hint"]
    over = next(p for p in result["problems"] if p["code"] == "over_length")
    assert "over model_max_length=1000" in over["message"]


def test_malformed_json_list_reports_line_and_column(tmp_path, capsys):
    (tmp_path / "d.json").write_text('[\n  {"id": "a",\n   "conversations": [{"from": "human" "value": "x"}]}\n]\n')
    assert main([str(tmp_path / "d.json"), "--tokenizer", "tiny", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "malformed_json" in out and "line 3, column 39" in out  # where "value" starts


def test_malformed_jsonl_line_reports_line_and_column(tmp_path, capsys):
    good = [json.dumps({"id": f"a{k}", "conversations": [turn("human", "hi"), turn("gpt", "yo")]}) for k in range(3)]
    (tmp_path / "d.jsonl").write_text(f"{good[0]}\n{good[1]}\n{{\"id\": \"b\", \"conversations\": [,]}}\n{good[2]}\n")
    assert main([str(tmp_path / "d.jsonl"), "--tokenizer", "tiny", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "#2 (line 3) malformed_json: d.jsonl line 3, column 31" in out
    assert "4 sample(s) checked: 1 with errors" in out


def test_clean_data_passes_and_truncation_is_a_warning(tmp_path, capsys):
    sf.write(tmp_path / "a.wav", tone(2.0, 22050), 22050)
    long_chat = [turn("human", "question " * 40), turn("gpt", "answer " * 40)] * 3
    records = [
        {"id": "s", "speech": "a.wav", "conversations": [turn("human", "<speech>"), turn("gpt", "ok")]},
        {"id": "chat", "conversations": long_chat},
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    args = [str(tmp_path / "d.json"), "--tokenizer", "tiny", "--model-max-length", "400", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "truncated" in out and "warning" in out and "0 with errors, 1 with warnings" in out
    assert main(args + ["--strict"]) == 1
    assert main([str(tmp_path / "d.json"), "--tokenizer", "tiny", "--quiet"]) == 0
    assert "2 sample(s) checked: no problems" in capsys.readouterr().out


def test_roots_and_workers(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    data = problem_set(tmp_path / "x")
    moved = tmp_path / "data.json"
    moved.write_text(data.read_text())  # the JSON lives apart from its media
    args = [str(moved), "--root", str(tmp_path / "x"), "--tokenizer", "tiny", "--model-max-length", "1000", "--quiet"]
    assert main(args + ["--workers", "2", "--fix-report", str(tmp_path / "r.json")]) == 1
    assert "8 sample(s) checked: 7 with errors" in capsys.readouterr().out
    by_index = {p["index"]: p["code"] for p in json.loads((tmp_path / "r.json").read_text())["problems"]}
    assert by_index == EXPECTED


def test_cli_entry_point(tmp_path):
    data = problem_set(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "lyra.data.validate", str(data), "--tokenizer", "tiny", "--model-max-length", "1000"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert "8 sample(s) checked: 7 with errors" in result.stdout
    assert "validating" in result.stderr  # the tqdm progress bar
    counts = {line.split()[0]: line.split()[2] for line in result.stdout.splitlines()[2:9]}
    assert counts == {code: "1" for code in EXPECTED.values()}


# ----------------------------------------------------------------------------- one test per problem code
def chat(sample_id: str, answer: str = "Fine.", **media) -> dict:
    """A valid text record (with one <image> per image path given)."""
    images = media.get("image", [])
    question = "<image>\n" * len(images if isinstance(images, list) else [images]) + "What is it?"
    return {"id": sample_id, **media, "conversations": [turn("human", question), turn("gpt", answer)]}


def validate(data: Path, *extra: str) -> tuple[int, dict]:
    """Exit code of the CLI's `main` and its --fix-report."""
    report = data.parent / "report.json"
    code = main([str(data), "--tokenizer", "tiny", "--quiet", "--fix-report", str(report), *extra])
    return code, json.loads(report.read_text())


def codes(report: dict) -> list[tuple[int, str]]:
    return [(p["index"], p["code"]) for p in report["problems"]]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lyra.data.validate", *args, "--tokenizer", "tiny", "--quiet"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_not_utf8_json_list_is_a_finding_without_traceback(tmp_path):
    records = json.dumps([chat("a"), chat("b")], indent=1).replace("What is it?", "Qu'est-ce que c'est ?", 1)
    data = tmp_path / "d.json"
    data.write_bytes(records.encode("utf-8").replace(b"'est", b"\xe9st", 1))  # a Latin-1 byte
    result = run_cli(str(data), "--fix-report", str(tmp_path / "r.json"))
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert codes(report) == [(-1, "not_utf8")]
    line = next(k for k, text in enumerate(records.splitlines(), 1) if "Qu'est" in text)
    assert report["problems"][0]["line"] == line
    assert f"line {line}, column" in result.stdout and "byte 0xe9" in result.stdout


def test_not_utf8_jsonl_line_is_a_bad_sample(tmp_path):
    lines = [json.dumps(chat(f"s{k}")).encode() for k in range(3)]
    lines[1] = lines[1].replace(b"Fine.", b"Fin\xe9.")
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code, report = validate(tmp_path / "d.jsonl")
    assert code == 1 and codes(report) == [(1, "not_utf8")]
    assert report["problems"][0]["line"] == 2 and "line 2, column" in report["problems"][0]["message"]


def test_unreadable_data_file(tmp_path):
    (tmp_path / "folder.json").mkdir()
    for path, reason in ((tmp_path / "folder.json", "is a directory"), (tmp_path / "gone.json", "not found")):
        code, report = validate(path)
        assert code == 1 and codes(report) == [(-1, "unreadable_file")], path
        assert reason in report["problems"][0]["message"]


def test_unreadable_media_file_never_blocks(tmp_path):
    Image.new("RGB", (28, 28), "red").save(tmp_path / "ok.png")
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would wait for a writer forever
    (tmp_path / "folder.png").mkdir()
    records = [chat("ok", image="ok.png"), chat("fifo", image="pipe.png"), chat("dir", image="folder.png")]
    (tmp_path / "d.json").write_text(json.dumps(records))

    def hung(signum, frame):
        raise TimeoutError("the validator blocked on the FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        code, report = validate(tmp_path / "d.json")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 1 and codes(report) == [(1, "unreadable_file"), (2, "unreadable_file")]
    assert "not a regular file" in report["problems"][0]["message"] and "a directory" in report["problems"][1]["message"]


@pytest.mark.parametrize("content", [b"", b"  [ ]\n", b"\n\n  \n"], ids=["empty", "empty-list", "blank-lines"])
def test_no_records(tmp_path, capsys, content):
    (tmp_path / "d.json").write_bytes(content)
    code, report = validate(tmp_path / "d.json")
    assert code == 1 and codes(report) == [(-1, "no_records")] and report["num_samples"] == 0
    assert "0 sample(s) checked: 0 with errors, 0 with warnings; the file itself is unusable" in capsys.readouterr().out


def test_malformed_json_list_in_fix_report(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([chat("a")]) + ",\n" + json.dumps([chat("b")]))
    code, report = validate(tmp_path / "d.json")
    assert code == 1 and codes(report) == [(-1, "malformed_json")] and report["problems"][0]["line"] == 1


def test_duplicate_id(tmp_path):
    records = [chat("a"), chat("b"), chat("a"), {**chat("x"), "id": 7}, {**chat("y"), "id": "7"}]
    (tmp_path / "d.json").write_text(json.dumps(records, indent=1))
    code, report = validate(tmp_path / "d.json", "--workers", "2")
    assert code == 1 and codes(report) == [(2, "duplicate_id"), (4, "duplicate_id")]
    assert report["bad_indices"] == [2, 4]  # the first of each id is kept
    assert "record #0 (line 2)" in report["problems"][0]["message"]


def test_path_outside_root(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    for folder in (root, elsewhere):
        Image.new("RGB", (28, 28), "blue").save(folder / "img.png")
    (root / "link.png").symlink_to(elsewhere / "img.png")
    (root / "linked_dir").symlink_to(elsewhere)
    (root / "inner.png").symlink_to(root / "img.png")  # a link that stays inside is fine
    records = [
        chat("inside", image="sub/../img.png"),
        chat("absolute", image=str(elsewhere / "img.png")),
        chat("dotdot", image="sub/../../elsewhere/img.png"),
        chat("link", image="link.png"),
        chat("linked-dir", image="linked_dir/img.png"),
        chat("inner-link", image="inner.png"),
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))
    code, report = validate(tmp_path / "d.json", "--root", str(root))
    assert code == 1 and codes(report) == [(i, "path_outside_root") for i in (1, 2, 3, 4)]
    messages = [p["message"] for p in report["problems"]]
    assert "is absolute" in messages[0] and "'..'" in messages[1] and "symlink" in messages[2]
    assert report["problems"][3]["file"] == "linked_dir/img.png"
    code, report = validate(tmp_path / "d.json", "--root", str(root), "--follow-symlinks")
    assert code == 1 and codes(report) == [(1, "path_outside_root"), (2, "path_outside_root")]


def test_unknown_key_in_record_and_turn(tmp_path):
    typo = chat("typo")
    typo["sorce"] = "coco"
    turn_key = chat("turn-key")
    turn_key["conversations"][1]["weight"] = 0.5
    records = [{**chat("meta"), "meta": {"source": "coco"}}, typo, turn_key,
               {"id": "role-content", "conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    code, report = validate(tmp_path / "d.json")
    assert code == 1 and codes(report) == [(1, "unknown_key"), (2, "unknown_key")]
    assert "'sorce'" in report["problems"][0]["message"] and "turn 1" in report["problems"][1]["message"]


def test_empty_answer(tmp_path):
    multi = chat("multi")
    multi["conversations"] += [turn("human", "And?"), turn("gpt", " \n")]
    records = [chat("ok"), chat("empty", answer=""), multi]
    (tmp_path / "d.json").write_text(json.dumps(records))
    code, report = validate(tmp_path / "d.json")
    assert code == 1 and codes(report) == [(1, "empty_answer"), (2, "empty_answer")]
    assert "turn 3 (gpt)" in report["problems"][1]["message"]


def test_unit_out_of_range_matches_the_stage4_loss(tmp_path):
    num_units = load_config("tiny").speech_generator.num_units  # the vocabulary --tokenizer tiny checks against
    records = [{**chat("in"), "tgt_unit": f"<0><{num_units - 1}>"},
               {**chat("blank"), "tgt_unit": f"<3><{num_units}>"},
               {**chat("far"), "tgt_unit": [1, 999]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    code, report = validate(tmp_path / "d.json")
    assert code == 1 and codes(report) == [(1, "unit_out_of_range"), (2, "unit_out_of_range")]
    generator = SpeechGenerator(llm_width=8, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                                num_units=num_units, upsample=2)
    with pytest.raises(ValueError) as error:  # stage 4 refuses the same record with the same words
        generator.loss(torch.zeros(1, 3, 8), None, [[3, num_units]])
    assert report["problems"][0]["message"] == f"'tgt_unit': {error.value}"
    assert validate(tmp_path / "d.json", "--config", "mini")[0] == 0  # 1000 units cover them all


def test_setup_error_is_a_message(tmp_path, capsys):
    (tmp_path / "d.json").write_text(json.dumps([chat("a")]))
    assert main([str(tmp_path / "d.json"), "--tokenizer", "tiny", "--config", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "none.yaml" in err
