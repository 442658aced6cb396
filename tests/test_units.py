"""Speech units: k-means, unit strings, fairseq HuBERT conversion, prepare_units CLI."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

from lyra.data.units import (
    HubertUnitExtractor,
    KMeansQuantizer,
    convert_fairseq_hubert_state,
    dedup_units,
    fit_kmeans,
    format_units,
    hubert_config_from_fairseq,
    hubert_from_fairseq,
    kmeans_inertia,
    load_fairseq_checkpoint,
    parse_units,
)

from conftest import load_script


# A tiny fairseq HuBERT (cfg["model"] of a fairseq checkpoint, mHuBERT's key names).
FAIRSEQ_CFG = {
    "_name": "hubert",
    "extractor_mode": "default",
    "conv_feature_layers": "[(16,10,5)] + [(16,3,2)] * 2",
    "conv_bias": False,
    "encoder_layers": 3,
    "encoder_embed_dim": 32,
    "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 2,
    "activation_fn": "gelu",
    "conv_pos": 16,
    "conv_pos_groups": 4,
    "layer_norm_first": False,
    "final_dim": 8,
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine's cores are shared; oversubscription is slower
    yield
    torch.set_num_threads(threads)


def fairseq_hubert_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under fairseq's HubertModel names (fairseq/models/hubert/hubert.py,
    wav2vec2's ConvFeatureExtractionModel and TransformerEncoder)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    state = {}
    dims = [16, 16, 16]
    kernels = [10, 3, 3]
    in_dim = 1
    for i, (dim, k) in enumerate(zip(dims, kernels)):
        state[f"feature_extractor.conv_layers.{i}.0.weight"] = rnd(dim, in_dim, k, scale=0.3)
        in_dim = dim
    state["feature_extractor.conv_layers.0.2.weight"] = rnd(16, offset=1.0)  # Fp32GroupNorm
    state["feature_extractor.conv_layers.0.2.bias"] = rnd(16)
    state["layer_norm.weight"], state["layer_norm.bias"] = rnd(16, offset=1.0), rnd(16)
    state["post_extract_proj.weight"], state["post_extract_proj.bias"] = rnd(32, 16), rnd(32)
    state["mask_emb"] = rnd(32)
    state["encoder.pos_conv.0.weight_g"] = rnd(1, 1, 16, offset=1.0).abs()  # weight_norm(dim=2)
    state["encoder.pos_conv.0.weight_v"] = rnd(32, 8, 16)
    state["encoder.pos_conv.0.bias"] = rnd(32)
    state["encoder.layer_norm.weight"], state["encoder.layer_norm.bias"] = rnd(32, offset=1.0), rnd(32)
    for i in range(3):
        p = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[p + f"self_attn.{proj}.weight"], state[p + f"self_attn.{proj}.bias"] = rnd(32, 32), rnd(32)
        state[p + "self_attn_layer_norm.weight"], state[p + "self_attn_layer_norm.bias"] = rnd(32, offset=1.0), rnd(32)
        state[p + "fc1.weight"], state[p + "fc1.bias"] = rnd(64, 32), rnd(64)
        state[p + "fc2.weight"], state[p + "fc2.bias"] = rnd(32, 64), rnd(32)
        state[p + "final_layer_norm.weight"], state[p + "final_layer_norm.bias"] = rnd(32, offset=1.0), rnd(32)
    state["final_proj.weight"], state["final_proj.bias"] = rnd(8, 32), rnd(8)  # pre-training head
    state["label_embs_concat"] = rnd(504, 8)
    return state


def fairseq_reference_features(state: dict[str, torch.Tensor], wav: torch.Tensor, layer: int) -> torch.Tensor:
    """fairseq HubertModel.extract_features(output_layer=layer), written out functionally
    on the fairseq-named weights (post-LN encoder, group-norm conv extractor)."""
    x = wav.view(1, 1, -1)
    for i, stride in enumerate((5, 2, 2)):
        x = F.conv1d(x, state[f"feature_extractor.conv_layers.{i}.0.weight"], stride=stride)
        if i == 0:
            x = F.group_norm(x, 16, state["feature_extractor.conv_layers.0.2.weight"],
                             state["feature_extractor.conv_layers.0.2.bias"])
        x = F.gelu(x)
    x = x.transpose(1, 2)
    x = F.layer_norm(x, (16,), state["layer_norm.weight"], state["layer_norm.bias"])
    x = F.linear(x, state["post_extract_proj.weight"], state["post_extract_proj.bias"])
    weight = torch._weight_norm(state["encoder.pos_conv.0.weight_v"], state["encoder.pos_conv.0.weight_g"], 2)
    pos = F.conv1d(x.transpose(1, 2), weight, state["encoder.pos_conv.0.bias"], padding=8, groups=4)[..., :-1]
    x = x + F.gelu(pos).transpose(1, 2)
    x = F.layer_norm(x, (32,), state["encoder.layer_norm.weight"], state["encoder.layer_norm.bias"])
    heads, head_dim = 2, 16
    for i in range(layer):
        p = f"encoder.layers.{i}."

        def proj(name, t, p=p):
            return F.linear(t, state[p + f"self_attn.{name}.weight"], state[p + f"self_attn.{name}.bias"])

        split = lambda t: t.view(1, -1, heads, head_dim).transpose(1, 2)
        q, k, v = split(proj("q_proj", x) * head_dim**-0.5), split(proj("k_proj", x)), split(proj("v_proj", x))
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        x = x + proj("out_proj", attn.transpose(1, 2).reshape(1, -1, 32))
        x = F.layer_norm(x, (32,), state[p + "self_attn_layer_norm.weight"], state[p + "self_attn_layer_norm.bias"])
        h = F.linear(F.gelu(F.linear(x, state[p + "fc1.weight"], state[p + "fc1.bias"])),
                     state[p + "fc2.weight"], state[p + "fc2.bias"])
        x = F.layer_norm(x + h, (32,), state[p + "final_layer_norm.weight"], state[p + "final_layer_norm.bias"])
    return x[0]


@pytest.fixture(scope="module")
def tiny_hubert():
    from transformers import HubertModel

    config = hubert_config_from_fairseq(FAIRSEQ_CFG)
    model = HubertModel(config)
    state = fairseq_hubert_state()
    model.load_state_dict(convert_fairseq_hubert_state(state, config))
    return model.eval(), state


def test_unit_strings_round_trip():
    units = dedup_units([12, 12, 7, 7, 7, 981, 12, 12])
    assert units == [12, 7, 981, 12]
    assert format_units(units) == "<12><7><981><12>"
    assert parse_units("<12><7><981><12>") == units
    assert parse_units("") == []


def test_quantizer_is_nearest_centroid():
    torch.manual_seed(0)
    centroids, feats = torch.randn(50, 16), torch.randn(300, 16) * 2
    got = KMeansQuantizer(centroids.numpy())(feats)
    assert torch.equal(got, torch.cdist(feats, centroids).argmin(dim=1))
    with pytest.raises(ValueError, match="dimension"):
        KMeansQuantizer(centroids)(torch.randn(3, 8))


def test_kmeans_npy_only(tmp_path):
    path = tmp_path / "km.bin"
    path.write_bytes(b"\x80\x04not a numpy file")
    with pytest.raises(ValueError, match="cluster_centers_"):
        KMeansQuantizer.from_file(path)


def test_fit_kmeans_recovers_separated_clusters():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(6, 8)) * 10
    feats = (means[rng.integers(0, 6, size=3000)] + rng.normal(size=(3000, 8)) * 0.3).astype(np.float32)
    centroids = fit_kmeans(feats, 6, iterations=60, batch_size=500, seed=0)
    assert centroids.shape == (6, 8)
    nearest = np.linalg.norm(means[:, None] - centroids[None], axis=-1).min(axis=1)
    assert nearest.max() < 0.1, nearest  # every true mean has a centroid on it
    assert kmeans_inertia(feats, centroids) == pytest.approx(8 * 0.3**2, rel=0.1)


def test_fairseq_hubert_conversion_matches_reference_forward(tiny_hubert):
    model, state = tiny_hubert
    wav = torch.randn(8000, generator=torch.Generator().manual_seed(1)) * 0.1
    with torch.no_grad():
        hidden = model(wav[None], output_hidden_states=True).hidden_states
    for layer in (1, 2, 3):
        expected = fairseq_reference_features(state, wav, layer)
        torch.testing.assert_close(hidden[layer][0], expected, atol=2e-5, rtol=1e-4)


def test_fairseq_conversion_names_bad_keys():
    config = hubert_config_from_fairseq(FAIRSEQ_CFG)
    state = fairseq_hubert_state()
    state["encoder.layers.0.self_attn.qq_proj.weight"] = state.pop("encoder.layers.0.self_attn.q_proj.weight")
    with pytest.raises(ValueError, match=r"qq_proj.*missing.*encoder\.layers\.0\.attention\.q_proj\.weight"):
        convert_fairseq_hubert_state(state, config, source="bad.pt")


class _Meter:  # stands for fairseq objects (meters, namespaces) in a checkpoint
    def __init__(self):
        self.value = 3


def _touch(path):
    Path(path).touch()


class _Sneaky:  # unpickling it would call _touch(path)
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (_touch, (self.path,))


class _Evil:  # unpickling it would call os.makedirs(path)
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def test_fairseq_checkpoint_loads_without_running_pickled_code(tmp_path, tiny_hubert):
    import argparse

    model, state = tiny_hubert
    target = tmp_path / "pwned"
    path = tmp_path / "mhubert_tiny.pt"
    torch.save({
        "args": argparse.Namespace(**FAIRSEQ_CFG),
        "cfg": {"model": dict(FAIRSEQ_CFG), "task": {"sample_rate": 16000, "normalize": False}},
        "model": state,
        "extra_state": {"meters": _Meter(), "hook": _Sneaky(str(target))},
    }, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # plain safe loading refuses these objects
    checkpoint = load_fairseq_checkpoint(path)
    assert not target.exists()  # _touch was never called: it became an inert stub
    assert checkpoint["args"].encoder_layers == 3 and checkpoint["extra_state"]["meters"].value == 3
    loaded = hubert_from_fairseq(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    torch.save({"model": state, "hook": _Evil(str(target))}, path)
    with pytest.raises(ValueError, match="refused.*os.makedirs"):
        load_fairseq_checkpoint(path)
    assert not target.exists()


def test_extractor_units_are_nearest_centroids_of_layer(tmp_path, tiny_hubert):
    model, _ = tiny_hubert
    model.save_pretrained(tmp_path / "hubert")
    centroids = np.random.default_rng(0).normal(size=(20, 32)).astype(np.float32)
    np.save(tmp_path / "km.npy", centroids)
    extractor = HubertUnitExtractor(tmp_path / "hubert", tmp_path / "km.npy", layer=2)
    assert len(extractor.model.encoder.layers) == 2  # layers after the chosen one are dropped
    wav = np.random.default_rng(1).normal(size=16000).astype(np.float32) * 0.1
    with torch.no_grad():
        expected = model(torch.from_numpy(wav)[None], output_hidden_states=True).hidden_states[2][0]
    feats = extractor.features(wav)
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    assert feats.shape[0] == 16000 // 20 - 1  # 20x conv downsampling, valid convolutions
    raw = extractor.units(wav, dedup=False)
    assert raw == torch.cdist(expected, torch.from_numpy(centroids)).argmin(dim=1).tolist()
    assert extractor.units(wav) == dedup_units(raw)
    # chunked encoding (fairseq's max_chunk) concatenates per-chunk features
    chunked = HubertUnitExtractor(model, centroids, layer=2, max_chunk=8000)
    assert chunked.features(wav).shape[0] == 2 * (8000 // 20 - 1)


def test_prepare_units_cli_is_resumable(tmp_path, tiny_hubert, capsys, monkeypatch):
    prepare_units = load_script("prepare_units")

    model, _ = tiny_hubert
    model.save_pretrained(tmp_path / "hubert")
    np.save(tmp_path / "km.npy", np.random.default_rng(0).normal(size=(20, 32)).astype(np.float32))
    rng = np.random.default_rng(2)
    (tmp_path / "audio").mkdir()
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / "audio" / name, (rng.normal(size=12000) * 0.1).astype(np.float32), 16000)
    samples = [
        {"id": "s1", "conversations": [], "answer_speech": "audio/a.wav"},
        {"id": "s2", "conversations": []},  # text only
        {"id": "s3", "conversations": [], "answer_speech": "audio/b.wav"},
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(samples))
    out = tmp_path / "out" / "units.json"
    args = ["--data", str(data), "--root", str(tmp_path), "--hubert", str(tmp_path / "hubert"),
            "--kmeans", str(tmp_path / "km.npy"), "--out", str(out), "--layer", "2"]

    assert prepare_units.main(args) == 0
    result = json.loads(out.read_text())
    assert [s["id"] for s in result] == ["s1", "s2", "s3"] and "tgt_unit" not in result[1]
    extractor = HubertUnitExtractor(tmp_path / "hubert", tmp_path / "km.npy", layer=2)
    from lyra.data.audio import load_audio

    assert parse_units(result[0]["tgt_unit"]) == extractor.units(load_audio(tmp_path / "audio/a.wav"))
    assert "2 encoded, 0 already had units, 1 without 'answer_speech'" in capsys.readouterr().out

    # resume: a second run encodes nothing; a new sample is the only one encoded
    samples.append({"id": "s4", "answer_speech": "audio/b.wav"})
    data.write_text(json.dumps(samples))
    calls = []
    original = HubertUnitExtractor.units
    monkeypatch.setattr(HubertUnitExtractor, "units", lambda self, w, dedup=True: calls.append(1) or original(self, w, dedup))
    assert prepare_units.main(args) == 0
    assert len(calls) == 1
    assert "1 encoded, 2 already had units" in capsys.readouterr().out
    assert json.loads(out.read_text())[3]["tgt_unit"] == result[2]["tgt_unit"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["units.json"]  # no temp files left


def test_prepare_units_cli_writes_piper_phoneme_units(tmp_path, capsys):
    prepare_units = load_script("prepare_units")

    from lyra.model.vocoder import load_vocoder

    samples = [
        {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "three circles"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "red"},
                                      {"from": "human", "value": "q2"}, {"from": "gpt", "value": "four"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "q"}]},
    ]
    data, out = tmp_path / "data.json", tmp_path / "units.json"
    data.write_text(json.dumps(samples))
    assert prepare_units.main(["--data", str(data), "--voice", "piper:en_US-joe-medium", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    voice = load_vocoder("piper:en_US-joe-medium")
    assert parse_units(result[0]["tgt_unit"]) == voice.text_to_units("three circles")
    # every answer of a conversation, in order: the generator reads all their tokens
    assert parse_units(result[1]["tgt_unit"]) == [*voice.text_to_units("red"), voice.word_boundary,
                                                  *voice.text_to_units("four")]
    assert "tgt_unit" not in result[2]
    assert "2 answers as piper:en_US-joe-medium phonemes, 0 kept their tgt_unit, 1 without an answer" in \
        capsys.readouterr().out


def test_fit_kmeans_cli_writes_centroids(tmp_path, tiny_hubert, capsys):
    fit_kmeans = load_script("fit_kmeans")

    model, _ = tiny_hubert
    model.save_pretrained(tmp_path / "hubert")
    rng = np.random.default_rng(3)
    files = []
    for name in ("a.wav", "b.wav"):
        sf.write(tmp_path / name, (rng.normal(size=8000) * 0.1).astype(np.float32), 16000)
        files.append(str(tmp_path / name))
    out = tmp_path / "km" / "km4.npy"
    assert fit_kmeans.main(["--audio", *files, "--hubert", str(tmp_path / "hubert"), "--layer", "2",
                            "--clusters", "4", "--iterations", "5", "--batch-size", "100", "--out", str(out)]) == 0
    centroids = np.load(out)
    assert centroids.shape == (4, 32) and np.isfinite(centroids).all()
    assert "4 centroids of dim 32 from 798 frames" in capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["km4.npy"]
