"""Lyra training, stage 1. See lyra/train/recipe.py; usage:

    deepspeed scripts/train_stage1.py --config configs/train/stage1_base.yaml
    python scripts/train_stage1.py --config configs/train/stage1_tiny.yaml [--resume]
"""

import sys

from lyra.train.recipe import run

if __name__ == "__main__":
    sys.exit(run(stage=1))
