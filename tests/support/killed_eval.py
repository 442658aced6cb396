"""An evaluation process that kills itself with SIGKILL once its own shard holds a given number
of answered items, as a crash or an out-of-memory kill would (nothing more is flushed):

    torchrun --nproc_per_node 2 tests/support/killed_eval.py SCRIPT RECORDS --predictions P.jsonl ARGS...

SCRIPT is the name of an eval script in scripts/ (e.g. eval_librispeech); the rest of the
command line is its own and must name --predictions.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import threading
import time
from pathlib import Path

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


def main(script: str, records: str, *argv: str) -> int:
    predictions = Path(argv[list(argv).index("--predictions") + 1])
    layout = Layout.from_env()
    shard = shard_folder(predictions) / f"rank{layout.rank}-of-{layout.world_size}.jsonl"
    threading.Thread(target=kill_after, args=(shard, int(records)), daemon=True).start()
    spec = importlib.util.spec_from_file_location(f"lyra_script_{script}", SCRIPTS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    module.main(list(argv))
    raise SystemExit(f"rank {layout.rank} finished before answering {records} items")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
