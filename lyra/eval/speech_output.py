"""Measuring spoken answers: unit accuracy, what is heard, latency, streamed against one-shot.

For one question (a conversation and its media), `speak_and_judge` answers in streaming speech
through `Assistant.speak` (the code path of `python -m lyra.chat --speech-out`), synthesises the
same units again in one shot, and lets a `WhisperJudge` say what it hears in each. With
`expected` it also scores the units the speech generator gives when the LLM is fed the expected
answer (teacher-forced: the generator's own accuracy, whatever the LLM would have said).

    phoneme / unit error rate   edit distance between unit sequences over the reference length
                                (jiwer's word error rate, one "word" per unit)
    heard                       the closed-set choice among `candidates` (+ the model's own text)
    first_audio_after_token_s   first text token -> first audio (LLaMA-Omni reports 226 ms, GPU)
    first_audio_s               end of the user's audio (the call) -> first audio
    rtf                         time in the speech generator and the vocoder / audio duration
    rtf_end_to_end              (call -> last audio) / audio duration
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from lyra.eval.metrics import corpus_wer
from lyra.inference import GenerationOptions
from lyra.model import mlora
from lyra.processing import IGNORE_INDEX, collate


def unit_error_rate(references: list[list[int]], hypotheses: list[list[int]]) -> float:
    """Edit operations over reference units, summed over the corpus (the word error rate, one
    "word" per unit)."""
    words = lambda units: " ".join(f"u{int(u)}" for u in units)  # noqa: E731
    return corpus_wer([words(r) for r in references], [words(h) for h in hypotheses], normalizer=str).wer


@dataclass
class SpokenAnswer:
    text: str
    units: list[int]
    text_units: list[int]  # the vocoder's units for `text`: what the generator should have said
    heard_streamed: str
    heard_one_shot: str
    transcript: str  # Whisper's free transcription of the streamed audio
    audio_seconds: float
    one_shot_seconds: float
    pieces: int  # audio chunks the stream delivered
    first_token_s: float
    first_audio_s: float
    first_audio_after_token_s: float
    rtf: float
    rtf_end_to_end: float
    teacher_forced_units: list[int] | None = None
    expected_units: list[int] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def speak_and_judge(assistant, judge, messages: list[dict[str, str]], media, candidates: list[str],
                    expected: str | None = None, max_new_tokens: int = 16, wav_path: str | Path | None = None,
                    chunk_tokens: int = 1) -> SpokenAnswer:
    """Answer `messages` in streaming speech and judge it (see the module docstring).

    `wav_path`: where to keep the streamed answer (a temporary file otherwise)."""
    vocoder = assistant.model.vocoder
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    with tempfile.TemporaryDirectory(prefix="lyra-spoken-") as tmp:
        path = Path(wav_path) if wav_path is not None else Path(tmp) / "answer.wav"
        reply = assistant.speak(messages, media, options, path, chunk_tokens=chunk_tokens)
        streamed, rate = sf.read(str(path), dtype="float32")
    units = reply.units
    one_shot = vocoder.synthesize(units)
    choices = list(dict.fromkeys([*candidates, reply.text])) if reply.text else list(candidates)
    timings = reply.timings
    seconds = max(timings["audio_seconds"], 1e-9)
    answer = SpokenAnswer(
        text=reply.text, units=units, text_units=vocoder.text_to_units(reply.text) if reply.text else [],
        heard_streamed=judge.choose(streamed, rate, choices)[0] if streamed.size else "",
        heard_one_shot=judge.choose(one_shot, vocoder.sample_rate, choices)[0] if one_shot.size else "",
        transcript=judge.transcribe(streamed, rate), audio_seconds=timings["audio_seconds"],
        one_shot_seconds=one_shot.size / vocoder.sample_rate, pieces=timings["audio_pieces"],
        first_token_s=timings["first_token_s"], first_audio_s=timings["first_audio_s"],
        first_audio_after_token_s=timings["first_audio_after_token_s"],
        rtf=timings["speech_compute_s"] / seconds, rtf_end_to_end=timings["total_s"] / seconds)
    if expected is not None:
        answer.teacher_forced_units = teacher_forced_units(assistant, messages, media, expected)
        answer.expected_units = vocoder.text_to_units(expected)
    return answer


@torch.no_grad()
def teacher_forced_units(assistant, messages: list[dict[str, str]], media, answer: str) -> list[int]:
    """The speech generator's units for `answer` given after `messages`: the hidden states of its
    tokens and `<|im_end|>` (as in training) from one forward over prompt + answer."""
    model = assistant.model
    conversation = [*messages, {"role": "assistant", "content": answer}]
    sample = assistant.processor.for_training(conversation, images=media.images, videos=media.videos,
                                              speech=media.speech, sound=media.sound)
    prompt = assistant.processor.for_training(messages, images=media.images, videos=media.videos,
                                              speech=media.speech, sound=media.sound)
    sample.labels[: prompt.input_ids.shape[0]] = IGNORE_INDEX  # earlier answers are history, not this answer
    if mlora.adapter_names(model):  # the adapter inference chooses for this input
        mlora.use_adapter(model, mlora.adapter_for_audio(model, [w.shape[0] for w in sample.speech]))
    batch = collate([sample], model.config.tokens.pad)
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    states, mask = model.answer_states(**inputs)
    return model.speech_generator.predict(states, mask)[0]


def summarize(answers: list[SpokenAnswer], expected: list[str] | None = None) -> dict[str, Any]:
    """Corpus figures over spoken answers (see the module docstring)."""
    n = len(answers)
    after = [a.first_audio_after_token_s for a in answers]
    summary = {
        "answers": n,
        "unit_error_rate_vs_own_text": unit_error_rate([a.text_units for a in answers if a.text_units],
                                                       [a.units for a in answers if a.text_units]),
        "heard_equals_own_text": sum(a.heard_streamed == a.text for a in answers) / n,
        "streamed_heard_equals_one_shot": sum(a.heard_streamed == a.heard_one_shot for a in answers) / n,
        "first_audio_after_token_ms": {"median": 1000 * float(np.median(after)),
                                       "p90": 1000 * float(np.percentile(after, 90))},
        "first_audio_ms": {"median": 1000 * float(np.median([a.first_audio_s for a in answers])),
                           "p90": 1000 * float(np.percentile([a.first_audio_s for a in answers], 90))},
        "rtf": {"median": float(np.median([a.rtf for a in answers])),
                "p90": float(np.percentile([a.rtf for a in answers], 90))},
        "rtf_end_to_end": {"median": float(np.median([a.rtf_end_to_end for a in answers])),
                           "p90": float(np.percentile([a.rtf_end_to_end for a in answers], 90))},
    }
    forced = [a for a in answers if a.teacher_forced_units is not None]
    if forced:
        summary["unit_error_rate_teacher_forced"] = unit_error_rate([a.expected_units for a in forced],
                                                                    [a.teacher_forced_units for a in forced])
    if expected is not None:
        summary["text_equals_expected"] = sum(a.text == e for a, e in zip(answers, expected)) / n
        summary["heard_equals_expected"] = sum(a.heard_streamed == e for a, e in zip(answers, expected)) / n
    return summary
