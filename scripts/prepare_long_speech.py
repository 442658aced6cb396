#!/usr/bin/env python
"""Long recordings + transcripts -> long-speech QA training data (stage 3).

    # offline, rule-based questions (tests, dry runs)
    python scripts/prepare_long_speech.py --audio-dir data/Lyra_SFT/long_speech/Lyra_LongSpeech \
        --out data/Lyra_SFT/long_speech/lyra_longspeech.json
    # the paper's way: an LLM writes five QA pairs per transcript (Fig. 8 prompt)
    python scripts/prepare_long_speech.py --audio-dir ... --out ... --generator llm \
        --endpoint http://localhost:8000/v1 --model Qwen2.5-72B-Instruct --api-key-env OPENAI_API_KEY

Recordings are audio files with a transcript of the same name beside them (.txt, .srt, .vtt,
TED-LIUM .stm, or Whisper .json), or the lines of a --manifest JSONL
({"audio": path, "transcript": path} or {"audio": path, "text": "..."}; relative paths are
relative to the manifest). See lyra/data/long_speech.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from lyra.data.long_speech import find_transcript, prepare_long_speech

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"}


def collect(args: argparse.Namespace) -> tuple[list, list[str]]:
    items, missing = [], []
    if args.audio_dir:
        for audio in sorted(Path(args.audio_dir).rglob("*")):
            if audio.suffix.lower() in AUDIO_SUFFIXES:
                transcript = find_transcript(audio)
                if transcript is None:
                    missing.append(str(audio))
                else:
                    items.append((audio, transcript))
    if args.manifest:
        base = Path(args.manifest).parent
        for line in Path(args.manifest).read_text().splitlines():
            if not line.strip():
                continue
            entry = json.loads(line)
            audio = base / entry["audio"]
            if "transcript" in entry:
                items.append((audio, base / entry["transcript"]))
            elif "text" in entry:
                items.append((audio, str(entry["text"])))
            else:
                missing.append(str(audio))
    return items, missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--audio-dir", help="folder of recordings with same-name transcripts")
    parser.add_argument("--manifest", help="JSONL of {audio, transcript | text}")
    parser.add_argument("--out", required=True, help="output JSON list")
    parser.add_argument("--root", default=None, help="audio paths are written relative to this (default: --out's folder)")
    parser.add_argument("--generator", choices=["rules", "llm"], default="rules")
    parser.add_argument("--endpoint", help="OpenAI-compatible base URL or .../chat/completions URL")
    parser.add_argument("--model", help="model name for the endpoint")
    parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key (optional)")
    parser.add_argument("--pairs", type=int, default=5, help="QA pairs per recording (paper: 5)")
    parser.add_argument("--min-seconds", type=float, default=30.0)
    parser.add_argument("--max-seconds", type=float, default=2500.0, help="stage 3 used recordings under 2500 s")
    parser.add_argument("--max-transcript-chars", type=int, default=None, help="cut longer transcripts for the LLM")
    parser.add_argument("--one-qa-per-sample", action="store_true", help="one sample per QA pair instead of multi-turn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4, help="concurrent LLM requests")
    parser.add_argument("--cache-dir", default=None, help="LLM answer cache (default: OUT_DIR/.qa_cache)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if not args.audio_dir and not args.manifest:
        parser.error("give --audio-dir and/or --manifest")
    items, missing = collect(args)
    for audio in missing:
        logging.warning("no transcript for %s", audio)
    stats = prepare_long_speech(
        items, args.out, root=args.root, generator=args.generator, endpoint=args.endpoint, model=args.model,
        api_key=os.environ.get(args.api_key_env) if args.api_key_env else None, num_pairs=args.pairs,
        min_seconds=args.min_seconds, max_seconds=args.max_seconds, max_transcript_chars=args.max_transcript_chars,
        one_per_sample=args.one_qa_per_sample, seed=args.seed, workers=args.workers, cache_dir=args.cache_dir,
        progress=not args.quiet,
    )
    print(f"{stats.samples} sample(s) from {stats.recordings} recording(s) ({stats.cached} from the LLM cache); "
          f"{len(stats.skipped) + len(missing)} skipped -> {args.out}")
    return 0 if stats.recordings else 1


if __name__ == "__main__":
    sys.exit(main())
