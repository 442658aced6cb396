"""Unit HiFi-GAN vocoder: real hyper-parameters, fairseq weights, streaming chunks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lyra.model.hifigan import (
    CodeHiFiGAN,
    StreamingVocoder,
    VocoderConfig,
    load_code_hifigan,
)

# config.json of fairseq's mhubert_vp_en_es_fr_it3_400k_layer11_km1000_lj vocoder
# (dl.fbaipublicfiles.com/fairseq/speech_to_speech/vocoder/code_hifigan/...): the
# speech-resynthesis `hubert100_dw1.0.json` recipe with 1,000 units.
MHUBERT_LJ_CONFIG = {
    "resblock": "1",
    "num_gpus": 0,
    "batch_size": 16,
    "learning_rate": 0.0002,
    "adam_b1": 0.8,
    "adam_b2": 0.99,
    "lr_decay": 0.999,
    "seed": 1234,
    "upsample_rates": [5, 4, 4, 2, 2],
    "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 512,
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "num_embeddings": 1000,
    "embedding_dim": 128,
    "model_in_dim": 128,
    "segment_size": 8960,
    "code_hop_size": 320,
    "f0": False,
    "num_mels": 80,
    "num_freq": 1025,
    "n_fft": 1024,
    "hop_size": 256,
    "win_size": 1024,
    "dur_prediction_weight": 1.0,
    "dur_predictor_params": {
        "encoder_embed_dim": 128,
        "var_pred_hidden_dim": 128,
        "var_pred_kernel_size": 3,
        "var_pred_dropout": 0.5,
    },
    "sampling_rate": 16000,
    "fmin": 0,
    "fmax": 8000,
    "fmax_for_loss": None,
    "num_workers": 4,
    "dist_config": {"dist_backend": "nccl", "dist_url": "env://"},
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; oversubscription is slower
    yield
    torch.set_num_threads(threads)


def fairseq_generator_state(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the names of fairseq's CodeGenerator state dict, listed
    from its code: weight-normed (g, v) convs conv_pre, ups.i, resblocks.i.convs{1,2}.j,
    conv_post; plain dict (Embedding) and dur_predictor (VariancePredictor)."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def wn(stem, weight_shape, transposed=False):
        out = weight_shape[0]  # weight_norm(dim=0): one magnitude per first-axis slice
        state[f"{stem}.weight_g"] = 0.3 + 0.4 * torch.rand(out, 1, 1, generator=g)
        state[f"{stem}.weight_v"] = torch.randn(*weight_shape, generator=g)
        state[f"{stem}.bias"] = 0.01 * torch.randn(weight_shape[1] if transposed else weight_shape[0], generator=g)

    ch = cfg["upsample_initial_channel"]
    state["dict.weight"] = torch.randn(cfg["num_embeddings"], cfg["embedding_dim"], generator=g)
    wn("conv_pre", (ch, cfg["model_in_dim"], 7))
    for i, (u, k) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])):
        wn(f"ups.{i}", (ch // 2**i, ch // 2 ** (i + 1), k), transposed=True)
    for i in range(len(cfg["upsample_rates"])):
        c = ch // 2 ** (i + 1)
        for j, (rk, rd) in enumerate(zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"])):
            for m in range(len(rd)):
                wn(f"resblocks.{i * 3 + j}.convs1.{m}", (c, c, rk))
                wn(f"resblocks.{i * 3 + j}.convs2.{m}", (c, c, rk))
    wn("conv_post", (1, ch // 2 ** len(cfg["upsample_rates"]), 7))
    d = cfg["dur_predictor_params"]
    h, k = d["var_pred_hidden_dim"], d["var_pred_kernel_size"]
    state["dur_predictor.conv1.0.weight"] = 0.1 * torch.randn(h, d["encoder_embed_dim"], k, generator=g)
    state["dur_predictor.conv1.0.bias"] = 0.1 * torch.randn(h, generator=g)
    state["dur_predictor.ln1.weight"], state["dur_predictor.ln1.bias"] = torch.ones(h), torch.zeros(h)
    state["dur_predictor.conv2.0.weight"] = 0.1 * torch.randn(h, h, k, generator=g)
    state["dur_predictor.conv2.0.bias"] = 0.1 * torch.randn(h, generator=g)
    state["dur_predictor.ln2.weight"], state["dur_predictor.ln2.bias"] = torch.ones(h), torch.zeros(h)
    state["dur_predictor.proj.weight"] = 0.02 * torch.randn(1, h, generator=g)
    state["dur_predictor.proj.bias"] = torch.tensor([1.0])  # ~1-2 frames per unit
    return state


def reference_vocoder(state: dict, cfg: dict, units: list[int], dur_prediction: bool) -> torch.Tensor:
    """fairseq's CodeGenerator.forward (codehifigan.py + hifigan.py), written out on the
    fairseq-named weights; weight norm applied as torch.nn.utils.weight_norm does."""

    def w(stem):
        return torch._weight_norm(state[f"{stem}.weight_v"], state[f"{stem}.weight_g"], 0)

    x = state["dict.weight"][torch.tensor(units)].T[None]  # (1, C, T)
    if dur_prediction:
        h = F.relu(F.conv1d(x, state["dur_predictor.conv1.0.weight"], state["dur_predictor.conv1.0.bias"], padding=1))
        h = F.layer_norm(h.transpose(1, 2), (h.shape[1],), state["dur_predictor.ln1.weight"], state["dur_predictor.ln1.bias"])
        h = F.relu(F.conv1d(h.transpose(1, 2), state["dur_predictor.conv2.0.weight"], state["dur_predictor.conv2.0.bias"], padding=1))
        h = F.layer_norm(h.transpose(1, 2), (h.shape[1],), state["dur_predictor.ln2.weight"], state["dur_predictor.ln2.bias"])
        log_dur = F.linear(h, state["dur_predictor.proj.weight"], state["dur_predictor.proj.bias"])[0, :, 0]
        x = torch.repeat_interleave(x, torch.clamp(torch.round(torch.exp(log_dur) - 1).long(), min=1), dim=2)
    x = F.conv1d(x, w("conv_pre"), state["conv_pre.bias"], padding=3)
    n = len(cfg["resblock_kernel_sizes"])
    for i, (u, k) in enumerate(zip(cfg["upsample_rates"], cfg["upsample_kernel_sizes"])):
        x = F.conv_transpose1d(F.leaky_relu(x, 0.1), w(f"ups.{i}"), state[f"ups.{i}.bias"], stride=u, padding=(k - u) // 2)
        total = 0
        for j, (rk, rd) in enumerate(zip(cfg["resblock_kernel_sizes"], cfg["resblock_dilation_sizes"])):
            y, stem = x, f"resblocks.{i * n + j}"
            for m, d in enumerate(rd):
                t = F.conv1d(F.leaky_relu(y, 0.1), w(f"{stem}.convs1.{m}"), state[f"{stem}.convs1.{m}.bias"],
                             dilation=d, padding=(rk * d - d) // 2)
                t = F.conv1d(F.leaky_relu(t, 0.1), w(f"{stem}.convs2.{m}"), state[f"{stem}.convs2.{m}.bias"],
                             padding=(rk - 1) // 2)
                y = y + t
            total = total + y
        x = total / n
    x = F.conv1d(F.leaky_relu(x), w("conv_post"), state["conv_post.bias"], padding=3)
    return torch.tanh(x)[0, 0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A g_00500000-style file ({'generator': fairseq state}) and its config.json."""
    root = tmp_path_factory.mktemp("vocoder")
    state = fairseq_generator_state(MHUBERT_LJ_CONFIG)
    torch.save({"generator": state}, root / "g_00500000")
    (root / "config.json").write_text(json.dumps(MHUBERT_LJ_CONFIG))
    return root, state


@pytest.fixture(scope="module")
def vocoder(checkpoint):
    root, _ = checkpoint
    return load_code_hifigan(root / "g_00500000", root / "config.json")


def test_real_config_gives_16k_audio_of_units_times_hop(vocoder):
    assert vocoder.config == VocoderConfig.from_dict(MHUBERT_LJ_CONFIG)
    assert vocoder.sample_rate == 16000 and vocoder.hop_length == 320  # 5*4*4*2*2 samples per 20 ms frame
    assert sum(p.numel() for p in vocoder.parameters()) == pytest.approx(13.49e6, rel=0.01)
    units = torch.randint(0, 1000, (37,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert vocoder(units).shape == (37 * 320,)
        durations = vocoder.durations(units)
        assert durations.min() >= 1 and durations.max() > 1
        assert vocoder(units, dur_prediction=True).shape == (int(durations.sum()) * 320,)
    with pytest.raises(ValueError, match="outside"):
        vocoder([1000])


def test_fairseq_checkpoint_loads_exactly_and_reproduces_fairseq_forward(checkpoint, vocoder):
    root, state = checkpoint
    assert vocoder.weight_norm_folded
    unfolded = load_code_hifigan(root / "g_00500000", root / "config.json", fold_weight_norm=False)
    assert set(unfolded.fairseq_state_dict()) == set(state)  # exactly fairseq's key set
    for key, value in unfolded.fairseq_state_dict().items():
        assert torch.equal(value, state[key]), key  # values copied as stored
    units = torch.randint(0, 1000, (20,), generator=torch.Generator().manual_seed(3)).tolist()
    for dur in (False, True):
        expected = reference_vocoder(state, MHUBERT_LJ_CONFIG, units, dur)
        with torch.no_grad():
            got, got_unfolded = vocoder(units, dur_prediction=dur), unfolded(units, dur_prediction=dur)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(got_unfolded, expected, atol=1e-5, rtol=1e-4)
    # round trip: our fairseq-named export loads back into a fresh model
    again = CodeHiFiGAN(VocoderConfig.from_dict(MHUBERT_LJ_CONFIG))
    again.load_fairseq_state_dict(unfolded.fairseq_state_dict())
    again.remove_weight_norm().eval()
    with torch.no_grad():
        torch.testing.assert_close(again(units), vocoder(units), atol=1e-6, rtol=1e-5)


def test_wrong_keys_fail_with_names_and_file(checkpoint, tmp_path):
    root, state = checkpoint
    bad = dict(state)
    bad["resblocks.0.convs1.0.weight_gg"] = bad.pop("resblocks.0.convs1.0.weight_g")
    del bad["dur_predictor.proj.bias"]
    path = tmp_path / "g_bad"
    torch.save({"generator": bad}, path)
    with pytest.raises(ValueError) as error:
        load_code_hifigan(path, root / "config.json")
    message = str(error.value)
    assert str(path) in message and "dur_predictor.proj.bias" in message and "resblocks.0.convs1.0" in message
    torch.save({"discriminator": {}}, path)
    with pytest.raises(ValueError, match="no 'generator'"):
        load_code_hifigan(path, root / "config.json")
    small = dict(MHUBERT_LJ_CONFIG, upsample_initial_channel=256)
    with pytest.raises(ValueError, match="other shapes"):
        load_code_hifigan(root / "g_00500000", small)


def test_streaming_chunks_equal_one_shot_audio(vocoder):
    """Chunked vocoding vs one-shot synthesis of the same units.

    With the default context/look-ahead (the receptive-field bound, 23 units) the
    chunks concatenate to the one-shot audio up to float rounding, durations included.
    Without look-ahead (and without duration prediction, so lengths agree) the audio
    differs only in the frames just before a chunk border, whose right context was
    still unknown; everything after the border (left context given) is exact.
    """
    gen = torch.Generator().manual_seed(5)
    units = torch.randint(0, 1000, (48,), generator=gen).tolist()
    assert vocoder.receptive_field_units(True) == 23
    with torch.no_grad():
        full = vocoder(units, dur_prediction=True).numpy()
    stream = StreamingVocoder(vocoder, dur_prediction=True)
    out = np.concatenate([stream.push(units[i:i + 16]) for i in range(0, 48, 16)] + [stream.flush()])
    assert out.shape == full.shape
    assert np.abs(out - full).max() < 1e-5

    units = torch.randint(0, 1000, (80,), generator=gen).tolist()
    with torch.no_grad():
        full = vocoder(units).numpy()
    stream = StreamingVocoder(vocoder, dur_prediction=False, lookahead_units=0)
    parts = [stream.push(units[:40]), stream.push(units[40:])]
    assert [len(p) for p in parts] == [40 * 320] * 2  # all audio out at once, nothing held back
    diff = np.abs(np.concatenate(parts) - full)
    hop, field, border = 320, vocoder.receptive_field_frames(), 40
    assert diff[: (border - field) * hop].max() < 1e-5  # exact far before the border
    assert diff[border * hop:].max() < 1e-5  # exact after it
    assert diff.max() > 1e-4  # the error that the look-ahead removes
    frames = np.flatnonzero(diff > 1e-6) / hop - border
    print(f"\nlook-ahead 0: max |diff| {diff.max():.2e} ({diff.max() / np.abs(full).max():.1%} of the peak) "
          f"at {diff.argmax() / hop - border:+.2f} frames from the border; samples differ (>1e-6) "
          f"from {frames.min():+.2f} to {frames.max():+.2f} frames")
