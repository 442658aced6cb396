"""Lyra training, stage 3. See lyra/train/recipe.py; usage:

    deepspeed scripts/train_stage3.py --config configs/train/stage3_base.yaml
    python scripts/train_stage3.py --config configs/train/stage3_tiny.yaml [--resume]
"""

import sys

from lyra.train.recipe import run

if __name__ == "__main__":
    sys.exit(run(stage=3))
