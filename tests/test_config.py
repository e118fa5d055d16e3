"""The config system: defaults, YAML, dotted overrides, one-line errors naming the key."""

from __future__ import annotations

import dataclasses

import pytest

from aligntok.config import (
    ConfigError,
    DataConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)


@dataclasses.dataclass
class Run:
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  batch_size: 4\noptim:\n  lr: 0.5\n")
    cfg = load_config(Run, path, ["train.steps=9", "optim.betas=[0.8,0.95]", "data.train=/some/folder"])
    assert cfg.train.steps == 9 and cfg.train.batch_size == 4 and cfg.optim.lr == 0.5
    assert cfg.optim.betas == (0.8, 0.95) and cfg.data.train == "/some/folder"
    assert cfg.train.seed == TrainConfig().seed  # untouched fields keep their defaults


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(Run, None, ["train.steps=3", "optim.schedule=cosine"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Run, tmp_path / "resolved.yaml") == cfg
    assert config_from_dict(Run, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.stepz=3"], "unknown config key 'train.stepz'"),
        (["optim.lr=fast"], "config key 'optim.lr'"),
        (["train.precision=fp16"], "precision='fp16' is not one of"),
        (["train.batch_size=6", "train.grad_accum=4"], "not divisible by grad_accum"),
        (["steps"], "not of the form key=value"),
    ],
)
def test_bad_overrides_give_one_line_errors(overrides, expected):
    with pytest.raises(ConfigError) as info:
        load_config(Run, None, overrides)
    message = str(info.value)
    assert expected in message and "\n" not in message


def test_bad_yaml_files(tmp_path):
    (tmp_path / "unknown.yaml").write_text("train:\n  nope: 1\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.nope'"):
        load_config(Run, tmp_path / "unknown.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(Run, tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, tmp_path / "missing.yaml")
