"""Spoken answers of a trained Lyra-Nano on its held-out questions: units, what is heard, latency.

Every held-out question asked in speech (training voices; `outputs/nano/data/eval.json`, the
earlier turns of a conversation given as gold history) is answered by `Assistant.speak`, the
path of `python -m lyra.chat --speech-out`: text and units stream, and the Piper voice speaks
each word as it completes. Measured (lyra/eval/speech_output.py):

  * unit accuracy: the phoneme error rate of the generator's units against the phonemised
    expected answer, with the LLM fed that answer (teacher-forced), and against the phonemised
    text it actually said;
  * what is heard: Whisper tiny.en's closed-set choice among the task's answers (plus the
    model's own text), for the streamed and for a one-shot synthesis of the same units; its
    free transcription too;
  * latency: first text token -> first audio, and end of the user's audio -> first audio
    (median and p90; one question at a time, after one warm-up); the real-time factor.

    python scripts/bench_speech_output.py [--model outputs/nano/model] [--limit N]

Prints a table and writes JSON (default outputs/bench_speech_output.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from lyra.utils.io import atomic_write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="outputs/nano/model", help="a trained nano model with a speech generator")
    parser.add_argument("--data", default="outputs/nano/data", help="the nano task folder (eval.json)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--out", default="outputs/bench_speech_output.json")
    args = parser.parse_args(argv)

    from lyra.nano.task import all_answers
    from lyra.eval.heard import WhisperJudge
    from lyra.nano.evaluate import prompt_for_turn, variant_of
    from lyra.eval.speech_output import speak_and_judge, summarize
    from lyra.inference import Assistant, Media, attach_vocoder, load_model

    model, tokenizer, info = load_model(args.model, device="cpu", dtype="fp32")
    attach_vocoder(model)
    assistant, judge = Assistant(model, tokenizer), WhisperJudge()
    root = Path(args.data)
    jobs = []
    for record in json.loads((root / "eval.json").read_text()):
        if variant_of(record["id"]) == "speech":
            jobs += [(record, k) for k, spoken in enumerate(record["meta"]["spoken"]) if spoken]
    jobs = jobs[: args.limit] if args.limit else jobs
    candidates = all_answers()

    def ask(record, turn):
        messages, media = prompt_for_turn(record, turn)
        files = Media(images=[root / p for p in media["images"]], speech=[root / p for p in media["speech"]],
                      sound=[root / p for p in media["sound"]])
        return speak_and_judge(assistant, judge, messages, files, candidates,
                               expected=record["meta"]["answers"][turn])

    from tqdm.auto import tqdm

    ask(*jobs[0])  # warm-up: first calls initialise the phonemiser and allocate caches
    started = time.perf_counter()
    answers, expected, types = [], [], []
    for record, turn in tqdm(jobs, desc="spoken answers", unit="question"):
        answers.append(ask(record, turn))
        expected.append(record["meta"]["answers"][turn])
        types.append(record["meta"]["types"][turn])
    summary = summarize(answers, expected)
    by_type = defaultdict(list)
    for answer, want, qtype in zip(answers, expected, types):
        by_type[qtype].append((answer, want))
    per_type = {qtype: {"n": len(rows), "text_right": sum(a.text == w for a, w in rows) / len(rows),
                        "heard_right": sum(a.heard_streamed == w for a, w in rows) / len(rows),
                        "heard_own_text": sum(a.heard_streamed == a.text for a, _ in rows) / len(rows)}
                for qtype, rows in by_type.items()}
    extra = [a.audio_seconds - a.one_shot_seconds for a in answers]
    summary["streamed_minus_one_shot_seconds"] = {"mean": sum(extra) / len(extra), "max": max(extra)}
    summary["mean_pieces"] = sum(a.pieces for a in answers) / len(answers)
    summary["free_transcript_equals_own_text"] = sum(
        _plain(a.transcript) == _plain(a.text) for a in answers) / len(answers)
    report = {"model": args.model, "build": _build(args.model), "questions": len(answers),
              "seconds": round(time.perf_counter() - started, 1), "machine": _machine(),
              "summary": summary, "per_type": per_type,
              "answers": [{"type": t, "expected": w, **a.as_dict()} for a, w, t in zip(answers, expected, types)]}
    print(table(summary, per_type))
    out = Path(args.out)
    atomic_write_json(out, report)
    print(f"wrote {out} ({report['seconds']:.0f} s)")
    return 0


def _plain(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum() or ch == " ").strip()


def _build(model: str) -> str | None:
    record = Path(model) / "nano_build.json"
    return json.loads(record.read_text()).get("hash") if record.is_file() else None


def _machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def table(summary: dict, per_type: dict) -> str:
    pct = lambda x: f"{100 * x:.1f} %"  # noqa: E731
    lines = [
        "| figure | value |", "|---|---|",
        f"| phoneme error rate, teacher-forced vs expected answer | {pct(summary['unit_error_rate_teacher_forced'])} |",
        f"| phoneme error rate vs the model's own text | {pct(summary['unit_error_rate_vs_own_text'])} |",
        f"| heard (closed set) = own text answer | {pct(summary['heard_equals_own_text'])} |",
        f"| heard (closed set) = expected answer | {pct(summary['heard_equals_expected'])} |",
        f"| text answer = expected answer | {pct(summary['text_equals_expected'])} |",
        f"| free transcription = own text | {pct(summary['free_transcript_equals_own_text'])} |",
        f"| heard from stream = heard from one-shot | {pct(summary['streamed_heard_equals_one_shot'])} |",
        f"| first text token -> first audio, median / p90 | {summary['first_audio_after_token_ms']['median']:.0f} / "
        f"{summary['first_audio_after_token_ms']['p90']:.0f} ms |",
        f"| end of user audio -> first audio, median / p90 | {summary['first_audio_ms']['median']:.0f} / "
        f"{summary['first_audio_ms']['p90']:.0f} ms |",
        f"| real-time factor (generator + vocoder), median / p90 | {summary['rtf']['median']:.3f} / "
        f"{summary['rtf']['p90']:.3f} |",
        f"| real-time factor end to end, median / p90 | {summary['rtf_end_to_end']['median']:.3f} / "
        f"{summary['rtf_end_to_end']['p90']:.3f} |",
        "", "| question type | n | text answer right | heard right | heard = own text |", "|---|---|---|---|---|",
    ]
    for qtype, row in per_type.items():
        lines.append(f"| {qtype} | {row['n']} | {pct(row['text_right'])} | {pct(row['heard_right'])} | "
                     f"{pct(row['heard_own_text'])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
