"""Lyra training, stage 4. See lyra/train/recipe.py; usage:

    deepspeed scripts/train_stage4.py --config configs/train/stage4_base.yaml
    python scripts/train_stage4.py --config configs/train/stage4_tiny.yaml [--resume]
"""

import sys

from lyra.train.recipe import run

if __name__ == "__main__":
    sys.exit(run(stage=4))
