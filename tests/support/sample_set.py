"""A small synthetic data set covering every record kind, for the tests, the tiny training
configs (configs/train/stage*_tiny.yaml) and scripts/bench_dataloader.py:

    python tests/support/sample_set.py outputs/sample_data [--samples 32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import av
import numpy as np
import soundfile as sf
from PIL import Image

from lyra.utils.io import atomic_write_text


def make_sample_set(root: str | Path, num_samples: int = 32, seed: int = 0, long_speech_seconds: float = 65.0) -> Path:
    """Write a small data set covering every record kind under `root`; returns its JSON path.

    Media are synthetic (shapes, tones, noise) and small: a few hundred kB in all. The kinds
    cycle: text multi-turn, image, video, speech (16 kHz WAV with transcript), speech (44.1 kHz
    stereo FLAC), sound (8 kHz WAV), image+speech multi-turn, long speech.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for sub in ("images", "videos", "audio"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    def tone(seconds: float, rate: int, freq: float, channels: int = 1) -> np.ndarray:
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.2 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.shape[0])
        return np.stack([wave] * channels, axis=1).astype(np.float32) if channels > 1 else wave.astype(np.float32)

    sizes = [(56, 56), (112, 84), (84, 140), (168, 112)]
    for k, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        pixels[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = (200, 30 * k, 40)
        Image.fromarray(pixels).save(root / "images" / f"img{k}.png")
    for k in range(2):
        path = root / "videos" / f"clip{k}.mp4"
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=4)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for f in range(8):
                frame = np.full((48, 64, 3), 20 * f, dtype=np.uint8)
                frame[:, (8 * f) % 64 : (8 * f) % 64 + 8] = (255, 255 - 40 * k, 0)
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    for k in range(3):
        sf.write(root / "audio" / f"speech{k}.wav", tone(2.0 + k, 16000, 220.0 * (k + 1)), 16000)
    sf.write(root / "audio" / "stereo.flac", tone(3.0, 44100, 330.0, channels=2), 44100)
    sf.write(root / "audio" / "sound.wav", tone(4.0, 8000, 880.0), 8000)
    sf.write(root / "audio" / "long.wav", tone(long_speech_seconds, 16000, 150.0), 16000)

    questions = ["What is shown here?", "Describe it briefly.", "What colour stands out?", "Is anything moving?"]
    answers = ["A red square on noise.", "A small synthetic picture.", "Red.", "A bar slides to the right."]
    records = []
    for i in range(num_samples):
        q, a = questions[i % 4], answers[i % 4]
        kind = i % 8
        rec: dict[str, Any] = {"id": f"sample-{i:04d}"}
        if kind == 0:
            rec["conversations"] = [
                {"from": "human", "value": q}, {"from": "gpt", "value": a},
                {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "Nothing else."},
            ]
        elif kind == 1:
            rec["image"] = f"images/img{i % 4}.png"
            rec["conversations"] = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        elif kind == 2:
            rec["video"] = f"videos/clip{i % 2}.mp4"
            rec["conversations"] = [{"from": "human", "value": f"<video>\n{q}"}, {"from": "gpt", "value": a}]
        elif kind == 3:
            rec["speech"] = f"audio/speech{i % 3}.wav"
            rec["speech_asr"] = q
            rec["conversations"] = [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": a}]
        elif kind == 4:
            rec["speech"] = "audio/stereo.flac"
            rec["conversations"] = [{"from": "human", "value": "<speech>\nTranscribe this."}, {"from": "gpt", "value": a}]
        elif kind == 5:
            rec["sound"] = "audio/sound.wav"
            rec["conversations"] = [{"from": "human", "value": "<sound>\nWhat do you hear?"}, {"from": "gpt", "value": "A beep."}]
        elif kind == 6:
            rec["image"] = f"images/img{i % 4}.png"
            rec["speech"] = f"audio/speech{i % 3}.wav"
            rec["speech_asr"] = q
            rec["conversations"] = [
                {"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a},
                {"from": "human", "value": "<speech>"}, {"from": "gpt", "value": answers[(i + 1) % 4]},
            ]
        else:
            rec["long_speech"] = "audio/long.wav"
            rec["conversations"] = [
                {"from": "human", "value": "<speech>\nSummarize this recording."}, {"from": "gpt", "value": "A steady hum."},
            ]
        records.append(rec)
    path = root / "samples.json"
    atomic_write_text(path, json.dumps(records, indent=1))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder to write samples.json and its media into")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make_sample_set(args.root, args.samples, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
