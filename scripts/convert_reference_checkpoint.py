"""Convert a released Lyra checkpoint (Lyra_Mini_3B / Lyra_Base_9B) to our layout.

    python scripts/convert_reference_checkpoint.py --src Lyra_Base_9B --dst checkpoints/lyra-base

See `lyra/model/convert.py` for the key mapping and what is written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from lyra.model.convert import convert_reference_checkpoint

DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="the downloaded reference checkpoint directory")
    parser.add_argument("--dst", type=Path, required=True, help="output directory (must not exist)")
    parser.add_argument("--whisper", type=Path, default=None,
                        help="Whisper weights (openai-whisper .pt or HF whisper dir) to use for the speech "
                             "encoder, e.g. when the checkpoint was saved without its speech tower")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="cast floating tensors")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    convert_reference_checkpoint(
        args.src, args.dst, whisper=args.whisper, dtype=DTYPES[args.dtype], overwrite=args.overwrite
    )


if __name__ == "__main__":
    main()
