#!/usr/bin/env python
"""Image-speech benchmarks: TextVQA^S, DocVQA^S, ChartQA^S, MM-Vet^S (spoken questions).

    python scripts/eval_speech_vqa.py --task textvqa --model outputs/base/model \\
        --data-root data/Lyra_Eval/TextVQA_speech --out runs/textvqa_s.json
    python scripts/eval_speech_vqa.py --task docvqa --data-root data/Lyra_Eval/Docvqa_val --out runs/docvqa_s.json
    # MM-Vet^S: writes runs/mmvet_s.mmvet_submission.json ({question_id: answer}, what MM-Vet's
    # evaluator reads) and, with a judge, grades it with MM-Vet's prompt:
    python scripts/eval_speech_vqa.py --task mmvet --data-root data/Lyra_Eval/MM_vet_speech --out runs/mmvet_s.json \\
        --judge-endpoint https://api.openai.com/v1 --judge-model gpt-4-0613   # key from $OPENAI_API_KEY

    torchrun --nproc_per_node 4 scripts/eval_speech_vqa.py --task docvqa --batch-size 8 \
        --data-root data/Lyra_Eval/Docvqa_val --out runs/docvqa_s.json

Predictions are appended per item to shard files next to --out (one per process) and merged
into `<out stem>.predictions.jsonl`; judge grades to `<out stem>.judge.jsonl` (first process
only). Running again, with any number of processes, skips what is done. Layouts, prompts
and metrics: `lyra/eval/speech_vqa.py`; sharding and batching: `lyra/eval/runner.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lyra.utils.io import atomic_write_json
from lyra.eval.runner import (
    EvalTask, Layout, PredictionLog, Request, add_model_arguments, audio_seconds, default_predictions_path,
    evaluate, exit_code, first, load_assistant, lyra_answers, model_meta, run_items,
)
from lyra.eval.speech_vqa import TASKS, SpeechVQAItem, judge_one, load_items, mmvet_scores, score_predictions
from lyra.inference import Media

MAX_NEW_TOKENS = {"textvqa": 64, "docvqa": 64, "chartqa": 64, "mmvet": 512}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--data-root", required=True, help="the task folder, e.g. data/Lyra_Eval/Docvqa_val")
    parser.add_argument("--out", required=True, help="results JSON (written atomically)")
    parser.add_argument("--question-file", default=None)
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--speech-folder", default=None)
    parser.add_argument("--annotation-file", default=None, help="TextVQA_0.5.1_val.json / mm-vet.json")
    parser.add_argument("--instruction", default=None, help="text after <speech>, e.g. an answer-format hint")
    parser.add_argument("--predictions", default=None, help="predictions JSONL (default: next to --out)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    judge = parser.add_argument_group("MM-Vet judge (an OpenAI-compatible endpoint)")
    judge.add_argument("--judge-endpoint", default=None, help="base URL, e.g. https://api.openai.com/v1")
    judge.add_argument("--judge-model", default=None, help="e.g. gpt-4-0613 (MM-Vet's grader)")
    judge.add_argument("--judge-api-key-env", default="OPENAI_API_KEY", help="environment variable with the key")
    add_model_arguments(parser, max_new_tokens=None)
    return parser


def speech_task(args: argparse.Namespace, items: list[SpeechVQAItem]) -> EvalTask:
    """Each item: its image and spoken question in one user turn; batches sorted by speech length."""

    def prepare(item: SpeechVQAItem) -> list[Request]:
        return [Request([{"role": "user", "content": item.prompt}], Media(images=[item.image], speech=[item.speech]))]

    def finish(item: SpeechVQAItem, replies: list) -> dict:
        reply = replies[0]
        return {"response": reply.text, "image": item.image.name, "speech": item.speech.name,
                "prompt_tokens": reply.prompt_tokens, "new_tokens": len(reply.token_ids),
                "seconds": reply.timings["total_s"]}

    return EvalTask(f"{args.task}^S", items, lambda item: item.id, prepare, finish,
                    lambda item: ("image+speech", audio_seconds(item.speech)))


def score(args: argparse.Namespace, items: list[SpeechVQAItem], records: list[dict], meta: dict, info: dict,
          out: Path, predictions: Path) -> dict:
    """Score the merged predictions, export (and judge) MM-Vet; the results dict."""
    records = [{**record, "answers": item.answers} for item, record in zip(items, records)]
    results = {"benchmark": f"{args.task}_speech", "model": info["model"], "untrained": info["untrained"],
               "unit": "percent", **score_predictions(args.task, records), "settings": meta,
               "predictions": str(predictions)}
    if args.task == "mmvet":
        submission = out.with_name(out.stem + ".mmvet_submission.json")
        responses = {item.id: record.get("response") or "" for item, record in zip(items, records)}
        atomic_write_json(submission, responses)
        results["submission_file"] = str(submission)
        if args.judge_endpoint:
            api_key = os.environ.get(args.judge_api_key_env)
            grades_path = out.with_name(out.stem + ".judge.jsonl")
            judge_meta = {"benchmark": "mmvet_judge", "judge_model": args.judge_model, "predictions": str(predictions)}
            with PredictionLog(grades_path, judge_meta) as grades:
                judged = run_items(
                    items, grades,
                    lambda item: judge_one(item, responses[item.id], args.judge_endpoint, args.judge_model, api_key),
                    lambda item: item.id, desc="MM-Vet judge")
                graded = [grades.records[item.id] for item in items if grades.done(item.id)]
            results.update(mmvet_scores(graded, items))
            results["judge"] = {"model": args.judge_model, "endpoint": args.judge_endpoint, "grades": str(grades_path),
                                "failed": judged.failed}
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = MAX_NEW_TOKENS[args.task]
    with Layout.from_env() as layout:
        return exit_code(lambda: run(args, layout))


def run(args: argparse.Namespace, layout: Layout) -> int:
    if bool(args.judge_endpoint) != bool(args.judge_model):
        raise ValueError("--judge-endpoint and --judge-model go together")
    if args.judge_endpoint and args.task != "mmvet":
        raise ValueError("the LLM judge is for --task mmvet")
    items = first(load_items(args.task, args.data_root, args.question_file, args.image_folder,
                             args.speech_folder, args.annotation_file, args.instruction), args.limit)
    assistant, options, info = load_assistant(args, layout)
    out = Path(args.out)
    predictions = Path(args.predictions) if args.predictions else default_predictions_path(out)
    meta = {"benchmark": f"{args.task}_speech", "instruction": args.instruction, **model_meta(args, info)}
    outcome = evaluate(speech_task(args, items), lyra_answers(assistant, options), predictions, meta, layout,
                       args.batch_size)
    if not layout.main:
        return 0
    results = {**score(args, items, outcome.records, meta, info, out, predictions),
               **outcome.report(layout, args.batch_size)}
    atomic_write_json(out, results)
    score_value = results.get("score")
    print(f"{args.task}^S: {results['metric']} {score_value if score_value is not None else '(not judged)'} over "
          f"{results['n']} questions -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
