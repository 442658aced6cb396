"""Loading a model by name or path, and answering one conversation turn.

Shared by `python -m lyra.chat`, the web demo, the API server and the evaluation
scripts, so every entry point routes adapters, LMME and streaming the same way.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lyra.config import LMMEConfig, available_presets, load_config
from lyra.data.audio import SAMPLE_RATE
from lyra.data.vision import VisionLimits
from lyra.model import mlora
from lyra.model.lyra import LyraForConditionalGeneration, checkpoint_tokenizer_source, read_checkpoint_config
from lyra.model.streaming import stream_speech, write_speech
from lyra.model.vocoder import load_vocoder
from lyra.processing import LyraProcessor, collate
from lyra.tokenizer import load_tokenizer

# Where `make demo` leaves the trained nano model; used by default when present.
DEFAULT_CHECKPOINT = Path("outputs") / "nano" / "model"  # relative to the working directory


def default_model() -> str:
    return str(DEFAULT_CHECKPOINT) if DEFAULT_CHECKPOINT.is_dir() else "nano"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    choices = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in choices:
        raise ValueError(f"unknown dtype {dtype!r}; choose from auto, {', '.join(choices)}")
    if dtype == "fp16" and device.type == "cpu":
        raise ValueError("fp16 is not supported on CPU; use fp32 or bf16")
    return choices[dtype]


def load_model(spec: str | None = None, device: str = "auto", dtype: str = "auto"):
    """A model and its tokenizer from a checkpoint directory or a preset name.

    A preset builds an untrained model (random LLM, ViT and projectors), which is only
    useful to try the pipeline; `untrained` in the returned info says so.
    """
    spec = spec or default_model()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = Path(spec)
    if path.is_dir():
        read_checkpoint_config(path)  # a clear error for a directory that is not a Lyra checkpoint
        model = LyraForConditionalGeneration.from_pretrained(path, dtype=torch_dtype, device=torch_device)
        tokenizer = load_tokenizer(checkpoint_tokenizer_source(path, model.config))
        untrained = False
    elif spec in available_presets():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # an untrained preset is at least the same every run
            model = LyraForConditionalGeneration.from_config(load_config(spec))
        model = model.to(torch_device, torch_dtype)
        tokenizer = load_tokenizer(model.config.tokenizer)
        untrained = True
    else:
        raise FileNotFoundError(
            f"--model {spec!r} is neither a checkpoint directory nor a preset ({', '.join(available_presets())})"
        )
    return model.eval(), tokenizer, {"model": spec, "untrained": untrained, "device": str(torch_device),
                                     "dtype": str(torch_dtype).removeprefix("torch.")}


@dataclass
class GenerationOptions:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    lmme: LMMEConfig | None = None

    def generate_kwargs(self) -> dict[str, Any]:
        sampling = self.temperature > 0
        return {"max_new_tokens": self.max_new_tokens, "do_sample": sampling,
                "temperature": self.temperature if sampling else 1.0, "top_p": self.top_p, "top_k": self.top_k,
                "lmme": self.lmme}


@dataclass
class Media:
    images: list = field(default_factory=list)
    videos: list = field(default_factory=list)
    speech: list = field(default_factory=list)
    sound: list = field(default_factory=list)


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    adapter: str | None
    timings: dict[str, float]
    kept_fraction: list[float] | None
    speech_seconds: list[float]
    units: list[int] | None = None  # a spoken answer's speech units

    def as_dict(self) -> dict[str, Any]:
        return {"answer": self.text, "prompt_tokens": self.prompt_tokens, "new_tokens": len(self.token_ids),
                "adapter": self.adapter, "timings": self.timings, "kept_fraction": self.kept_fraction,
                "speech_seconds": self.speech_seconds}


class _TextStreamer:
    """transformers streamer protocol -> text deltas (decoded as a whole so multi-byte
    characters never split), and the time of the first new token."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, started: float):
        self.tokenizer, self.on_text, self.started = tokenizer, on_text, started
        self.tokens: list[int] = []
        self.text = ""
        self.first_token_s: float | None = None
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.started
        self.tokens.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if self.on_text is not None and len(text) > len(self.text) and not text.endswith("\ufffd"):
            self.on_text(text[len(self.text):])
            self.text = text

    def end(self) -> None:
        pass


class Assistant:
    """A loaded model that answers conversations with media attached (and, given a
    vocoder and a model with a speech generator, speaks the answer)."""

    def __init__(self, model: LyraForConditionalGeneration, tokenizer, limits: VisionLimits | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = LyraProcessor(tokenizer, model.config, limits)

    def _sample(self, messages: list[dict[str, str]], media: Media | None):
        """Tokenise and load the media of one conversation; (sample, its adapter, speech seconds)."""
        media = media or Media()
        sample = self.processor(messages, images=media.images, videos=media.videos, speech=media.speech,
                                sound=media.sound)
        adapter = mlora.adapter_for_audio(self.model, [w.shape[0] for w in sample.speech])
        speech_seconds = [round(w.shape[0] / SAMPLE_RATE, 2) for w in sample.speech]  # reported only
        return sample, adapter, speech_seconds

    def _batch(self, samples: list, adapter: str | None) -> dict[str, Any]:
        """Switch on `adapter` and left-pad `samples` into one generation batch on the model's device."""
        if mlora.adapter_names(self.model):
            mlora.use_adapter(self.model, adapter)
        return _to_device(collate(samples, self.model.config.tokens.pad, padding_side="left"), self.model.device)

    def _prepare(self, messages: list[dict[str, str]], media: Media | None):
        """Tokenise, load the media, choose and switch on the adapter; a one-sample batch."""
        sample, adapter, speech_seconds = self._sample(messages, media)
        return sample, self._batch([sample], adapter), adapter, speech_seconds

    def _answer_tokens(self, new: torch.Tensor) -> list[int]:
        """One row of `generate`'s new tokens `[new]` without padding (a finished row is padded)."""
        return [t for t in new.tolist() if t != self.model.config.tokens.pad]

    def speak(self, messages: list[dict[str, str]], media: Media | None, options: GenerationOptions,
              wav_path: str | Path, on_text: Callable[[str], None] | None = None, chunk_tokens: int = 1) -> Reply:
        """Answer in text and speech at once (streaming): the hidden states of every `chunk_tokens`
        new text tokens become units, and the vocoder voices them as they arrive; the whole
        audio is written to `wav_path` (a WAV at the vocoder's rate, atomically).

        Timings: `first_token_s` and `first_audio_s` from the call (the user's audio is complete
        then), `first_audio_after_token_s` between the two, `speech_compute_s` the time spent in
        the speech generator and the vocoder, `audio_seconds` and `audio_pieces` (chunks streamed)."""
        if not self.model.can_speak:
            raise ValueError("this model cannot speak: it needs a speech generator (stage 4) and its vocoder")
        if options.lmme is not None and options.lmme.enabled:
            raise ValueError("spoken answers are generated without LMME; drop --lmme")
        check_writable(wav_path)
        vocoder = self.model.vocoder
        started = time.perf_counter()
        sample, batch, adapter, speech_seconds = self._prepare(messages, media)
        tokens, units, chunks, text, first_token, first_audio = [], [], [], "", None, None
        kwargs = {"max_new_tokens": options.max_new_tokens, "do_sample": options.temperature > 0,
                  "temperature": options.temperature or 1.0, "top_k": options.top_k,
                  "eos_token_id": self.model.config.stop_token_ids}
        speech_compute = 0.0
        for new_tokens, new_units, audio, seconds in stream_speech(
                self.model, self.model.speech_generator, vocoder, batch, chunk_tokens=chunk_tokens, **kwargs):
            now = time.perf_counter() - started
            units.extend(new_units)
            speech_compute += seconds
            if new_tokens:
                first_token = first_token if first_token is not None else now
                tokens.extend(new_tokens)
                decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if on_text is not None and len(decoded) > len(text) and not decoded.endswith("\ufffd"):
                    on_text(decoded[len(text):])
                    text = decoded
            if len(audio):
                first_audio = first_audio if first_audio is not None else now
                chunks.append(audio)
        write_speech(chunks, wav_path, vocoder.sample_rate)
        finished = time.perf_counter() - started
        first_token, first_audio = first_token or finished, first_audio or finished
        return Reply(
            text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), token_ids=tokens,
            prompt_tokens=int(sample.input_ids.shape[0]), adapter=adapter,
            timings={"first_token_s": round(first_token, 4), "first_audio_s": round(first_audio, 4),
                     "first_audio_after_token_s": round(first_audio - first_token, 4),
                     "speech_compute_s": round(speech_compute, 4), "total_s": round(finished, 4),
                     "audio_seconds": round(sum(len(c) for c in chunks) / vocoder.sample_rate, 3),
                     "audio_pieces": len(chunks)},
            kept_fraction=None, speech_seconds=speech_seconds, units=units,
        )

    def reply(self, messages: list[dict[str, str]], media: Media | None = None,
              options: GenerationOptions | None = None, on_text: Callable[[str], None] | None = None,
              progress: bool = False) -> Reply:
        """Answer the last user turn of `messages` (placeholders in turn text, files in `media`)."""
        options = options or GenerationOptions()
        started = time.perf_counter()
        sample, batch, adapter, speech_seconds = self._prepare(messages, media)
        prepared = time.perf_counter()
        streamer = _TextStreamer(self.tokenizer, on_text, started)
        self.model.last_retention = None
        new = self.model.generate(**batch, streamer=streamer, progress=progress, **options.generate_kwargs())[0]
        tokens = self._answer_tokens(new)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        if on_text is not None and len(text) > len(streamer.text.strip()):
            on_text(text[len(streamer.text.strip()):])
        finished = time.perf_counter()
        retention = getattr(self.model, "last_retention", None)
        return Reply(
            text=text, token_ids=tokens, prompt_tokens=int(sample.input_ids.shape[0]), adapter=adapter,
            timings={"prepare_s": round(prepared - started, 4),
                     "first_token_s": round(streamer.first_token_s or finished - started, 4),
                     "total_s": round(finished - started, 4)},
            kept_fraction=retention.kept_fraction() if retention is not None else None,
            speech_seconds=speech_seconds,
        )

    def reply_batch(self, conversations: list[tuple[list[dict[str, str]], Media | None]],
                    options: GenerationOptions | None = None) -> list[Reply]:
        """Answer several (messages, media) conversations at once, in the order given.

        The prompts are left-padded by `collate` into one `generate` call per adapter (the
        path the API server's batcher takes), so a greedy answer is the one `reply` gives.
        `timings["total_s"]` is the wall time of the whole call, shared by its replies;
        `kept_fraction` (LMME) is over the batch.
        """
        options = options or GenerationOptions()
        started = time.perf_counter()
        prepared = [self._sample(messages, media) for messages, media in conversations]
        replies: list[Reply | None] = [None] * len(prepared)
        for adapter in dict.fromkeys(adapter for _, adapter, _ in prepared):  # each adapter once, in order
            rows = [i for i, (_, a, _) in enumerate(prepared) if a == adapter]
            batch = self._batch([prepared[i][0] for i in rows], adapter)
            self.model.last_retention = None
            new = self.model.generate(**batch, **options.generate_kwargs())
            retention = getattr(self.model, "last_retention", None)
            for row, i in enumerate(rows):
                sample, _, speech_seconds = prepared[i]
                tokens = self._answer_tokens(new[row])
                replies[i] = Reply(
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True).strip(), token_ids=tokens,
                    prompt_tokens=int(sample.input_ids.shape[0]), adapter=adapter, timings={},
                    kept_fraction=retention.kept_fraction() if retention is not None else None,
                    speech_seconds=speech_seconds)
        total = round(time.perf_counter() - started, 4)
        for reply in replies:
            reply.timings = {"total_s": total, "batch_size": len(replies)}
        return replies


def attach_vocoder(model: LyraForConditionalGeneration, override: str | None = None, required: bool = True):
    """Load the vocoder that speaks the model's units and attach it: `override` (`--vocoder`)
    if given, else the one its checkpoint records (`speech_generator.vocoder`).

    `required=False` (servers): a model that cannot speak, having no speech generator or no
    vocoder to name, stays text-only and None is returned instead of an error."""
    if not required and (model.speech_generator is None
                         or not (override or model.config.speech_generator.vocoder)):
        return None
    if model.speech_generator is None:
        raise ValueError(f"the model '{model.config.name}' has no speech generator (train stage 4), so it cannot "
                         f"speak")
    spec = override or model.config.speech_generator.vocoder
    if not spec:
        raise ValueError(f"the model '{model.config.name}' names no vocoder for its "
                         f"{model.config.speech_generator.unit_kind} units; pass --vocoder (a code HiFi-GAN folder "
                         f"or a Piper voice)")
    vocoder = load_vocoder(spec, device=model.device)
    model.attach_vocoder(vocoder)
    return vocoder


def check_writable(path: str | Path) -> None:
    """A clear error, before any work, when an output file cannot be written at `path`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"cannot write {path}: it is a directory; give a file name such as {path / 'reply.wav'}")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", delete=True)
        probe.close()
    except OSError as error:
        raise ValueError(f"cannot write {path}: {error.strerror or error} (choose a writable folder)") from None


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device)
        elif isinstance(value, list):
            moved[key] = [v.to(device) for v in value]
        else:
            moved[key] = value
    return moved
