"""QLoRA on a CPU with bitsandbytes: the LM trains 4-bit (asserted), resumes exactly, and loads, serves and
merges with the NF4-dequantised base its adapter was trained against. Tiny random LMs saved with their
weights (QLoRA quantises an LM as it loads it); SmolLM2-135M's real weights in the slow test."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, CLIPVisionConfig

from conftest import TINY_CLIP, make_tokenizer, recipe, save_tiny, tiny_text_config
from mmllm import MultimodalConfig, MultimodalLM
from mmllm.cli import main
from mmllm.config import load_config
from mmllm.data.config import DataConfig, DatasetSpec
from mmllm.data.loading import LoadReport, build_dataloader
from mmllm.engine.torch_backend import Pipeline
from mmllm.errors import MmllmError
from mmllm.models.build import load_model
from mmllm.models.nf4 import nf4_layers
from mmllm.processor import MultimodalProcessor
from mmllm.train.checkpoint import checkpoints
from mmllm.train.config import LoraSettings, PartsConfig, TrainConfig
from mmllm.train.loop import train, trained_tokens
from mmllm.train.parts import parameter_table, qlora_quantization_config, setup_parts

bnb = pytest.importorskip("bitsandbytes")

REPO = Path(__file__).resolve().parents[1]
EASY_VQA_TEST = DataConfig(datasets=[DatasetSpec(format="easy-vqa", split="test", limit=4)], num_workers=0)


def save_lm(folder: Path, kind: str) -> Path:
    """A tiny random LM of a real architecture saved with its weights and tokenizer: what `model.lm`
    names. A responsive init (std 0.3), so that adapters and the NF4 rounding move the logits visibly."""
    tokenizer = make_tokenizer(kind)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_text_config(kind, tokenizer, init_std=0.3)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    """A stage-1 model (projector trained) over a tiny Qwen2 LM (tied head, as Qwen2.5's) that it refers
    to by path, and a tiny untrained CLIP tower: what a QLoRA stage 2 starts from."""
    root = tmp_path_factory.mktemp("stage1")
    lm = save_lm(root / "lm", "qwen2")
    CLIPVisionConfig(**TINY_CLIP).save_pretrained(root / "clip")
    model = {"lm": str(lm), "vision": str(root / "clip"), "vision_feature_mode": "patch"}
    cfg = recipe("", root / "run", init_from="", model=model, max_steps=2)
    return train(load_config(TrainConfig, None, base=cfg))


def qlora_recipe(stage1: Path, out: Path, **overrides) -> dict:
    settings = {
        "parts.language_model": "qlora",
        "lora.dropout": 0.0,
        "max_steps": 8,
        "save_every": 4,
        "eval_every": 4,  # a held-out evaluation mid-run: no-grad forwards through the 4-bit layers
        "eval_data": {"datasets": [{"format": "easy-vqa", "split": "test", "limit": 4}], "num_workers": 0},
        **overrides,
    }
    return recipe(stage1, out, **settings)


@pytest.fixture(scope="module")
def qlora_run(stage1, tmp_path_factory) -> Path:
    """8 QLoRA steps from stage 1 in fp32 (so that logits compare to 1e-6), checkpoints every 4."""
    out = tmp_path_factory.mktemp("qlora")
    train(load_config(TrainConfig, None, base=qlora_recipe(stage1, out)))
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def four_bit(path: Path, precision: str = "fp32") -> MultimodalLM:
    """A saved QLoRA model as its training loads it: the LM 4-bit, the adapter on top."""
    model, _ = load_model(str(path), quantization_config=qlora_quantization_config(precision))
    setup_parts(model, PartsConfig(language_model="qlora"), LoraSettings())
    return model.eval()


def easy_vqa_batch(path: Path, answer: str = "") -> dict:
    """A question on an easy-VQA test image; with `answer`, a training batch (labels on the answer)."""
    from easy_vqa import get_test_image_paths

    processor = MultimodalProcessor.from_pretrained(path)
    conversation = [{"role": "user", "content": "What shape is in the image?"}]
    if answer:
        conversation.append({"role": "assistant", "content": answer})
    return processor([conversation], [[get_test_image_paths()[0]]], train=bool(answer))


@torch.no_grad()
def logits(model: MultimodalLM, batch: dict) -> torch.Tensor:
    return model.eval()(**batch).logits


def test_qlora_trains_the_lm_in_4bit_from_init_from_and_records_it(qlora_run, caplog):
    rows = [m for m in metrics(qlora_run) if "loss" in m]
    assert len(rows) == 8 and all(m["skipped_steps"] == 0 for m in rows)
    assert sum(m["loss"] for m in rows[-2:]) < sum(m["loss"] for m in rows[:2])
    assert sum("eval_loss" in m for m in metrics(qlora_run)) == 2
    config = json.loads((qlora_run / "model" / "config.json").read_text())
    assert config["adapter"] == "lora" and config["saved_parts"] == ["projector"]  # the LM: by reference
    recorded = config["base_quantization"]
    assert recorded["quant_type"] == "nf4" and recorded["double_quant"] and recorded["blocksize"] == 64
    assert recorded["full_precision"] == ["lm_head"]  # the head, tied to the embedding, stays fp32
    assert (recorded["dtype"], recorded["device"]) == ("float32", "cpu")
    # The run's own model: every linear layer 4-bit NF4 (2 layers x q, k, v, o, gate, up, down), with
    # adapters on each, trained.
    model = four_bit(qlora_run / "model")
    layers = nf4_layers(model.language_model)
    assert len(layers) == 14 and all(layer.compute_dtype == torch.float32 for layer in layers)
    lora_b = [p for n, p in model.language_model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 14 and all(p.abs().sum() > 0 for p in lora_b)
    # The run's parameter table counts weights, not the bytes that hold two 4-bit weights each.
    plain, _ = load_model(str(qlora_run / "model"))
    [row] = [line for line in parameter_table(model).splitlines() if line.startswith("language_model")]
    assert int(row.split()[-1].replace(",", "")) == sum(p.numel() for p in plain.language_model.parameters())


def test_merged_into_the_dequantised_base_gives_the_4bit_models_logits(qlora_run, tmp_path):
    batch = easy_vqa_batch(qlora_run / "model")
    reference = logits(four_bit(qlora_run / "model"), batch)  # the 4-bit base + adapter, fp32 compute
    assert main(["merge", str(qlora_run / "model"), str(tmp_path / "merged")]) == 0
    merged = MultimodalLM.from_pretrained(tmp_path / "merged")
    assert not merged.has_lora and merged.config.base_quantization is None
    assert (logits(merged, batch) - reference).abs().max() <= 1e-3
    # Every other load path (ask, serve, eval, exports) loads through the same rounding.
    served = Pipeline.load(str(qlora_run / "model"), device="cpu").model
    assert not served.has_lora
    assert (logits(served, batch) - reference).abs().max() <= 1e-3
    # What the seed design did: the adapter merged into the unquantised base.
    config = MultimodalConfig.from_pretrained(qlora_run / "model")
    config.base_quantization = None
    unrounded = MultimodalLM.from_pretrained(qlora_run / "model", config=config)
    unrounded.merge_lora()
    assert (logits(unrounded, batch) - reference).abs().max() > 1e-2


def held_out_loss(model: MultimodalLM, path: Path, data: DataConfig, bf16: bool) -> float:
    """Mean token loss on held-out data, as the trainer's evaluator computes it."""
    processor = MultimodalProcessor.from_pretrained(path)
    summed = tokens = 0.0
    for batch in build_dataloader(data, processor, shuffle=False, train=False):
        batch = LoadReport().update(batch)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            summed += float(model.eval()(**batch, num_items_in_batch=1).loss)
        tokens += trained_tokens(batch)
    return summed / tokens


def test_a_held_out_evaluation_leaves_the_4bit_layers_as_they_train(qlora_run):
    """bitsandbytes repacks a 4-bit layer for its AVX512-BF16 CPU kernel on the first no-grad forward in
    eval mode: bf16 block scales, and a kernel that training's backward pass cannot go through."""
    model = four_bit(qlora_run / "model")
    before = held_out_loss(model, qlora_run / "model", EASY_VQA_TEST, bf16=False)
    assert held_out_loss(model, qlora_run / "model", EASY_VQA_TEST, bf16=False) == before
    layers = nf4_layers(model.language_model)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    model.train()
    batch = easy_vqa_batch(qlora_run / "model", "circle")
    embeds = model.embed_inputs(batch.pop("input_ids"), batch.pop("pixel_values")).detach().requires_grad_()
    model(inputs_embeds=embeds, **batch).loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0  # gradients reach the first layer


def test_qlora_resumes_exactly(stage1, qlora_run, tmp_path):
    """Stopped after a checkpoint, resumed: the same adapter and projector as the uninterrupted run (the
    resumed run rebuilds the same 4-bit base and asserts it, mid-run evaluations included)."""
    cfg = qlora_recipe(stage1, tmp_path, stop_after=4)
    train(load_config(TrainConfig, None, base=cfg))
    assert [c.name for c in checkpoints(tmp_path)] == ["step-000004"]
    train(load_config(TrainConfig, None, base=qlora_recipe(stage1, tmp_path)), resume="auto")
    straight, resumed = (load_file_states(out / "model") for out in (qlora_run, tmp_path))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


def load_file_states(model_dir: Path) -> dict[str, torch.Tensor]:
    """What a saved model trained: its stored parts and its adapter."""
    from safetensors.torch import load_file

    return {
        **load_file(model_dir / "model.safetensors"),
        **load_file(model_dir / "lora" / "adapter_model.safetensors"),
    }


def test_compute_dtype_follows_the_precision(stage1):
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model, _ = load_model(str(stage1), quantization_config=qlora_quantization_config(precision))
        assert {layer.compute_dtype for layer in nf4_layers(model.language_model)} == {dtype}
    if not torch.cuda.is_available():
        with pytest.raises(MmllmError, match="precision=bf16"):
            qlora_quantization_config("fp16")


def test_qlora_refuses_clearly_what_it_cannot_quantise_or_run_with(stage1, tmp_path, monkeypatch):
    # A model that stores its LM (trained in full, merged, or saved whole) has no base to load 4-bit.
    whole = save_tiny(tmp_path / "whole")
    with pytest.raises(MmllmError, match=r"not 4-bit.*parts\.language_model=lora"):
        train(load_config(TrainConfig, None, base=qlora_recipe(whole, tmp_path / "a")))
    # An unrelated package that installs a `bitsandbytes` module.
    real = importlib.metadata.packages_distributions
    monkeypatch.setattr(
        importlib.metadata,
        "packages_distributions",
        lambda: {**real(), "bitsandbytes": ["bitsandbytes-cpu-fork"]},
    )
    with pytest.raises(MmllmError, match="pip uninstall bitsandbytes-cpu-fork"):
        train(load_config(TrainConfig, None, base=qlora_recipe(stage1, tmp_path / "b")))
    monkeypatch.setattr(importlib.metadata, "packages_distributions", real)
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.45.5")
    with pytest.raises(MmllmError, match=r"0\.50 or newer, found 0\.45\.5"):
        qlora_quantization_config("fp32")


def recipe_cpu_command() -> list[str]:
    """The CPU command the recipe's comment gives, as arguments."""
    text = (REPO / "configs" / "qlora_phi35.yaml").read_text()
    [line] = [line for line in text.splitlines() if line.startswith("#   mmllm train ")]
    return shlex.split(line.removeprefix("#   mmllm "))


def test_the_qlora_phi35_recipe_runs_end_to_end_on_a_tiny_phi3(tmp_path, easy_vqa_image):
    """configs/qlora_phi35.yaml with the overrides its comment gives for a CPU, a tiny Phi-3 as its LM
    and a 2-step run; then merged and asked."""
    phi3 = save_lm(tmp_path / "phi3", "phi3")
    command = recipe_cpu_command()
    command = [
        f"model.lm={phi3}"
        if arg.startswith("model.lm=")
        else str(REPO / arg)
        if arg.endswith(".yaml")
        else arg
        for arg in command
    ]
    run = ["max_steps=2", f"output_dir={tmp_path / 'run'}", "tensorboard=false", "data.num_workers=0"]
    assert main([*command, *run]) == 0
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert (
        config["text_config"]["model_type"] == "phi3" and config["base_quantization"]["quant_type"] == "nf4"
    )
    # Phi-3 fuses q/k/v and gate/up: 2 layers x (qkv, o, gate_up, down); its own head stays fp32.
    assert config["base_quantization"]["full_precision"] == ["lm_head"]
    assert len(nf4_layers(four_bit(tmp_path / "run" / "model", "bf16").language_model)) == 8
    assert main(["merge", str(tmp_path / "run" / "model"), str(tmp_path / "merged")]) == 0
    ask = ["ask", easy_vqa_image, "What shape is it?", "--model", str(tmp_path / "merged")]
    assert main([*ask, "--max-new-tokens", "3"]) == 0


@pytest.fixture
def easy_vqa_image() -> str:
    from easy_vqa import get_test_image_paths

    return get_test_image_paths()[0]


# -- with real weights (the slow job) -------------------------------------------------------------


def kill_after_a_checkpoint(command: list[str], out: Path) -> Path:
    """Run a training command and SIGKILL it one step after its first checkpoint; that checkpoint."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        found = checkpoints(out)
        steps = (out / "metrics.jsonl").read_text().count("\n") if found else 0
        if found and steps > int(found[-1].name.removeprefix("step-")):
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run must be killed mid-way, not finish"
    return checkpoints(out)[-1]


def smollm2_qlora() -> dict:
    """SmolLM2-135M-Instruct (real weights) in 4-bit under a small untrained CLIP, bf16 compute (the
    CPU's QLoRA), on easy-VQA questions: a short run's recipe, held-out data included."""
    return {
        "init_from": "",
        "model": {
            "lm": "smollm2-135m-instruct",
            "vision": str(REPO / "configs/easyvqa/clip-easyvqa"),
            "vision_feature_mode": "pooled",
        },
        "precision": "bf16",
        "parts.language_model": "qlora",
        "lora.dropout": 0.05,  # dropout draws from the RNG state a resume restores
        "optim": {"lr_projector": 1e-3, "lr_lora": 2e-4, "warmup_ratio": 0.1},
        "data.datasets": [{"format": "easy-vqa", "split": "train", "limit": 48}],
        "data.batch_size": 2,
        "data.max_length": 128,
        "max_steps": 16,
        "save_every": 4,
        "eval_data": {"datasets": [{"format": "easy-vqa", "split": "test", "limit": 64}], "num_workers": 0},
    }


@pytest.mark.slow
def test_smollm2_qlora_is_killed_resumes_exactly_and_merges_without_a_loss_jump(tmp_path):
    """SmolLM2-135M-Instruct's real weights, 4-bit, bf16 compute (the CPU's QLoRA): 16 steps straight,
    and killed after a checkpoint then resumed, to the same adapter; merged, its held-out loss is the
    4-bit model's within 1% (docs/training.md gives the numbers, and why they are not equal)."""
    recipes = {}
    for name in ("straight", "killed"):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(json.dumps(recipe("", tmp_path / name, **smollm2_qlora())))
    assert main(["train", str(recipes["straight"])]) == 0
    command = [sys.executable, "-m", "mmllm.cli", "train", str(recipes["killed"])]
    assert int(kill_after_a_checkpoint(command, tmp_path / "killed").name.removeprefix("step-")) < 16
    assert main(["train", str(recipes["killed"]), "--resume", "auto"]) == 0
    straight, resumed = (load_file_states(tmp_path / name / "model") for name in ("straight", "killed"))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)

    trained = tmp_path / "straight" / "model"
    assert main(["merge", str(trained), str(tmp_path / "merged")]) == 0
    before = metrics(tmp_path / "straight")[-1]["eval_loss"]  # the run's own: 4-bit + adapter, bf16
    eval_data = load_config(TrainConfig, recipes["straight"]).eval_data
    after = held_out_loss(MultimodalLM.from_pretrained(tmp_path / "merged"), trained, eval_data, bf16=True)
    print(f"held-out loss: 4-bit + adapter {before:.4f}, merged {after:.4f}")
    assert abs(after / before - 1) < 0.01
