"""Fold one MLoRA adapter (and its projector) into dense weights.

    python scripts/merge_lora.py --model outputs/base/stage2/final --adapter speech --out checkpoints/lyra-base-speech

The result is a plain checkpoint without adapters: it answers every request as the
adapter would (text and image requests included, so it no longer keeps pure Qwen2-VL
behaviour for them — keep the adapter checkpoint for that).
"""

from __future__ import annotations

import argparse
import sys

from lyra.model import mlora
from lyra.model.lyra import LyraForConditionalGeneration, checkpoint_tokenizer_source
from lyra.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a Lyra checkpoint directory with adapters/")
    parser.add_argument("--adapter", required=True, help="the adapter to fold in, e.g. speech")
    parser.add_argument("--out", required=True, help="where to write the merged checkpoint")
    args = parser.parse_args(argv)
    try:
        model = LyraForConditionalGeneration.from_pretrained(args.model)
        mlora.merge_adapter(model, args.adapter)
        tokenizer = load_tokenizer(checkpoint_tokenizer_source(args.model, model.config))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out, tokenizer=tokenizer)
    print(f"merged adapter '{args.adapter}' into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
