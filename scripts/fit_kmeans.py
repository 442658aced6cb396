"""Fit k-means centroids on HuBERT features for a new unit inventory.

Features of layer --layer are collected from the answer audio of a Lyra data JSON (or
from --audio files) until --max-frames frames, then `lyra.data.units.fit_kmeans`
(mini-batch k-means, k-means++ init) fits --clusters centroids, saved as a .npy
[K, D] for `scripts/prepare_units.py --kmeans`.

    python scripts/fit_kmeans.py --data data.json --root data/ --hubert mhubert/ \\
        --clusters 1000 --out km1000.npy
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lyra.utils.io import atomic_file
from lyra.data.audio import load_audio
from lyra.data.units import HubertUnitExtractor, fit_kmeans, kmeans_inertia


def audio_paths(args: argparse.Namespace) -> list[Path]:
    if args.audio:
        return list(args.audio)
    if args.data is None or args.root is None:
        raise SystemExit("give --audio files, or --data with --root")
    with open(args.data, encoding="utf-8") as f:
        samples = json.load(f)
    paths = []
    for sample in samples:
        value = sample.get(args.audio_field)
        for path in [value] if isinstance(value, str) else list(value or []):
            paths.append(args.root / path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--audio-field", default="answer_speech")
    parser.add_argument("--audio", type=Path, nargs="*")
    parser.add_argument("--hubert", required=True, type=Path, help="transformers HuBERT dir or fairseq .pt")
    parser.add_argument("--layer", type=int, default=11)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--max-frames", type=int, default=500_000, help="features used for fitting")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    paths = audio_paths(args)
    if not paths:
        raise SystemExit("no audio found")
    random.Random(args.seed).shuffle(paths)
    extractor = HubertUnitExtractor(args.hubert, None, layer=args.layer, device=args.device)
    hidden = extractor.model.config.hidden_size
    features, frames = [], 0
    for path in tqdm(paths, desc="features", unit="file"):
        feats = extractor.features(load_audio(path))
        features.append(feats)
        frames += feats.shape[0]
        if frames >= args.max_frames:
            break
    data = torch.cat(features)[: args.max_frames].numpy()
    centroids = fit_kmeans(data, args.clusters, iterations=args.iterations, batch_size=args.batch_size, seed=args.seed)
    with atomic_file(args.out) as temporary:
        np.save(temporary, centroids)
    print(f"{args.out}: {args.clusters} centroids of dim {hidden} from {data.shape[0]} frames; "
          f"inertia {kmeans_inertia(data, centroids):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
