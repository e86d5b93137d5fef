"""Writes docs/recipes.md, the reference of every recipe and settings field, from the dataclasses
themselves (`python docs/make_recipes.py`); a test checks the committed file is up to date."""

from __future__ import annotations

import sys
from pathlib import Path

from mmllm.config import describe_fields
from mmllm.data.config import DataConfig
from mmllm.engine.torch_backend import GenerationSettings
from mmllm.models.build import ModelConfig
from mmllm.serve.config import ServeConfig
from mmllm.train.config import TrainConfig
from mmllm.ui import UiConfig

SECTIONS = (
    (TrainConfig, "`mmllm train RECIPE.yaml [KEY=VALUE …]`: a training recipe (`configs/*.yaml`)"),
    (
        DataConfig,
        "`--data RECIPE.yaml` of `eval`, `features`, `data stats` (and `data:` in a training recipe)",
    ),
    (ModelConfig, "`configs/models/*.yaml`, and `model:` in a training recipe"),
    (GenerationSettings, "decoding: `--max-new-tokens`, `--temperature`, … on `ask`, `caption`, `eval`"),
    (ServeConfig, "`mmllm serve --OPTION`"),
    (UiConfig, "`mmllm ui --OPTION`"),
)


def reference() -> str:
    lines = [
        "# Recipe and settings reference",
        "",
        "Generated from the dataclasses by `python docs/make_recipes.py`; `mmllm train --help` prints the",
        "training part. In YAML a dotted name is nesting (`optim.lr_projector` is `lr_projector:` under",
        "`optim:`); on the command line it is an override, `optim.lr_projector=5e-4`, and a number indexes",
        "a list (`data.datasets.0.split=test`, written `N` below). Command-line options spell the names",
        "with dashes (`--max-new-tokens`).",
    ]
    for cls, where in SECTIONS:
        lines += ["", f"## {cls.__name__}", "", where, "", "```"]
        lines += [line[2:] for line in describe_fields(cls)]
        lines += ["```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    target = Path(__file__).with_name("recipes.md")
    target.write_text(reference())
    print(f"wrote {target}", file=sys.stderr)
