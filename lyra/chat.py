"""Talk to Lyra from the terminal: images, video, speech and sound in; text (and speech) out.

    python -m lyra.chat --image photo.png --speech question.wav
    python -m lyra.chat --video clip.mp4 --text "What happens?" --lmme 4,0.7 --json
    python -m lyra.chat --audio-only-video lecture.mp4 --text "Summarise the talk."
    python -m lyra.chat --image photo.png --speech question.wav --speech-out reply.wav
    python -m lyra.chat                  # interactive: /image PATH, /speech PATH, /reset, /quit

With no --text and no --speech the session is interactive and keeps the conversation.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from lyra.config import LMMEConfig
from lyra.data.audio import load_video_audio
from lyra.inference import (
    Assistant,
    GenerationOptions,
    Media,
    attach_vocoder,
    check_writable,
    default_model,
    load_model,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lyra.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"checkpoint directory or preset (default: {default_model()})")
    parser.add_argument("--image", action="append", default=[], help="an image file (repeatable)")
    parser.add_argument("--video", action="append", default=[], help="a video file: its frames (repeatable)")
    parser.add_argument("--audio-only-video", action="append", default=[], metavar="VIDEO",
                        help="a video file: its audio track, as speech")
    parser.add_argument("--speech", action="append", default=[], help="a speech recording (the question, or context)")
    parser.add_argument("--sound", action="append", default=[], help="a sound clip (up to 30 s)")
    parser.add_argument("--text", default=None, help="the question in text (alone or with --speech)")
    parser.add_argument("--speech-out", default=None, metavar="WAV",
                        help="also speak the answer, streaming, into this wav (a model with a speech generator)")
    parser.add_argument("--vocoder", default=None, metavar="SPEC",
                        help="override the vocoder the model records: a code HiFi-GAN folder (g_00500000 + "
                             "config.json), a Piper .onnx voice or piper:<voice>")
    parser.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    parser.add_argument("--lmme", default=None, metavar="BLOCKS,KEEP", help="token pruning, e.g. 4,0.7 (or off)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return parser


@dataclass
class Turn:
    """Media queued for the next user turn, with a placeholder each."""

    media: Media = field(default_factory=Media)
    placeholders: list[str] = field(default_factory=list)

    def add(self, kind: str, item) -> None:
        getattr(self.media, {"image": "images", "video": "videos"}.get(kind, kind)).append(item)
        self.placeholders.append(f"<{kind}>")

    def content(self, text: str | None) -> str:
        return "\n".join(self.placeholders + ([text] if text else []))


def turn_from_args(args) -> Turn:
    turn = Turn()
    for path in args.image:
        turn.add("image", path)
    for path in args.video:
        turn.add("video", path)
    for path in args.audio_only_video:
        turn.add("speech", (load_video_audio(path), 16000))
    for path in args.sound:
        turn.add("sound", path)
    for path in args.speech:
        turn.add("speech", path)
    return turn


def merge(history: Media, new: Media) -> Media:
    return Media(history.images + new.images, history.videos + new.videos, history.speech + new.speech,
                 history.sound + new.sound)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        options = GenerationOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                    lmme=LMMEConfig.parse(args.lmme) if args.lmme else None)
        turn = turn_from_args(args)
        if args.speech_out:
            check_writable(args.speech_out)
        model, tokenizer, info = load_model(args.model, args.device, args.dtype)
        if args.speech_out:
            if model.speech_generator is None:
                raise ValueError(
                    f"--speech-out needs a model with a trained speech generator (stage 4); {info['model']} has none"
                )
            attach_vocoder(model, args.vocoder)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if info["untrained"] and not args.json:
        print(f"note: '{info['model']}' is a preset with untrained weights; its answers are noise. "
              f"Pass --model with a trained checkpoint.", file=sys.stderr)
    assistant = Assistant(model, tokenizer)
    if args.text is None and not args.speech and not args.audio_only_video:
        return interactive(assistant, options, turn, args)
    try:
        return answer_once(assistant, options, turn, args, info)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def answer_once(assistant: Assistant, options: GenerationOptions, turn: Turn, args, info) -> int:
    messages = [{"role": "user", "content": turn.content(args.text)}]
    on_text = (lambda delta: print(delta, end="", flush=True)) if args.stream and not args.json else None
    if args.speech_out:
        reply = assistant.speak(messages, turn.media, options, args.speech_out, on_text=on_text)
    else:
        reply = assistant.reply(messages, turn.media, options, on_text=on_text, progress=not args.json)
    if args.json:
        print(json.dumps({**reply.as_dict(), "model": info["model"], "untrained": info["untrained"],
                          "device": info["device"], "dtype": info["dtype"], "speech_out": args.speech_out}))
    elif args.stream:
        print()
    else:
        print(reply.text)
    return 0


def interactive(assistant: Assistant, options: GenerationOptions, turn: Turn, args) -> int:
    """A multi-turn session on stdin; the conversation and its media accumulate until /reset."""
    print("Lyra chat. Commands: /image PATH, /speech PATH, /video PATH, /sound PATH, /reset, /quit. "
          "An empty line sends queued media.", file=sys.stderr)
    messages: list[dict[str, str]] = []
    history = Media()
    for line in sys.stdin:
        line = line.rstrip("\n")
        command, _, argument = line.partition(" ")
        if command == "/quit":
            break
        if command == "/reset":
            messages, history, turn = [], Media(), Turn()
            print("(conversation cleared)", flush=True)
            continue
        if command in ("/image", "/speech", "/video", "/sound"):
            turn.add(command[1:], argument.strip())
            continue
        if not line.strip() and not turn.placeholders:
            continue
        candidate = messages + [{"role": "user", "content": turn.content(line.strip() or None)}]
        media = merge(history, turn.media)
        try:
            show = lambda delta: print(delta, end="", flush=True)  # noqa: E731
            if args.speech_out:  # each answer is spoken into the same file, replacing the last one
                reply = assistant.speak(candidate, media, options, args.speech_out, on_text=show)
            else:
                reply = assistant.reply(candidate, media, options, on_text=show, progress=True)
        except (ValueError, FileNotFoundError, OSError) as error:
            print(f"error: {error}", flush=True)
            turn = Turn()
            continue
        print(flush=True)
        messages = candidate + [{"role": "assistant", "content": reply.text}]
        history, turn = media, Turn()
    return 0


if __name__ == "__main__":
    sys.exit(main())
