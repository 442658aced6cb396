"""`make demo`: train Lyra-Nano on the nano task, measure it, then talk with it.

1. generate the nano task (lyra/nano/task.py; cached in outputs/nano/data);
2. train the nano model: ViT and sound-projector pretraining, the base phase from scratch,
   stage 1 (speech projector + LCMR), stage 2 (MLoRA), stage 4 (the speech generator, on the
   Piper voice's phonemes) -- lyra/nano/pipeline.py, cached: a second run whose task and configs
   hash the same reuses outputs/nano/model and trains nothing;
3. measure held-out accuracy per question type, for text and for spoken questions, and stop
   with an error when it falls below `ACCURACY_FLOOR`;
4. ask three spoken questions of different types about held-out images (chosen with a fixed
   seed), the first through `python -m lyra.chat --speech-out` as a user would; each is answered
   in streaming speech (outputs/nano/answer.wav, answer_2.wav, answer_3.wav), and Whisper tiny.en
   says what it hears in each wav, free and as a choice among the task's answers;
5. write outputs/nano/demo_transcript.md (and .json) with everything it did.

    python -m lyra.nano.demo [--out outputs/nano] [--retrain] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import soundfile as sf

from lyra.data.audio import load_audio
from lyra.eval.heard import WhisperJudge
from lyra.inference import Assistant, GenerationOptions, Media, attach_vocoder, load_model
from lyra.memory import keep_freed_memory
from lyra.nano.evaluate import evaluate_nano
from lyra.nano.pipeline import DEFAULT_OUT, shared_frame_cache, train_nano
from lyra.nano.task import NanoTaskSpec, all_answers, build_nano_task
from lyra.utils.io import atomic_write_json, atomic_write_text

# Held-out exact-match accuracy below which the demo fails (README, Lyra-Nano): under the lowest
# build measured over seeds and machines (74.9 %), so that only a broken pipeline trips it.
ACCURACY_FLOOR = {"text": 0.65, "speech": 0.65}
SPOKEN_QUESTIONS = 3
HEADLINE = ("Held-out = images and sound clips whose content never occurs in training (colour x shape and "
            "word x ink pairs, sound pitches and lengths held out); spoken questions are read by the training "
            "voices (python -m lyra.nano.reproduce also scores a voice never trained on).")


def step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def pick_spoken_questions(task, seed: int, count: int = SPOKEN_QUESTIONS) -> list[dict]:
    """`count` held-out image questions of different types, asked in speech (a training voice) as
    the first turn, chosen at random with `seed`."""
    by_type: dict[str, list[dict]] = {}
    for record in task.records("eval"):
        meta = record["meta"]
        if record["id"].endswith("-speech") and "image" in record and meta["spoken"][0]:
            by_type.setdefault(meta["types"][0], []).append(record)
    rng = random.Random(seed)
    types = sorted(by_type)
    if len(types) < count:
        raise RuntimeError(f"the held-out set has spoken questions of {len(types)} types; the demo asks {count}")
    return [rng.choice(by_type[qtype]) for qtype in rng.sample(types, count)]


def ask_with_chat_cli(model_dir: Path, image: Path, speech: Path, wav: Path) -> tuple[dict, str]:
    """Run `python -m lyra.chat --speech-out` in a subprocess, as a user would; its JSON and command."""
    command = [sys.executable, "-m", "lyra.chat", "--model", str(model_dir), "--image", str(image),
               "--speech", str(speech), "--speech-out", str(wav), "--json", "--max-new-tokens", "8"]
    shown = " ".join(["python", *command[1:]])
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{shown} failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1]), shown


def talk(model_dir: Path, model, tokenizer, task, out: Path, seed: int) -> list[dict]:
    """Ask the spoken questions (the first through the chat CLI, the rest in this process with
    `model` loaded from `model_dir`, on the same code path), keep each answer's wav and judge what
    is heard in it."""
    judge = WhisperJudge()
    attach_vocoder(model)
    assistant = Assistant(model, tokenizer)
    turns = []
    for k, record in enumerate(pick_spoken_questions(task, seed)):
        image, speech = task.root / record["image"], task.root / record["speech"][0]
        wav = out / ("answer.wav" if k == 0 else f"answer_{k + 1}.wav")
        if k == 0:
            reply, command = ask_with_chat_cli(model_dir, image, speech, wav)
        else:
            answer = assistant.speak([{"role": "user", "content": "<image>\n<speech>"}],
                                     Media(images=[image], speech=[speech]), GenerationOptions(max_new_tokens=8), wav)
            reply, command = answer.as_dict(), None
        audio, rate = sf.read(str(wav), dtype="float32")
        meta = record["meta"]
        candidates = list(dict.fromkeys([*all_answers(), reply["answer"]]))
        heard = judge.choose(audio, rate, candidates)[0] if audio.size else ""
        turns.append({
            "command": command, "image": str(image), "speech": str(speech), "wav": str(wav),
            "type": meta["types"][0], "question": meta["questions"][0], "voice": meta["voices"][0],
            "question_heard": judge.transcribe(load_audio(speech), 16000),
            "objects": task.media()[record["image"]], "expected": meta["answers"][0], "answer": reply["answer"],
            "heard": heard, "transcript": judge.transcribe(audio, rate) if audio.size else "",
            "audio_seconds": len(audio) / rate, "timings": reply["timings"],
        })
    return turns


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--retrain", action="store_true", help="train even if outputs/nano/model matches")
    args = parser.parse_args(argv)
    keep_freed_memory()  # ~1.5x faster CPU training steps (lyra/memory.py)
    started = time.perf_counter()
    out = Path(args.out)

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
         "stage 1 (speech projector + LCMR) -> stage 2 (MLoRA) -> stage 4 (speech generator)")
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

    model, tokenizer, _ = load_model(str(model_dir), device="cpu", dtype="fp32")
    model.frame_cache = cache
    accuracy = evaluate_nano(model, tokenizer, task.files["eval"], variants=("text", "speech"), batch_size=32)
    print(accuracy.table())
    print(f"    ({accuracy.seconds:.0f} s) {HEADLINE}")
    below = {variant: accuracy.value(variant) for variant, floor in ACCURACY_FLOOR.items()
             if accuracy.value(variant) is None or accuracy.value(variant) < floor}

    step(f"4/5 {SPOKEN_QUESTIONS} spoken questions about held-out images, answered in speech "
         f"(the first through `python -m lyra.chat --speech-out`)")
    tick = time.perf_counter()
    turns = talk(model_dir, model, tokenizer, task, out, args.seed)
    for turn in turns:
        if turn["command"]:
            print(f"    $ {turn['command']}")
        print(f"    [{turn['type']}] {turn['question']!r} ({turn['voice']}; Whisper hears "
              f"{turn['question_heard']!r}) about {turn['objects']}")
        print(f"      answer {turn['answer']!r} -> {turn['wav']} ({turn['audio_seconds']:.2f} s; first audio "
              f"{1000 * turn['timings']['first_audio_after_token_s']:.0f} ms after the first token); Whisper hears "
              f"{turn['heard']!r} (free: {turn['transcript']!r}); expected {turn['expected']!r}: "
              f"{'RIGHT' if turn['heard'] == turn['expected'] else 'WRONG'} as heard")
    print(f"    ({time.perf_counter() - tick:.0f} s)")

    step("5/5 transcript")
    total = time.perf_counter() - started
    report = {
        "model": str(model_dir), "build": build["hash"], "reused": reused, "seconds": round(total, 1),
        "phases": build["phases"], "accuracy": accuracy.as_dict(), "accuracy_table": accuracy.table(),
        "accuracy_floor": ACCURACY_FLOOR, "spoken_answers": turns,
    }
    transcript = out / "demo_transcript.md"
    write_transcript(transcript, report)
    atomic_write_json(out / "demo_transcript.json", report, default=str)
    print(f"    wrote {transcript} and {transcript.with_suffix('.json')}; whole run {total:.0f} s")
    if below:
        print("error: held-out accuracy is below the floor the README states ("
              + ", ".join(f"{v}: {100 * (x or 0):.1f} % < {100 * ACCURACY_FLOOR[v]:.0f} %" for v, x in below.items())
              + ")", file=sys.stderr)
        return 1
    return 0


def write_transcript(path: Path, report: dict) -> None:
    phases = "\n".join(
        f"| {p['phase']} | {p['steps']} | {p['samples']} | {p['seconds']:.0f} | {p['cpu_seconds']:.0f} | "
        f"{p['train_loss']:.3f} |" for p in report["phases"])
    answers = "\n".join(
        f"| {t['type']} | {t['question']} ({t['voice']}) | {t['expected']} | {t['answer']} | `{Path(t['wav']).name}` | "
        f"{t['heard']} | {t['transcript']} | {'right' if t['heard'] == t['expected'] else 'wrong'} |"
        for t in report["spoken_answers"])
    first = report["spoken_answers"][0]
    floor = ", ".join(f"{v} {100 * x:.0f} %" for v, x in report["accuracy_floor"].items())
    text = f"""# Lyra-Nano demo transcript

Model `{report['model']}` (build {report['build']}, {'reused from an earlier run' if report['reused'] else 'trained in this run'}).
Whole run: {report['seconds']:.0f} s.

## Training phases (lyra/nano/pipeline.py, lyra/nano/configs/*.yaml)

| phase | steps | samples | wall s | CPU s | final train loss |
|---|---|---|---|---|---|
{phases}

## Held-out accuracy

What was measured: exact match of the greedy answer (teacher-forced, so earlier turns of a
conversation are the gold history) on held-out content. {HEADLINE} The demo fails below
{floor}.

{report['accuracy_table']}

## Spoken questions about held-out images, answered in speech

Heard = Whisper tiny.en's choice among the task's answers (and the model's own text) as the
transcript of the answer's wav; free = its own transcription. Right or wrong is judged on what
is heard.

| type | question (voice) | expected | text answer | wav | heard | free transcription | as heard |
|---|---|---|---|---|---|---|---|
{answers}

The first, through the chat CLI:

```
$ {first['command']}
{json.dumps(first['timings'])}
```
"""
    atomic_write_text(path, text)


if __name__ == "__main__":
    sys.exit(main())
