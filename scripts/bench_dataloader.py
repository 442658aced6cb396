#!/usr/bin/env python
"""DataLoader throughput on the generated sample set: samples/s with N worker processes.

    python scripts/bench_dataloader.py                     # 2 workers, tiny tokenizer
    python scripts/bench_dataloader.py --workers 0 --tokenizer qwen2 --samples 256

Generates `lyra.data.dataset.make_sample_set` (text, image, video, speech at several rates
and channel counts, sound, mixed, long speech) in a temporary folder, then times full passes
of a `DataLoader(LyraDataset, collate_fn=LyraCollator)` after one warm-up epoch (persistent workers).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tokenizer", default="tiny", help="'tiny', 'qwen2' or a tokenizer folder")
    parser.add_argument("--config", default=None, help="model preset (default: tiny for the tiny tokenizer, else mini)")
    parser.add_argument("--model-max-length", type=int, default=4096)
    args = parser.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader

    from lyra.config import load_config
    from lyra.data.dataset import BadSampleTracker, LyraCollator, LyraDataset, make_sample_set
    from lyra.data.vision import VisionLimits
    from lyra.processing import LyraProcessor
    from lyra.tokenizer import load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(None if args.tokenizer == "qwen2" else args.tokenizer)
    config = load_config(args.config or ("tiny" if args.tokenizer == "tiny" else "mini"))
    limits = VisionLimits(image_max_pixels=256 * 28 * 28, video_max_pixels=64 * 28 * 28, video_min_pixels=16 * 28 * 28,
                          video_total_pixels=512 * 28 * 28)
    with tempfile.TemporaryDirectory(prefix="lyra-bench-") as tmp:
        data = make_sample_set(tmp, num_samples=args.samples)
        dataset = LyraDataset(data, LyraProcessor(tokenizer, config, limits), model_max_length=args.model_max_length)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            collate_fn=LyraCollator.from_processor(dataset.processor),
                            persistent_workers=args.workers > 0)
        tracker = BadSampleTracker()
        for _ in loader:  # warm-up epoch: workers start and import their decoders (librosa, PyAV)
            pass
        tokens, kinds = 0, Counter()
        start = time.perf_counter()
        seen = 0
        for _ in range(args.epochs):
            for batch in tracker.track(loader):
                seen += batch["num_samples"]
                tokens += int(batch["attention_mask"].sum())
        elapsed = time.perf_counter() - start
        kinds.update(dataset.modalities)
    print(f"{seen} samples in {elapsed:.2f} s with {args.workers} worker(s), batch {args.batch_size}: "
          f"{seen / elapsed:.1f} samples/s, {tokens / elapsed:.0f} tokens/s; {tracker.summary()}")
    print("mix: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
