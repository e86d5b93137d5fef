"""Data recipes: which datasets, how they mix, and how samples become batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from mmllm.config import load_config
from mmllm.data.records import CAPTION_INSTRUCTIONS
from mmllm.errors import MmllmError

DatasetFormat = Literal[
    "llava", "coco", "karpathy", "vqav2", "webdataset", "tsv", "easy-vqa", "jsonl", "label-qa"
]


@dataclass
class DatasetSpec:
    """One dataset in a recipe."""

    format: DatasetFormat = "llava"
    """llava (JSON/JSONL conversations), coco (captions_*.json), karpathy (dataset_coco.json),
    vqav2 (questions JSON), webdataset (.tar shards), tsv (caption<TAB>image), easy-vqa (the
    package), jsonl (custom), label-qa (generated text-only questions for a labels-bridge model)."""
    path: str = ""
    """Main file: JSON/JSONL/TSV, or a glob of .tar shards for webdataset. Unused for easy-vqa."""
    images: str = ""
    """Folder that relative image paths are resolved against (default: the main file's folder)."""
    annotations: str = ""
    """VQAv2 annotations JSON with the answers (empty: questions only, e.g. test-dev)."""
    split: str = "train"
    """Split for karpathy (train includes restval) and easy-vqa (train / test)."""
    per_image: bool = False
    """Captions: one sample per image, all captions kept as references. VQA: one multi-turn conversation
    per image holding all its questions (divides the image work by the questions per image)."""
    shuffle_turns: bool = False
    """VQA with per_image: the questions of each conversation in a random (seeded) order, so that no
    question always follows the answer it could be read from (easy-VQA lists colour and shape first)."""
    answer_types: list[str] = field(default_factory=list)
    """VQA: keep only questions of these answer types (VQAv2: yes/no, number, other; easy-VQA: yes/no,
    color, shape). Empty: all."""
    balance_yes_no: bool = False
    """VQA training: within each question type, repeat the rarer of the yes and no answers until both
    are as frequent, so that the wording alone no longer predicts the answer (easy-VQA asks "is there a
    red shape?" mostly of shapes that are not red: a model that never looks scores 88% on such questions)."""
    describe: bool = False
    """easy-VQA: instead of its questions, one sample per image that its questions describe fully, answered
    "COLOR SHAPE" ("red circle"): targets for `token_target_weight` (images left partly open are skipped)."""
    limit: int | None = None
    """Use at most this many samples (after per_image grouping)."""
    weight: float = 1.0
    """Share in a mixture: each epoch draws weight x size samples of this dataset (2.0 = twice over)."""


@dataclass
class AugmentConfig:
    """Train-time image augmentation. Off by default: VQA answers may depend on left/right and colour."""

    enabled: bool = False
    """Apply the augmentations below to training images."""
    crop_scale: float = 0.8
    """Random resized crop keeps at least this fraction of the image area (1.0: no crop)."""
    hflip: bool = False
    """Mirror images half of the time (wrong for left/right questions)."""
    vflip: bool = False
    """Flip images upside down half of the time (wrong for above/below questions)."""
    rot90: bool = False
    """Turn images by a random multiple of 90 degrees (wrong for orientation questions; with both flips,
    all eight symmetries of the square: 8x the views of a small dataset whose answers survive them)."""
    jitter: float = 0.0
    """Brightness/contrast jitter strength, 0..1 (wrong for colour questions)."""
    capitalize: float = 0.0
    """Chance of upper-casing the first letter of each user turn: datasets written in lower case
    (easy-VQA, VQAv2) otherwise leave a model unsure what "What colour…?", as people type it, means."""


@dataclass
class DataConfig:
    """Datasets and how they are turned into batches."""

    datasets: list[DatasetSpec] = field(default_factory=list)
    """The datasets to read and mix."""
    instructions: list[str] = field(default_factory=lambda: list(CAPTION_INSTRUCTIONS))
    """Instructions that turn a caption into a conversation (one drawn per sample)."""
    max_length: int = 1024
    """Longest token sequence; longer samples lose their last answers, never image placeholders."""
    batch_size: int = 8
    """Samples per batch."""
    conversation_format: Literal["chat", "plain"] = "chat"
    """`chat`: the model's chat template. `plain`: LLaVA's alignment format, questions and answers as bare
    text with no template or system prompt (several times fewer tokens; for stage-1 alignment only).
    Read by training, which saves the format with the model; evaluation renders as the model was trained."""
    group_by_length: bool = True
    """Batch samples of similar length together to cut padding."""
    pack: bool = False
    """Pack a batch's samples into as few rows of up to max_length tokens as they fit, each sample with
    its own positions and attending to itself only: the same loss with (almost) no pad tokens."""
    num_workers: int = 2
    """DataLoader worker processes (0: load in the main process)."""
    feature_cache: str = ""
    """Directory of precomputed vision features (`mmllm features`); used when the vision tower is frozen."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Train-time image augmentation."""
    seed: int = 0
    """Seed for instruction choice, mixing and shuffling."""


def data_config_from_arg(value: str, overrides: list[str] = (), images: str = "") -> DataConfig:
    """`--data` on the command line: a recipe YAML, or one dataset as FORMAT:PATH (easy-vqa:SPLIT)."""
    if value.endswith((".yaml", ".yml")):
        return load_config(DataConfig, value, overrides)
    fmt, _, rest = value.partition(":")
    if fmt not in get_args(DatasetFormat):
        raise MmllmError(
            f"--data {value!r}: expected a recipe .yaml or FORMAT:PATH with FORMAT one of "
            f"{', '.join(get_args(DatasetFormat))}"
        )
    spec = {"format": fmt, "images": images}
    spec.update({"split": rest or "train"} if fmt == "easy-vqa" else {"path": rest})
    return load_config(DataConfig, None, overrides, base={"datasets": [spec]})
