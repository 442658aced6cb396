"""Real-size presets build on the meta device with the published parameter counts."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lyra.config import load_config
from lyra.model.summary import build_on_meta, component_parameters

# Parameter counts of the released Qwen2-VL checkpoints (ViT + LLM, from their
# safetensors metadata) and of Whisper-large-v3's encoder.
QWEN2VL_PARAMS = {"mini": 2_208_985_600, "base": 8_291_375_616, "pro": 73_405_560_320}
WHISPER_LARGE_V3_ENCODER = 635_048_960
PAPER_TOTAL_BILLIONS = {"mini": 3, "base": 9, "pro": 74}  # Table 2


@pytest.mark.parametrize("preset", ["mini", "base", "pro"])
def test_real_sizes_match_the_released_models(preset):
    counts = component_parameters(build_on_meta(load_config(preset)))
    assert counts["vit"] + counts["llm"] == QWEN2VL_PARAMS[preset]
    assert counts["speech_encoder"] == WHISPER_LARGE_V3_ENCODER
    assert round(counts["total"] / 1e9) == PAPER_TOTAL_BILLIONS[preset]


def test_summary_cli_json_has_total():
    out = subprocess.run(
        [sys.executable, "-m", "lyra.model.summary", "--preset", "tiny", "--json"],
        check=True, capture_output=True, text=True,
    ).stdout
    counts = json.loads(out)
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


def test_summary_cli_rejects_unknown_preset():
    result = subprocess.run([sys.executable, "-m", "lyra.model.summary", "--preset", "huge"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "unknown model preset 'huge'" in result.stderr
