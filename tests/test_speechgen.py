"""CTC speech generator and streaming text+speech generation."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from lyra.config import load_config
from lyra.model.speechgen import SpeechGenerator, ctc_collapse, reference_state_dict
from lyra.model.streaming import generate_speech, stream_speech, write_speech
from lyra.model.hifigan import CodeHiFiGAN, VocoderConfig
from lyra.model.vocoder import HiFiGANVocoder

# A small vocoder with the real one's upsampling (320 samples per frame at 16 kHz).
SMALL_VOCODER = {
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 32,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "num_embeddings": 50,
    "embedding_dim": 16,
    "model_in_dim": 16,
    "dur_predictor_params": {"encoder_embed_dim": 16, "var_pred_hidden_dim": 16, "var_pred_kernel_size": 3,
                             "var_pred_dropout": 0.5},
    "sampling_rate": 16000,
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; oversubscription is slower
    yield
    torch.set_num_threads(threads)


def tiny_generator(seed: int = 0) -> SpeechGenerator:
    cfg = load_config("tiny")
    torch.manual_seed(seed)
    return SpeechGenerator.from_config(cfg.speech_generator, cfg.text.hidden_size)


def test_from_config_presets():
    for preset in ("tiny", "nano"):
        cfg = load_config(preset)
        gen = SpeechGenerator.from_config(cfg.speech_generator, cfg.text.hidden_size)
        sg = cfg.speech_generator
        assert gen.upsample == sg.upsample and gen.blank == sg.num_units
        assert gen.input_proj.in_features == cfg.text.hidden_size
        assert gen.output_proj.out_features == sg.num_units + 1
        assert len(gen.layers) == sg.num_layers
        assert gen.layers[0].mlp.gate_proj.out_features == sg.intermediate_size


def test_overfits_a_tiny_unit_set():
    """Tiny dims (tiny preset: width 64, 4 heads, 50 units, x5 upsampling), 3 answers of
    10 text states (two with masked positions), 4-5 target units each: the CTC loss goes
    to ~0 and greedy decoding returns the targets exactly."""
    gen = tiny_generator(0)
    hidden = torch.randn(3, 10, 64)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[1, 8:] = False  # padding after the answer
    mask[2, :2] = False  # prompt positions before it
    targets = [torch.randint(0, 50, (n,)) for n in (5, 4, 4)]
    padded = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=-100)
    optimizer = torch.optim.Adam(gen.parameters(), lr=1e-2)
    first = None
    for _ in range(300):
        loss = gen.loss(hidden, mask, padded)
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 3.0 and loss.item() < 0.01
    assert gen.predict(hidden, mask) == [t.tolist() for t in targets]


def test_loss_is_ctc_sum_over_target_units():
    gen = tiny_generator(1)
    hidden = torch.randn(2, 4, 64)
    targets = [[3, 3, 7], [1, 2, 4, 4, 9, 0]]
    logits, frame_mask = gen(hidden)
    assert frame_mask.sum(1).tolist() == [20, 20]
    manual = sum(
        F.ctc_loss(logits[b:b + 1].log_softmax(-1).transpose(0, 1), torch.tensor([t]), [20], [len(t)],
                   blank=50, reduction="sum")
        for b, t in enumerate(targets)
    ) / 9
    torch.testing.assert_close(gen.loss(hidden, None, targets), manual)
    with pytest.raises(ValueError, match="blank"):
        gen.loss(hidden, None, [[50], [1]])


def test_upsampling_repeats_and_stretches_to_long_targets():
    gen = tiny_generator(0)
    hidden = torch.arange(3 * 64, dtype=torch.float).view(1, 3, 64)
    frames, frame_mask, offsets = gen.upsample_states(hidden)
    assert frames.shape == (1, 15, 64) and bool(frame_mask.all())
    assert torch.equal(frames[0, :, 0], hidden[0, :, 0].repeat_interleave(5))
    assert offsets[0].tolist() == [0, 1, 2, 3, 4] * 3  # each frame's index among its state's copies
    # a target longer than 3 x 5 frames: 18 frames, frame f copies state floor(f * 3 / 18)
    frames, frame_mask, offsets = gen.upsample_states(hidden, min_frames=torch.tensor([18]))
    assert frames.shape[1] == 18
    assert torch.equal(frames[0, :, 0], hidden[0, torch.arange(18) * 3 // 18, 0])
    assert offsets[0].tolist() == list(range(6)) * 3
    # rows of different lengths: padding frames get offset 0
    two = torch.randn(2, 3, 64)
    _, frame_mask, offsets = gen.upsample_states(two, torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool))
    assert offsets[1].tolist() == [0, 1, 2, 3, 4] + [0] * 10 and frame_mask[1].sum() == 5


def test_collapse_merges_repeats_before_dropping_blanks():
    assert ctc_collapse([5, 5, 50, 5, 7, 7, 50, 50], blank=50) == [5, 5, 7]
    assert ctc_collapse([7, 7, 2], blank=50, previous=7) == [2]  # run continuing from the last chunk
    assert ctc_collapse([50, 7], blank=50, previous=7) == [7]  # a blank separates the two 7s


@pytest.mark.parametrize("extras", [False, True])
def test_attention_is_causal_and_streaming_is_exact(extras):
    """Also with frame positions and the input ActNorm (after its initialisation)."""
    gen = tiny_generator(2)
    hidden = torch.randn(1, 11, 64)
    if extras:
        cfg = load_config("tiny").speech_generator
        cfg.frame_positions = cfg.input_norm = True
        torch.manual_seed(2)
        gen = SpeechGenerator.from_config(cfg, 64)
        gen.input_norm.initialize(hidden[0] * 3 + 1)
    gen.eval()
    with torch.no_grad():
        logits, _ = gen(hidden)
        changed, _ = gen(torch.cat([hidden[:, :6], torch.randn(1, 5, 64)], dim=1))
    assert torch.equal(logits[:, :30], changed[:, :30])  # frames of states 0..5 ignore later states
    assert not torch.allclose(logits[:, 30:], changed[:, 30:])
    full = gen.predict(hidden)[0]
    for chunk in (1, 3, 4, 11):
        stream = gen.stream()
        units = [u for i in range(0, 11, chunk) for u in stream.push(hidden[0, i:i + chunk])]
        assert units == full, chunk


def test_frame_positions_let_one_state_yield_several_units():
    """Without them the copies of the first state are identical frames (causal attention over
    copies of one vector): at most one unit. With them one state can say a whole word."""
    for frame_positions, most in ((False, 1), (True, 5)):
        cfg = load_config("tiny").speech_generator
        cfg.frame_positions = frame_positions
        torch.manual_seed(0)
        gen = SpeechGenerator.from_config(cfg, 64)
        hidden = torch.randn(1, 1, 64)
        optimizer = torch.optim.Adam(gen.parameters(), lr=1e-2)
        for _ in range(150):
            loss = gen.loss(hidden, None, [[3, 8, 1, 9, 4]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        assert len(gen.predict(hidden)[0]) <= most
        if frame_positions:
            assert gen.predict(hidden)[0] == [3, 8, 1, 9, 4]


def test_input_norm_starts_from_the_first_batch_and_is_saved():
    cfg = load_config("tiny").speech_generator
    cfg.input_norm = True
    gen = SpeechGenerator.from_config(cfg, 64).train()
    hidden = torch.randn(2, 6, 64) * 4 + 7
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    gen.loss(hidden, mask, [[1, 2], [3]])
    norm = gen.input_norm
    normalised = norm(hidden[mask.bool()])
    torch.testing.assert_close(normalised.mean(0), torch.zeros(64), atol=1e-4, rtol=0)
    torch.testing.assert_close(normalised.std(0, unbiased=False), torch.ones(64), atol=1e-3, rtol=0)
    state = gen.state_dict()
    assert bool(state["input_norm.initialized"])
    again = SpeechGenerator.from_config(cfg, 64).train()
    again.load_state_dict(state)
    again.loss(torch.randn(1, 2, 64), None, [[1]])  # a resumed run keeps the saved statistics
    assert torch.equal(again.input_norm.shift, norm.shift)


def test_reference_checkpoint_keys_load():
    gen = tiny_generator(3).eval()
    # the reference module's names (Lyra speech_generator.py / LLaMA-Omni: input_proj,
    # Qwen2/Llama decoder layers under layers.N, output_proj) under a full-model prefix
    expected = {"input_proj.weight", "input_proj.bias", "output_proj.weight", "output_proj.bias"}
    for i in range(2):
        for name in ("q_proj", "k_proj", "v_proj"):
            expected |= {f"layers.{i}.self_attn.{name}.weight", f"layers.{i}.self_attn.{name}.bias"}
        expected |= {f"layers.{i}.self_attn.o_proj.weight", f"layers.{i}.input_layernorm.weight",
                     f"layers.{i}.post_attention_layernorm.weight"}
        expected |= {f"layers.{i}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(gen.state_dict()) == expected
    full_model = {f"model.speech_generator.{k}": v.clone() for k, v in gen.state_dict().items()}
    full_model["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(1)  # LLM weights are ignored
    other = tiny_generator(4)
    other.load_reference_state_dict(full_model, source="lyra.bin")
    hidden = torch.randn(1, 5, 64)
    with torch.no_grad():
        assert torch.equal(other(hidden)[0], gen(hidden)[0])

    # LLaMA-Omni's Llama layers have no q/k/v biases: zeros are the same function
    llama = {k: v for k, v in gen.state_dict().items() if not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))}
    mapped = reference_state_dict({f"speech_generator.{k}": v for k, v in llama.items()})
    assert torch.equal(mapped["layers.1.self_attn.k_proj.bias"], torch.zeros(64))
    other.load_reference_state_dict(mapped)

    bad = dict(gen.state_dict())
    bad["output_head.weight"] = bad.pop("output_proj.weight")
    with pytest.raises(ValueError, match=r"ckpt\.bin.*output_proj\.weight.*output_head\.weight"):
        other.load_reference_state_dict(bad, source="ckpt.bin")


def test_streaming_speech_matches_one_shot_and_starts_early(tiny_model, tmp_path):
    """Tiny Lyra LLM -> generator (chunks of 4 tokens) -> small vocoder: the streamed
    text equals greedy `generate`, the streamed audio equals the one-shot audio of the
    same units, and audio arrives before the text is finished."""
    gen = tiny_generator(5).eval()
    torch.manual_seed(6)
    hifigan = CodeHiFiGAN(VocoderConfig.from_dict(SMALL_VOCODER)).remove_weight_norm().eval()
    vocoder = HiFiGANVocoder(hifigan)
    batch = {"input_ids": torch.randint(0, 1000, (1, 12)), "attention_mask": torch.ones(1, 12, dtype=torch.long)}
    options = {"max_new_tokens": 40, "eos_token_id": -1}

    events = list(stream_speech(tiny_model, gen, vocoder, batch, chunk_tokens=4, **options))
    tokens = [t for event in events for t in event.tokens]
    audio = np.concatenate([event.audio for event in events])
    one_shot = generate_speech(tiny_model, gen, vocoder, batch, **options)

    assert tokens == one_shot.tokens == tiny_model.generate(batch["input_ids"], max_new_tokens=40)[0].tolist()
    assert len(one_shot.units) > 0 and audio.shape == one_shot.audio.shape
    assert np.abs(audio - one_shot.audio).max() < 1e-5
    assert [u for event in events for u in event.units] == one_shot.units
    assert audio.shape[0] == int(hifigan.durations(one_shot.units).sum()) * 320
    first_audio = next(i for i, event in enumerate(events) if event.audio.size)
    last_token = max(i for i, event in enumerate(events) if event.tokens)
    assert first_audio < last_token  # speech started before the text ended
    # (the default look-ahead holds back the last 23 units of each push until the next)

    path = write_speech(events, tmp_path / "out" / "answer.wav", vocoder.sample_rate)
    written, rate = sf.read(path, dtype="float32")
    assert rate == 16000 and written.shape == audio.shape
    assert np.abs(written - np.clip(audio, -1, 1)).max() <= 1 / 32767
    assert [p.name for p in path.parent.iterdir()] == ["answer.wav"]  # no temp file left

    with pytest.raises(TypeError, match="top_p"):
        next(stream_speech(tiny_model, gen, vocoder, batch, top_p=0.9))
    with pytest.raises(ValueError, match="one prompt"):
        next(stream_speech(tiny_model, gen, vocoder, {"input_ids": torch.zeros(2, 3, dtype=torch.long)}))


def test_llama_omni_style_generator_is_reproduced():
    """LLaMA-Omni's generator is input_proj -> causal LlamaDecoderLayers (Llama-3.1 config:
    llama3 RoPE, eps 1e-5, no q/k/v bias) -> output_proj. Its weights, loaded here with
    the matching rope/eps, give the same logits."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (
        LlamaDecoderLayer,
        LlamaRotaryEmbedding,
    )

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    torch.manual_seed(7)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=128,
                         num_hidden_layers=2, rms_norm_eps=1e-5, rope_parameters=rope)
    config._attn_implementation = "eager"
    layers = torch.nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(2)).eval()
    input_proj, output_proj = torch.nn.Linear(32, 64), torch.nn.Linear(64, 21)
    state = {f"speech_generator.input_proj.{k}": v for k, v in input_proj.state_dict().items()}
    state |= {f"speech_generator.layers.{k}": v for k, v in layers.state_dict().items()}
    state |= {f"speech_generator.output_proj.{k}": v for k, v in output_proj.state_dict().items()}
    ours = SpeechGenerator(llm_width=32, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                           num_units=20, upsample=3, rope_parameters=rope, rms_norm_eps=1e-5).eval()
    ours.load_reference_state_dict(state, source="llama-omni")
    hidden = torch.randn(1, 5, 32)
    with torch.no_grad():
        x = input_proj(hidden.repeat_interleave(3, dim=1))
        positions = torch.arange(15)[None]
        rotary = LlamaRotaryEmbedding(config)(x, positions)
        causal = torch.full((15, 15), float("-inf")).triu(1)[None, None]
        for layer in layers:
            x = layer(x, attention_mask=causal, position_ids=positions, position_embeddings=rotary)
        torch.testing.assert_close(ours(hidden)[0], output_proj(x), atol=1e-5, rtol=1e-5)
