"""`python -m lyra.serve.api` as a child process on a free loopback port, for load tests and
attack runs: it is ready once it prints its `serving '<model id>' at http://...:<port>/v1` line."""

from __future__ import annotations

import http.client
import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

HOST = "127.0.0.1"
_READY = re.compile(r"serving '(.+)' at http://127\.0\.0\.1:(\d+)/v1")


class ServerProcess:
    """The server started with `args` (e.g. `["--model", "tiny"]`) added to a loopback host, a
    free port and `log_level`; raises RuntimeError (and stops it) when it exits, or is not
    ready within `start_timeout` seconds, silent or not."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str] | None = None, start_timeout: float = 300,
                 log_level: str = "WARNING"):
        command = [sys.executable, "-m", "lyra.serve.api", "--host", HOST, "--port", "0",
                   "--log-level", log_level, *args]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                        env=None if env is None else dict(env))
        self.port: int | None = None
        self.model_id: str | None = None
        deadline = time.monotonic() + start_timeout
        output, pipe, closed = b"", self.process.stdout.fileno(), False
        while self.port is None:
            # wait for output no longer than the time left (a read would block on a silent server)
            if not select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            chunk = os.read(pipe, 65536)
            if not chunk:  # it exited (or closed its output)
                closed = True
                break
            output += chunk
            match = _READY.search(output.decode("utf-8", "replace"))  # "/v1" ends the line: the port is whole
            if match:
                self.model_id, self.port = match.group(1), int(match.group(2))
        if self.port is None:
            self.stop()
            why = "exited" if closed else f"was not ready within {start_timeout:g} s"
            raise RuntimeError(f"the server ({' '.join(args)}) {why} (exit code {self.process.returncode})")

    def get_json(self, path: str) -> Any:
        """`GET path` (e.g. "/health") decoded from JSON."""
        conn = http.client.HTTPConnection(HOST, self.port, timeout=30)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server so far (less sensitive than wall time to other
        processes on a shared machine); None without psutil."""
        try:
            import psutil
        except ImportError:
            return None
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def rss_mb(self) -> float | None:
        """The server's resident memory in MiB; None without psutil."""
        try:
            import psutil
        except ImportError:
            return None
        return psutil.Process(self.process.pid).memory_info().rss / 2 ** 20

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
