"""TTS round trip: synthesise prompts, transcribe them with Whisper, score the word error rate.

A WER near Whisper's own on clean read speech (a few percent) means the synthetic speech is
intelligible and the transcripts (`speech_asr`) match the audio (scripts/tts_roundtrip_wer.py).
"""

from __future__ import annotations

import numpy as np
import torch

from lyra.data.tts import TTSBackend, synthesize_16k
from lyra.eval.metrics import corpus_wer

ROUNDTRIP_PROMPTS = [
    "What is the man holding in his right hand?",
    "Please describe this picture in one short sentence.",
    "How many people are sitting at the table?",
    "What colour is the car parked next to the house?",
    "Which animal is standing on the grass?",
    "What is written on the sign above the door?",
    "Is the woman wearing a hat or a scarf?",
    "What is the weather like in this photo?",
    "Where could this photograph have been taken?",
    "What is the title of this book? Option A is Cooking. Option B is History. Option C is Travel.",
    "Which option best describes the chart? Option A is rising prices. Option B is falling prices.",
    "What time is shown on the clock on the wall?",
    "Why is the child smiling at the camera?",
    "What is the boy doing with the red ball?",
    "Describe the main events of the video in detail.",
    "How many windows can you see on the building?",
    "What kind of food is served on the plate?",
    "Answer the question using a single word or phrase.",
    "Summarize the key points of this document for me.",
    "Which team is winning the game according to the score board?",
    "What is the highest value shown in the bar chart?",
    "Can you explain what the diagram is trying to show?",
    "What is the name of the street in this picture?",
    "Is there anything unusual about this scene?",
]
"""Instruction-like prompts (already in spoken form) for TTS -> Whisper round trips."""


def transcribe_16k(model, clips: list[np.ndarray], batch: int = 16) -> list[str]:
    """Greedy English transcription of clips (each under 30 s) with an openai-whisper model."""
    import whisper

    options = whisper.DecodingOptions(language="en", fp16=False, temperature=0.0, without_timestamps=True)
    texts: list[str] = []
    for start in range(0, len(clips), batch):
        mels = torch.stack([
            whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(c)), n_mels=model.dims.n_mels)
            for c in clips[start : start + batch]
        ])
        with torch.no_grad():
            texts.extend(result.text for result in whisper.decode(model, mels, options))
    return texts


def roundtrip_wer(
    backend: TTSBackend, prompts: list[str], model, seed: int = 0, speaker_every: int = 4
) -> tuple[float, list[str]]:
    """Synthesise each prompt (speakers rotating every `speaker_every` prompts), transcribe it
    with Whisper, and return (WER, transcripts)."""
    clips = [synthesize_16k(backend, text, backend.speaker(i // speaker_every, seed)) for i, text in enumerate(prompts)]
    hypotheses = transcribe_16k(model, clips)
    return corpus_wer(prompts, hypotheses).wer, hypotheses
