"""Every shipped recipe parses into its config type, so a typo in configs/ fails here, not in a user's run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmllm.config import load_config
from mmllm.data.config import DataConfig
from mmllm.models.build import ModelConfig
from mmllm.train.config import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


TRAINING = sorted(
    [*CONFIGS.glob("*.yaml"), *(CONFIGS / "easyvqa").glob("*.yaml"), *(CONFIGS / "photo").glob("*.yaml")]
)


@pytest.mark.parametrize("path", TRAINING, ids=lambda p: p.name)
def test_training_recipes_parse(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.data.datasets, "a training recipe needs data"
    vision = Path(cfg.model.vision)
    if cfg.model.vision.startswith("configs/"):
        assert (CONFIGS.parent / vision / "config.json").is_file()


@pytest.mark.parametrize(("folder", "kind"), [("models", ModelConfig), ("data", DataConfig)])
def test_model_and_data_recipes_parse(folder, kind):
    paths = sorted((CONFIGS / folder).glob("*.yaml"))
    assert paths
    for path in paths:
        load_config(kind, path)


def test_accelerate_configs_name_a_distributed_type():
    expected = {
        "ddp.yaml": "MULTI_GPU",
        "fsdp.yaml": "FSDP",
        "deepspeed_zero2.yaml": "DEEPSPEED",
        "deepspeed_zero3.yaml": "DEEPSPEED",
    }
    found = {path.name: path for path in (CONFIGS / "accelerate").glob("*.yaml")}
    assert set(found) == set(expected)  # an empty or renamed folder fails here
    for name, kind in expected.items():
        assert yaml.safe_load(found[name].read_text())["distributed_type"] == kind, name


def test_the_recipe_reference_is_up_to_date():
    import runpy

    generated = runpy.run_path(str(CONFIGS.parent / "docs" / "make_recipes.py"))["reference"]()
    assert (CONFIGS.parent / "docs" / "recipes.md").read_text() == generated, (
        "run python docs/make_recipes.py"
    )
