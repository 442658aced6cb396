"""A training run that kills itself with SIGKILL at the end of a given step, as a crash or an
out-of-memory kill would (nothing is flushed, no handler runs):

    python tests/support/killed_run.py CONFIG.yaml OVERRIDES_JSON STEP
"""

from __future__ import annotations

import json
import os
import signal
import sys

from transformers import TrainerCallback

from lyra.train.config import load_train_config
from lyra.train.recipe import build_trainer, train


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(config_path: str, overrides: str, step: str) -> None:
    config = load_train_config(config_path, json.loads(overrides))
    trainer = build_trainer(config)
    trainer.add_callback(KillAt(int(step)))
    train(trainer, config)
    raise SystemExit(f"the run finished without reaching step {step}")


if __name__ == "__main__":
    main(*sys.argv[1:])
