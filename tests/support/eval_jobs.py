"""Eval scripts run one after another in one process, so that one `torchrun` launch serves
several runs (a launch costs seconds of imports) in one gloo process group:

    torchrun --nproc_per_node 2 tests/support/eval_jobs.py JOBS.json

JOBS.json is a list of {"script": "eval_librispeech", "argv": [...], "kill_after": N or null}.
A job with `kill_after` ends the process with SIGKILL, as a crash or an out-of-memory kill
would (nothing more is flushed), once this rank's shard holds N answered items; its argv
must name --predictions. Jobs after it never run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch.distributed

from lyra.eval.runner import Layout, shard_folder

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def answered(shard: Path) -> int:
    """Records in a shard (its first line is the header)."""
    try:
        return max(0, shard.read_text(encoding="utf-8").count("\n") - 1)
    except FileNotFoundError:
        return 0


def kill_after(shard: Path, records: int) -> None:
    while answered(shard) < records:
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)


def script_main(name: str):
    spec = importlib.util.spec_from_file_location(f"lyra_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module.main


def main(jobs_file: str) -> int:
    layout = Layout.from_env()
    torch.distributed.init_process_group("gloo")  # the scripts use it and leave it
    for job in json.loads(Path(jobs_file).read_text()):
        argv = job["argv"]
        if job.get("kill_after") is not None:
            predictions = Path(argv[argv.index("--predictions") + 1])
            shard = shard_folder(predictions) / f"rank{layout.rank}-of-{layout.world_size}.jsonl"
            threading.Thread(target=kill_after, args=(shard, job["kill_after"]), daemon=True).start()
        status = script_main(job["script"])(argv)
        if status != 0 or job.get("kill_after") is not None:
            raise SystemExit(f"rank {layout.rank}: {job['script']} returned {status}"
                             + (" before it was killed" if job.get("kill_after") is not None else ""))
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
