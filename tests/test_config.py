"""Config system: YAML + dotted overrides into typed dataclasses; docstrings become --help."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from mmllm.config import add_arguments, apply_overrides, field_docs, from_namespace, load_config
from mmllm.engine.settings import GenerationSettings
from mmllm.errors import MmllmError
from mmllm.models.build import ModelConfig


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 10
    """Optimizer steps."""
    mode: Literal["a", "b"] = "a"
    tags: list[str] = field(default_factory=list)


def test_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  lm: smollm2-135m-instruct\n  vision_feature_mode: patch\nsteps: 5\n")
    cfg = load_config(Recipe, recipe, ["steps=7", "model.vision_use_cls=true", "tags=[x, y]"])
    assert cfg.model.lm == "smollm2-135m-instruct" and cfg.model.vision_feature_mode == "patch"
    assert cfg.steps == 7 and cfg.model.vision_use_cls is True and cfg.tags == ["x", "y"]
    assert cfg.model.projector_type == "mlp_ln"  # untouched default


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stepz=3", "unknown config keys stepz"),
        ("model.nope=1", "unknown config keys model.nope"),
        ("steps=many", "steps: 'many' is not a valid int"),
        ("steps=2.5", "not an integer"),
        ("mode=c", "mode: 'c' is not one of a, b"),
        ("model.vision_use_cls=maybe", "not a boolean"),
        ("steps", "not of the form"),
    ],
)
def test_bad_values_name_the_field(override, message):
    with pytest.raises(MmllmError, match=message):
        load_config(Recipe, None, [override])


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(MmllmError, match="invalid YAML"):
        load_config(Recipe, bad)
    with pytest.raises(MmllmError, match="no such config file"):
        load_config(Recipe, tmp_path / "missing.yaml")


def test_docstrings_become_help_and_options_are_typed():
    assert field_docs(GenerationSettings)["top_p"].startswith("Nucleus sampling")
    parser = argparse.ArgumentParser()
    add_arguments(parser, GenerationSettings)
    assert "Nucleus sampling" in parser.format_help()
    args = parser.parse_args(["--max-new-tokens", "9", "--temperature", "0.5"])
    settings = from_namespace(GenerationSettings, args)
    assert settings.max_new_tokens == 9 and settings.temperature == 0.5 and settings.seed is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--num-beams", "two"])


def test_overrides_index_lists():
    data = {"datasets": [{"split": "train"}, {"split": "train", "limit": 3}]}
    apply_overrides(data, ["datasets.0.split=test", "datasets.1.limit=7"])
    assert data == {"datasets": [{"split": "test"}, {"split": "train", "limit": 7}]}
    for bad, message in (
        ("datasets.2.split=x", "'2' is not an index of a list of 2"),
        ("datasets.x.split=1", "'x'"),
    ):
        with pytest.raises(MmllmError, match=message):
            apply_overrides(data, [bad])


def test_dataset_overrides_from_the_command_line_in_any_order(capsys):
    from mmllm.cli import main

    for args in (
        ["data", "stats", "easy-vqa:train", "datasets.0.split=test", "datasets.0.limit=3", "--images", ""],
        ["data", "stats", "easy-vqa:train", "--images", "", "datasets.0.split=test", "datasets.0.limit=3"],
    ):
        assert main(args) == 0, capsys.readouterr().err
        assert "samples: 3" in capsys.readouterr().out


def test_train_help_lists_every_recipe_field_with_default_and_doc(capsys):
    import dataclasses

    from mmllm.cli import main
    from mmllm.data.config import DatasetSpec
    from mmllm.train.config import TrainConfig

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out

    def leaves(cls, prefix=""):
        for f in dataclasses.fields(cls):
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(value):
                yield from leaves(type(value), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", f.name, cls

    for path, name, cls in leaves(TrainConfig):
        assert f"  {path} (default:" in text, path
        doc = field_docs(cls).get(name)
        assert doc and doc[:40] in text, path  # every field documents itself
    assert "  data.datasets.N.split (default: 'train')" in text
    assert all(f"data.datasets.N.{f.name} " in text for f in dataclasses.fields(DatasetSpec))


def test_the_api_key_comes_from_the_environment_unless_given(monkeypatch):
    from mmllm.serve.config import API_KEY_VARIABLE, ServeConfig

    monkeypatch.delenv(API_KEY_VARIABLE, raising=False)
    assert ServeConfig().api_key is None
    monkeypatch.setenv(API_KEY_VARIABLE, "from-env")
    assert ServeConfig().api_key == "from-env"
    assert ServeConfig(api_key="given").api_key == "given"
    monkeypatch.setenv(API_KEY_VARIABLE, "")
    assert ServeConfig().api_key is None  # set but empty: no key, as without the variable
