"""Shared fixtures: the tiny random model and its tiny tokenizer."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lyra.config import load_config
from lyra.model.lyra import LyraForConditionalGeneration

REPO_ROOT = Path(__file__).resolve().parents[1]  # the checkout: data/demo, scripts/, configs/train/


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep tests from writing to the user's cache, but share one across the session."""
    import os

    os.environ.setdefault("LYRA_CACHE_DIR", str(tmp_path_factory.mktemp("lyra-cache")))


@pytest.fixture(scope="session")
def tiny_config():
    return load_config("tiny")


@pytest.fixture()
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return LyraForConditionalGeneration.from_config(tiny_config).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lyra.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def pyannote_sample() -> Path:
    """The real 30 s 16 kHz two-speaker call shipped by pyannote.audio (never imported)."""
    spec = importlib.util.find_spec("pyannote.audio")
    if spec is None:
        pytest.fail("pyannote.audio is not installed; run `make setup`")
    return Path(spec.submodule_search_locations[0]) / "sample" / "sample.wav"


def tone(seconds: float, sample_rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


SMALL_VOCODER = {  # a scaled-down code HiFi-GAN (the real one's structure, 320x upsampling)
    "upsample_rates": [5, 4, 4, 2, 2], "upsample_kernel_sizes": [11, 8, 8, 4, 4],
    "upsample_initial_channel": 32, "resblock_kernel_sizes": [3], "resblock_dilation_sizes": [[1, 3]],
    "num_embeddings": 50, "embedding_dim": 16, "model_in_dim": 16,
    "dur_predictor_params": {"encoder_embed_dim": 16, "var_pred_hidden_dim": 16,
                             "var_pred_kernel_size": 3, "var_pred_dropout": 0.5},
}


def load_script(name: str):
    """Import scripts/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"lyra_script_{name}", REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def small_vocoder():
    """The small code HiFi-GAN behind the unit-vocoder interface (speaks 50 hubert units)."""
    from lyra.model.hifigan import CodeHiFiGAN, VocoderConfig
    from lyra.model.vocoder import HiFiGANVocoder

    torch.manual_seed(0)
    return HiFiGANVocoder(CodeHiFiGAN(VocoderConfig.from_dict(SMALL_VOCODER)).eval(), name="small code HiFi-GAN")


def talking(model):
    """Give `model` a random speech generator whose units are not all blanks."""
    model.add_speech_generator()
    with torch.no_grad():
        model.speech_generator.output_proj.bias[-1] = -10.0
    return model
