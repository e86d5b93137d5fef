"""Prefix caching across requests: multi-turn conversations through the real server answer exactly as
without the cache (torch's eager and static sessions, llama.cpp), each turn reading only what is new;
different images never share their rows, tenants (API key, `cache_salt`) never share entries, the LRU
holds its budget, and usage and /metrics report what was cached."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import make_tiny, save_tiny
from mmllm.engine.backend import Prompt
from mmllm.engine.prefix_cache import PrefixCache, prompt_keys
from mmllm.engine.static_session import StaticSession
from mmllm.engine.torch_backend import Pipeline
from mmllm.serve.app import create_app
from mmllm.serve.config import ServeConfig

DESIGN = {"feature_mode": "patch", "lm_init_std": 0.3}  # 16 placeholder rows an image
QUESTIONS = ["What is in this picture?", "What colour is it?", "Why?", "Describe it briefly.", "Yes?"]
TOKENS = 8


def data_uri(colour: str) -> str:
    image = Image.new("RGB", (40, 30), "white")
    image.paste(colour, (5, 5, 30, 25))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Conversation:
    """A chat client's conversation: each turn re-sends all before it, the image in turn 1 only."""

    def __init__(self, colour: str | None, headers: dict | None = None, **extra):
        self.messages: list[dict] = []
        self.colour, self.headers, self.extra = colour, headers or {}, extra
        self.turns: list[tuple[str, int, int]] = []  # (answer, cached tokens, prompt tokens)

    def ask(self, client: TestClient, stream: bool = False) -> tuple[str, int, int]:
        question = QUESTIONS[len(self.turns) % len(QUESTIONS)]
        content: str | list = question
        if not self.messages and self.colour:
            image = {"type": "image_url", "image_url": {"url": data_uri(self.colour)}}
            content = [image, {"type": "text", "text": question}]
        self.messages.append({"role": "user", "content": content})
        body = {"messages": self.messages, "max_tokens": TOKENS, **self.extra}
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        response = client.post("/v1/chat/completions", json=body, headers=self.headers)
        assert response.status_code == 200, response.text
        if stream:
            chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line[6:].startswith("{")]
            text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
            usage = chunks[-1]["usage"]
        else:
            text, usage = response.json()["choices"][0]["message"]["content"], response.json()["usage"]
        self.messages.append({"role": "assistant", "content": text})
        turn = (text, usage["prompt_tokens_details"]["cached_tokens"], usage["prompt_tokens"])
        self.turns.append(turn)
        return turn


def talk(backend, conversations: list[Conversation], turns: int, **config) -> dict[str, float]:
    """Run the conversations turn by turn, interleaved, through a server over `backend`; its /metrics."""
    with TestClient(create_app(backend, ServeConfig(**config))) as client:
        for turn in range(turns):
            for conversation in conversations:
                conversation.ask(client, stream=turn == 1)
        text = client.get("/metrics").text
    return {line.split()[0]: float(line.split()[-1]) for line in text.splitlines() if line[:1] != "#"}


def scenario() -> list[Conversation]:
    """Two conversations about different pictures (same questions), the first again for a second
    tenant by API key and a third by `cache_salt`, and one without an image."""
    return [
        Conversation("red"),
        Conversation("blue"),
        Conversation("red", {"Authorization": "Bearer tenant-2"}),
        Conversation("red", cache_salt="tenant-3"),
        Conversation(None),
    ]


def first_placeholder() -> int:
    """Where the first turn's image begins: all before it is the system prompt and the user's header."""
    processor = make_tiny("qwen2", **DESIGN)[1]
    conversation = [{"role": "user", "content": f"{processor.image_token}\n{QUESTIONS[0]}"}]
    return processor.encode_text(conversation, 1)["input_ids"].index(processor.image_token_id)


def torch_backend():
    return Pipeline(*make_tiny("qwen2", **DESIGN))


def static_backend():
    pipeline = torch_backend()
    pipeline.__dict__["session"] = StaticSession(
        pipeline.model, pipeline.embed_prompt, slots=4, compiler=None
    )
    return pipeline


def export(root, context: int):
    pytest.importorskip("llama_cpp")
    from mmllm.export.gguf import export_gguf

    model = save_tiny(root / "model", "qwen2", context=context, **DESIGN)
    return export_gguf(str(model), root / "gguf", ["f32"])


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    """A llama.cpp export whose KV cache (2,048 cells) holds every conversation of the scenario."""
    return export(tmp_path_factory.mktemp("prefix_gguf"), 2048)


def llama_backend(gguf):
    from mmllm.engine.llama_cpp import LlamaCppBackend

    return LlamaCppBackend.load(gguf, "f32")


@pytest.fixture(params=["torch", "static", "llama.cpp"])
def make_backend(request):
    if request.param == "llama.cpp":
        folder = request.getfixturevalue("gguf")
        return lambda: llama_backend(folder)
    return {"torch": torch_backend, "static": static_backend}[request.param]


def test_conversations_answer_as_without_the_cache(make_backend):
    turns = 4
    cached, plain = scenario(), scenario()
    on = talk(make_backend(), cached, turns)
    off = talk(make_backend(), plain, turns, prefix_cache_mb=0)
    for with_cache, without in zip(cached, plain, strict=True):
        assert [t[0] for t in with_cache.turns] == [t[0] for t in without.turns]  # the answers, exactly
        assert [t[2] for t in with_cache.turns] == [t[2] for t in without.turns]
        assert all(t[1] == 0 for t in without.turns)
    red, blue, tenant_2, tenant_3, _ = cached
    assert red.turns[0][0] != blue.turns[0][0]  # the pictures matter to the answers ...
    assert blue.turns[0][1] == first_placeholder() > 0  # ... and blue's share nothing from its first on
    assert tenant_2.turns[0][1] == tenant_3.turns[0][1] == 0  # other tenants: nothing of red's
    for conversation in cached:
        for (_, hit, _), (_, _, before) in zip(conversation.turns[1:], conversation.turns, strict=False):
            assert hit >= before, conversation.turns  # every later turn reads its history from the cache
    assert on["mmllm_prefix_cache_hits_total"] == sum(t[1] for c in cached for t in c.turns)
    assert on["mmllm_prefix_cache_queries_total"] == sum(t[2] for c in cached for t in c.turns)
    assert on["mmllm_prefix_cache_entries"] >= 1 and on["mmllm_prefix_cache_bytes"] > 0
    assert off["mmllm_prefix_cache_queries_total"] == off["mmllm_prefix_cache_entries"] == 0


def test_the_lru_holds_its_budget():
    lm = make_tiny("qwen2", **DESIGN)[0].config.text_config
    head_dim = lm.hidden_size // lm.num_attention_heads
    token_bytes = 2 * lm.num_hidden_layers * lm.num_key_value_heads * head_dim * 4  # fp32 keys and values
    budget = token_bytes * 100  # one conversation's first turn (~70 tokens), not two
    red, blue = Conversation("red"), Conversation("blue")
    metrics = talk(torch_backend(), [red, blue], 1, prefix_cache_mb=budget / 2**20)
    assert metrics["mmllm_prefix_cache_entries"] == 1 and metrics["mmllm_prefix_cache_bytes"] <= budget
    roomy = Conversation("red")
    talk(torch_backend(), [roomy, Conversation("blue")], 2)
    evicted = Conversation("red")
    talk(torch_backend(), [evicted, Conversation("blue")], 2, prefix_cache_mb=budget / 2**20)
    assert roomy.turns[1][1] >= roomy.turns[0][2]  # red's first turn, kept
    assert evicted.turns[1][1] == first_placeholder()  # red's went for blue's: what they share
    assert [t[0] for t in evicted.turns] == [t[0] for t in roomy.turns]


def test_llama_cpp_running_rows_evict_kept_sequences(tmp_path):
    """Kept sequences share the KV cache with running rows: when a row needs their cells, the least
    recently used go, and the answers are still those of a server without the cache."""
    small = export(tmp_path, 512)  # 512 cells: 9 conversations' first turns (~65 tokens each) do not fit
    answers = {}
    for budget in (512, 0):
        tenants = [Conversation("red", {"Authorization": f"Bearer {n}"}) for n in range(9)]
        with TestClient(create_app(llama_backend(small), ServeConfig(prefix_cache_mb=budget))) as client:
            for conversation in tenants + tenants[::-1]:  # the latest first in turn 2, the oldest last
                conversation.ask(client)
            answers[budget] = [turn[0] for c in tenants for turn in c.turns]
        if budget:
            last, first = tenants[-1].turns, tenants[0].turns
            assert last[1][1] >= last[0][2]  # the most recent kept its first turn ...
            assert first[1][1] < first[0][2]  # ... the oldest gave its cells up to running rows
    assert answers[512] == answers[0]


def test_prefix_cache_matches_the_longest_prefix_of_its_own_salt():
    cache = PrefixCache(budget=1000)
    keys = np.arange(10)
    assert cache.store("a", keys, 100, lambda: "ten")
    assert cache.store("a", np.r_[keys[:4], 50, 51], 60, lambda: "four")
    assert cache.match("a", np.r_[keys, 99]) == ("ten", 10)
    assert cache.match("a", keys) == ("ten", 9)  # the last token is always read: its logits are wanted
    assert cache.match("a", np.r_[keys[:4], 50, 7, 7]) == ("four", 5)
    assert cache.match("b", keys) == (None, 0)  # another salt sees nothing
    assert not cache.store("a", keys[:6], 60, lambda: "six")  # already held: no entry
    assert cache.store("a", np.r_[keys, 10, 11], 120, lambda: "twelve")  # "ten" only repeats its start
    assert [e.payload for e in cache.entries.values()] == ["four", "twelve"] and cache.nbytes == 180
    released = []
    cache.release = released.append
    cache.match("a", np.r_[keys[:4], 50, 51, 52])  # "four" is now the most recent ...
    assert cache.store("b", np.arange(5), 950, lambda: "big")  # ... so "twelve" goes first, then "four"
    assert released == ["twelve", "four"] and cache.nbytes == 950
    assert not cache.store("b", np.arange(3), 2000, lambda: "huge")  # over the whole budget
    cache.resize(0)
    assert not cache.entries and not cache.enabled and released[-1] == "big"


def test_image_placeholders_are_keyed_by_the_images_pixels():
    model, processor = make_tiny("qwen2", **DESIGN)
    pipeline = Pipeline(model, processor)
    conversation = [{"role": "user", "content": "<image>\n<image>\nSame?"}]
    red, blue = Image.new("RGB", (32, 32), "red"), Image.new("RGB", (32, 32), "blue")
    token = processor.image_token_id

    def keys(*images) -> np.ndarray:
        return prompt_keys(pipeline.prepare(conversation, list(images)), token)

    two, swapped = keys(red, blue), keys(blue, red)
    ids = np.asarray(pipeline.prepare(conversation, [red, blue]).input_ids)
    placeholders = ids == token
    assert placeholders.sum() == 2 * model.config.num_image_tokens
    assert (two[~placeholders] == ids[~placeholders]).all() and (two[placeholders] < 0).all()
    assert len(set(two[placeholders])) == placeholders.sum()  # each row of each image its own key
    assert (keys(red, blue) == two).all()  # the same pixels, the same keys
    first = np.flatnonzero(placeholders)[0]
    assert (swapped[:first] == two[:first]).all() and swapped[first] != two[first]
    assert (prompt_keys(Prompt([1, 2, token], None), token) == [1, 2, token]).all()  # no image: ids
