"""Training on CPU with tiny models and real easy-VQA data: every stage, exact resume, DDP, merge."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tiny, recipe
from mmllm import MultimodalLM
from mmllm.cli import main
from mmllm.config import load_config
from mmllm.engine.torch_backend import Pipeline
from mmllm.errors import MmllmError
from mmllm.models.vision import load_vision_tower
from mmllm.processor import ALIGN_TEMPLATE, MultimodalProcessor
from mmllm.train.checkpoint import checkpoints
from mmllm.train.config import TrainConfig
from mmllm.train.loop import train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # Patch features and a responsive LM, so the projector alone can move the loss (see make_tiny).
    model, processor = make_tiny("qwen2", feature_mode="patch", lm_init_std=0.3)
    folder = tmp_path_factory.mktemp("tiny")
    model.config.trained_parts = ["language_model"]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run(tiny_dir, out, **overrides) -> tuple[MultimodalLM, list[dict]]:
    final = train(load_config(TrainConfig, None, base=recipe(tiny_dir, out, **overrides)))
    return MultimodalLM.from_pretrained(final), _metrics(out)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_stage1_trains_projector_only(tiny_dir, tmp_path):
    base = MultimodalLM.from_pretrained(tiny_dir)
    model, metrics = run(tiny_dir, tmp_path)
    losses = [m["loss"] for m in metrics if "loss" in m]
    # Two batches alternate: compare the first pass over the data with the last.
    assert len(losses) == 12 and sum(losses[-2:]) < 0.85 * sum(losses[:2])
    for part in ("vision_tower", "language_model"):
        before, after = state(getattr(base, part)), state(getattr(model, part))
        assert all(torch.equal(before[k], after[k]) for k in before), f"{part} changed"
    assert not torch.equal(base.projector[0].weight, model.projector[0].weight)
    assert [c.name for c in checkpoints(tmp_path)] == ["step-000008", "step-000012"]
    assert (tmp_path / "checkpoints" / "step-000012" / "model" / "mmllm_processor.json").is_file()


def test_one_process_trains_again_in_another_precision(tiny_dir, tmp_path):
    """A notebook or a test session that trained once: accelerate would refuse the second precision."""
    base = MultimodalLM.from_pretrained(tiny_dir).projector[0].weight
    trained = {}
    for n, precision in enumerate(("bf16", "fp32", "bf16")):
        model, metrics = run(tiny_dir, tmp_path / f"{n}-{precision}", max_steps=1, precision=precision)
        assert [m["loss"] for m in metrics if "loss" in m]
        weight = model.projector[0].weight
        assert not torch.equal(weight, base)  # it trained
        trained.setdefault(precision, []).append(weight)
    # Each run trained in its own precision, not the first one's: the same step in bf16 and in fp32
    # gives other weights, and the second bf16 run those of the first.
    assert not torch.equal(trained["bf16"][0], trained["fp32"][0])
    torch.testing.assert_close(trained["bf16"][0], trained["bf16"][1], rtol=0, atol=0)


def test_model_answers_in_the_format_it_was_last_trained_on(tiny_dir, tmp_path):
    question = [{"role": "user", "content": "<image>What colour is it?"}]
    plain = train(
        load_config(
            TrainConfig,
            None,
            base=recipe(tiny_dir, tmp_path / "a", max_steps=1, **{"data.conversation_format": "plain"}),
        )
    )
    processor = MultimodalProcessor.from_pretrained(plain)
    assert processor.template == ALIGN_TEMPLATE
    assert processor.render(question, add_generation_prompt=True) == "<image>What colour is it?\n"
    # A chat stage started from it goes back to the tokenizer's own template, and saves that.
    chat = train(
        load_config(
            TrainConfig, None, base={**recipe(tiny_dir, tmp_path / "b", max_steps=1), "init_from": str(plain)}
        )
    )
    processor = MultimodalProcessor.from_pretrained(chat)
    assert processor.chat_template is None and "<|im_start|>" in processor.render(question)


def test_stage2_lora_only_on_the_language_model_and_merge_is_lossless(tiny_dir, tmp_path):
    base = MultimodalLM.from_pretrained(tiny_dir)
    model, metrics = run(tiny_dir, tmp_path, **{"parts.language_model": "lora", "lora.dropout": 0.0})
    assert metrics[-1]["loss"] + metrics[-2]["loss"] < 0.95 * (metrics[0]["loss"] + metrics[1]["loss"])
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names and all(n.startswith("language_model.") for n in lora_names)
    assert not any("lora" in n for n, _ in model.vision_tower.named_modules())
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
    assert (tmp_path / "model" / "lora" / "adapter_config.json").is_file()
    # Base weights under the adapters did not move.
    base_lm = state(base.language_model)
    merged_free = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in model.language_model.state_dict().items()
        if "lora_" not in k
    }
    assert all(torch.equal(base_lm[k], merged_free[k]) for k in base_lm)

    processor_batch = _batch(tiny_dir)
    unmerged = model(**processor_batch).logits
    assert main(["merge", str(tmp_path / "checkpoints" / "step-000012"), str(tmp_path / "merged")]) == 0
    merged = MultimodalLM.from_pretrained(tmp_path / "merged")
    assert not merged.has_lora
    assert (merged(**processor_batch).logits - unmerged).abs().max() < 1e-4
    served = Pipeline.load(str(tmp_path / "model"), device="cpu").model
    assert not served.has_lora  # Pipeline merges the adapters: no extra matmuls in each decode step
    assert (served(**processor_batch).logits - unmerged).abs().max() < 1e-4

    # A recipe that starts from this checkpoint trains its adapters only if it says so.
    from mmllm.train.config import LoraSettings, PartsConfig
    from mmllm.train.parts import setup_parts

    for language_model, adapters_train in (("frozen", False), ("lora", True)):
        again = MultimodalLM.from_pretrained(tmp_path / "model")
        setup_parts(again, PartsConfig(projector="full", language_model=language_model), LoraSettings())
        lora = [p.requires_grad for n, p in again.named_parameters() if "lora_" in n]
        assert lora and all(trains == adapters_train for trains in lora), language_model


def _batch(tiny_dir):
    from mmllm import MultimodalProcessor

    processor = MultimodalProcessor.from_pretrained(tiny_dir)
    from easy_vqa import get_test_image_paths

    image = get_test_image_paths()[0]
    return processor([[{"role": "user", "content": "What shape is in the image?"}]], [[image]])


def test_stage2_full_trains_lm_and_keeps_vision(tiny_dir, tmp_path):
    base = MultimodalLM.from_pretrained(tiny_dir)
    model, metrics = run(tiny_dir, tmp_path, **{"parts.language_model": "full", "max_steps": 6})
    assert metrics[-1]["loss"] + metrics[-2]["loss"] < 0.9 * (metrics[0]["loss"] + metrics[1]["loss"])
    assert not torch.equal(base.language_model.lm_head.weight, model.language_model.lm_head.weight)
    before, after = state(base.vision_tower), state(model.vision_tower)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_non_finite_steps_are_skipped_and_reported(tiny_dir, tmp_path):
    poisoned = MultimodalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        poisoned.projector[0].weight[0, 0] = float("nan")
    from mmllm import MultimodalProcessor

    poisoned.save_pretrained(tmp_path / "poisoned")
    MultimodalProcessor.from_pretrained(tiny_dir).save_pretrained(tmp_path / "poisoned")
    model, metrics = run(tmp_path / "poisoned", tmp_path / "run", max_steps=3)
    assert metrics[-1]["skipped_steps"] == 3
    assert torch.equal(model.projector[2].weight, poisoned.projector[2].weight)


def _write_recipe(tiny_dir, out, path, **overrides) -> Path:
    path.write_text(yaml.safe_dump(recipe(tiny_dir, out, **overrides)))
    return path


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return state(MultimodalLM.from_pretrained(out / "model"))


def test_kill_and_resume_matches_uninterrupted_run(tiny_dir, tmp_path):
    settings = {"max_steps": 30, "save_every": 5, "parts.language_model": "lora", "lora.dropout": 0.1}
    straight = _write_recipe(tiny_dir, tmp_path / "straight", tmp_path / "a.yaml", **settings)
    assert main(["train", str(straight)]) == 0
    killed = _write_recipe(tiny_dir, tmp_path / "killed", tmp_path / "b.yaml", **settings)
    command = [sys.executable, "-m", "mmllm.cli", "train", str(killed)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = metrics.is_file() and metrics.read_text().count("\n")
        if (
            done
            and checkpoints(tmp_path / "killed")
            and done > int(checkpoints(tmp_path / "killed")[-1].name[5:])
        ):
            break
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run must be killed mid-way, not finish"
    last = checkpoints(tmp_path / "killed")[-1]
    assert int(last.name[5:]) < 30
    assert main(["train", str(killed), "--resume", "auto"]) == 0
    a, b = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "killed")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def test_stop_after_ends_early_on_the_full_schedule_and_resume_finishes_it(tiny_dir, tmp_path):
    _, straight = run(tiny_dir, tmp_path / "straight", save_every=6)
    _, stopped = run(tiny_dir, tmp_path / "stopped", save_every=6, stop_after=6)
    assert [m["lr"] for m in stopped] == [m["lr"] for m in straight][:6]  # not a 6-step schedule
    assert (tmp_path / "stopped" / "model" / "config.json").is_file()
    config = load_config(TrainConfig, None, base=recipe(tiny_dir, tmp_path / "stopped", save_every=6))
    finished = MultimodalLM.from_pretrained(train(config, resume="auto"))
    straight_model = MultimodalLM.from_pretrained(tmp_path / "straight" / "model")
    torch.testing.assert_close(finished.projector.state_dict(), straight_model.projector.state_dict())


def test_two_process_ddp_equals_one_process(tiny_dir, tmp_path):
    settings = {"max_steps": 4, "parts.language_model": "lora", "lora.dropout": 0.0, "save_every": 100}
    single = _write_recipe(tiny_dir, tmp_path / "single", tmp_path / "single.yaml", **settings)
    assert main(["train", str(single)]) == 0
    double = _write_recipe(tiny_dir, tmp_path / "ddp", tmp_path / "ddp.yaml", **settings)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "-m", "mmllm.cli", "train", str(double)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in result.stderr
    a, b = _final_weights(tmp_path / "single"), _final_weights(tmp_path / "ddp")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests FSDP over CPU processes")
def test_fsdp2_over_two_processes_equals_one_process_and_resumes_anywhere(tiny_dir, tmp_path):
    """The shipped FSDP config, launched by accelerate on 2 CPU processes (gloo): full fine-tuning
    ends with the weights of 1 process, and checkpoints resume across worlds, either way."""
    settings = {"max_steps": 4, "save_every": 2, "parts.language_model": "full"}
    single = _write_recipe(tiny_dir, tmp_path / "single", tmp_path / "single.yaml", **settings)
    assert main(["train", str(single)]) == 0

    def sharded(name: str, *arguments: str) -> str:
        recipe_file = _write_recipe(tiny_dir, tmp_path / name, tmp_path / f"{name}.yaml", **settings)
        config = REPO / "configs" / "accelerate" / "fsdp.yaml"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "2", "--mixed_precision", "no",
                   "-m", "mmllm.cli", "train", str(recipe_file), *arguments]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stderr

    log = sharded("fsdp")
    assert "2 process(es), DistributedType.FSDP" in log
    found = re.search(r"holds ([\d,]+) of ([\d,]+) parameters", log).group(1, 2)
    held, total = (int(n.replace(",", "")) for n in found)
    assert held < 0.6 * total  # sharded: each process holds about half
    halfway = tmp_path / "fsdp" / "checkpoints" / "step-000002"
    sharded("fsdp-resumed", "--resume", str(halfway))
    sharded("fsdp-from-single", "--resume", str(tmp_path / "single" / "checkpoints" / "step-000002"))
    resumed = _write_recipe(tiny_dir, tmp_path / "resumed", tmp_path / "resumed.yaml", **settings)
    assert main(["train", str(resumed), "--resume", str(halfway)]) == 0
    base, one = state(MultimodalLM.from_pretrained(tiny_dir)), _final_weights(tmp_path / "single")
    assert not torch.equal(base["language_model.model.layers.0.mlp.up_proj.weight"],
                           one["language_model.model.layers.0.mlp.up_proj.weight"])  # fmt: skip
    for run in ("fsdp", "fsdp-resumed", "fsdp-from-single", "resumed"):
        weights = _final_weights(tmp_path / run)
        for key in one:
            torch.testing.assert_close(one[key], weights[key], rtol=1e-4, atol=5e-5, msg=f"{run}: {key}")


@pytest.mark.slow
def test_compiled_decoder_layers_train_to_the_same_weights(tiny_dir, tmp_path):
    """`compile: true` (inductor, dynamic lengths) changes the speed only: the same losses, the same
    weights under the same names."""
    common = {"max_steps": 3, "parts.language_model": "lora", "lora.dropout": 0.0, "save_every": 100}
    eager, eager_metrics = run(tiny_dir, tmp_path / "eager", **common)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled, compiled_metrics = run(tiny_dir, tmp_path / "compiled", **common, compile=True)
    # Compiled, and shared: a graph or two serve both layers at every length.
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 4
    torch.testing.assert_close(
        [m["loss"] for m in compiled_metrics], [m["loss"] for m in eager_metrics], rtol=1e-5, atol=0
    )
    a, b = state(eager), state(compiled)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=5e-5, msg=key)


def test_gradient_accumulation_and_checkpointing_give_the_same_weights(tiny_dir, tmp_path):
    """A batch of 4 = 2 micro-batches of 2 (token-weighted loss), with or without recomputation."""
    # Four samples: every optimiser step sees all of them, however they are split.
    data = [{"format": "easy-vqa", "split": "train", "per_image": True, "limit": 4}]
    common = {
        "max_steps": 3,
        "parts.language_model": "lora",
        "lora.dropout": 0.0,
        "save_every": 100,
        "data.datasets": data,
        "data.group_by_length": False,
    }
    run(tiny_dir, tmp_path / "one", **common)
    run(tiny_dir, tmp_path / "accum", **common, grad_accum=2, **{"data.batch_size": 2})
    run(tiny_dir, tmp_path / "ckpt", **common, gradient_checkpointing=True)
    one = _final_weights(tmp_path / "one")
    curve = [(m["loss"], m["grad_norm"]) for m in _metrics(tmp_path / "one")]
    for other in ("accum", "ckpt"):
        other_curve = [(m["loss"], m["grad_norm"]) for m in _metrics(tmp_path / other)]
        torch.testing.assert_close(curve, other_curve, rtol=1e-5, atol=0)
        weights = _final_weights(tmp_path / other)
        for key in one:
            # Adam divides by sqrt(v): float noise in near-zero LoRA gradients grows to ~1e-5.
            torch.testing.assert_close(one[key], weights[key], rtol=1e-4, atol=5e-5, msg=f"{other}: {key}")


def test_token_target_loss_regresses_image_tokens_onto_the_description_in_order(tiny_dir):
    from mmllm.train.losses import projected_images, token_target_loss

    model = MultimodalLM.from_pretrained(tiny_dir)
    processor = MultimodalProcessor.from_pretrained(tiny_dir)
    from easy_vqa import get_train_image_paths

    chats = [
        [{"role": "user", "content": "<image>Describe."}, {"role": "assistant", "content": answer}]
        for answer in (" red circle", " blue")
    ]
    paths = get_train_image_paths()
    batch = processor(chats, [[paths[0]], [paths[1]]], train=True, padding_side="right")
    ends = processor.stop_token_ids
    loss = token_target_loss(model, batch, ignore_ids=ends)
    loss.backward()
    assert torch.isfinite(loss) and model.projector[0].weight.grad.abs().sum() > 0

    def word(text: str) -> torch.Tensor:
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"the tiny tokenizer splits {text!r}"
        return model.get_input_embeddings().weight[ids[0]].detach()

    count = projected_images(model, batch).shape[1]
    first = [word(" red")] * (count // 2) + [word(" circle")] * (count - count // 2)
    targets = torch.stack([torch.stack(first), torch.stack([word(" blue")] * count)])  # (2, N, D)
    last = model.projector[-1]
    with torch.no_grad():
        last.weight.zero_(), last.bias.zero_()
        assert float(token_target_loss(model, batch, ignore_ids=ends)) == pytest.approx(1.0)
    model.projector.forward = lambda features: targets  # the exact descriptions, in order
    assert float(token_target_loss(model, batch, ignore_ids=ends)) == pytest.approx(0.0, abs=1e-6)
    model.projector.forward = lambda features: torch.stack([targets[0].flip(0), targets[1]])
    assert float(token_target_loss(model, batch, ignore_ids=ends)) > 0.1  # circle before red: wrong slots
    # The vocabulary term: tokens far out along their target words are read as those words (its share of
    # the loss -> 0); the same tokens in swapped slots are read as the wrong words (a large share).
    model.projector.forward = lambda features: 50 * targets
    right = token_target_loss(model, batch, ignore_ids=ends, vocab_weight=1.0)
    right -= token_target_loss(model, batch, ignore_ids=ends)
    model.projector.forward = lambda features: 50 * torch.stack([targets[0].flip(0), targets[1]])
    wrong = token_target_loss(model, batch, ignore_ids=ends, vocab_weight=1.0)
    wrong -= token_target_loss(model, batch, ignore_ids=ends)
    assert float(right) < 0.05 and float(wrong) > 10


def test_contrastive_loss_trains_alongside(tiny_dir, tmp_path):
    from mmllm.train.losses import contrastive_loss

    model = MultimodalLM.from_pretrained(tiny_dir)
    from mmllm import MultimodalProcessor

    processor = MultimodalProcessor.from_pretrained(tiny_dir)
    from easy_vqa import get_train_image_paths

    paths = get_train_image_paths()
    chats = [
        [{"role": "user", "content": "What shape?"}, {"role": "assistant", "content": answer}]
        for answer in ("circle", "triangle", "rectangle")
    ]
    batch = processor(chats, [[paths[i]] for i in range(3)], train=True, padding_side="right")
    loss = contrastive_loss(model, batch)
    assert torch.isfinite(loss) and 0 < float(loss) < 2 * torch.log(torch.tensor(3.0))
    loss.backward()
    assert model.projector[0].weight.grad.abs().sum() > 0
    _, metrics = run(
        tiny_dir, tmp_path, max_steps=4, contrastive_weight=0.5, **{"data.group_by_length": False}
    )
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)


IMAGE_ONLY_STAGES = {
    # CLIP's contrastive loss against the mean embedding of each image's answers (its colour).
    "contrastive": ("contrastive_weight", {"per_image": True, "answer_types": ["color"]}),
    # Image tokens regressed onto the embeddings of the image's description (" red circle").
    "token_target": ("token_target_weight", {"describe": True}),
}


@pytest.mark.parametrize("loss", IMAGE_ONLY_STAGES)
def test_image_only_stage_trains_the_tower_without_running_the_lm(loss, tiny_dir, tmp_path, monkeypatch):
    weight, dataset = IMAGE_ONLY_STAGES[loss]
    lm_calls = []
    monkeypatch.setattr(
        MultimodalLM, "forward", lambda self, *a, **k: lm_calls.append(1) or pytest.fail("LM forward ran")
    )
    base = MultimodalLM.from_pretrained(tiny_dir)
    settings = {
        "language_loss_weight": 0.0,
        weight: 1.0,
        "parts.vision_tower": "full",
        "optim.lr_vision": 3e-3,
        "optim.lr_projector": 3e-3,
        "data.batch_size": 8,
        "data.datasets": [{"format": "easy-vqa", "split": "train", "limit": 64, **dataset}],
        "max_steps": 40,
    }
    model, metrics = run(tiny_dir, tmp_path, **settings)
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert not lm_calls and len(losses) == 40
    assert sum(losses[-8:]) < 0.8 * sum(losses[:8])  # the first pass over the 64 images vs the fifth
    if loss == "token_target":
        # Same seed, batch and weights: step 1 differs only by the vocabulary cross-entropy (~ln V).
        settings.update({"max_steps": 1, "token_target_vocab_weight": 1.0})
        _, with_vocab = run(tiny_dir, tmp_path / "vocab", **settings)
        assert with_vocab[0]["loss"] > losses[0] + 3
    for part in ("vision_tower", "projector"):
        before, after = state(getattr(base, part)), state(getattr(model, part))
        assert any(not torch.equal(before[k], after[k]) for k in before), f"{part} did not train"
    lm_before, lm_after = state(base.language_model), state(model.language_model)
    assert all(torch.equal(lm_before[k], lm_after[k]) for k in lm_before)
    # A new model (other projector, token layout or LM) can start from this trained tower.
    tower, pretrained = load_vision_tower(str(tmp_path / "model"), "patch")
    assert pretrained and all(torch.equal(v, state(model.vision_tower)[k]) for k, v in state(tower).items())
    with pytest.raises(MmllmError, match="feature mode 'patch'"):
        load_vision_tower(str(tmp_path / "model"), "pooled")
    with pytest.raises(
        MmllmError, match=r"no trained vision tower .*trained parts: language_model.*a CLIP model"
    ):
        load_vision_tower(str(tiny_dir), "patch")  # its tower is random


def test_an_image_only_stage_needs_an_image_loss(tiny_dir, tmp_path):
    with pytest.raises(MmllmError, match="contrastive_weight or token_target_weight"):
        run(tiny_dir, tmp_path / "nothing", language_loss_weight=0.0)


def test_a_used_output_dir_is_refused_or_cleared_never_mixed(tiny_dir, tmp_path, capfd):
    common = {"max_steps": 4, "save_every": 2, "eval_data.datasets": recipe(tiny_dir, "")["data"]["datasets"]}
    common["parts.language_model"] = "lora"
    _, first = run(tiny_dir, tmp_path, **common)
    console = capfd.readouterr().err
    assert "step 4: eval_loss" in console and "lr_projector" in console and "lr_lora" in console
    assert {"lr_projector", "lr_lora"} <= set(first[0])  # each trained part's own rate, logged too
    with pytest.raises(MmllmError, match=r"holds a previous run .*--resume auto"):
        run(tiny_dir, tmp_path, **common)
    _, again = run(tiny_dir, tmp_path, **common, overwrite_output_dir=True)
    assert [m["step"] for m in again if "loss" in m] == [1, 2, 3, 4]  # the old run's rows are gone
    assert [c.name for c in checkpoints(tmp_path)] == ["step-000002", "step-000004"]


def test_lora_adapts_every_projection_of_each_lm_kind(lm_kind):
    """Llama and Qwen2 split q/k/v and gate/up, Phi-3 fuses them: the default targets cover both."""
    from mmllm.train.config import LoraSettings, PartsConfig
    from mmllm.train.parts import setup_parts

    model, _ = make_tiny(lm_kind)
    setup_parts(model, PartsConfig(projector="full", language_model="lora"), LoraSettings())
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in model.named_parameters() if ".lora_A" in n
    }
    expected = {"phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}}.get(
        lm_kind, {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    assert adapted == expected
    with pytest.raises(MmllmError, match="match no module of this LM; its linear layers"):
        setup_parts(
            make_tiny(lm_kind)[0], PartsConfig(language_model="lora"), LoraSettings(target_modules=["c_attn"])
        )
