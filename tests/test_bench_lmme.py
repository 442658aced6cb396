"""scripts/bench_lmme.py on a 4-layer tiny LLM: the materialised model equals the library's,
LMME at rho = 1 equals the library forward, OOM and time-budget cells are recorded and the run
goes on, the JSON / PNG written, Table 4a as the paper prints it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

from lyra.config import load_config
from lyra.model.backbone import qwen2vl_config

from conftest import REPO_ROOT, load_script

bench = load_script("bench_lmme")
FOUR_LAYERS = {"text.num_hidden_layers": 4}
PAPER = REPO_ROOT.parent / "shared" / "paper" / "lyra-paper.txt"


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    return bench.build_language_model(load_config("tiny", overrides=FOUR_LAYERS), torch.device("cpu"), torch.float32)


def test_materialised_model_equals_the_library_model_with_its_weights(lm):
    """Built on meta then materialised: loading its weights into an ordinarily built
    Qwen2VLTextModel gives the same hidden states (so the rotary tables were rebuilt right)."""
    reference = Qwen2VLTextModel(qwen2vl_config(lm.config).text_config).eval()
    reference.load_state_dict(lm.decoder.state_dict())
    prompt = bench.make_prompt(lm, 40, seed=3)
    with torch.inference_mode():
        ours = lm.decoder(inputs_embeds=prompt.embeds, position_ids=prompt.positions).last_hidden_state
        theirs = reference(inputs_embeds=prompt.embeds, position_ids=prompt.positions).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    weights = dict(lm.decoder.named_parameters())
    assert torch.equal(weights["norm.weight"], torch.ones_like(weights["norm.weight"]))
    assert torch.equal(weights["layers.0.self_attn.q_proj.bias"], torch.zeros_like(weights["layers.0.self_attn.q_proj.bias"]))
    assert abs(float(weights["layers.0.mlp.up_proj.weight"].detach().std()) - bench.INIT_STD) < 0.002


def test_rho1_equals_the_library_forward_and_pruning_does_not(lm):
    same = bench.check_equivalence(lm, context=96, keep=1.0, decode_steps=3)
    assert same.passed and same.relative_diff <= 1e-5, same
    pruned = bench.check_equivalence(lm, context=96, keep=0.5, decode_steps=3)
    assert not pruned.passed and pruned.relative_diff > 100 * bench.RHO1_TOLERANCE[torch.float32], pruned


def test_oom_is_recorded_per_cell_and_the_run_goes_on(lm):
    meter = bench.Meter(torch.device("cpu"))
    calls = []

    def run_one(length: int, name: str) -> dict:
        calls.append((length, name))
        if name == "baseline" and length >= 200:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return bench.measure(lm, bench.make_prompt(lm, length, seed=length), bench.VARIANTS[name], meter, 2)

    rows = bench.run_table([100, 200, 300], list(bench.VARIANTS), 2, run_one, bench.Budget(None), lambda n, v: n)
    status = {(r["context_tokens"], r["variant"]): r["status"] for r in rows}
    assert status == {(100, "baseline"): "ok", (200, "baseline"): "oom", (300, "baseline"): "oom",
                      **{(n, v): "ok" for n in (100, 200, 300) for v in ("LMME(4,0.8)", "LMME(4,0.7)")}}
    assert ("baseline", 300) not in {(v, n) for n, v in calls}  # a longer prompt than the one that ran out: untried
    assert calls.count((200, "baseline")) == 1 and calls.count((200, "LMME(4,0.7)")) == 2
    oom = next(r for r in rows if r["status"] == "oom")
    assert "out of memory" in oom["note"] and "prefill_s" not in oom
    assert next(r for r in rows if r["context_tokens"] == 300 and r["variant"] == "baseline")["note"] == \
        "not tried: out of memory at 200 tokens"

    bench.add_ratios(rows, lambda n, v: 1.0)
    kept = next(r for r in rows if r["context_tokens"] == 100 and r["variant"] == "LMME(4,0.7)")
    assert kept["kept_fraction"] == pytest.approx(0.35) and kept["runs"] == 2
    assert next(r for r in rows if r["context_tokens"] == 200 and r["variant"] == "LMME(4,0.7)")["prefill_speedup"] is None
    longest = bench.compare_with_paper(rows)["longest_context"]
    assert longest["baseline"] == {"ours": 100, "ours_longest_tried": 300, "paper": 2**15,
                                   "ours_first_failure": {"context_tokens": 200, "status": "oom"}}
    assert longest["LMME(4,0.7)"]["ours"] == 300 and longest["LMME(4,0.7)"]["paper"] == 2**17


def test_time_budget_skips_cells_that_no_longer_fit():
    """A fake clock: each run takes `length / 10` s; cost grows linearly, so the predictions are exact."""
    now = [0.0]

    def run_one(length: int, name: str) -> dict:
        now[0] += length / 10
        return {"prefill_s": 1.0, "decode_tok_s": 1.0, "peak_gib": 0.0, "kept_fraction": 1.0, "scoring_share": 0.0}

    budget = bench.Budget(100.0, clock=lambda: now[0])
    rows = bench.run_table([10, 100, 1000], ["baseline", "LMME(4,0.7)"], 2, run_one, budget, lambda n, v: float(n))
    summary = [(r["context_tokens"], r["variant"], r["status"], r["runs"]) for r in rows]
    # 4 s at 10; at 100 each run is 10 s: 4 + 40 = 44 s; at 1000 a run would take 100 s > 56 s left
    assert summary == [(10, "baseline", "ok", 2), (10, "LMME(4,0.7)", "ok", 2), (100, "baseline", "ok", 2),
                       (100, "LMME(4,0.7)", "ok", 2), (1000, "baseline", "skipped", 0), (1000, "LMME(4,0.7)", "skipped", 0)]
    assert now[0] == pytest.approx(44.0)
    assert rows[-1]["note"] == "time budget: predicted 100.0 s"


def test_main_writes_the_table_next_to_the_paper(tmp_path):
    preset = tmp_path / "four_layers.yaml"
    preset.write_text((REPO_ROOT / "lyra" / "presets" / "tiny.yaml").read_text().replace(
        "num_hidden_layers: 2", "num_hidden_layers: 4"))
    out = tmp_path / "bench"
    code = bench.main(["--preset", str(preset), "--lengths", "40", "80", "--repeats", "1", "--decode-tokens", "2",
                       "--check-tokens", "48", "--threads", "1", "--profile-below", "1000", "--out", str(out)])
    assert code == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["rho1_check"]["passed"] and payload["rho1_check"]["relative_diff"] <= 1e-5
    assert payload["device"].startswith("CPU") and payload["memory"].startswith("process RSS")
    assert payload["paper_table_4a"] == json.loads(json.dumps(bench.PAPER_TABLE_4A))
    assert [(r["context_tokens"], r["variant"], r["status"]) for r in payload["rows"]] == \
        [(n, v, "ok") for n in (40, 80) for v in bench.VARIANTS]
    for row in payload["rows"]:
        assert set(bench.COLUMNS) <= set(row) and row["decode_tok_s"] > 0 and row["peak_gib"] > 0
        assert math.isclose(row["speedup_over_bound"], row["prefill_speedup"] / row["flop_bound"])
    speedups = payload["comparison"]["prefill_speedup"]["LMME(4,0.7)"]
    assert {"context_tokens": 16384, "ours": None, "paper": pytest.approx(1.47 / 0.59)} in speedups
    assert payload["comparison"]["memory_at_32768"]["baseline"] == {"ours_gib": None, "paper_g": 60}
    profile = payload["profile"]
    assert profile["context_tokens"] == 80 and set(profile["ranges_ms"]) == {"lmme.score", "lmme.repad"}
    assert (tmp_path / "bench_profile.txt").read_text().startswith(f"{profile['variant']} prefill at 80")
    with Image.open(out.with_suffix(".png")) as picture:
        assert picture.size == (1040, 720)


def test_too_few_layers_is_a_clear_error():
    with pytest.raises(SystemExit, match="tiny.*2 layers.*at least 4"):
        bench.main(["--preset", "tiny", "--lengths", "40"])


def test_imports_without_deepspeed_whisper_or_librosa():
    """The GPU machine has none of them: the script must not need them to load, nor load the
    speech encoder or numba (the soft-DTW kernels) that the LLM alone does not use."""
    blocked = "import sys; sys.modules.update(dict.fromkeys(['deepspeed', 'whisper', 'librosa'], None)); "
    load = ("import importlib.util as u; s = u.spec_from_file_location('b', 'scripts/bench_lmme.py'); "
            "m = u.module_from_spec(s); sys.modules['b'] = m; s.loader.exec_module(m); print(m.VARIANTS); "
            "print('loaded:', sorted(n for n in ('lyra.model.lyra', 'lyra.model.speech', 'numba') if n in sys.modules))")
    result = subprocess.run([sys.executable, "-c", blocked + load], cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "LMME(4,0.7)" in result.stdout
    assert "loaded: []" in result.stdout


@pytest.mark.skipif(not PAPER.is_file(), reason=f"{PAPER} is not in this checkout's neighbourhood")
def test_paper_table_4a_is_the_papers():
    lines = PAPER.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Prefill(s)"))
    metrics = {"Prefill(s)": "prefill_s", "TPS": "decode_tok_s", "Memory": "memory_g"}
    parsed: dict[str, dict[str, list]] = {}
    metric = None
    for line in lines[start:start + 9]:
        fields = [f for f in line.split("\t") if f]
        if len(fields) == 9:
            metric = metrics[fields.pop(0).rstrip("↓↑")]
        variant = fields[0].replace(" ", "")
        values = [None if f == "OOM" else float(f.rstrip("G")) for f in fields[1:]]
        parsed.setdefault(metric, {})["baseline" if variant == "Baseline" else variant] = values
    assert parsed == {k: v for k, v in bench.PAPER_TABLE_4A.items() if k != "lengths"}
