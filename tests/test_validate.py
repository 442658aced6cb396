"""`python -m lyra.data.validate`: each kind of problem is caught, reported and counted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from lyra.data.validate import main

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
