"""llama.cpp: the mmproj GGUF export, checked in llama.cpp's own multimodal engine (mtmd), and the
llama.cpp backend, which runs every design with mmllm's image rows (`--backend llama.cpp`)."""

from __future__ import annotations

import ctypes
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    check_streams_and_cancels,
    check_streams_equal_answers,
    easy_vqa_predictions,
    recipe,
    run_jobs,
    save_tiny,
    serving,
    tiny_vit,
)
from mmllm.cli import main
from mmllm.config import load_config
from mmllm.engine.scheduler import Scheduler
from mmllm.engine.settings import GenerationSettings
from mmllm.engine.torch_backend import Pipeline
from mmllm.errors import MmllmError
from mmllm.export.gguf import export_gguf

QUESTION = "What is in this image?"


llama_cpp = pytest.importorskip("llama_cpp")
mtmd = pytest.importorskip("llama_cpp.mtmd_cpp")


def square_image(size: int) -> Image.Image:
    """A square picture at the tower's own size: mmllm and llama.cpp then see the same pixels."""
    pixels = np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


class Mtmd:
    """llama.cpp's own multimodal path over an export: the LM GGUF, the mmproj, mtmd's tokenizer and
    image encoder, and greedy decoding in llama.cpp."""

    def __init__(self, folder):
        settings = json.loads((folder / "mmllm_llamacpp.json").read_text())
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(folder / settings["gguf"]["f32"]).encode(), llama_cpp.llama_model_default_params()
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx, params.n_batch = 512, 512
        params.type_k = params.type_v = 0  # GGML_TYPE_F32: an f16 cache moves logits by ~1e-2
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        options = mtmd.mtmd_context_params_default()
        options.use_gpu, options.warmup, options.print_timings, options.n_threads = False, False, False, 2
        self.mtmd = mtmd.mtmd_init_from_file(str(folder / settings["mmproj"]).encode(), self.model, options)
        assert self.mtmd, "mtmd could not load the mmproj"
        self.vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def chunks(self, prompt: str, image: Image.Image):
        data = np.asarray(image.convert("RGB"), np.uint8).tobytes()
        bitmap = mtmd.mtmd_bitmap_init(
            image.width, image.height, (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        )
        chunks = mtmd.mtmd_input_chunks_init()
        text = mtmd.mtmd_input_text()
        text.text, text.text_len = prompt.encode(), len(prompt.encode())
        text.add_special, text.parse_special = False, True
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        assert mtmd.mtmd_tokenize(self.mtmd, chunks, ctypes.byref(text), bitmaps, 1) == 0
        return chunks

    def parts(self, chunks) -> list:
        """Each chunk's token ids (text) or its image rows (N, D), as llama.cpp computes them."""
        parts = []
        for index in range(mtmd.mtmd_input_chunks_size(chunks)):
            chunk = mtmd.mtmd_input_chunks_get(chunks, index)
            if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                count = ctypes.c_size_t()
                tokens = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(count))
                parts.append([tokens[i] for i in range(count.value)])
            else:
                assert mtmd.mtmd_encode_chunk(self.mtmd, chunk) == 0
                rows = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                width = llama_cpp.llama_model_n_embd(self.model)
                embd = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self.mtmd), shape=(rows * width,))
                parts.append(embd.reshape(rows, width).copy())
        return parts

    def greedy(self, chunks, tokens: int, stop_ids: list[int]) -> list[int]:
        past = llama_cpp.llama_pos(0)
        assert (
            mtmd.mtmd_helper_eval_chunks(self.mtmd, self.ctx, chunks, 0, 0, 512, True, ctypes.byref(past))
            == 0
        )
        position, answer = past.value, []
        batch = llama_cpp.llama_batch_init(1, 0, 1)
        for _ in range(tokens):
            logits = llama_cpp.llama_get_logits_ith(self.ctx, -1)
            token = int(np.ctypeslib.as_array(logits, shape=(self.vocab,)).argmax())
            if token in stop_ids:
                break
            answer.append(token)
            batch.n_tokens, batch.token[0], batch.pos[0] = 1, token, position
            batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = 1, 0, True
            assert llama_cpp.llama_decode(self.ctx, batch) == 0
            position += 1
        llama_cpp.llama_batch_free(batch)
        return answer


def llava_design(folder, train_steps: int = 0, size: int = 32):
    """A tiny model of LLaVA's design on a CLS-free ViT (what llama.cpp's llava graph computes exactly),
    saved; with `train_steps`, trained first by `mmllm train`."""
    design = {"vision": tiny_vit(size), "feature_mode": "patch", "projector": "mlp_gelu", "lm_init_std": 0.3}
    model = save_tiny(folder / "base", **design)
    if not train_steps:
        return model
    from mmllm.train.config import TrainConfig
    from mmllm.train.loop import train

    lora = {"parts.language_model": "lora", "max_steps": train_steps, "save_every": train_steps}
    run = recipe(model, folder / "run", **lora)
    return train(load_config(TrainConfig, None, base=run))


@pytest.mark.parametrize(
    ("train_steps", "size"), [(0, 32), (0, 64), (6, 32)], ids=["random", "64px", "trained"]
)
def test_llama_cpps_own_engine_sees_and_answers_as_mmllm(tmp_path, train_steps, size):
    """64 px images in 8 px patches: 64 image rows, as the easy-VQA tower has."""
    model = llava_design(tmp_path, train_steps, size)
    folder = export_gguf(str(model), tmp_path / "gguf", ["f32"])
    assert (folder / "mmproj-f32.gguf").is_file()
    pipeline = Pipeline.load(str(model), device="cpu")
    processor = pipeline.processor
    image = square_image(processor.image_processor.size)
    conversation = [{"role": "user", "content": f"{processor.image_token}\n{QUESTION}"}]
    marked = processor._place_images(conversation, 1, image_words=[mtmd.mtmd_default_marker().decode()])
    engine = Mtmd(folder)
    chunks = engine.chunks(processor.render(marked, add_generation_prompt=True), image)
    before, rows, after = engine.parts(chunks)

    # The text around the image is tokenised as mmllm does, and the image rows agree row by row.
    ours = processor.encode_text(conversation, 1)["input_ids"]
    placeholders = [i for i, t in enumerate(ours) if t == processor.image_token_id]
    assert before == ours[: placeholders[0]] and after == ours[placeholders[-1] + 1 :]
    with torch.no_grad():
        pixels = processor.image_processor([image])
        expected = pipeline.model.project_images(pipeline.model.get_image_features(pixels))[0].numpy()
    cosine = (rows * expected).sum(-1) / np.linalg.norm(rows, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert rows.shape == expected.shape and cosine.min() >= 0.999, cosine.min()

    answer = pipeline.complete([conversation], [[image]], GenerationSettings(max_new_tokens=8))[0]
    tokens = engine.greedy(chunks, 8, processor.stop_token_ids)
    assert processor.tokenizer.decode(tokens, skip_special_tokens=True) == answer.text


def test_ollama_modelfile_names_the_lm_then_the_mmproj(tmp_path):
    folder = export_gguf(str(llava_design(tmp_path)), tmp_path / "gguf")
    lines = (folder / "Modelfile").read_text().splitlines()
    assert lines[:2] == ["FROM ./model-q4_k_m.gguf", "FROM ./mmproj-f16.gguf"]
    assert {"model-f16.gguf", "model-q8_0.gguf", "model-q4_k_m.gguf"} <= {p.name for p in folder.iterdir()}
    assert 'PARAMETER stop "<|im_end|>"' in lines


# -- the backend ---------------------------------------------------------------------------------------
DESIGNS = {
    "pooled": {},
    "snapped patches": {"feature_mode": "patch", "projector_snap_to_vocab": True},
    "shuffled patches": {"feature_mode": "patch", "vision_pixel_shuffle": 2, "projector": "mlp_gelu"},
}


@pytest.fixture(
    scope="module", params=[("qwen2", "pooled"), ("llama", "snapped patches"), ("qwen2", "shuffled patches")]
)
def pair(request, tmp_path_factory):
    kind, design = request.param
    root = tmp_path_factory.mktemp("llama_cpp")
    model = save_tiny(root / "model", kind, lm_init_std=0.3, **DESIGNS[design])
    export_gguf(str(model), root / "gguf", ["f32", "q8_0"])
    from mmllm.engine.llama_cpp import LlamaCppBackend

    return Pipeline.load(str(model), device="cpu"), LlamaCppBackend.load(root / "gguf", "f32")


def conversations(images):
    return [
        [{"role": "user", "content": "<image>\nWhat is it?"}],
        [{"role": "user", "content": "A longer question without an image, about colours?"}],
        [{"role": "user", "content": "<image>\nAnd this one?"}],
    ], [[images[0]], [], [images[1]]]


def test_llama_cpp_rows_end_as_torch_rows_do(pair, images):
    torch_backend, llama = pair
    prompts, pictures = conversations(images)
    settings = GenerationSettings(max_new_tokens=12)
    reference = torch_backend.complete(prompts, pictures, settings)
    assert llama.complete(prompts, pictures, settings) == reference
    stop, limits = (
        [[reference[0].text[2:4]], [], []],
        [settings, settings, replace(settings, max_new_tokens=3)],
    )
    alike = [b.complete(prompts, pictures, limits, stop=stop) for b in pair]
    assert alike[0] == alike[1]
    assert alike[1][0].finish_reason == "stop" and alike[1][2].completion_tokens == 3


def test_llama_cpp_streams_equal_answers(pair, images):
    prompts, pictures = conversations(images)
    check_streams_equal_answers(pair[1], prompts[:2], pictures[:2])


def test_rows_that_do_not_fit_the_cache_together_take_turns(pair, images, monkeypatch):
    torch_backend, llama = pair
    prompts, pictures = conversations(images)
    settings = GenerationSettings(max_new_tokens=10, ignore_eos=True)
    together = llama.complete(prompts, pictures, settings)
    assert together == torch_backend.complete(prompts, pictures, settings)
    with monkeypatch.context() as patch:
        patch.setattr(llama.session, "max_rows", 1)
        assert llama.complete(prompts, pictures, settings) == together
    longest = max(len(llama.prepare(c, i).input_ids) for c, i in zip(prompts, pictures, strict=True))
    monkeypatch.setattr(llama.session, "kv_tokens", longest + 10)  # room for one row at a time
    assert llama.complete(prompts, pictures, settings) == together


def test_the_scheduler_runs_llama_cpp_rows_as_they_run_alone(pair, images):
    torch_backend, llama = pair
    prompts, pictures = conversations(images)
    prepared = [llama.prepare(c, i) for c, i in zip(prompts * 2, pictures * 2, strict=True)]
    limits = [9, 2, 14, 5, 11, 1]
    items = [
        (p, GenerationSettings(max_new_tokens=n, ignore_eos=True))
        for p, n in zip(prepared, limits, strict=True)
    ]
    queue = Scheduler(llama, max_rows=2, step_tokens=8)  # rows join mid-answer, prompts read in chunks
    busy = run_jobs(queue, items)
    queue.close()
    alone = [torch_backend.complete_prompts([p], s)[0] for p, s in items]
    assert busy == alone
    assert not llama.session.prompts and not llama.session.rows_held


def test_llama_cpp_streams_samples_and_cancels(pair, images):
    llama = pair[1]
    check_streams_and_cancels(llama, images[0])

    def ask(**options) -> str:
        settings = {"max_new_tokens": 10, "ignore_eos": True, "temperature": 1.5, "top_k": 20, **options}
        return llama.ask(images[0], "What is it?", GenerationSettings(**settings))

    greedy = ask(temperature=0.0)
    sampled = [ask(seed=seed) for seed in range(4)]
    assert ask(seed=0) == sampled[0]  # the same seed, the same answer
    assert len(set(sampled)) >= 3, sampled  # other seeds, other answers
    assert greedy not in sampled  # the temperature is applied ...
    assert ask(temperature=1e-4, seed=3) == greedy  # ... as a divisor: a tiny one is all but greedy
    # top_k=1 or a tiny top_p leave only the argmax, however hot: both are applied.
    assert ask(top_k=1, temperature=100.0, seed=1) == greedy
    assert ask(top_k=0, top_p=1e-9, temperature=100.0, seed=2) == greedy


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    model = save_tiny(root / "model", lm_init_std=0.3, projector_snap_to_vocab=True, feature_mode="patch")
    export_gguf(str(model), root / "gguf", ["f32", "q4_k_m"])
    return model, root / "gguf"


def test_every_command_runs_on_the_llama_cpp_backend(exported, images, tmp_path, capsys, monkeypatch):
    from mmllm.engine.llama_cpp import LlamaCppBackend

    model, gguf = exported
    kinds = []  # the GGUF file each backend the commands load runs
    start = LlamaCppBackend.__init__
    monkeypatch.setattr(LlamaCppBackend, "__init__", lambda self, *a: kinds.append(a[1]) or start(self, *a))
    ask = [str(images[0]), "What is it?", "--max-new-tokens", "6"]
    assert main(["ask", *ask, "--model", str(model)]) == 0
    torch_answer = capsys.readouterr().out
    llama = ["--model", str(gguf), "--backend", "llama.cpp"]
    assert main(["ask", *ask, *llama, "--dtype", "f32", "--stream"]) == 0
    assert capsys.readouterr().out == torch_answer
    kinds.clear()
    assert main(["ask", *ask, *llama]) == 0  # auto: the q4_k_m file
    assert kinds == ["q4_k_m"]
    q4_answer = LlamaCppBackend.load(gguf, "q4_k_m").ask(
        images[0], "What is it?", GenerationSettings(max_new_tokens=6)
    )
    assert capsys.readouterr().out == q4_answer + "\n"
    assert main(["caption", str(images[0]), str(images[1]), *llama]) == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.strip().split("\n")] == [
        str(images[0]),
        str(images[1]),
    ]
    for refused, message in (
        (["--num-beams", "2"], "num_beams"),
        (["--dtype", "q8_0"], "not q8_0"),
        (["--device", "cuda"], "runs on the CPU"),
    ):
        assert main(["ask", *ask, *llama, *refused]) == 2
        assert message in capsys.readouterr().err
    assert main(["ask", *ask, "--model", str(model), "--backend", "llama.cpp"]) == 2
    assert "not a `mmllm export gguf` folder" in capsys.readouterr().err
    torch_predictions = easy_vqa_predictions(tmp_path / "torch", model, "torch")
    assert easy_vqa_predictions(tmp_path / "llama.cpp", gguf, "llama.cpp", "f32") == torch_predictions


def test_serve_on_the_llama_cpp_backend(exported):
    model, gguf = exported
    body = {"messages": [{"role": "user", "content": "What colour is it?"}], "max_tokens": 6}
    answers = {}
    for options in ((str(model),), (str(gguf), "--backend", "llama.cpp", "--dtype", "f32")):
        with serving(*options) as url:
            import httpx

            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            answers[options[-1]] = reply.json()["choices"][0]["message"]["content"]
    assert answers["f32"] == answers[str(model)]


def test_an_export_without_the_asked_file_is_refused(exported):
    from mmllm.engine.llama_cpp import LlamaCppBackend

    with pytest.raises(MmllmError, match="export gguf --outtype f16"):
        LlamaCppBackend.load(exported[1], "f16")
