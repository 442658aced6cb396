#!/usr/bin/env python
"""Image-speech benchmarks: TextVQA^S, DocVQA^S, ChartQA^S, MM-Vet^S (spoken questions).

    python scripts/eval_speech_vqa.py --task textvqa --model outputs/base/model \\
        --data-root data/Lyra_Eval/TextVQA_speech --out runs/textvqa_s.json
    python scripts/eval_speech_vqa.py --task docvqa --data-root data/Lyra_Eval/Docvqa_val --out runs/docvqa_s.json
    # MM-Vet^S: writes runs/mmvet_s.mmvet_submission.json ({question_id: answer}, what MM-Vet's
    # evaluator reads) and, with a judge, grades it with MM-Vet's prompt:
    python scripts/eval_speech_vqa.py --task mmvet --data-root data/Lyra_Eval/MM_vet_speech --out runs/mmvet_s.json \\
        --judge-endpoint https://api.openai.com/v1 --judge-model gpt-4-0613   # key from $OPENAI_API_KEY

Predictions (and judge grades) are appended per item to JSONL files next to --out; running
again skips what is done. Layouts, prompts and metrics: `lyra/eval/speech_vqa.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lyra.utils.io import atomic_write_json
from lyra.eval.runner import (
    PredictionLog, add_model_arguments, default_predictions_path, first, load_assistant,
    model_meta, run_items,
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


def evaluate(args: argparse.Namespace, items: list[SpeechVQAItem], answer, info: dict, out: Path) -> dict:
    """Answer what is not answered yet, score, export (and judge) MM-Vet; the results dict."""
    predictions = Path(args.predictions) if args.predictions else default_predictions_path(out)
    meta = {"benchmark": f"{args.task}_speech", "instruction": args.instruction, **model_meta(args, info)}
    with PredictionLog(predictions, meta) as log:
        summary = run_items(items, log, answer, lambda item: item.id, desc=f"{args.task}^S")
        records = [{**log.records[item.id], "answers": item.answers} for item in items]
    results = {"benchmark": f"{args.task}_speech", "model": info["model"], "untrained": info["untrained"],
               "unit": "percent", **score_predictions(args.task, records), "settings": meta,
               "predictions": str(predictions),
               "run": {"computed": summary.computed, "skipped": summary.skipped, "failed": summary.failed}}

    if args.task == "mmvet":
        submission = out.with_name(out.stem + ".mmvet_submission.json")
        atomic_write_json(submission, {item.id: record.get("response") or "" for item, record in zip(items, records)})
        results["submission_file"] = str(submission)
        if args.judge_endpoint:
            api_key = os.environ.get(args.judge_api_key_env)
            responses = {item.id: record.get("response") or "" for item, record in zip(items, records)}
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
    try:
        if bool(args.judge_endpoint) != bool(args.judge_model):
            raise ValueError("--judge-endpoint and --judge-model go together")
        if args.judge_endpoint and args.task != "mmvet":
            raise ValueError("the LLM judge is for --task mmvet")
        items = first(load_items(args.task, args.data_root, args.question_file, args.image_folder,
                                 args.speech_folder, args.annotation_file, args.instruction), args.limit)
        assistant, options, info = load_assistant(args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def answer(item: SpeechVQAItem) -> dict:
        reply = assistant.reply([{"role": "user", "content": item.prompt}],
                                Media(images=[item.image], speech=[item.speech]), options)
        return {"response": reply.text, "image": item.image.name, "speech": item.speech.name,
                "prompt_tokens": reply.prompt_tokens, "new_tokens": len(reply.token_ids),
                "seconds": reply.timings["total_s"]}

    out = Path(args.out)
    try:
        results = evaluate(args, items, answer, info, out)
    except ValueError as error:  # e.g. a predictions file of another run
        print(f"error: {error}", file=sys.stderr)
        return 2
    atomic_write_json(out, results)
    score = results.get("score")
    print(f"{args.task}^S: {results['metric']} {score if score is not None else '(not judged)'} over "
          f"{results['n']} questions -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
