"""The Lyra model against plain transformers Qwen2-VL and a hand-built reference."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2VLForConditionalGeneration

from lyra.config import load_config
from lyra.model.lyra import LyraForConditionalGeneration, qwen2vl_config
from lyra.model.speech import CLIP_SAMPLES, log_mel
from lyra.processing import collate

from conftest import tone


def plain_qwen2vl(model: LyraForConditionalGeneration) -> Qwen2VLForConditionalGeneration:
    reference = Qwen2VLForConditionalGeneration(qwen2vl_config(model.config)).eval()
    reference.load_state_dict(model.backbone.state_dict())
    return reference


def vision_inputs(config, kind: str, grid=(2, 4, 6)):
    """Random patches for one image (t=1) or video (t=grid[0]) and its token ids."""
    t, h, w = (1, *grid[1:]) if kind == "image" else grid
    vision = config.vision
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    pixels = torch.randn(t * h * w, patch_dim)
    n_tokens = t * h * w // vision.spatial_merge_size**2
    pad = config.tokens.image if kind == "image" else config.tokens.video
    ids = torch.cat([
        torch.randint(0, 900, (5,)),
        torch.tensor([config.tokens.vision_start] + [pad] * n_tokens + [config.tokens.vision_end]),
        torch.randint(0, 900, (7,)),
    ])[None]
    types = torch.zeros_like(ids, dtype=torch.int)
    types[ids == pad] = 1 if kind == "image" else 2
    if kind == "image":
        extra = {"pixel_values": pixels, "image_grid_thw": torch.tensor([[t, h, w]])}
    else:
        extra = {"pixel_values_videos": pixels, "video_grid_thw": torch.tensor([[t, h, w]])}
    return ids, dict(extra, mm_token_type_ids=types)


@pytest.mark.parametrize("kind", ["text", "image", "video"])
def test_logits_equal_plain_qwen2vl(tiny_model, kind):
    torch.manual_seed(1)
    reference = plain_qwen2vl(tiny_model)
    if kind == "text":
        ids, extra = torch.randint(0, 1000, (2, 17)), {}
    else:
        ids, extra = vision_inputs(tiny_model.config, kind)
    with torch.no_grad():
        ours = tiny_model(ids, **extra).logits
        theirs = reference(input_ids=ids, **extra).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_speech_is_spliced_at_pad_tokens_with_text_positions(tiny_model):
    """Reference: embeddings built by hand from the encoder and projector, fed to Qwen2-VL."""
    config = tiny_model.config
    speech = torch.from_numpy(tone(3.0))
    ids = torch.cat([
        torch.randint(0, 900, (4,)), torch.full((config.speech_tokens_per_clip,), config.tokens.speech),
        torch.randint(0, 900, (6,)),
    ])[None]
    with torch.no_grad():
        padded = torch.nn.functional.pad(speech, (0, CLIP_SAMPLES - speech.shape[0]))[None]
        frames = tiny_model.speech_encoder.whisper(log_mel(padded, config.speech.encoder.n_mels))
        k = config.speech.projector.frames_per_token
        stacked = frames.reshape(1, frames.shape[1] // k, -1)
        projector = tiny_model.speech_projector
        features = projector.fc2(torch.relu(projector.fc1(stacked)))[0]
        embeds = tiny_model.backbone.get_input_embeddings()(ids).clone()
        embeds[0, 4 : 4 + features.shape[0]] = features
        expected = plain_qwen2vl(tiny_model)(inputs_embeds=embeds).logits
        ours = tiny_model(ids, speech=[speech]).logits
    assert (ours - expected).abs().max().item() <= 1e-5


def test_speech_token_count_95s_is_four_clips(tiny_model):
    tokens, = tiny_model.encode_speech([torch.from_numpy(tone(95.0))])
    assert tokens.shape == (4 * 300, tiny_model.config.text.hidden_size)


def test_long_speech_equals_clipwise_encoding(tiny_model):
    """Batched chunked encoding == each 30 s clip encoded alone, in order."""
    audio = torch.from_numpy(tone(100.0, freq=220.0)) * torch.linspace(0.1, 1.0, 1_600_000)
    with torch.no_grad():
        whole, = tiny_model.encode_speech([audio])
        pieces = [tiny_model.encode_speech([audio[i : i + CLIP_SAMPLES]])[0] for i in range(0, audio.shape[0], CLIP_SAMPLES)]
    assert torch.allclose(whole, torch.cat(pieces), atol=1e-5)


def test_audio_count_mismatch_is_an_error(tiny_model):
    ids = torch.full((1, 10), tiny_model.config.tokens.speech)
    with pytest.raises(ValueError, match="300 feature tokens but input_ids hold 10"):
        tiny_model(ids, speech=[torch.from_numpy(tone(1.0))])
    with pytest.raises(ValueError, match="no speech audio"):
        tiny_model(ids)


def test_generate_matches_greedy_recomputation(tiny_model):
    config = tiny_model.config
    speech = torch.from_numpy(tone(2.0))
    ids = torch.cat([torch.randint(0, 900, (3,)), torch.full((300,), config.tokens.speech), torch.randint(0, 900, (4,))])[None]
    new = tiny_model.generate(ids, speech=[speech], max_new_tokens=6, do_sample=False)
    sequence = ids
    with torch.no_grad():
        for _ in range(6):
            logits = tiny_model(sequence, speech=[speech]).logits[:, -1]
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
            if sequence[0, -1] == config.tokens.eos:
                break
    assert new.tolist() == sequence[:, ids.shape[1]:].tolist()


def test_batched_left_padded_generation_matches_single(tiny_model, tiny_tokenizer):
    from lyra.processing import LyraProcessor

    processor = LyraProcessor(tiny_tokenizer, tiny_model.config)
    short = processor([{"role": "user", "content": "<speech> hi"}], speech=[tone(1.0)])
    long = processor([{"role": "user", "content": "a longer question about <speech> and more words"}], speech=[tone(31.0)])
    batch = collate([short, long], tiny_model.config.tokens.pad, padding_side="left")
    together = tiny_model.generate(**batch, max_new_tokens=4, do_sample=False)
    for row, sample in enumerate([short, long]):
        alone = tiny_model.generate(**collate([sample], tiny_model.config.tokens.pad), max_new_tokens=4, do_sample=False)
        assert together[row, : alone.shape[1]].tolist() == alone[0].tolist()


def test_loss_ignores_masked_labels(tiny_model):
    ids = torch.randint(0, 1000, (1, 12))
    labels = ids.clone()
    labels[:, :6] = -100
    out = tiny_model(ids, labels=labels)
    logits = out.logits[0, 5:-1]
    expected = torch.nn.functional.cross_entropy(logits, ids[0, 6:])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    out.loss.backward()
    assert tiny_model.speech_projector.fc1.weight.grad is None  # no speech in this batch
    assert tiny_model.backbone.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("tied", [False, True])
def test_save_and_load_round_trip(tmp_path, tied):
    config = load_config("tiny", overrides={"text.tie_word_embeddings": tied})
    torch.manual_seed(0)
    model = LyraForConditionalGeneration.from_config(config).eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".ckpt*")), "staging directory left behind"
    loaded = LyraForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    if tied:
        assert loaded.backbone.lm_head.weight is loaded.backbone.get_input_embeddings().weight
    ids = torch.randint(0, 1000, (1, 9))
    speech = [torch.from_numpy(tone(2.0))]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        assert torch.equal(model.encode_speech(speech)[0], loaded.encode_speech(speech)[0])
    model.save_pretrained(tmp_path / "ckpt")  # overwriting an existing checkpoint works too
    assert LyraForConditionalGeneration.from_pretrained(tmp_path / "ckpt") is not None


def test_checkpoint_with_missing_keys_is_rejected(tmp_path, tiny_model):
    from safetensors.torch import load_file, save_file

    tiny_model.save_pretrained(tmp_path / "ckpt")
    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    del state["speech_projector.fc1.weight"]
    save_file(state, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(ValueError, match=r"1 missing keys \['speech_projector.fc1.weight'\]"):
        LyraForConditionalGeneration.from_pretrained(tmp_path / "ckpt")


def test_checkpoint_of_another_model_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="not a Lyra checkpoint config"):
        LyraForConditionalGeneration.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        LyraForConditionalGeneration.from_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="has no config.json"):
        LyraForConditionalGeneration.from_pretrained(tmp_path)


def test_from_qwen2vl_and_whisper_checkpoints(tmp_path, tiny_config):
    """Build from a local Qwen2-VL directory and an openai-whisper .pt: weights carried over."""
    from whisper.model import ModelDimensions, Whisper

    torch.manual_seed(0)
    qwen = Qwen2VLForConditionalGeneration(qwen2vl_config(tiny_config))
    qwen.save_pretrained(tmp_path / "qwen")
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=1, n_audio_layer=2,
                           n_vocab=100, n_text_ctx=8, n_text_state=64, n_text_head=1, n_text_layer=1)
    whisper = Whisper(dims)
    torch.save({"dims": vars(dims), "model_state_dict": whisper.state_dict()}, tmp_path / "whisper.pt")
    model = LyraForConditionalGeneration.from_qwen2vl(tmp_path / "qwen", tmp_path / "whisper.pt", base_config=tiny_config)
    assert model.config.speech.encoder.n_audio_layer == 2
    assert torch.equal(model.speech_encoder.whisper.blocks[1].mlp[0].weight, whisper.encoder.blocks[1].mlp[0].weight)
    assert torch.equal(model.backbone.model.language_model.layers[1].mlp.up_proj.weight,
                       qwen.model.language_model.layers[1].mlp.up_proj.weight)
    with pytest.raises(FileNotFoundError, match="not a Qwen2-VL checkpoint"):
        LyraForConditionalGeneration.from_qwen2vl(tmp_path, tmp_path / "whisper.pt")


def test_hf_whisper_directory_maps_onto_openai_names(tmp_path):
    """An HF whisper directory loads into our encoder with outputs equal to HF's encoder."""
    from transformers import WhisperConfig, WhisperModel

    from lyra.config import AudioEncoderConfig
    from lyra.model.speech import WhisperEncoder

    hf_config = WhisperConfig(num_mel_bins=80, d_model=64, encoder_layers=2, encoder_attention_heads=1,
                              decoder_layers=1, decoder_attention_heads=1, encoder_ffn_dim=256,
                              decoder_ffn_dim=256, max_source_positions=1500)
    torch.manual_seed(0)
    hf = WhisperModel(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = WhisperEncoder(AudioEncoderConfig(n_mels=80, n_audio_state=64, n_audio_head=1, n_audio_layer=2)).eval()
    ours.load_checkpoint(tmp_path / "hf")
    mel = torch.randn(1, 80, 3000)
    with torch.no_grad():
        assert torch.allclose(ours(mel), hf.encoder(mel).last_hidden_state, atol=1e-5)


def test_whisper_encoder_equals_openai_whisper():
    """Our encoder has openai-whisper's parameter names (a strict load both ways) and its outputs."""
    from whisper.model import AudioEncoder

    from lyra.model.whisper_encoder import WhisperAudioEncoder

    torch.manual_seed(0)
    reference = AudioEncoder(80, 1500, 64, 4, 2).eval()
    ours = WhisperAudioEncoder(80, 1500, 64, 4, 2).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    reference.load_state_dict(ours.state_dict(), strict=True)
    mel = torch.randn(2, 80, 3000)
    with torch.no_grad():
        assert torch.allclose(ours(mel), reference(mel), atol=1e-5)
    with pytest.raises(ValueError, match="takes 3000 frames"):
        ours(mel[..., :2000])


def test_sound_uses_its_own_projector_and_placeholder(tiny_model):
    config = tiny_model.config
    sound, speech = torch.from_numpy(tone(4.0, freq=900.0)), torch.from_numpy(tone(2.0))
    n = config.speech_tokens_per_clip
    ids = torch.cat([torch.full((n,), config.tokens.sound), torch.randint(0, 900, (3,)),
                     torch.full((n,), config.tokens.speech)])[None]
    with torch.no_grad():
        embeds, _ = tiny_model.embed_inputs(ids, speech=[speech], sound=[sound])
        frames = tiny_model.speech_encoder(log_mel(torch.nn.functional.pad(sound, (0, CLIP_SAMPLES - sound.shape[0]))[None], 80))
        expected_sound = tiny_model.sound_projector(frames)[0]
    assert torch.allclose(embeds[0, :n], expected_sound, atol=1e-6)
    assert torch.allclose(embeds[0, -n:], tiny_model.encode_speech([speech])[0], atol=1e-6)
    assert not torch.allclose(tiny_model.speech_projector(frames)[0], expected_sound)


def test_frozen_encoder_cache_reuses_outputs(tiny_config):
    config = load_config("tiny", overrides={"speech.frozen_encoder_cache_mib": 16})
    torch.manual_seed(0)
    model = LyraForConditionalGeneration.from_config(config).eval()
    model.speech_encoder.requires_grad_(False)
    speech = torch.from_numpy(tone(3.0))
    first, = model.encode_speech([speech])
    calls = []
    model.speech_encoder.register_forward_hook(lambda *args: calls.append(1))
    again, = model.encode_speech([speech.clone()])
    assert calls == [] and torch.equal(first, again)
    frames, = model.audio_frames("speech", [speech])  # what a server's encoder thread asks: the same entries
    assert calls == [] and torch.equal(model.encode_speech([speech], frames=[frames])[0], first)
    model.encode_speech([speech * 0.5])
    assert calls == [1]
    model.speech_encoder.requires_grad_(True)  # a trainable encoder is never cached
    model.encode_speech([speech])
    assert calls == [1, 1]


def test_frame_cache_is_used_without_grad_and_skipped_when_the_encoder_trains(tiny_model):
    from lyra.model.speech import FrameCache

    audio = torch.from_numpy(tone(2.0))
    tiny_model.frame_cache = FrameCache(64)
    assert all(p.requires_grad for p in tiny_model.speech_encoder.parameters())
    with torch.enable_grad():  # a trainable encoder: its outputs must carry gradients, never cached
        trained, = tiny_model.encode_speech([audio])
    assert len(tiny_model.frame_cache.entries) == 0 and trained.requires_grad
    with torch.no_grad():  # evaluation and inference: encoded once, then reused
        first, = tiny_model.encode_speech([audio])
        again, = tiny_model.encode_speech([audio])
    assert len(tiny_model.frame_cache.entries) == 1
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    torch.testing.assert_close(first, trained.detach(), rtol=1e-5, atol=1e-6)


def test_precomputed_encoder_frames_give_the_same_embeddings(tiny_model):
    """`audio_frames` run ahead (as the server's encoder thread does) and handed to
    `embed_inputs` give exactly the embeddings of encoding inside it, with the encoder not run
    again; waveforms over `max_clips` get None and are encoded inside."""
    config = tiny_model.config
    long_speech, short_speech = torch.from_numpy(tone(95.0)), torch.from_numpy(tone(2.0, freq=600.0))
    sound = torch.from_numpy(tone(4.0, freq=900.0))
    n = config.speech_tokens_per_clip
    ids = torch.cat([torch.full((4 * n,), config.tokens.speech), torch.full((n,), config.tokens.sound),
                     torch.randint(0, 900, (3,)), torch.full((n,), config.tokens.speech)])[None]
    calls = []
    hook = tiny_model.speech_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            expected, _ = tiny_model.embed_inputs(ids, speech=[long_speech, short_speech], sound=[sound])
            speech_frames = tiny_model.audio_frames("speech", [long_speech, short_speech], max_clips=1)
            sound_frames = tiny_model.audio_frames("sound", [sound])
            assert speech_frames[0] is None and speech_frames[1].shape[0] == 1 and sound_frames[0].shape[0] == 1
            calls.clear()
            embeds, _ = tiny_model.embed_inputs(ids, speech=[long_speech, short_speech], sound=[sound],
                                                speech_frames=speech_frames, sound_frames=sound_frames)
            assert torch.equal(embeds, expected)
            assert len(calls) == 1  # the long input's one batch of 4 clips; nothing else ran again
            with pytest.raises(ValueError, match="cover 1 clips, but the waveform of 1520000 samples takes 4"):
                tiny_model.embed_inputs(ids, speech=[long_speech, short_speech], sound=[sound],
                                        speech_frames=[speech_frames[1], None])
            with pytest.raises(ValueError, match="1 precomputed encoder outputs for 2 waveforms"):
                tiny_model.embed_inputs(ids, speech=[long_speech, short_speech], speech_frames=[None])
    finally:
        hook.remove()
