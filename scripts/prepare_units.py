"""Add stage-4 target units (`tgt_unit`, e.g. "<12><7><981>") to a Lyra data JSON.

Two kinds of units (lyra/model/vocoder.py):

* hubert: each sample's answer audio (the field named by --audio-field, a path relative to
  --root) goes through HuBERT (layer --layer, 16 kHz) and the k-means centroids (--kmeans, a
  .npy [K, D]); consecutive repeats are merged (unless --no-dedup).

    python scripts/prepare_units.py --data data.json --root data/ --hubert mhubert/ \\
        --kmeans km1000.npy --out data_units.json

* piper-phoneme: the text of each sample's answers (every assistant turn, in order: the speech
  generator reads all of them), as the phoneme ids of a Piper voice
  (--voice; the model config then says `unit_kind: piper-phoneme`, `num_units: 256` and names
  the same voice as its `vocoder`). No audio and no download: the voice installs from PyPI.

    python scripts/prepare_units.py --data data.json --voice piper:en_US-joe-medium --out data_units.json

--audio-field defaults to `answer_speech`, this project's field for the spoken answer.
The reference's TTS script (Lyra `data_preparation/speech_generation/generate_audio.py`)
writes the answer audio path into `speech` instead; pass `--audio-field speech` for
files made by it. A list of paths is encoded file by file and the units concatenated.

Resumable: when --out exists, samples that already carry `tgt_unit` there (matched by
`id` and audio path, else by position) are not encoded again; so are input samples
that have one (unless --overwrite). The output is rewritten atomically (temp file,
then rename) every --save-every encoded samples and at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lyra.utils.io import atomic_write_json
from lyra.data.audio import load_audio
from lyra.data.units import HubertUnitExtractor, dedup_units, format_units


def sample_key(sample: dict[str, Any], index: int, field: str) -> str:
    ident = sample.get("id")
    return json.dumps([ident if ident is not None else f"#{index}", sample.get(field)])


def existing_units(out: Path, field: str) -> dict[str, str]:
    if not out.is_file():
        return {}
    try:
        with open(out, encoding="utf-8") as f:
            previous = json.load(f)
    except json.JSONDecodeError as error:
        raise SystemExit(f"{out} exists but is not valid JSON ({error}); move it away to start over")
    return {sample_key(s, i, field): s["tgt_unit"] for i, s in enumerate(previous) if s.get("tgt_unit")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="input JSON list of samples")
    parser.add_argument("--root", type=Path, help="directory the audio paths are relative to (hubert units)")
    parser.add_argument("--hubert", type=Path, help="transformers HuBERT dir or fairseq .pt (hubert units)")
    parser.add_argument("--kmeans", type=Path, help="k-means centroids .npy [K, D] (hubert units)")
    parser.add_argument("--voice", default=None,
                        help="phoneme units of the answers' text instead: a Piper voice (piper:<voice> or .onnx)")
    parser.add_argument("--out", required=True, type=Path, help="output JSON (resumed when it exists)")
    parser.add_argument("--audio-field", default="answer_speech", help="sample key of the answer audio path")
    parser.add_argument("--layer", type=int, default=11, help="HuBERT layer, 1-based (mHuBERT: 11)")
    parser.add_argument("--no-dedup", action="store_true", help="keep consecutive repeated units")
    parser.add_argument("--save-every", type=int, default=200, help="rewrite --out after this many encodings")
    parser.add_argument("--overwrite", action="store_true", help="re-encode samples that already have tgt_unit")
    parser.add_argument("--skip-errors", action="store_true", help="report unreadable audio and go on")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    with open(args.data, encoding="utf-8") as f:
        samples = json.load(f)
    if not isinstance(samples, list):
        raise SystemExit(f"{args.data}: expected a JSON list of samples")
    if args.voice:
        return phoneme_units(samples, args)
    if not (args.root and args.hubert and args.kmeans):
        parser.error("hubert units need --root, --hubert and --kmeans (or pass --voice for phoneme units)")
    done = {} if args.overwrite else existing_units(args.out, args.audio_field)
    extractor = HubertUnitExtractor(args.hubert, args.kmeans, layer=args.layer, device=args.device)

    stats = {"encoded": 0, "reused": 0, "no_audio": 0, "errors": 0, "units": 0, "seconds": 0.0}
    output: list[dict[str, Any]] = []
    since_save = 0
    started = time.perf_counter()
    for index, sample in enumerate(tqdm(samples, desc="units", unit="sample")):
        sample = dict(sample)
        output.append(sample)
        paths = sample.get(args.audio_field)
        if not paths:
            stats["no_audio"] += 1
            continue
        key = sample_key(sample, index, args.audio_field)
        if not args.overwrite and (sample.get("tgt_unit") or key in done):
            sample["tgt_unit"] = sample.get("tgt_unit") or done[key]
            stats["reused"] += 1
            continue
        try:
            units: list[int] = []
            for path in [paths] if isinstance(paths, str) else list(paths):
                waveform = load_audio(args.root / path)
                units.extend(extractor.units(waveform, dedup=not args.no_dedup))
                stats["seconds"] += len(waveform) / 16000
        except (OSError, ValueError) as error:
            stats["errors"] += 1
            message = f"sample {index} (id {sample.get('id')!r}): {error}"
            if not args.skip_errors:
                atomic_write_json(args.out, output + [dict(s) for s in samples[index + 1:]])
                raise SystemExit(f"{message}\nprogress saved to {args.out}; rerun to resume, or pass --skip-errors")
            tqdm.write(f"skipped {message}")
            continue
        if not args.no_dedup:
            units = dedup_units(units)  # across the files of one sample too
        sample["tgt_unit"] = format_units(units)
        stats["encoded"] += 1
        stats["units"] += len(units)
        since_save += 1
        if since_save >= args.save_every:
            atomic_write_json(args.out, output + [dict(s) for s in samples[index + 1:]])
            since_save = 0
    atomic_write_json(args.out, output)
    elapsed = time.perf_counter() - started
    rate = stats["units"] / stats["seconds"] if stats["seconds"] else 0.0
    print(
        f"{args.out}: {stats['encoded']} encoded, {stats['reused']} already had units, "
        f"{stats['no_audio']} without '{args.audio_field}', {stats['errors']} unreadable; "
        f"{rate:.1f} units per second of audio; {elapsed:.1f} s"
    )
    return 0


def phoneme_units(samples: list[dict[str, Any]], args) -> int:
    """`tgt_unit` from the text of each sample's answers, as the voice's phoneme ids (the answers'
    units joined by a word boundary: the generator reads every answer token of a sample)."""
    from lyra.model.vocoder import load_vocoder

    voice = load_vocoder(args.voice)
    if voice.unit_kind != "piper-phoneme":
        raise SystemExit(f"--voice {args.voice} is a {voice.unit_kind} vocoder; phoneme units need a Piper voice")
    counts = {"encoded": 0, "kept": 0, "no_answer": 0}
    output = []
    for sample in tqdm(samples, desc="phoneme units", unit="sample"):
        sample = dict(sample)
        answers = [turn.get("value", "") for turn in sample.get("conversations") or [] if turn.get("from") == "gpt"]
        if sample.get("tgt_unit") and not args.overwrite:
            counts["kept"] += 1
        elif any(answer.strip() for answer in answers):
            units: list[int] = []
            for answer in answers:
                spoken = voice.text_to_units(answer)
                units += ([voice.word_boundary] if units and spoken else []) + spoken
            sample["tgt_unit"] = format_units(units)
            counts["encoded"] += 1
        else:
            counts["no_answer"] += 1
        output.append(sample)
    atomic_write_json(args.out, output)
    print(f"{args.out}: {counts['encoded']} answers as {voice.name} phonemes, {counts['kept']} kept their "
          f"tgt_unit, {counts['no_answer']} without an answer")
    return 0


if __name__ == "__main__":
    sys.exit(main())
