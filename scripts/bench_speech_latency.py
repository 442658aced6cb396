"""Latency of streaming speech: first generated text token -> first audio chunk.

On CPU (default): the nano Lyra (`load_config("nano")`, random LLM weights, real Whisper
tiny.en encoder) and its CTC speech generator (random). On a GPU (`--device cuda --preset
base --dtype bf16`): Lyra-Base dimensions with random weights, built on the GPU, and the
preset's speech generator, which for base is the largest config (LLaMA-Omni's: 2 layers of
width 4096, upsampling x25). Both with a unit HiFi-GAN with the real
mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj hyper-parameters (random weights, weight
norm folded, duration prediction on, fp32 on the run's device). EOS is disabled so every
run decodes --max-new-tokens tokens.

Random weights make the generator emit almost no units (its frames barely differ), so
the vocoder would do no work. The generator still runs for real (it is timed), but its
units are replaced by --units-per-token random units per text token, each lasting
--frames-per-unit frames (the duration predictor is set to that constant): 8 x 2 =
16 frames = 0.32 s of audio per token, about real speech (50 HuBERT frames/s, ~3
tokens/s; de-duplicated mHuBERT units last ~2 frames). --units-per-token 0 keeps the
generator's own units. For each chunk size and vocoder look-ahead (the exact default,
and 0 = emit immediately) the median over --repeats runs is reported:

  first_audio_ms   first text token -> first non-empty audio chunk (the figure
                   LLaMA-Omni reports as 226 ms, on GPU); also its minimum over runs,
                   the least disturbed by other processes on a shared machine
  prefill_ms       prompt -> first text token
  token_ms         mean decode step
  units_ms / vocoder_ms   mean time per chunk in the generator / the vocoder
  first_chunk_s    seconds of audio in the first chunk
  rtf              total compute / audio duration (whole answer)

    python scripts/bench_speech_latency.py --out outputs/bench_speech_latency.json
    python scripts/bench_speech_latency.py --device cuda --preset base --dtype bf16 --out outputs/speech_cuda.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from lyra.utils.io import atomic_write_json

VOCODER_CONFIG = {  # config.json of the mHuBERT layer-11 km1000 LJSpeech unit vocoder
    "resblock": "1",
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 512,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "num_embeddings": 1000,
    "embedding_dim": 128,
    "model_in_dim": 128,
    "code_hop_size": 320,
    "dur_predictor_params": {"encoder_embed_dim": 128, "var_pred_hidden_dim": 128, "var_pred_kernel_size": 3,
                             "var_pred_dropout": 0.5},
    "sampling_rate": 16000,
}


class Timer:
    """Accumulates the time spent in wrapped methods."""

    def __init__(self):
        self.calls: dict[str, list[float]] = {}

    def wrap(self, cls, name: str, label: str):
        original = getattr(cls, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            self.calls.setdefault(label, []).append(time.perf_counter() - start)
            return result

        setattr(cls, name, timed)
        return original


def run_once(model, generator, vocoder, batch, chunk_tokens, lookahead, max_new_tokens, units_per_token) -> dict:
    from lyra.model.hifigan import StreamingVocoder
    from lyra.model.speechgen import SpeechGeneratorStream
    from lyra.model.streaming import stream_speech
    from lyra.model.vocoder import HiFiGANVocoder

    timer = Timer()
    originals = [
        (SpeechGeneratorStream, "push", timer.wrap(SpeechGeneratorStream, "push", "units")),
        (StreamingVocoder, "push", timer.wrap(StreamingVocoder, "push", "vocoder")),
    ]
    if units_per_token:
        timed_push = SpeechGeneratorStream.push
        rng = torch.Generator().manual_seed(1)

        def synthetic_units(self, hidden):
            timed_push(self, hidden)  # the real generator work, timed
            return torch.randint(0, 1000, (hidden.shape[0] * units_per_token,), generator=rng).tolist()

        SpeechGeneratorStream.push = synthetic_units
    try:
        start = time.perf_counter()
        first_token = first_audio = None
        first_chunk = 0
        tokens = samples = 0
        for ids, _, audio, _ in stream_speech(model, generator, HiFiGANVocoder(vocoder, lookahead_units=lookahead), batch,
                                              chunk_tokens=chunk_tokens, max_new_tokens=max_new_tokens,
                                              eos_token_id=-1):
            now = time.perf_counter()
            if ids and first_token is None:
                first_token = now
            if audio.size and first_audio is None:
                first_audio, first_chunk = now, audio.size
            tokens += len(ids)
            samples += audio.size
        end = time.perf_counter()
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)
    decode = (end - first_token - sum(timer.calls.get("units", [])) - sum(timer.calls.get("vocoder", [])))
    return {
        "first_audio_ms": 1000 * (first_audio - first_token),
        "prefill_ms": 1000 * (first_token - start),
        "token_ms": 1000 * decode / max(tokens - 1, 1),
        "units_ms": 1000 * statistics.mean(timer.calls.get("units", [0.0])),
        "vocoder_ms": 1000 * statistics.mean(timer.calls.get("vocoder", [0.0])),
        "first_chunk_s": first_chunk / 16000,
        "audio_s": samples / 16000,
        "rtf": (end - start) / max(samples / 16000, 1e-9),
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--chunks", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--units-per-token", type=int, default=8, help="0: the random generator's own units")
    parser.add_argument("--frames-per-unit", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the 2 shared cores thrash with more under load)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="the LLM's and generator's")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_speech_latency.json"))
    args = parser.parse_args(argv)

    from lyra.bench import device_name, random_model
    from lyra.config import load_config
    from lyra.model.lyra import LyraForConditionalGeneration
    from lyra.model.speechgen import SpeechGenerator
    from lyra.model.hifigan import CodeHiFiGAN, VocoderConfig
    from lyra.train.config import DTYPES

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.preset)
    if device.type == "cpu" and dtype == torch.float32:
        model = LyraForConditionalGeneration.from_config(cfg).eval()  # with the preset's encoder checkpoint
    else:  # random weights throughout, made on the device: a Lyra-Base never passes through host memory
        model = random_model(cfg, device, dtype).eval()
    generator = SpeechGenerator.from_config(cfg.speech_generator, cfg.text.hidden_size).to(device, dtype).eval()
    vocoder = CodeHiFiGAN(VocoderConfig.from_dict(VOCODER_CONFIG)).remove_weight_norm().to(device).eval()
    if args.units_per_token:
        with torch.no_grad():  # constant durations: log(1 + frames)
            vocoder.dur_predictor.proj.weight.zero_()
            vocoder.dur_predictor.proj.bias.fill_(float(torch.log(torch.tensor(1.0 + args.frames_per_unit))))
    prompt = torch.randint(0, min(cfg.text.vocab_size, cfg.tokens.pad), (1, args.prompt_tokens))
    batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    field = vocoder.receptive_field_units(True)

    run_once(model, generator, vocoder, batch, args.chunks[0], None, 8, args.units_per_token)  # warm-up
    rows = []
    for chunk in args.chunks:
        for lookahead in (None, 0):
            runs = [run_once(model, generator, vocoder, batch, chunk, lookahead, args.max_new_tokens,
                             args.units_per_token)
                    for _ in range(args.repeats)]
            row = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            row["first_audio_min_ms"] = min(r["first_audio_ms"] for r in runs)  # least disturbed run
            row.update(chunk_tokens=chunk, lookahead_units=field if lookahead is None else lookahead)
            rows.append(row)

    header = (f"{'chunk':>5} {'look':>4} {'first_audio_ms':>14} {'(min)':>6} {'prefill_ms':>10} {'token_ms':>8} "
              f"{'units_ms':>8} {'vocoder_ms':>10} {'first_chunk_s':>13} {'audio_s':>7} {'rtf':>5}")
    generator_shape = cfg.speech_generator
    print(f"{device_name(device)}, {args.dtype}, speech generator {generator_shape.num_layers} x "
          f"{generator_shape.hidden_size}")
    print(f"preset {args.preset}, {torch.get_num_threads()} threads, prompt {args.prompt_tokens} tokens, "
          f"{args.max_new_tokens} new tokens, upsample x{cfg.speech_generator.upsample}, "
          f"{args.units_per_token or 'generator'} units/token x {args.frames_per_unit} frames, median of {args.repeats}")
    print(header)
    for r in rows:
        print(f"{r['chunk_tokens']:>5} {r['lookahead_units']:>4} {r['first_audio_ms']:>14.0f} "
              f"{r['first_audio_min_ms']:>6.0f} {r['prefill_ms']:>10.0f} "
              f"{r['token_ms']:>8.1f} {r['units_ms']:>8.1f} {r['vocoder_ms']:>10.0f} {r['first_chunk_s']:>13.2f} "
              f"{r['audio_s']:>7.2f} {r['rtf']:>5.2f}")
    result = {
        "preset": args.preset,
        "threads": torch.get_num_threads(),
        "prompt_tokens": args.prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "units_per_token": args.units_per_token,
        "frames_per_unit": args.frames_per_unit,
        "vocoder_receptive_field_units": field,
        "device": device_name(device),
        "device_type": device.type,
        "dtype": args.dtype,
        "speech_generator": {"num_layers": generator_shape.num_layers, "hidden_size": generator_shape.hidden_size,
                             "intermediate_size": generator_shape.intermediate_size,
                             "upsample": generator_shape.upsample, "num_units": generator_shape.num_units},
        "reference": "LLaMA-Omni: 226 ms first-audio latency on GPU",
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
