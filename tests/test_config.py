"""Config: YAML + dotted overrides; unknown keys and wrong types name the key."""

from dataclasses import dataclass, field
from typing import Literal

import pytest
import yaml

from aikd.config import ConfigError, describe_config, load_config, save_config


@dataclass
class Optim:
    lr: float = field(default=0.05, metadata={"help": "learning rate"})
    momentum: float = 0.9
    name: Literal["sgd", "adamw"] = "sgd"

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class Run:
    epochs: int = 1
    weights: str | None = None
    sizes: tuple[int, ...] = (1, 2)
    optim: Optim = field(default_factory=Optim)


def test_defaults_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\noptim:\n  momentum: 0.5\n")
    cfg = load_config(Run, path, ["optim.lr=0.01", "weights=none.pth", "sizes=[4, 5]", "optim.name=adamw"])
    assert cfg.epochs == 3 and cfg.optim.momentum == 0.5 and cfg.optim.lr == 0.01
    assert cfg.weights == "none.pth" and cfg.sizes == (4, 5) and cfg.optim.name == "adamw"
    assert isinstance(cfg.optim.lr, float)


def test_int_and_exponent_strings_promoted_to_float():
    assert load_config(Run, None, ["optim.lr=1"]).optim.lr == 1.0
    assert load_config(Run, None, ["optim.lr=1e-4"]).optim.lr == 1e-4


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=0.1", r"unknown config key optim.lrr \(did you mean optim.lr\?\)"),
        ("epochs=three", r"epochs: expected int, got 'three'"),
        ("epochs=true", r"epochs: expected int"),
        ("optim.name=adam", r"optim.name: expected one of 'sgd', 'adamw'"),
        ("optim.lr=-1", r"optim: lr must be positive"),
        ("optim=3", r"optim: expected a mapping"),
        ("no_equals_sign", r"not of the form key=value"),
        ("weights=[1]", r"weights: expected str \| None, got \[1\]"),
        ("epochs.x=1", r"epochs is not a section"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, None, [override])


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(Run, path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Run, tmp_path / "missing.yaml")


def test_save_roundtrip_and_describe(tmp_path):
    cfg = load_config(Run, None, ["optim.lr=0.2"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["optim"]["lr"] == 0.2
    assert load_config(Run, tmp_path / "resolved.yaml") == cfg
    lines = describe_config(Run)
    assert any(line.startswith("optim.lr (float, default 0.05): learning rate") for line in lines)
