"""Exports: llava-hf (transformers Llava), INT8 (torchao), ONNX (onnxruntime), GGUF."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from conftest import make_tiny, tiny_vit
from mmllm.errors import MmllmError
from mmllm.export.mmproj import mmproj_refusal
from mmllm.models.projector import PROJECTOR_TYPES
from mmllm.models.timm_vision import describe_architecture

QUESTION = [{"role": "user", "content": "<image>\nWhat shape is it?"}]


# The standard multimodal message transformers' processors and vLLM's chat take.
STANDARD_QUESTION = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is it?"}]}
]
# The llava-hf layout of the hub's checkpoints (llava-hf/llava-1.5-7b-hf): what vLLM's loader reads.
HUB_LAYOUT = (
    "vision_tower.vision_model.",
    "multi_modal_projector.",
    "language_model.model.",
    "language_model.lm_head.",
)


@pytest.mark.parametrize(("kind", "use_cls"), [("qwen2", False), ("qwen2", True), ("llama", False)])
def test_llava_hf_export_gives_the_same_logits_and_prompt(tmp_path, images, kind, use_cls):
    from jinja2 import TemplateError
    from PIL import Image
    from safetensors import safe_open
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

    from mmllm.export.llava_hf import export_llava_hf

    model, processor = make_tiny(
        kind, feature_mode="patch", projector="mlp_gelu", lm_init_std=0.3, vision_use_cls=use_cls
    )
    source = tmp_path / "mmllm"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    # mmllm places the image before the question itself.
    batch = processor([[{"role": "user", "content": "What shape is it?"}]], [[images[0]]])
    with torch.no_grad():
        expected = model(**batch).logits

    export = export_llava_hf(str(source), tmp_path / "llava")
    with safe_open(export / "model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert all(key.startswith(HUB_LAYOUT) for key in keys), keys
    assert any(key.startswith("vision_tower.vision_model.") for key in keys)
    assert not any(key.startswith("vision_tower.embeddings.") for key in keys)
    tied = kind == "qwen2"  # the fixture's Qwen2 ties its head to the embeddings; the hub stores it once
    assert ("language_model.lm_head.weight" in keys) != tied
    llava, loading = LlavaForConditionalGeneration.from_pretrained(export, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    llava.eval()

    # PIL's resize, as ours: with torchvision present transformers picks a torchvision resize that
    # antialiases differently (a few pixels off by ~0.015), a difference of theirs, not of the export.
    llava_processor = AutoProcessor.from_pretrained(export, use_fast=False)
    text = llava_processor.apply_chat_template(STANDARD_QUESTION, add_generation_prompt=True)
    assert text == processor.render(QUESTION, add_generation_prompt=True)
    assert llava_processor.apply_chat_template(QUESTION, add_generation_prompt=True) == text
    assert AutoTokenizer.from_pretrained(export).chat_template == llava_processor.chat_template
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is it?"}]}]
    with pytest.raises(TemplateError, match="reads text and image parts, not video"):
        llava_processor.apply_chat_template(video)
    inputs = llava_processor(text=text, images=Image.open(images[0]), return_tensors="pt")
    assert inputs["input_ids"].tolist() == batch["input_ids"].tolist()  # Llava expands <image> as we do
    torch.testing.assert_close(inputs["pixel_values"], batch["pixel_values"], atol=1e-5, rtol=0)
    with torch.no_grad():
        logits = llava(**inputs).logits
    vocab = expected.shape[-1]  # the export adds a zero row for the image token when the LM lacks it
    torch.testing.assert_close(logits[..., :vocab], expected, atol=1e-4, rtol=1e-4)
    assert (logits[..., vocab:] == 0).all()
    greedy = dict(max_new_tokens=5, do_sample=False)
    ours = model.generate(**batch, **greedy, eos_token_id=None)
    theirs = llava.generate(**inputs, **greedy, eos_token_id=None)
    assert (
        ours[:, batch["input_ids"].shape[1] :].tolist() == theirs[:, inputs["input_ids"].shape[1] :].tolist()
    )


def test_llava_hf_export_refuses_other_designs(tmp_path):
    from mmllm.export.llava_hf import to_llava

    model, processor = make_tiny("qwen2", feature_mode="pooled", projector="mlp_ln")
    with pytest.raises(MmllmError, match="patch features and the mlp_gelu projector"):
        to_llava(model, processor)
    model, processor = make_tiny("qwen2", feature_mode="patch", projector="mlp_gelu", vision_pixel_shuffle=2)
    with pytest.raises(MmllmError, match="cannot carry vision_pixel_shuffle"):
        to_llava(model, processor)
    model, processor = make_tiny(
        "qwen2", feature_mode="patch", projector="mlp_gelu", projector_snap_to_vocab=True
    )
    with pytest.raises(MmllmError, match="cannot carry projector_snap_to_vocab"):
        to_llava(model, processor)


# Every projector design that makes image rows, with and without snapping image tokens to words (the
# labels projector makes words instead, from a timm classifier: tests/test_timm_tower.py).
DESIGNS = [
    {"projector": projector, "projector_snap_to_vocab": snap}
    for projector in PROJECTOR_TYPES
    if projector != "labels"
    for snap in (False, True)
]
DESIGN_IDS = [f"{d['projector']}{'-snap' if d['projector_snap_to_vocab'] else ''}" for d in DESIGNS]


@pytest.mark.parametrize("design", DESIGNS, ids=DESIGN_IDS)
@pytest.mark.parametrize("scheme", ["weight-only", "dynamic"])
def test_int8_export_loads_as_int8_and_answers_like_fp32(tmp_path, images, scheme, design):
    from torchao.quantization import Int8Tensor

    from mmllm.engine.settings import GenerationSettings
    from mmllm.engine.torch_backend import Pipeline
    from mmllm.export.int8 import export_int8
    from mmllm.models.multimodal import MultimodalLM

    model, processor = make_tiny("qwen2", lm_init_std=0.3, **design)
    source = tmp_path / "fp32"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    export_int8(str(source), tmp_path / "int8", scheme)

    loaded = MultimodalLM.from_pretrained(tmp_path / "int8")
    assert isinstance(loaded.language_model.model.layers[0].mlp.up_proj.weight, Int8Tensor)
    size = lambda folder: (folder / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "int8") < 0.6 * size(source)  # Linear weights shrink 4x; embeddings stay fp32
    batch = processor([QUESTION], [[images[0]]])
    with torch.no_grad():
        reference, quantized = model(**batch).logits[0, -1], loaded(**batch).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(reference, quantized, dim=0) > 0.99
    settings = GenerationSettings(max_new_tokens=4, ignore_eos=True)
    answer = Pipeline.load(str(tmp_path / "int8"), device="cpu").ask(images[0], "What shape is it?", settings)
    assert answer and answer == Pipeline(loaded, processor).ask(images[0], "What shape is it?", settings)
    # --dtype int8 quantises any model in memory (a random model's greedy answer is too close a call
    # between tokens to compare exactly: compare the logits).
    in_memory = Pipeline.load(str(source), device="cpu", dtype="int8")
    assert isinstance(in_memory.model.language_model.model.layers[0].mlp.up_proj.weight, Int8Tensor)
    with torch.no_grad():
        logits = in_memory.model(**batch).logits[0, -1]
    assert torch.nn.functional.cosine_similarity(reference, logits, dim=0) > 0.98  # activations int8 too


@pytest.mark.parametrize("pixel_shuffle", [1, 2])
@pytest.mark.parametrize("design", DESIGNS, ids=DESIGN_IDS)
def test_onnx_export_matches_pytorch_logits_and_greedy_answers(tmp_path, images, pixel_shuffle, design):
    from mmllm.engine.onnx import OnnxBackend
    from mmllm.engine.settings import GenerationSettings
    from mmllm.engine.torch_backend import Pipeline
    from mmllm.export.onnx import export_onnx

    model, processor = make_tiny(
        "qwen2", feature_mode="patch", lm_init_std=0.3, vision_pixel_shuffle=pixel_shuffle, **design
    )
    source = tmp_path / "model"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    export_onnx(str(source), tmp_path / "onnx")
    onnx = OnnxBackend.load(tmp_path / "onnx")

    conversations = [QUESTION, [{"role": "user", "content": "<image>\nA longer question, about colours?"}]]
    pictures = [[images[0]], [images[1]]]
    batch = processor(conversations, pictures)  # left-padded
    with torch.no_grad():
        expected = model(**batch).logits[:, -1]
    embeds, mask = onnx.prompt_embeddings(
        [onnx.prepare(c, i) for c, i in zip(conversations, pictures, strict=True)]
    )
    positions = (mask.cumsum(1) - 1).clip(min=0)
    shape = (2, model.config.text_config.num_key_value_heads, 0, onnx.settings["head_dim"])
    cache = {n: torch.zeros(shape).numpy() for n in [i.name for i in onnx.decoder.get_inputs()][3:]}
    logits = onnx.decoder.run(
        None, {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions, **cache}
    )[0]
    torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=1e-4)

    settings = GenerationSettings(max_new_tokens=12)
    assert onnx.generate(conversations, pictures, settings) == Pipeline(model, processor).generate(
        conversations, pictures, settings
    )


def test_onnx_int8_decoder_is_a_quarter_of_the_bytes_and_answers_alike(tmp_path, images):
    from mmllm.engine.onnx import OnnxBackend
    from mmllm.engine.settings import GenerationSettings
    from mmllm.export.onnx import export_onnx

    model, processor = make_tiny("qwen2", lm_init_std=0.3)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    decoder_bytes = {}
    logits = {}
    for weights in ("fp32", "int8"):
        folder = export_onnx(str(tmp_path / "model"), tmp_path / weights, weights)
        graph = onnx.load(str(folder / "decoder.onnx")).graph
        decoder_bytes[weights] = sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)
        pipeline = OnnxBackend.load(folder)
        embeds, mask = pipeline.prompt_embeddings([pipeline.prepare(QUESTION, [images[0]])])
        cache = {
            i.name: np.zeros([1, *i.shape[1:2], 0, *i.shape[3:]], np.float32)
            for i in pipeline.decoder.get_inputs()[3:]
        }
        inputs = {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": mask.cumsum(1) - 1,
            **cache,
        }
        logits[weights] = torch.from_numpy(pipeline.decoder.run(None, inputs)[0][0])
    ops = {
        node.op_type
        for node in onnx.load(str(tmp_path / "int8" / "decoder.onnx"), load_external_data=False).graph.node
    }
    assert "MatMulNBits" in ops
    assert decoder_bytes["int8"] < 0.4 * decoder_bytes["fp32"]
    assert torch.nn.functional.cosine_similarity(logits["fp32"], logits["int8"], dim=0) > 0.99
    # The int8 graphs answer a question the same alone and in a left-padded batch.
    int8 = OnnxBackend.load(tmp_path / "int8")
    settings = GenerationSettings(max_new_tokens=4, ignore_eos=True)
    alone = int8.ask(images[0], "What is it?", settings)
    longer = [{"role": "user", "content": "Describe the picture in a few more words, please."}]
    batch = int8.generate(
        [[{"role": "user", "content": "What is it?"}], longer], [[images[0]], [images[1]]], settings
    )
    assert alone and batch[0] == alone


def test_onnx_backend_from_the_cli(tmp_path, images, capsys):
    from mmllm.cli import main

    model, processor = make_tiny("qwen2", lm_init_std=0.3)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    assert main(["export", "onnx", str(tmp_path / "model"), str(tmp_path / "onnx")]) == 0
    assert "onnx: wrote" in capsys.readouterr().out
    args = [str(images[0]), "What is it?", "--max-new-tokens", "6"]
    assert main(["ask", *args, "--model", str(tmp_path / "model")]) == 0
    torch_answer = capsys.readouterr().out
    assert main(["ask", *args, "--model", str(tmp_path / "onnx"), "--backend", "onnx"]) == 0
    assert capsys.readouterr().out == torch_answer
    assert main(["ask", *args, "--model", str(tmp_path / "model"), "--backend", "onnx"]) == 2
    assert "not a `mmllm export onnx` folder" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_gguf_export_round_trips_through_transformers(tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmllm.export.gguf import bytes_read_per_token, export_gguf

    model, processor = make_tiny(kind, lm_init_std=0.3)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    path = export_gguf(str(tmp_path / "model"), tmp_path / "gguf", ["f32"]) / "model-f32.gguf"
    # Decoding reads one row of the embeddings, unless they are the output matrix too (tied: qwen2 here).
    lm = model.language_model
    unread = 0 if lm.config.tie_word_embeddings else lm.get_input_embeddings().weight.numel()
    assert bytes_read_per_token(path) == 4 * (lm.num_parameters() - unread)

    text = "What shape is it? It is a blue square."
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tokenizer(text)["input_ids"] == processor.tokenizer(text)["input_ids"]
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    ids = torch.tensor([processor.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model.language_model(ids).logits, atol=1e-4, rtol=1e-4)


def test_gguf_export_refuses_other_architectures(tmp_path):
    from mmllm.export.gguf import export_gguf

    model, processor = make_tiny("phi3")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    with pytest.raises(MmllmError, match="supports qwen2, llama"):
        export_gguf(str(tmp_path / "model"), tmp_path / "out")


@pytest.mark.parametrize(
    ("design", "reason"),
    [
        ({}, "pooled"),
        ({"feature_mode": "patch"}, "mlp_ln"),
        ({"feature_mode": "patch", "projector": "mlp_gelu", "vision_use_cls": True}, "CLS"),
        ({"feature_mode": "patch", "projector": "mlp_gelu", "vision_pixel_shuffle": 2}, "pixel-shuffle"),
        ({"feature_mode": "patch", "projector": "mlp_gelu", "projector_snap_to_vocab": True}, "nearest word"),
    ],
)
def test_mmproj_is_refused_with_what_llama_cpp_lacks(design, reason):
    model, _ = make_tiny("qwen2", **design)
    assert reason in mmproj_refusal(model)


def test_mmproj_is_written_for_a_cls_free_vit_with_llavas_projector_only():
    vit = {"vision": tiny_vit(), "feature_mode": "patch"}
    assert mmproj_refusal(make_tiny("qwen2", projector="mlp_gelu", **vit)[0]) is None
    assert "mlp_ln" in mmproj_refusal(make_tiny("qwen2", **vit)[0])
    assert "CLS token" in mmproj_refusal(make_tiny("qwen2", feature_mode="patch", projector="mlp_gelu")[0])
    cnn = describe_architecture("test_efficientnet", image_size=64)
    model = make_tiny(
        "qwen2", vision=cnn, feature_mode="patch", projector="mlp_gelu", vision_feature_layer=-1
    )[0]
    assert "no graph for timm's test_efficientnet" in mmproj_refusal(model)
