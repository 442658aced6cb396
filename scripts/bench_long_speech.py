"""Peak memory of long-speech encoding: does it grow only by the output tokens?

Each duration runs in a fresh process (peak RSS is per process). The waveform is
allocated before the baseline is read and the peak counter is reset, so `growth` is
what encoding itself adds: the output tokens plus one batch of encoder activations.

    python scripts/bench_long_speech.py --minutes 10 60 120 --out outputs/bench_long_speech.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lyra.utils.io import atomic_write_json
from lyra.memory import reset_peak_rss, status_mib


def measure(minutes: float, preset: str) -> dict:
    import numpy as np
    import torch

    from lyra.config import load_config
    from lyra.model.lyra import LyraForConditionalGeneration

    torch.set_num_threads(2)
    model = LyraForConditionalGeneration.from_config(load_config(preset)).eval()
    rng = np.random.default_rng(0)
    waveform = torch.from_numpy(rng.standard_normal(int(minutes * 60 * 16000), dtype=np.float32) * 0.1)
    reset_peak_rss()  # the peak of building the model and the input is not encoding's
    baseline = status_mib("VmRSS")
    start = time.perf_counter()
    with torch.inference_mode():
        tokens, = model.encode_speech([waveform], progress=True)
    seconds = time.perf_counter() - start
    peak = status_mib("VmHWM")
    output_mib = tokens.numel() * tokens.element_size() / 2**20
    return {
        "minutes": minutes,
        "clips": tokens.shape[0] // model.config.speech_tokens_per_clip,
        "tokens": tokens.shape[0],
        "waveform_mib": round(waveform.numel() * 4 / 2**20, 1),
        "baseline_rss_mib": round(baseline, 1),
        "peak_rss_mib": round(peak, 1),
        "growth_mib": round(peak - baseline, 1),
        "output_tokens_mib": round(output_mib, 1),
        "growth_minus_output_mib": round(peak - baseline - output_mib, 1),
        "encode_seconds": round(seconds, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, nargs="+", default=[10, 60, 120])
    parser.add_argument("--preset", default="nano", help="model preset (nano: the real Whisper tiny.en encoder)")
    parser.add_argument("--out", default="outputs/bench_long_speech.json")
    parser.add_argument("--one", type=float, help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args.one, args.preset)))
        return 0
    rows = []
    for minutes in args.minutes:
        child = subprocess.run(
            [sys.executable, __file__, "--one", str(minutes), "--preset", args.preset],
            check=True, stdout=subprocess.PIPE, text=True,
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    out = Path(args.out)
    atomic_write_json(out, {"preset": args.preset, "rows": rows})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
