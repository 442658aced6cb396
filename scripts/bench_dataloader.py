#!/usr/bin/env python
"""DataLoader throughput: samples/s and tokens/s of `DataLoader(LyraDataset, collate_fn=LyraCollator)`.

    python tests/support/sample_set.py /tmp/sample --samples 128   # every record kind, synthetic media
    python scripts/bench_dataloader.py --data /tmp/sample/samples.json          # 2 workers, tiny tokenizer
    python scripts/bench_dataloader.py --data my_data.json --workers 0 --tokenizer qwen2

Times full passes after one warm-up epoch (persistent workers) and writes JSON (`--json`).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter

import torch
from torch.utils.data import DataLoader

from lyra.config import load_config
from lyra.data.collate import BadSampleTracker, LyraCollator
from lyra.data.dataset import LyraDataset
from lyra.data.vision import VisionLimits
from lyra.processing import LyraProcessor
from lyra.tokenizer import load_tokenizer
from lyra.utils.io import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a data JSON/JSONL (e.g. from tests/support/sample_set.py)")
    parser.add_argument("--root", default=None, help="folder media paths are relative to (default: the data file's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tokenizer", default="tiny", help="'tiny', 'qwen2' or a tokenizer folder")
    parser.add_argument("--config", default=None, help="model preset (default: tiny for the tiny tokenizer, else mini)")
    parser.add_argument("--model-max-length", type=int, default=4096)
    parser.add_argument("--json", default="outputs/bench_dataloader.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(None if args.tokenizer == "qwen2" else args.tokenizer)
    config = load_config(args.config or ("tiny" if args.tokenizer == "tiny" else "mini"))
    limits = VisionLimits(image_max_pixels=256 * 28 * 28, video_max_pixels=64 * 28 * 28, video_min_pixels=16 * 28 * 28,
                          video_total_pixels=512 * 28 * 28)
    dataset = LyraDataset(args.data, LyraProcessor(tokenizer, config, limits), root=args.root,
                          model_max_length=args.model_max_length)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                        collate_fn=LyraCollator.from_processor(dataset.processor), persistent_workers=args.workers > 0)
    tracker = BadSampleTracker()
    for _ in loader:  # warm-up epoch: workers start and import their decoders (librosa, PyAV)
        pass
    tokens = seen = 0
    start = time.perf_counter()
    for _ in range(args.epochs):
        for batch in tracker.track(loader):
            seen += batch["num_samples"]
            tokens += int(batch.get("attention_mask", torch.zeros(0)).sum())
    elapsed = time.perf_counter() - start
    mix = dict(sorted(Counter(dataset.modalities).items()))
    result = {"data": args.data, "workers": args.workers, "batch_size": args.batch_size, "samples": seen,
              "seconds": round(elapsed, 3), "samples_per_s": round(seen / elapsed, 1),
              "tokens_per_s": round(tokens / elapsed), "bad_samples": tracker.state_dict(), "mix": mix}
    print("| workers | batch | samples | seconds | samples/s | tokens/s |\n|---|---|---|---|---|---|")
    print(f"| {args.workers} | {args.batch_size} | {seen} | {elapsed:.2f} | {result['samples_per_s']} | "
          f"{result['tokens_per_s']} |")
    print(f"{tracker.summary()}; mix: " + ", ".join(f"{k} {n}" for k, n in mix.items()))
    atomic_write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
