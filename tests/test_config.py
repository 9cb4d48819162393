"""Config loading: every shipped config validates; mistakes are all reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.config import load_config
from tuneforge.demo import DEMO_CONFIG
from tuneforge.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_configs_exist():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates_and_its_data_exists(path):
    config = load_config(path)
    for f in (config.data.train, config.data.validation, config.data.test):
        if f:
            assert (REPO / f).is_file(), f"{path.name}: {f} missing"


def test_demo_config_file_matches_the_builtin_demo_settings():
    file_cfg = load_config(REPO / "configs" / "demo-support-lora.yaml")
    code_cfg = load_config(None, ["data.train=x"], base=DEMO_CONFIG)
    assert file_cfg.adapter == code_cfg.adapter
    assert file_cfg.train == code_cfg.train
    assert file_cfg.model == code_cfg.model
    assert file_cfg.data.max_length == code_cfg.data.max_length


def test_overrides_are_typed_and_nested():
    c = load_config(None, ["data.train=t.jsonl", "train.lr=3e-4", "train.max_steps=5",
                           "adapter.target_modules=[q_proj, v_proj]", "train.bf16=false"])
    assert c.train.lr == 3e-4 and c.train.max_steps == 5 and c.train.bf16 == "false"
    assert c.adapter.target_modules == ["q_proj", "v_proj"]


def test_all_errors_reported_at_once_with_hints(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("modle:\n  name: x\ntrain:\n  lr: fast\n  batchsize: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg, ["adapter.method=qlora", "train.epochs=-1"])
    text = str(err.value)
    for fragment in ("modle: unknown key; did you mean model?", "train.lr: expected float, got 'fast'",
                     "train.batchsize: unknown key; did you mean train.batch_size?",
                     "adapter.method: expected one of", "train.epochs: must be > 0",
                     "data.train: required", str(cfg)):
        assert fragment in text, fragment


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_consistency_checks():
    with pytest.raises(ConfigError, match="early_stopping_patience: needs validation data"):
        load_config(None, ["data.train=t", "train.early_stopping_patience=2"])
    with pytest.raises(ConfigError, match="give one, not both"):
        load_config(None, ["data.train=t", "data.validation=v", "data.validation_fraction=0.1"])
