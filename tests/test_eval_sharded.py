"""Sharded, batched, resumable evaluation (lyra/eval/runner.py) with the tiny model: two
processes under torchrun (gloo) give the single process's predictions and scores item for
item (the needle heatmap drawn from the merged cells), a run killed midway resumes under
another process count without answering any item twice, a batch gives batch 1's greedy
answers, and predictions of other settings are refused."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from lyra.eval.runner import (
    FINGERPRINT_SAMPLES, EvalTask, Layout, batches, deal, evaluate, model_meta, settings_hash, shard_folder,
)
from lyra.inference import Assistant
from lyra.model import mlora
from lyra.model.lyra import LyraForConditionalGeneration
from lyra.utils.state_dict import weights_sha256

from conftest import REPO_ROOT, load_script, tone
from test_eval_scripts import (  # noqa: F401 (fixtures)
    SMALL, _one_thread, librispeech_root, prediction_lines, replies, speech_vqa_roots, videomme_root,
)

TIMING = {"seconds"}  # per-item wall time: the only field that may differ between runs


def torchrun(script: str, argv: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node N script argv` (CPU: gloo), from the repository root."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO_ROOT))  # this checkout's lyra
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={processes}", script, *argv],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def untimed(record: dict) -> dict:
    """A record without its wall times (a needle cell's trials have their own)."""
    return {k: [untimed(t) for t in v] if k == "trials" else v for k, v in record.items() if k not in TIMING}


def answers(predictions: Path) -> list[dict]:
    """The merged predictions without timings, in file order."""
    return [untimed(r) for r in prediction_lines(predictions)]


def shard_records(predictions: Path) -> list[dict]:
    return [r for shard in sorted(shard_folder(predictions).glob("*.jsonl")) for r in prediction_lines(shard)]


SETS = {  # script, the flag its data fixture fills, its other arguments, the result fields that score it
    "videomme": ("eval_videomme", "--data-root", ["--mode", "omni"], ("accuracy", "counts", "n", "unparsed")),
    "docvqa": ("eval_speech_vqa", "--data-root", ["--task", "docvqa"], ("score", "exact_match", "n")),
    "librispeech": ("eval_librispeech", "--data-root", ["--splits", "test-clean", "test-other"], ("splits",)),
    "needle": ("eval_needle", "--haystack", ["--lengths", "6", "12", "--depths", "0", "1", "--samples", "2",
                                             "--question", "What is the password?", "--answer", "pineapple"],
               ("grid", "overall", "by_length", "trials", "errors")),
}


@pytest.fixture(scope="module")
def data_roots(videomme_root, speech_vqa_roots, librispeech_root, tmp_path_factory) -> dict[str, Path]:
    background = tmp_path_factory.mktemp("needle") / "background.wav"
    noise = 0.01 * np.random.default_rng(0).standard_normal(8 * 16000).astype(np.float32)
    sf.write(background, tone(8.0, 16000, 180.0) + noise, 16000)
    return {"videomme": videomme_root, "docvqa": speech_vqa_roots["docvqa"], "librispeech": librispeech_root,
            "needle": background}


def arguments(name: str, root: Path, out: Path, *extra: str) -> list[str]:
    _, flag, rest, _ = SETS[name]
    return [*SMALL, *rest, flag, str(root), "--out", str(out),
            "--predictions", str(out.with_suffix(".predictions.jsonl")), *extra]


@pytest.fixture(scope="module")
def single(data_roots, tmp_path_factory) -> dict[str, Path]:
    """Each set evaluated by one process at batch 1: name -> results JSON."""
    folder = tmp_path_factory.mktemp("single")
    outs = {name: folder / f"{name}.json" for name in SETS}
    for name, out in outs.items():
        assert load_script(SETS[name][0]).main(arguments(name, data_roots[name], out)) == 0
    return outs


@pytest.fixture(scope="module")
def two_ranks(data_roots, tmp_path_factory) -> tuple[dict[str, Path], Path, subprocess.CompletedProcess]:
    """One `torchrun --nproc_per_node 2` launch: each set at batch 2 (name -> results JSON),
    then a LibriSpeech run whose ranks are SIGKILLed after one answer each (its results JSON
    path, never written) -- and the launch's outcome."""
    folder = tmp_path_factory.mktemp("two_ranks")
    outs = {name: folder / f"{name}.json" for name in SETS}
    killed = folder / "killed.json"
    jobs = [{"script": SETS[name][0], "argv": arguments(name, data_roots[name], out, "--batch-size", "2")}
            for name, out in outs.items()]
    jobs.append({"script": "eval_librispeech", "argv": arguments("librispeech", data_roots["librispeech"], killed),
                 "kill_after": 1})
    (folder / "jobs.json").write_text(json.dumps(jobs))
    return outs, killed, torchrun("tests/support/eval_jobs.py", [str(folder / "jobs.json")])


@pytest.mark.parametrize("name", list(SETS))
def test_two_processes_equal_one(name, single, two_ranks):
    """Merged predictions of 2 ranks (batches of 2) == one process at batch 1, and so do the scores."""
    fields = SETS[name][3]
    outs, _, launch = two_ranks
    sharded = outs[name]
    assert sharded.is_file(), launch.stderr[-3000:]
    reference = answers(single[name].with_suffix(".predictions.jsonl"))
    assert answers(sharded.with_suffix(".predictions.jsonl")) == reference
    shards = sorted(p.name for p in shard_folder(sharded.with_suffix(".predictions.jsonl")).iterdir())
    assert shards == ["rank0-of-2.jsonl", "rank1-of-2.jsonl"]
    assert sorted(r["id"] for r in shard_records(sharded.with_suffix(".predictions.jsonl"))) == sorted(
        r["id"] for r in reference)  # each item answered by exactly one rank
    ours, theirs = json.loads(single[name].read_text()), json.loads(sharded.read_text())
    assert {f: ours[f] for f in fields} == {f: theirs[f] for f in fields}
    assert theirs["processes"] == 2 and theirs["run"]["computed"] == len(reference)
    assert launch.stderr.count("items/s; time by modality") >= len(SETS)  # rank 0's throughput line
    if name == "needle":  # drawn by rank 0 from the merged cells
        assert Path(theirs["heatmap"]).is_file() and theirs["grid"][1][0] is not None


def test_killed_two_processes_resume_with_one(data_roots, single, two_ranks, replies):
    """SIGKILL both ranks midway, resume with one process: only the missing items are answered,
    each exactly once, and the result equals an uninterrupted run's."""
    _, out, launch = two_ranks
    predictions = out.with_suffix(".predictions.jsonl")
    assert launch.returncode != 0 and not predictions.exists()  # killed before any merge
    before = shard_records(predictions)
    reference = single["librispeech"]
    total = len(prediction_lines(reference.with_suffix(".predictions.jsonl")))
    assert 0 < len(before) < total, launch.stderr[-3000:]

    assert load_script("eval_librispeech").main(arguments("librispeech", data_roots["librispeech"], out)) == 0
    assert len(replies) == total - len(before)  # only what the shards lacked
    ids = [r["id"] for r in shard_records(predictions)]
    assert len(ids) == len(set(ids)) == total
    assert answers(predictions) == answers(reference.with_suffix(".predictions.jsonl"))
    resumed, uninterrupted = json.loads(out.read_text()), json.loads(reference.read_text())
    assert resumed["splits"] == uninterrupted["splits"]
    assert resumed["run"] == {"computed": total - len(before), "skipped": len(before), "failed": 0}


@pytest.fixture()
def batch_sizes(monkeypatch) -> list[int]:
    """How many conversations each Assistant.reply_batch call the scripts make holds."""
    sizes = []
    original = Assistant.reply_batch

    def counting(self, conversations, options=None):
        sizes.append(len(conversations))
        return original(self, conversations, options)

    monkeypatch.setattr(Assistant, "reply_batch", counting)
    return sizes


@pytest.mark.parametrize("name, batch", [("librispeech", 3), ("videomme", 4)])
def test_batches_equal_batch_one(name, batch, data_roots, tmp_path, batch_sizes):
    """Greedy answers do not depend on the batch size (rows of different lengths, left-padded)."""
    script = load_script(SETS[name][0]).main
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    assert script(arguments(name, data_roots[name], one)) == 0
    assert set(batch_sizes) == {1}
    assert script(arguments(name, data_roots[name], many, "--batch-size", str(batch))) == 0
    assert answers(many.with_suffix(".predictions.jsonl")) == answers(one.with_suffix(".predictions.jsonl"))
    assert max(batch_sizes) > 1 and all(size <= batch for size in batch_sizes)


def test_foreign_shard_is_refused(data_roots, tmp_path, capsys):
    """A shard written with other settings (here max_new_tokens) is refused by name, not merged;
    so is a merged file whose header carries another run's hash."""
    root = data_roots["docvqa"]
    run = load_script("eval_speech_vqa").main
    other = tmp_path / "other.json"
    assert run(arguments("docvqa", root, other, "--max-new-tokens", "3")) == 0
    out = tmp_path / "mine.json"
    predictions = out.with_suffix(".predictions.jsonl")
    foreign = shard_folder(predictions) / "rank1-of-2.jsonl"
    foreign.parent.mkdir(parents=True)
    foreign.write_text((shard_folder(other.with_suffix(".predictions.jsonl")) / "rank0-of-1.jsonl").read_text())
    capsys.readouterr()
    assert run(arguments("docvqa", root, out)) == 2
    error = capsys.readouterr().err
    assert str(foreign) in error and "settings hash" in error and "max_new_tokens: 3 there, 4 now" in error
    assert not predictions.exists()

    foreign.unlink()
    theirs = other.with_suffix(".predictions.jsonl").read_text()
    edited = theirs.replace('"max_new_tokens": 3', '"max_new_tokens": 4')
    assert edited != theirs
    predictions.write_text(edited)  # this run's settings under the other run's hash
    assert run(arguments("docvqa", root, out)) == 2
    error = capsys.readouterr().err
    assert str(predictions) in error and "edited header" in error


def test_the_settings_hash_follows_the_weights(tiny_config):
    """The model fingerprint in the predictions header, and so the settings hash, changes with
    any weight: the model's own and the projector MLoRA keeps for inputs with the adapter off."""
    args = argparse.Namespace(model="m", lmme=None, max_new_tokens=4, temperature=0.0, max_pixels=None,
                              max_frames=None, fps=None)

    def settings(model: LyraForConditionalGeneration) -> str:
        return settings_hash(model_meta(args, {"fingerprint": weights_sha256(model, FINGERPRINT_SAMPLES)}))

    torch.manual_seed(0)
    model = LyraForConditionalGeneration.from_config(tiny_config)
    mlora.add_adapter(model, "speech")
    torch.manual_seed(0)
    same = LyraForConditionalGeneration.from_config(tiny_config)
    mlora.add_adapter(same, "speech")
    reference = settings(model)
    assert settings(same) == reference
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1.0  # the first sampled value of one weight
    assert settings(same) != reference
    model.adapter_projectors[mlora.BASE]["fc1.bias"] += 1.0
    edited = settings(model)
    assert edited != reference
    assert settings(model.to(torch.bfloat16)) != edited


def test_deal_and_batches():
    """Every pending item goes to exactly one rank, each rank's share is sorted by length, and
    a batch holds one modality and at most `batch_size` items."""
    items = [("speech", 3.0), ("image", 1.0), ("speech", 1.0), ("text", 0.0), ("image", 2.0), ("speech", 2.0),
             ("text", 5.0)]
    pending = [(item, item) for item in items]  # an item is its own group here
    shares = [deal(pending, Layout(rank, 3, rank)) for rank in range(3)]
    assert sorted(i for share in shares for i, _ in share) == sorted(items)
    assert [i for i, _ in shares[0]] == [("image", 1.0), ("speech", 2.0), ("text", 5.0)]
    assert all(share == sorted(share) and all(i[0] == m for i, m in share) for share in shares)
    everything = deal(pending, Layout())
    grouped = list(batches(everything, 2))
    assert grouped == [([("image", 1.0), ("image", 2.0)], "image"), ([("speech", 1.0), ("speech", 2.0)], "speech"),
                       ([("speech", 3.0)], "speech"), ([("text", 0.0), ("text", 5.0)], "text")]
    with pytest.raises(ValueError, match="RANK 2 is not in"):
        Layout.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    assert Layout.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Layout(1, 2, 1)


def test_a_bad_item_fails_alone_and_is_retried(tmp_path):
    """A batch whose generation fails is answered item by item: only the bad item gets an error
    record, and the next run retries just that one."""
    calls: list[list[str]] = []
    broken = {"b"}

    def answer(requests: list[str]) -> list[str]:
        calls.append(list(requests))
        if broken & set(requests):
            raise RuntimeError("cannot decode")
        return [r.upper() for r in requests]

    task = EvalTask("letters", ["a", "b", "c", "d"], str, lambda item: [item], lambda item, out: {"answer": out[0]},
                    lambda item: ("text", 0.0))
    predictions = tmp_path / "letters.predictions.jsonl"
    first_run = evaluate(task, answer, predictions, {"benchmark": "letters"}, Layout(), batch_size=4)
    assert calls == [["a", "b", "c", "d"], ["a"], ["b"], ["c"], ["d"]]
    assert [r.get("answer") for r in first_run.records] == ["A", None, "C", "D"]
    assert "RuntimeError: cannot decode" in first_run.records[1]["error"]
    assert (first_run.summary.computed, first_run.summary.failed) == (3, 1)
    broken.clear()
    second = evaluate(task, answer, predictions, {"benchmark": "letters"}, Layout(), batch_size=4)
    assert calls[-1] == ["b"] and [r["answer"] for r in second.records] == ["A", "B", "C", "D"]
    assert (second.summary.computed, second.summary.skipped) == (1, 3)
