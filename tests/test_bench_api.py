"""scripts/bench_api.py: the request sets it sends and the targets it reads off its rows."""

import base64

from conftest import load_script

bench = load_script("bench_api")


def audio_of(requests: list[dict]) -> list[bytes]:
    return [base64.b64decode(part["input_audio"]["data"]) for r in requests for part in r["messages"][0]["content"]
            if isinstance(part, dict) and part["type"] == "input_audio"]


def test_fresh_audio_differs_by_seed_and_repeats_for_one_seed():
    clips = {seed: audio_of(bench.build_requests("m", 6, [8], "mixed", seed)) for seed in (None, 1, 2)}
    assert len(clips[None]) == 2 and len(set(clips[None])) == 2  # a clip per speech request
    assert audio_of(bench.build_requests("m", 6, [8], "mixed", 1)) == clips[1]
    assert not set(clips[1]) & set(clips[2]) and not set(clips[1]) & set(clips[None])


def row(mode: str, clients: int, rps: float, p95: float, prefill: float, decode: float, encode: float | None = None,
        encoder_thread: bool = True) -> dict:
    return {"model": "tiny", "mix": "mixed", "mode": mode, "clients": clients, "requests_per_s": rps,
            "p95_ms": p95, "engine_encode_ms_per_request": encode, "engine_prefill_ms_per_request": prefill,
            "engine_decode_ms_per_request": decode, "encoder_thread": encoder_thread}


def test_targets_and_the_bound_of_batching_decode_steps():
    rows = [row("continuous", 1, 10.0, 100.0, 12.0, 20.0), row("one-at-a-time", 1, 10.5, 90.0, 12.0, 20.0),
            row("continuous", 8, 31.0, 300.0, 12.0, 4.0), row("one-at-a-time", 8, 10.0, 310.0, 10.0, 30.0)]
    checks = bench.targets(rows)["tiny"]
    assert checks["speedup_at_8"] == {"value": 3.1, "target": 3.0, "met": True}
    assert checks["speedup_at_1"] == {"value": 0.95, "target": 1.0, "met": False}
    assert checks["p95_ms_at_8"] == {"value": 300.0, "target": 310.0, "met": True}
    assert "speedup_bound_at_8" not in checks
    # continuous: prefill 12 ms per request, so at most 83.33 req/s, 8.33x the one-at-a-time 10 req/s
    assert bench.decode_free_bounds(rows) == {
        "tiny": {"speedup_at_8": 8.33, "requests_per_s": 83.33, "encode_ms": 0.0, "prefill_ms": 12.0}}


def test_each_encoder_thread_setting_has_its_own_targets_and_bound():
    """With the encoder thread, the continuous server is bound by the slower of its two
    threads' per-request work: max(prefill, encode)."""
    rows = [row("continuous", 8, 24.0, 300.0, 2.0, 5.0, encode=25.0),
            row("one-at-a-time", 8, 12.0, 310.0, 10.0, 30.0, encode=25.0),
            row("continuous", 8, 20.0, 300.0, 12.0, 4.0, encoder_thread=False),
            row("one-at-a-time", 8, 10.0, 310.0, 35.0, 30.0, encoder_thread=False)]
    checks = bench.targets(rows)
    assert checks["tiny"]["speedup_at_8"]["value"] == 2.0
    assert checks["tiny (no encoder thread)"]["speedup_at_8"]["value"] == 2.0
    bounds = bench.decode_free_bounds(rows)
    assert bounds["tiny"]["speedup_at_8"] == 3.33  # 1000 / max(2, 25) = 40 req/s over 12
    assert bounds["tiny (no encoder thread)"]["speedup_at_8"] == 8.33  # 1000 / 12 over 10
