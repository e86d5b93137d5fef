"""The CPU decoding path `Pipeline.load` takes (grouped-query attention, linears in oneDNN's layout, a KV
cache with spare columns, prompts read together) computes what the plain path computes; and `mmllm
serve`, which runs the model from its first thread, still stops cleanly on SIGTERM and fails cleanly
on a port in use."""

from __future__ import annotations

import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from conftest import make_tiny, save_tiny, start_server
from mmllm.engine.backend import Prompt
from mmllm.engine.prefix_cache import PrefixCache
from mmllm.engine.torch_backend import Pipeline, TorchSession, slack_cache
from mmllm.models.attention import use_grouped_attention
from mmllm.models.language import cache_keyword
from mmllm.models.packed_linear import FusedPart, PackedLinear, pack_linears
from mmllm.serve.launch import free_port

DESIGN = {"feature_mode": "patch", "lm_init_std": 0.3}


def decode_logits(lm, ids: torch.Tensor, mask: torch.Tensor, steps: int = 3) -> list[torch.Tensor]:
    """A left-padded prompt batch, then `steps` greedy tokens: every pass's last logits."""
    cache, positions = {cache_keyword(lm): DynamicCache()}, (mask.cumsum(1) - 1).clamp(min=0)
    out = lm(input_ids=ids, attention_mask=mask, position_ids=positions, **cache)
    logits = [out.logits[:, -1]]
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
        positions = positions[:, -1:] + 1
        token = logits[-1].argmax(-1, keepdim=True)
        out = lm(input_ids=token, attention_mask=mask, position_ids=positions, **cache)
        logits.append(out.logits[:, -1])
    return logits


@torch.inference_mode()
def test_grouped_attention_decodes_as_eager_attention(lm_kind):
    """qwen2 and llama share KV heads between query heads (4 over 2); phi3 does not."""
    model, _ = make_tiny(lm_kind, lm_init_std=0.3)
    lm = model.language_model
    ids = torch.randint(5, 60, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4], mask[1, :2] = 0, 0  # left padding
    lm.set_attn_implementation("eager")
    expected = decode_logits(lm, ids, mask)
    use_grouped_attention(lm)
    for got, want in zip(decode_logits(lm, ids, mask), expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_packed_linears_compute_what_their_linears_do(dtype):
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no oneDNN bf16 kernels on this CPU")
    model, _ = make_tiny("qwen2", **DESIGN)
    model = model.to(dtype)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    up_weight = model.language_model.model.layers[0].mlp.up_proj.weight.detach().clone()
    x, y = torch.randn(2, 2, 7, 64, generator=torch.Generator().manual_seed(2)).to(dtype)  # (B, T, D)
    attention, mlp = model.language_model.model.layers[0].self_attn, model.language_model.model.layers[0].mlp
    names = [(attention, "q_proj"), (attention, "k_proj"), (attention, "v_proj"), (mlp, "gate_proj")]
    names += [(mlp, "up_proj"), (model.language_model, "lm_head")]
    expected = {name: getattr(module, name)(x) for module, name in names}
    inner = torch.randn(2, 7, 128).to(dtype)
    expected["down_proj"] = mlp.down_proj(inner)
    features = torch.randn(2, 16, 32).to(dtype)
    projected = model.project_images(features)
    assert pack_linears(model) == len(linears)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(attention.q_proj, FusedPart) and isinstance(mlp.down_proj, PackedLinear)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    for module, name in names:  # q_proj computes q, k and v; k_proj and v_proj take theirs
        torch.testing.assert_close(getattr(module, name)(x), expected[name], **tolerance)
    assert attention.q_proj.fused.output is None  # all three taken: nothing held
    torch.testing.assert_close(mlp.down_proj(inner), expected["down_proj"], **tolerance)
    torch.testing.assert_close(mlp.gate_proj(x), expected["gate_proj"], **tolerance)
    torch.testing.assert_close(mlp.up_proj(y), F.linear(y, up_weight), **tolerance)  # another input
    other = ThreadPoolExecutor(1)  # another thread between q_proj and k_proj takes its own, never ours
    attention.q_proj(x)
    other.submit(lambda: attention.q_proj(y)).result()
    torch.testing.assert_close(attention.k_proj(x), expected["k_proj"], **tolerance)
    torch.testing.assert_close(model.project_images(features), projected, **tolerance)


def test_the_slack_cache_grows_in_place_and_takes_what_it_is_given():
    keys = torch.randn(2, 3, 5, 4)
    cache = slack_cache([(keys, keys + 1)])
    layer = cache.layers[0]
    room = layer.room[0].data_ptr()
    for step in range(3):
        new = torch.full((2, 3, 1, 4), float(step))
        got, _ = cache.update(new, new, 0)
        torch.testing.assert_close(got[:, :, :5], keys)
        assert got.shape[2] == 6 + step and torch.equal(got[:, :, -1:], new)
    assert layer.room[0].data_ptr() == room  # written in place: no copy a step
    layer.keys, layer.values = layer.keys[:1], layer.values[:1]  # a row left: the batch is cut
    got, _ = cache.update(torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 4), 0)
    assert got.shape == (1, 3, 9, 4) and torch.equal(got[0, :, :5], keys[0])


@torch.inference_mode()
def test_rows_read_together_as_each_alone_with_cached_pasts_and_chunks(images):
    """Three rows read in one pass (one resuming a cached conversation, one text alone, chunks of
    different lengths) give the first logits each gives read alone without any cache."""
    model, processor = make_tiny("llama", **DESIGN)
    use_grouped_attention(model.language_model)
    pack_linears(model)
    pipeline = Pipeline(model, processor)

    def prompt(question: str, image=None) -> Prompt:
        return pipeline.prepare([{"role": "user", "content": question}], [image] if image else None)

    first = prompt("What is in this picture?", images[0])
    session = TorchSession(pipeline)
    session.prefix_cache = PrefixCache(budget=2**30)
    handle, _ = session.start(first)
    [logits] = session.read([(handle, len(first.input_ids))])
    answer = [int(logits.argmax())]
    for _ in range(3):
        answer.append(int(session.step([handle], answer[-1:])[0].argmax()))
    session.stop(handle)
    follow_up = Prompt(first.input_ids + answer[:3] + prompt("Why?").input_ids, first.pixel_values)
    prompts = [follow_up, prompt("Describe the picture briefly, please.", images[1]), prompt("Yes?")]

    alone = []
    for each in prompts:
        plain = TorchSession(pipeline)
        handle, cached = plain.start(each)
        assert cached == 0
        alone.append(plain.read([(handle, len(each.input_ids))])[0])

    handles = [session.start(each) for each in prompts]
    # the follow-up resumes its conversation; the others share the chat template's first tokens
    assert handles[0][1] > len(first.input_ids) > max(cached for _, cached in handles[1:])
    halves = [
        (handle, (cached + len(each.input_ids)) // 2)
        for (handle, cached), each in zip(handles, prompts, strict=True)
    ]
    assert session.read(halves) == [None, None, None]
    together = session.read(
        [(handle, len(each.input_ids)) for (handle, _), each in zip(handles, prompts, strict=True)]
    )
    for got, want in zip(together, alone, strict=True):
        assert got.argmax() == want.argmax()
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(want), atol=1e-4, rtol=1e-4)
    steps = session.step([handle for handle, _ in handles], [int(t.argmax()) for t in together])
    assert steps.shape == (3, together[0].shape[0])


def test_serve_stops_on_sigterm_and_fails_on_a_port_in_use(tmp_path):
    model = save_tiny(tmp_path / "tiny", "qwen2")
    port = free_port()
    command = [sys.executable, "-m", "mmllm.cli", "serve", "--model", str(model), "--port", str(port)]
    process = start_server(command, f"http://127.0.0.1:{port}/health")
    try:
        second = subprocess.run(command, capture_output=True, text=True, timeout=300)  # the same port
        assert second.returncode == 1, second.stdout + second.stderr
        assert "address already in use" in (second.stderr + second.stdout).lower()
        assert "Traceback" not in second.stderr, second.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert "Traceback" not in output, output
