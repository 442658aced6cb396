"""Load test of the API server: throughput and latency, batched vs one request at a time.

    python scripts/bench_api.py [--model tiny] [--requests 24] [--rounds 3] [--concurrency 1,4,8]
                                [--out outputs/bench_api.json]

Starts two `python -m lyra.serve.api` processes on 127.0.0.1 (a free port each), one with
`--max-batch-size 8` and one with `--max-batch-size 1`, and sends both the same fixed
list of requests (a mix of text, image + text and speech, or `--mix text`; greedy; `--max-tokens` new
tokens at most) from 1, 4 and 8 concurrent clients (threads, one keep-alive connection
each). Each round runs every level on both servers in turn, so load from other
processes on a shared machine affects both alike. Reports requests/s (over all rounds,
and per round), generated tokens/s, p50/p95 latency over every request, and the mean
batch size the server formed and the server process's CPU time per request (psutil);
checks that greedy answers are the same both ways;
prints a table and writes JSON. Bounded: a fixed request count, a per-request timeout
and an overall time limit (levels past it are skipped).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import platform
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HOST = "127.0.0.1"  # loopback only
REPO_ROOT = Path(__file__).resolve().parents[1]


def build_requests(model_id: str, count: int, max_tokens: int, mix: str = "mixed") -> list[dict]:
    """`count` requests cycling through text, image + text and speech inputs (`mix`
    "mixed"), or text only ("text")."""
    import soundfile as sf
    from PIL import Image

    def wav(seconds: float, freq: float) -> str:
        t = np.arange(int(seconds * 16000)) / 16000
        buffer = io.BytesIO()
        sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format="WAV")
        return base64.b64encode(buffer.getvalue()).decode()

    def png(size: int, color: tuple[int, int, int]) -> str:
        buffer = io.BytesIO()
        Image.new("RGB", (size, size), color).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    questions = ["hello", "what is the capital of france?", "tell me a story about a cat and a boat",
                 "list three colours", "why is the sky blue? answer in one sentence"]
    requests = []
    for i in range(count):
        kind = i % 3 if mix == "mixed" else 0
        if kind == 0:
            content: list | str = questions[i % len(questions)]
        elif kind == 1:
            content = [{"type": "image_url", "image_url": {"url": png(56 + 28 * (i % 3), (i * 40 % 255, 90, 160))}},
                       {"type": "text", "text": "what is in the picture?"}]
        else:
            content = [{"type": "input_audio", "input_audio": {"data": wav(1.0 + (i % 2), 220.0 + 40 * i),
                                                               "format": "wav"}}]
        requests.append({"model": model_id, "messages": [{"role": "user", "content": content}],
                         "max_tokens": max_tokens, "temperature": 0})
    return requests


class Server:
    """`python -m lyra.serve.api` in a subprocess on a free loopback port."""

    def __init__(self, model: str, max_batch_size: int, max_wait_ms: float, start_timeout: float = 300):
        command = [sys.executable, "-m", "lyra.serve.api", "--model", model, "--host", HOST, "--port", "0",
                   "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
                   "--log-level", "WARNING"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                        cwd=REPO_ROOT)
        self.port = None
        self.model_id = None
        deadline = time.monotonic() + start_timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            match = re.search(r"serving '(.+)' at http://127\.0\.0\.1:(\d+)/v1", line)
            if match:
                self.model_id, self.port = match.group(1), int(match.group(2))
                break
        if self.port is None:
            self.stop()
            raise RuntimeError(f"the server did not start (exit code {self.process.poll()})")

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process so far (less sensitive than wall
        time to other processes sharing the machine); None without psutil."""
        try:
            import psutil
        except ImportError:
            return None
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_level(server: Server, requests: list[dict], clients: int, timeout: float) -> dict:
    """Send `requests` from `clients` threads; latency per request and totals."""
    pending = list(enumerate(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    tokens = 0
    errors: list[str] = []
    answers: dict[int, str] = {}

    def worker() -> None:
        nonlocal tokens
        conn = http.client.HTTPConnection(HOST, server.port, timeout=timeout)
        try:
            while True:
                with lock:
                    if not pending:
                        return
                    index, body = pending.pop(0)
                payload = json.dumps(body).encode()
                started = time.perf_counter()
                try:
                    conn.request("POST", "/v1/chat/completions", payload, {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    data = json.loads(response.read())
                except (OSError, http.client.HTTPException, ValueError) as error:
                    conn.close()
                    with lock:
                        errors.append(f"{type(error).__name__}: {error}")
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    if response.status != 200:
                        errors.append(f"{response.status}: {data}")
                        continue
                    latencies.append(elapsed)
                    tokens += data["usage"]["completion_tokens"]
                    answers[index] = data["choices"][0]["message"]["content"]
        finally:
            conn.close()

    before = server.get("/health")["batches"]
    cpu_before = server.cpu_seconds()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(worker) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    cpu = server.cpu_seconds() - cpu_before if cpu_before is not None else None
    after = server.get("/health")["batches"]
    batches = after["batches"] - before["batches"]
    served = after["requests"] - before["requests"]
    lat = np.array(latencies) * 1000
    return {
        "clients": clients, "requests": len(requests), "ok": len(latencies), "errors": errors[:5],
        "error_count": len(errors), "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "mean_batch_size": round(served / batches, 2) if batches else None,
        "answers": [answers.get(i) for i in range(len(requests))],
        "latencies_ms": lat.tolist(), "tokens": tokens, "batches": batches, "served": served, "cpu_s": cpu,
    }


def combine(rounds: list[dict]) -> dict:
    """One row from several rounds: throughput summed over rounds' wall time, latency
    percentiles over every request, the answers of the last round."""
    lat = np.array([x for r in rounds for x in r["latencies_ms"]])
    wall = sum(r["wall_s"] for r in rounds)
    ok = sum(r["ok"] for r in rounds)
    batches = sum(r["batches"] for r in rounds)
    return {
        "clients": rounds[0]["clients"], "rounds": len(rounds), "requests": sum(r["requests"] for r in rounds),
        "ok": ok, "error_count": sum(r["error_count"] for r in rounds),
        "errors": [e for r in rounds for e in r["errors"]][:5], "wall_s": round(wall, 3),
        "requests_per_s": round(ok / wall, 3), "tokens_per_s": round(sum(r["tokens"] for r in rounds) / wall, 2),
        "requests_per_s_by_round": [r["requests_per_s"] for r in rounds],
        "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
        "p95_ms": round(float(np.percentile(lat, 95)), 1) if len(lat) else None,
        "mean_batch_size": round(sum(r["served"] for r in rounds) / batches, 2) if batches else None,
        "server_cpu_ms_per_request": (round(1000 * sum(r["cpu_s"] for r in rounds) / ok, 1)
                                      if ok and all(r["cpu_s"] is not None for r in rounds) else None),
        "answers": rounds[-1]["answers"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="preset or checkpoint directory")
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=3, help="passes over all levels, alternating servers")
    parser.add_argument("--concurrency", default="1,4,8")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--mix", choices=["mixed", "text"], default="mixed",
                        help="mixed: 1/3 text, 1/3 image + text, 1/3 speech; text: text only")
    parser.add_argument("--max-batch-size", type=int, default=8, help="of the batched server")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="of the batched server")
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--time-limit", type=float, default=1200.0, help="skip levels after this many seconds")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "bench_api.json"))
    args = parser.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.requests < 1 or args.rounds < 1 or any(c < 1 for c in levels):
        parser.error("--requests, --rounds and every --concurrency level must be at least 1")

    started = time.monotonic()
    modes = [("batched", args.max_batch_size, args.max_wait_ms), ("one-at-a-time", 1, 0.0)]
    servers = {}
    runs: dict[tuple[str, int], list[dict]] = {}
    try:
        for mode, batch_size, wait_ms in modes:
            servers[mode] = Server(args.model, batch_size, wait_ms)
        requests = build_requests(servers["batched"].model_id, args.requests, args.max_tokens, args.mix)
        for server in servers.values():
            run_level(server, requests[:6], 2, args.request_timeout)  # warm-up, not reported
        # Rounds alternate the two servers level by level, so load from other processes
        # on a shared machine drifts over both alike; a round's levels share one request list.
        for round_index in range(args.rounds):
            for clients in levels:
                for mode, _, _ in modes:
                    if time.monotonic() - started > args.time_limit:
                        print(f"time limit reached; skipping {mode} x {clients}", file=sys.stderr)
                        continue
                    result = run_level(servers[mode], requests, clients, args.request_timeout)
                    runs.setdefault((mode, clients), []).append(result)
                    print(f"round {round_index + 1} {mode:>14} clients={clients}: "
                          f"{result['requests_per_s']:.2f} req/s, p50 {result['p50_ms']} ms",
                          file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()
    results = []
    for mode, batch_size, wait_ms in modes:
        for clients in levels:
            if (mode, clients) in runs:
                result = combine(runs[(mode, clients)])
                result.update(mode=mode, max_batch_size=batch_size, max_wait_ms=wait_ms)
                results.append(result)

    # Greedy answers must not depend on batching.
    by_clients = {}
    for result in results:
        by_clients.setdefault(result["clients"], {})[result["mode"]] = result["answers"]
    same = {c: (len(m) == 2 and m["batched"] == m["one-at-a-time"]) for c, m in by_clients.items()}

    print("| mode | clients | requests | req/s | req/s per round | tokens/s | p50 ms | p95 ms | mean batch "
          "| server CPU ms/req |")
    print("|" + "---|" * 10)
    for r in results:
        per_round = " / ".join(f"{x:.1f}" for x in r["requests_per_s_by_round"])
        print(f"| {r['mode']} | {r['clients']} | {r['ok']}/{r['requests']} | {r['requests_per_s']:.2f} | "
              f"{per_round} | {r['tokens_per_s']:.1f} | {r['p50_ms']} | {r['p95_ms']} | {r['mean_batch_size']} | "
              f"{r['server_cpu_ms_per_request']} |")
    print(f"greedy answers identical batched vs one-at-a-time: {same}")
    report = {
        "model": args.model, "max_tokens": args.max_tokens, "requests_per_level": args.requests,
        "rounds": args.rounds,
        "mix": ("1/3 text, 1/3 image (56-112 px) + text, 1/3 speech (1-2 s)" if args.mix == "mixed"
                else "text only"), "host": HOST,
        "machine": {"python": platform.python_version(), "processor": platform.processor() or platform.machine()},
        "answers_identical": same,
        "results": [{k: v for k, v in r.items() if k not in ("answers", "latencies_ms")} for r in results],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["error_count"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
