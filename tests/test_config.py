from typing import Literal

import pytest
from pydantic import Field

from fabrika.config import Config, apply_overrides, interpolate, load, load_yaml, validate
from fabrika.errors import FabrikaError


class Inner(Config):
    lr: float = 1e-3
    schedule: Literal["cosine", "linear"] = "cosine"


class Outer(Config):
    name: str = "x"
    train: Inner = Field(default_factory=Inner)


def test_unknown_key_suggests_spelling(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lrr: 0.1\n")
    with pytest.raises(FabrikaError) as e:
        load(Outer, p)
    assert str(p) in str(e.value) and "train.lrr" in str(e.value) and "did you mean 'lr'" in str(e.value)


def test_wrong_type_names_key_and_value(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  lr: fast\n")
    with pytest.raises(FabrikaError) as e:
        load(Outer, p)
    assert "train.lr" in str(e.value) and "'fast'" in str(e.value)


def test_literal_choices_listed():
    with pytest.raises(FabrikaError) as e:
        validate(Outer, {"train": {"schedule": "cosin"}}, "f.yaml", prefix="stages.pretrain")
    assert "stages.pretrain.train.schedule" in str(e.value) and "'cosine'" in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(FabrikaError, match="not found"):
        load_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(FabrikaError, match=r"line \d+"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n")
    with pytest.raises(FabrikaError, match="mapping"):
        load_yaml(lst)


def test_flags_over_file_and_set_over_flags(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: file\ntrain: {lr: 0.5, schedule: linear}\n")
    cfg = load(Outer, p, flags={"train": {"lr": 0.25}}, overrides=["name=cli"])
    assert cfg.name == "cli" and cfg.train.lr == 0.25 and cfg.train.schedule == "linear"


def test_overrides_parse_yaml_values_and_reject_bad_syntax():
    data = apply_overrides({}, ["a.b.c=3", "a.d=[x, y]", "e=true"])
    assert data == {"a": {"b": {"c": 3}, "d": ["x", "y"]}, "e": True}
    with pytest.raises(FabrikaError, match="KEY=VALUE"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(FabrikaError, match="not a mapping"):
        apply_overrides({"a": 1}, ["a.b=2"])


def test_interpolation():
    assert interpolate({"name": "n", "run_dir": "runs/${name}"})["run_dir"] == "runs/n"
    with pytest.raises(FabrikaError, match="missing"):
        interpolate({"run_dir": "runs/${missing}"})
