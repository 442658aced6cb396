"""A local web demo of Lyra (gradio): speak or type, attach an image or a video, read the
answer as it streams and, with a model that can speak, hear it.

    python -m lyra.serve.web                              # http://127.0.0.1:7860
    python -m lyra.serve.web --model outputs/nano/model --port 7861

The page only listens on 127.0.0.1 unless --host says otherwise. Answers come from
`lyra.inference.Assistant`, the same code path as `python -m lyra.chat`; the
conversation (text and the media of earlier turns) is kept per browser session.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lyra.inference import (
    Assistant,
    GenerationOptions,
    Media,
    default_model,
    attach_vocoder,
    load_model,
)

# No usage reports or update checks from gradio: the demo runs offline.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

SPEECH, SOUND = "Speech (a question or context)", "Sound clip (non-speech audio)"
_SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "sans-serif")
_MONO_FONTS = ("ui-monospace", "monospace")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lyra.serve.web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"checkpoint directory or preset (default: {default_model()})")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--vocoder", default=None, metavar="SPEC",
                        help="override the vocoder the model records (a code HiFi-GAN folder, a Piper .onnx voice "
                             "or piper:<voice>); a model with a speech generator speaks its answers")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto | fp32 | bf16 | fp16")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default answer length cap (the page can change it)")
    return parser


@dataclass
class Session:
    """One browser session's conversation: the messages so far (with their placeholders)
    and, in the same order, the media those placeholders refer to."""

    messages: list[dict[str, str]] = field(default_factory=list)
    media: Media = field(default_factory=Media)


class WebDemo:
    """The model, its assistant and (when it can speak) the vocoder, behind the page's handlers."""

    def __init__(self, model, tokenizer, info: dict[str, Any]):
        self.model, self.info = model, info
        self.assistant = Assistant(model, tokenizer)
        self.lock = threading.Lock()  # one generation at a time: the model is shared by every session
        self.audio_dir = Path(tempfile.mkdtemp(prefix="lyra-web-"))

    @property
    def can_speak(self) -> bool:
        return bool(getattr(self.model, "can_speak", False))

    # ------------------------------------------------------------------ one turn
    def turn(self, text: str, audio: str | None, audio_kind: str, image: str | None, video: str | None,
             session: Session) -> tuple[list[dict[str, str]], Media, list]:
        """The candidate conversation for this turn: history + the new user message, all media
        in placeholder order, and what the chat bubble shows: the media themselves (an image
        thumbnail, a video, an audio player), then the text."""
        text = (text or "").strip()
        new = Media()
        placeholders, shown = [], []
        for path, kind, bucket in ((image, "image", new.images), (video, "video", new.videos)):
            if path:
                _check_file(path, kind)
                bucket.append(path)
                placeholders.append(f"<{kind}>")
                shown.append({"path": path})
        if audio:
            kind = "sound" if audio_kind == SOUND else "speech"
            _check_file(audio, kind)
            (new.sound if kind == "sound" else new.speech).append(audio)
            placeholders.append(f"<{kind}>")
            shown.append({"path": audio})
        if not text and not placeholders:
            raise ValueError("type a message or attach audio, an image or a video first")
        messages = session.messages + [{"role": "user", "content": "\n".join(placeholders + ([text] if text else []))}]
        old = session.media
        media = Media(old.images + new.images, old.videos + new.videos, old.speech + new.speech,
                      old.sound + new.sound)
        return messages, media, shown + ([text] if text else [])

    def answer(self, messages: list[dict[str, str]], media: Media, options: GenerationOptions) -> Iterator[tuple]:
        """Stream one answer: ("text", delta) items while it is generated, then ("done", reply, wav_path)."""
        events: queue.Queue = queue.Queue()
        wav_path = None
        if self.can_speak:
            handle, wav_path = tempfile.mkstemp(suffix=".wav", dir=self.audio_dir)
            os.close(handle)

        def work() -> None:
            try:
                with self.lock:
                    on_text = lambda delta: events.put(("text", delta))
                    if wav_path is not None:
                        reply = self.assistant.speak(messages, media, options, wav_path, on_text=on_text)
                    else:
                        reply = self.assistant.reply(messages, media, options, on_text=on_text)
                events.put(("done", reply, wav_path))
            except Exception as error:  # noqa: BLE001 - re-raised in the page handler below
                events.put(("error", error))

        threading.Thread(target=work, name="lyra-web-answer", daemon=True).start()
        while True:
            event = events.get()
            if event[0] == "error":
                raise event[1]
            yield event
            if event[0] == "done":
                return


def _check_file(path: str, kind: str) -> None:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"the {kind} file {file.name} could not be read (upload it again)")
    if file.stat().st_size == 0:
        raise ValueError(f"the {kind} file {file.name} is empty")


def build_app(demo: WebDemo, max_new_tokens: int = 256):
    import gradio as gr

    untrained = demo.info.get("untrained", False)
    notes = [f"Model: `{demo.info.get('model')}` on {demo.info.get('device')} ({demo.info.get('dtype')})."]
    if untrained:
        notes.append("**Note:** this is a preset with untrained weights, so its answers are noise; "
                     "start the demo with `--model` pointing at a trained checkpoint.")
    notes.append("Spoken answers are on." if demo.can_speak else
                 "Answers are text only (spoken answers need a model with a speech generator: stage 4).")

    def respond(text, audio, audio_kind, image, video, max_tokens, temperature, chat, session: Session):
        chat = list(chat or [])
        try:
            messages, media, shown = demo.turn(text, audio, audio_kind, image, video, session)
        except (ValueError, FileNotFoundError, OSError) as error:
            raise gr.Error(str(error), title="Cannot send this turn") from None
        options = GenerationOptions(max_new_tokens=int(max_tokens), temperature=float(temperature))
        partial, started = "", False
        keep = gr.update()
        try:
            for event in demo.answer(messages, media, options):
                if not started:
                    # The files were read (a bad one raises before any event): show the turn and clear
                    # the inputs; on an error they stay put, so the user can fix them and send again.
                    started = True
                    chat = chat + [{"role": "user", "content": shown}, {"role": "assistant", "content": ""}]
                    yield chat, session, None, None, None, "", keep
                if event[0] == "text":
                    partial += event[1]
                    chat[-1] = {"role": "assistant", "content": partial}
                    yield chat, session, keep, keep, keep, keep, keep
                else:
                    reply, wav_path = event[1], event[2]
                    answer = reply.text or "(empty answer)"
                    chat[-1] = {"role": "assistant", "content": [answer, {"path": wav_path}] if wav_path else answer}
                    session = Session(messages + [{"role": "assistant", "content": reply.text}], media)
                    yield chat, session, keep, keep, keep, keep, wav_path if wav_path else keep
        except (ValueError, FileNotFoundError, OSError) as error:
            raise gr.Error(str(error), title="Lyra could not answer") from None

    def clear():
        return [], Session(), None, None, None, "", None

    with gr.Blocks(title="Lyra", analytics_enabled=False) as app:
        gr.Markdown("## Lyra\nRecord or upload audio, attach an image or a video, type a message, then **Send**.")
        gr.Markdown(" ".join(notes), elem_id="model-note")
        session = gr.State(Session())
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=420)
                spoken = gr.Audio(label="Spoken answer", type="filepath", interactive=False, autoplay=True,
                                  visible=demo.can_speak, elem_id="spoken")
                text = gr.Textbox(label="Message", placeholder="Ask something (optional with audio)", lines=2,
                                  elem_id="text-in")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    reset = gr.Button("New conversation", elem_id="reset")
            with gr.Column(scale=2):
                audio = gr.Audio(label="Audio", sources=["upload", "microphone"], type="filepath", elem_id="audio-in")
                audio_kind = gr.Radio([SPEECH, SOUND], value=SPEECH, label="The audio is", elem_id="audio-kind")
                image = gr.Image(label="Image", type="filepath", sources=["upload"], elem_id="image-in")
                video = gr.Video(label="Video", sources=["upload"], elem_id="video-in")
                with gr.Accordion("Generation", open=False):
                    max_tokens = gr.Slider(1, 1024, value=max_new_tokens, step=1, label="Max new tokens")
                    temperature = gr.Slider(0.0, 1.5, value=0.0, step=0.05, label="Temperature (0 = greedy)")
        inputs = [text, audio, audio_kind, image, video, max_tokens, temperature, chatbot, session]
        outputs = [chatbot, session, audio, image, video, text, spoken]
        send.click(respond, inputs, outputs, concurrency_limit=1)
        text.submit(respond, inputs, outputs, concurrency_limit=1)
        reset.click(clear, None, outputs)
    return app


def _theme():
    import gradio as gr

    # System fonts: the default theme would fetch web fonts, and the demo must work offline.
    return gr.themes.Default(font=list(_SYSTEM_FONTS), font_mono=list(_MONO_FONTS))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer, info = load_model(args.model, args.device, args.dtype)
        if args.vocoder and model.speech_generator is None:
            print(f"note: {info['model']} has no speech generator (stage 4), so answers are text only; "
                  f"--vocoder is ignored", file=sys.stderr)
        attach_vocoder(model, args.vocoder, required=False)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if info["untrained"]:
        print(f"note: '{info['model']}' is a preset with untrained weights; its answers are noise.", file=sys.stderr)
    demo = WebDemo(model, tokenizer, info)
    app = build_app(demo, args.max_new_tokens)
    print(f"Lyra web demo on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    app.queue().launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False,
                       show_error=True, ssr_mode=False, theme=_theme(), allowed_paths=[str(demo.audio_dir)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
