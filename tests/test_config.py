"""The config system: typed fields, one dotted override syntax, errors that name the key."""

import pydantic
import pytest
from conftest import REPO_ROOT

from lyra.config import ConfigError, LyraConfig, available_presets, load_config, parse_overrides
from lyra.nano.pipeline import PHASE_CONFIGS
from lyra.train.config import TrainConfig, load_train_config
from lyra.train.recipe import run

TINY_STAGE1 = REPO_ROOT / "configs" / "train" / "stage1_tiny.yaml"


def test_presets_ship_with_the_package_and_build():
    assert {"tiny", "nano", "mini", "base", "pro"} <= set(available_presets())
    base = load_config("base")
    assert (base.text.num_hidden_layers, base.text.hidden_size, base.text.vocab_size) == (28, 3584, 152064)


def test_dotted_overrides_set_typed_values():
    config = load_config("tiny", {"lcmr.weight": "0.25", "lmme.keep": 0.7})
    assert config.lcmr.weight == 0.25 and isinstance(config.lcmr.weight, float)
    assert config.lmme.keep == 0.7
    overrides = parse_overrides(["optim.lr=3e-4", "optim.batch_size=4", "trainable.vit=true"])
    assert overrides == {"optim.lr": "3e-4", "optim.batch_size": 4, "trainable.vit": True}
    train = load_train_config(TINY_STAGE1, overrides)
    assert (train.optim.lr, train.optim.batch_size, train.trainable.vit) == (3e-4, 4, True)


def test_a_wrong_type_in_a_preset_override_names_the_key():
    with pytest.raises(ConfigError, match=r"lcmr\.weight: .*got 'half'"):
        load_config("tiny", {"lcmr.weight": "half"})


def test_an_unknown_key_is_refused_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['wieght'\] in 'lcmr'; allowed: .*'weight'"):
        load_config("tiny", {"lcmr.wieght": 0.5})


def test_a_wrong_type_in_a_yaml_file_names_the_file_and_the_key(tmp_path):
    bad = tmp_path / "stage1.yaml"
    bad.write_text(TINY_STAGE1.read_text().replace("lr: 1.0e-3", "lr: fast"))
    with pytest.raises(ConfigError, match=rf"{bad}: optim\.lr: .*got 'fast'"):
        load_train_config(bad)


def test_a_wrong_type_in_a_set_override_names_the_key(capsys):
    assert run(1, ["--config", str(TINY_STAGE1), "--set", "optim.batch_size=two"]) == 2
    error = capsys.readouterr().err
    assert "optim.batch_size" in error and "'two'" in error
    assert run(1, ["--config", str(TINY_STAGE1), "--set", "optim.lr"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err


def test_assignment_is_type_checked():
    config = load_config("tiny")
    with pytest.raises(pydantic.ValidationError):
        config.lcmr.weight = "half"
    with pytest.raises(pydantic.ValidationError):
        config.lcmr.not_a_field = 1


def test_recipe_phase_configs_are_packaged_and_valid():
    for phase, path in PHASE_CONFIGS.items():
        assert isinstance(load_train_config(path), TrainConfig), phase


def test_semantic_checks_still_run_after_type_checks():
    with pytest.raises(ConfigError, match="keep must be in"):
        load_config("tiny", {"lmme.keep": 1.5})
    with pytest.raises((ConfigError, ValueError), match="mrope_section"):
        LyraConfig(text={"mrope_section": [1, 1, 1]})


def test_a_mapping_override_merges_into_its_section():
    nano = load_config("nano")
    merged = load_config("nano", {"text": {"num_hidden_layers": 2}})
    assert merged.text.num_hidden_layers == 2
    assert merged.text.vocab_size == nano.text.vocab_size
    assert merged.text.hidden_size == nano.text.hidden_size
