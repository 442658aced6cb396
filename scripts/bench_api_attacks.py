"""The API server under the attacks of issue 21: each one, and what a normal request sees meanwhile.

    python scripts/bench_api_attacks.py [--model tiny] [--out outputs/bench_api_attacks.json]

Starts `python -m lyra.serve.api` on 127.0.0.1 (a free port, `--max-concurrent 8`, a
temporary `--media-root` holding a FIFO and a symlink to /proc/kmsg, `--body-timeout-s 2`)
and runs, one after the other:

* a 30 MB text prompt, with a small request sent 0.1 s after it (its latency is what the
  prompt costs others);
* eight requests naming the FIFO and eight naming /proc/kmsg (as many as slots: before
  the fix each held its slot for good), then a normal request;
* `Content-Length: ²` and a body shorter than its Content-Length;
* eight streams dropped after their first chunk (max_tokens 2000), then a normal request,
  and how many jobs the server cancelled.

Prints a table (status, seconds) and writes JSON, with the server's peak RSS (psutil).
Timings depend on the machine and its load; rerun on a quiet one for figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from lyra.serve.process import HOST, ServerProcess
from lyra.utils.io import atomic_write_json

SLOTS = 8  # --max-concurrent: as many FIFO requests as slots, as many dropped streams


def start_server(model: str, media_root: str) -> ServerProcess:
    return ServerProcess(["--model", model, "--max-concurrent", str(SLOTS), "--media-root", media_root,
                          "--body-timeout-s", "2", "--prepare-timeout-s", "5"], log_level="ERROR")


def send(port: int, payload: bytes, timeout: float = 120.0) -> tuple[int | None, float]:
    """Raw bytes on a fresh connection -> (HTTP status or None when the connection died, seconds)."""
    started = time.monotonic()
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as sock:
            sock.sendall(payload)
            head = b""
            while b"\r\n" not in head:
                chunk = sock.recv(65536)
                if not chunk:
                    return None, time.monotonic() - started
                head += chunk
    except OSError:
        return None, time.monotonic() - started
    return int(head.split()[1]), time.monotonic() - started


def post(body: dict | bytes, headers: dict[str, str] | None = None) -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    fields = {"Host": HOST, "Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
    head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return f"POST /v1/chat/completions HTTP/1.1\r\n{head}Connection: close\r\n\r\n".encode() + data


def chat(model_id: str, content, **extra) -> dict:
    return {"model": model_id, "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def attacks(server: ServerProcess, media: Path) -> list[dict]:
    port, model_id = server.port, server.model_id
    rows: list[dict] = []

    def record(name: str, status: int | str | None, seconds: float) -> None:
        rows.append({"case": name, "status": status, "seconds": round(seconds, 3)})

    normal = post(chat(model_id, "hello", max_tokens=2))
    record("normal request (before)", *send(port, normal))

    # a 30 MB prompt, and a small request while it is handled
    result: dict[str, tuple] = {}
    prompt = post(chat(model_id, "word " * 6_000_000))
    big = threading.Thread(target=lambda: result.setdefault("big", send(port, prompt)))
    big.start()
    time.sleep(0.1)
    record("small request during the 30 MB prompt", *send(port, normal))
    big.join()
    record("30 MB prompt", *result["big"])

    # FIFO and /proc/kmsg under the media root, two slots
    for name, path in (("FIFO", media / "fifo"), ("/proc/kmsg", media / "kmsg")):
        request = post(chat(model_id, [{"type": "image_url", "image_url": {"url": str(path)}}]))
        results = [send(port, request) for _ in range(SLOTS)]
        statuses = sorted({status for status, _ in results}, key=str)
        record(f"{name} image x{SLOTS} (statuses, slowest)", "/".join(map(str, statuses)),
               max(seconds for _, seconds in results))
    record("normal request after FIFO and /proc/kmsg", *send(port, normal))

    # framing
    record("Content-Length: \u00b2", *send(port, post(b"{}", {"Content-Length": "\u00b2"})))
    record("body shorter than Content-Length", *send(port, post(b"{}", {"Content-Length": "100"})))

    # dropped streams
    stream = post(chat(model_id, "tell me a long story", max_tokens=2000, stream=True))
    sockets = []
    for _ in range(SLOTS):
        sock = socket.create_connection((HOST, port), timeout=60)
        sock.sendall(stream)
        sock.recv(4096)
        sockets.append(sock)
    for sock in sockets:
        sock.close()
    time.sleep(0.2)
    record(f"normal request after {SLOTS} dropped streams", *send(port, normal))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--out", default="outputs/bench_api_attacks.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as media:
        os.mkfifo(Path(media) / "fifo")
        (Path(media) / "kmsg").symlink_to("/proc/kmsg")
        server = start_server(args.model, media)
        try:
            rows = attacks(server, Path(media))
            health = server.get_json("/health")
            rss = server.rss_mb()
        finally:
            server.stop()

    width = max(len(row["case"]) for row in rows)
    print(f"{'case':<{width}}  status  seconds")
    for row in rows:
        print(f"{row['case']:<{width}}  {str(row['status']):>6}  {row['seconds']:>7.3f}")
    print(f"server RSS at the end: {rss:.0f} MB; cancelled jobs: {health['batches'].get('cancelled_requests')}"
          if rss is not None else "psutil missing: no RSS")
    report = {"model": args.model, "machine": platform.platform(), "cpus": os.cpu_count(), "rows": rows,
              "server_rss_mb": None if rss is None else round(rss, 1),
              "cancelled_jobs": health["batches"].get("cancelled_requests"), "health": health}
    atomic_write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
