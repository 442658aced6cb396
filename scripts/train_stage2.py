"""Lyra training, stage 2. See lyra/train/recipe.py; usage:

    deepspeed scripts/train_stage2.py --config configs/train/stage2_base.yaml
    python scripts/train_stage2.py --config configs/train/stage2_tiny.yaml [--resume]
"""

import sys

from lyra.train.recipe import run

if __name__ == "__main__":
    sys.exit(run(stage=2))
