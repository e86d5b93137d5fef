"""MultimodalLM on tiny random Qwen2 / Phi-3 / Llama LMs and a tiny CLIP: forward, generate, save, load."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText

import mmllm
from conftest import make_tiny
from mmllm import MultimodalLM
from mmllm.engine.settings import GenerationSettings

QUESTION = [{"role": "user", "content": "What is in this image?"}]
CHAT = [*QUESTION, {"role": "assistant", "content": "A red circle."}]


def generate(model, processor, batch, **settings):
    config = GenerationSettings(**{"max_new_tokens": 6, **settings}).generation_config(processor)
    return model.generate(**batch, generation_config=config)


def test_forward_loss_and_gradients_reach_projector(tiny, images):
    model, processor = tiny
    model.train()
    batch = processor([CHAT], [[images[0]]], train=True, padding_side="right")
    out = model(**batch)
    answer_positions = int((batch["labels"][0, 1:] != -100).sum())
    # logits only at the (row, position) pairs that predict a label
    assert out.logits.shape == (answer_positions, model.config.text_config.vocab_size)
    assert torch.isfinite(out.loss) and out.loss > 0
    out.loss.backward()
    for name in ("projector", "vision_tower"):
        grads = [p.grad for p in getattr(model, name).parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), f"no gradient reached {name}"


def test_loss_only_counts_assistant_tokens(tiny, images):
    """The loss over label positions only equals the loss over full logits, in a ragged batch too."""
    model, processor = tiny
    short = [*QUESTION, {"role": "assistant", "content": "Red."}]
    batch = processor([CHAT, short], [[images[0]], [images[1]]], train=True, padding_side="right")
    full = batch.copy()
    labels = full.pop("labels")
    logits = model(**full).logits[:, :-1]  # (B, T-1, V)
    targets = labels[:, 1:]
    expected = torch.nn.functional.cross_entropy(logits[targets != -100], targets[targets != -100])
    assert torch.allclose(model(**batch).loss, expected, atol=1e-5)


def _continuation_logits(model, batch, out):
    """(new tokens, vocab) next-token logits at each generated position, by one uncached forward pass."""
    prompt = batch["input_ids"].shape[1]
    full = {**batch, "input_ids": out, "attention_mask": torch.ones_like(out)}
    with torch.no_grad():
        logits = model(**full).logits[0]  # (T, V)
    return logits[prompt - 1 : out.shape[1] - 1]


def test_greedy_generate_is_the_argmax_at_every_step(tiny, images):
    model, processor = tiny
    batch = processor([QUESTION], [[images[0]]])
    out = generate(model, processor, batch, ignore_eos=True)
    new = out[0, batch["input_ids"].shape[1] :]
    assert len(new) == 6 and torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    assert torch.equal(_continuation_logits(model, batch, out).argmax(-1), new)


def test_beam_search_finds_an_answer_at_least_as_likely_as_greedy(tiny, images):
    model, processor = tiny
    batch = processor([QUESTION], [[images[0]]])

    def log_likelihood(out):
        logits = _continuation_logits(model, batch, out).log_softmax(-1)
        return float(logits.gather(1, out[0, batch["input_ids"].shape[1] :, None]).sum())

    greedy = generate(model, processor, batch, ignore_eos=True)
    beams = generate(model, processor, batch, ignore_eos=True, num_beams=3)
    assert beams.shape == greedy.shape
    assert log_likelihood(beams) >= log_likelihood(greedy) - 1e-4


def test_nucleus_sampling_draws_only_from_the_nucleus_and_follows_the_seed(tiny, images):
    model, processor = tiny
    batch = processor([QUESTION], [[images[0]]])
    settings = {"temperature": 0.8, "top_p": 0.5, "ignore_eos": True, "max_new_tokens": 12}
    torch.manual_seed(0)
    out = generate(model, processor, batch, **settings)
    torch.manual_seed(0)
    assert torch.equal(generate(model, processor, batch, **settings), out)
    probs = (_continuation_logits(model, batch, out) / 0.8).softmax(-1)  # (12, V)
    for step, token in enumerate(out[0, batch["input_ids"].shape[1] :].tolist()):
        ranked = probs[step].sort(descending=True)
        # The nucleus: the most likely tokens until their mass reaches top_p (the last one included).
        size = int((ranked.values.cumsum(0) < 0.5).sum()) + 1
        assert token in ranked.indices[:size].tolist(), f"step {step}: token outside the nucleus"


def test_kv_cache_matches_no_cache(tiny, images):
    model, processor = tiny
    batch = processor([QUESTION], [[images[0]]])
    with_cache = generate(model, processor, batch, max_new_tokens=8)
    config = GenerationSettings(max_new_tokens=8).generation_config(processor)
    without = model.generate(**batch, generation_config=config, use_cache=False)
    assert torch.equal(with_cache, without)


def test_prompt_alone_equals_prompt_in_left_padded_batch(tiny, images):
    model, processor = tiny
    long_question = [{"role": "user", "content": "Describe the image briefly. What colour is the triangle?"}]
    alone = processor([QUESTION], [[images[0]]])
    batch = processor([long_question, QUESTION], [[images[1]], [images[0]]])
    assert batch["attention_mask"][1, 0] == 0, "the short prompt must be left-padded"
    out_alone = generate(model, processor, alone, max_new_tokens=8)[0, alone["input_ids"].shape[1] :]
    out_batch = generate(model, processor, batch, max_new_tokens=8)[1, batch["input_ids"].shape[1] :]
    assert torch.equal(out_alone, out_batch[: len(out_alone)])


def test_two_images_in_one_prompt_each_reach_their_placeholders(images):
    model, processor = make_tiny("qwen2")
    messages = [{"role": "user", "content": "<image> and <image>: which is red?"}]
    batch = processor([messages], [[images[0], images[1]]])
    assert batch["pixel_values"].shape[0] == 2
    logits = model(**batch).logits
    swapped = processor([messages], [[images[1], images[0]]])
    assert not torch.allclose(logits, model(**swapped).logits), "image order must matter"
    # The first image's rows fill the first placeholders, the second's the second; text stays text.
    with torch.no_grad():
        embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])[0]
        each = [model.get_image_features(batch["pixel_values"][i : i + 1]) for i in range(2)]
        projected = torch.cat([model.project_images(features) for features in each])  # (2, N, D)
    placeholders = batch["input_ids"][0] == model.config.image_token_id
    torch.testing.assert_close(embeds[placeholders].view_as(projected), projected)
    text = model.get_input_embeddings()(batch["input_ids"][0][~placeholders])
    torch.testing.assert_close(embeds[~placeholders], text)
    # Beam search repeats both images with each beam: every beam's score is the log-probability the
    # model gives its tokens with the two images in order (it would not be, were a beam handed others).
    config = GenerationSettings(max_new_tokens=6, num_beams=2).generation_config(processor)
    config.num_return_sequences, config.length_penalty = 2, 0.0  # scores: plain sums of log-probs
    config.output_scores = config.return_dict_in_generate = True
    out = model.generate(**batch, generation_config=config)
    prompt = batch["input_ids"][0].tolist()
    assert not torch.equal(out.sequences[0], out.sequences[1])
    for sequence, score in zip(out.sequences, out.sequences_scores, strict=True):
        answer = sequence[len(prompt) :].tolist()
        ends = [i for i, token in enumerate(answer) if token in processor.stop_token_ids]
        answer = answer[: ends[0] + 1] if ends else answer
        with torch.no_grad():
            read = model(input_ids=torch.tensor([prompt + answer]), pixel_values=batch["pixel_values"])
        log_probs = torch.log_softmax(read.logits[0, len(prompt) - 1 : -1].float(), -1)
        total = log_probs.gather(1, torch.tensor(answer)[:, None]).sum()
        torch.testing.assert_close(total, score.float(), atol=1e-4, rtol=0)


def test_beam_search_with_different_image_counts_per_row(images):
    model, processor = make_tiny("qwen2")
    two = [{"role": "user", "content": "<image> <image> compare"}]
    batch = processor([two, QUESTION], [[images[0], images[1]], [images[0]]])
    beams = generate(model, processor, batch, num_beams=2)
    singles = [processor([two], [[images[0], images[1]]]), processor([QUESTION], [[images[0]]])]
    assert beams.shape[0] == 2
    for row, single in zip(beams, singles, strict=True):
        expected = generate(model, processor, single, num_beams=2)[0, single["input_ids"].shape[1] :]
        assert torch.equal(row[batch["input_ids"].shape[1] :][: len(expected)], expected)


def test_text_only_prompt(tiny):
    model, processor = tiny
    batch = processor([[{"role": "user", "content": "The answer is yes?"}]])
    assert "pixel_values" not in batch
    out = generate(model, processor, batch)
    assert out.shape[1] > batch["input_ids"].shape[1]
    # With no image, the multimodal model is its language model: the same greedy tokens.
    config = GenerationSettings(max_new_tokens=6).generation_config(processor)
    assert torch.equal(out, model.language_model.generate(**batch, generation_config=config))


def test_image_features_equal_pixel_values(images):
    model, processor = make_tiny("qwen2", feature_mode="patch")
    batch = processor([QUESTION], [[images[0]]])
    features = model.get_image_features(batch["pixel_values"])
    assert features.shape == (1, 16, 32)  # 32px / 8px patches = 16 tokens of width 32
    from_features = {k: v for k, v in batch.items() if k != "pixel_values"}
    assert torch.allclose(model(**batch).logits, model(**from_features, image_features=features).logits)


@pytest.mark.parametrize(
    ("mode", "use_cls", "tokens"), [("pooled", False, 1), ("patch", False, 16), ("patch", True, 17)]
)
def test_feature_modes_set_placeholder_count(images, mode, use_cls, tokens):
    model, processor = make_tiny("llama", feature_mode=mode, vision_use_cls=use_cls, projector="mlp_gelu")
    assert model.config.num_image_tokens == processor.num_image_tokens == tokens
    batch = processor([QUESTION], [[images[0]]])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == tokens
    assert model(**batch).logits.shape[1] == batch["input_ids"].shape[1]


def test_pixel_shuffle_merges_neighbouring_patches_into_fewer_wider_tokens(images, tmp_path):
    from mmllm.models.vision import pixel_shuffle

    # A 4x4 grid whose token at row r, column c holds the number 10r + c.
    grid = torch.tensor([[10.0 * r + c] for r in range(4) for c in range(4)]).unsqueeze(0)  # (1, 16, 1)
    merged = pixel_shuffle(grid, 2)  # (1, 4, 4)
    assert merged[0].tolist() == [[0, 1, 10, 11], [2, 3, 12, 13], [20, 21, 30, 31], [22, 23, 32, 33]]

    model, processor = make_tiny("qwen2", feature_mode="patch", vision_pixel_shuffle=2)
    assert model.config.num_image_tokens == processor.num_image_tokens == 4  # 16 patches / 2^2
    batch = processor([QUESTION], [[images[0]]])
    assert model.get_image_features(batch["pixel_values"]).shape == (1, 4, 4 * 32)
    model.save_pretrained(tmp_path)
    loaded = MultimodalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.vision_pixel_shuffle == 2
    torch.testing.assert_close(model(**batch).logits, loaded(**batch).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"feature_mode": "pooled", "vision_pixel_shuffle": 2}, "with patch features"),
        ({"feature_mode": "patch", "vision_pixel_shuffle": 3}, "4x4 grid"),
        ({"feature_mode": "patch", "vision_pixel_shuffle": 2, "vision_use_cls": True}, "without CLS"),
    ],
)
def test_pixel_shuffle_that_cannot_apply_is_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        make_tiny("qwen2", **extra)


def test_placeholder_feature_mismatch_raises(images):
    model, processor = make_tiny("qwen2", feature_mode="patch")
    batch = processor([QUESTION], [[images[0]]])
    with pytest.raises(ValueError, match="do not match: input_ids hold 16"):
        model(input_ids=batch["input_ids"], pixel_values=torch.cat([batch["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="no pixel_values"):
        model(input_ids=batch["input_ids"])


def test_snapped_image_tokens_are_words_and_still_train_the_projector(tmp_path, images):
    model, processor = make_tiny("qwen2", feature_mode="patch", projector_snap_to_vocab=True)
    model.train()
    batch = processor([CHAT], [[images[0]]], train=True, padding_side="right")
    embeds = model.embed_inputs(batch["input_ids"], batch["pixel_values"])  # (1, T, D)
    image_tokens = embeds[batch["input_ids"] == model.config.image_token_id]  # (N, D)
    table = model.get_input_embeddings().weight
    projected = model.projector(model.get_image_features(batch["pixel_values"]))[0]  # (N, D)
    torch.testing.assert_close(image_tokens, table[model.nearest_words(projected)], rtol=0, atol=1e-6)
    assert not torch.allclose(image_tokens, projected)
    model(**batch).loss.backward()
    assert model.projector[0].weight.grad.abs().sum() > 0, "straight-through gradient missing"
    model.save_pretrained(tmp_path)
    assert MultimodalLM.from_pretrained(tmp_path).config.projector_snap_to_vocab


def test_save_load_round_trip_and_auto_classes(tmp_path, images):
    model, processor = make_tiny("phi3")
    batch = processor([QUESTION], [[images[0]]])
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["mmllm_version"] == mmllm.__version__
    for loader in (MultimodalLM, AutoModel, AutoModelForImageTextToText):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, MultimodalLM)
        # Same weights; loaded tensors may differ in memory layout, so kernels may round differently.
        torch.testing.assert_close(model(**batch).logits, loaded(**batch).logits, rtol=0, atol=1e-6)


def test_parts_only_checkpoint_rebuilds_lm_from_reference(tmp_path, images):
    model, processor = make_tiny("qwen2")
    lm_dir = tmp_path / "lm"
    model.language_model.save_pretrained(lm_dir)
    model.config.text_model_name_or_path = str(lm_dir)
    with pytest.raises(ValueError, match="vision tower has no base reference"):
        model.save_pretrained(tmp_path / "bad", parts=["projector"])
    model.save_pretrained(tmp_path / "parts", parts=["projector", "vision_tower"])
    stored = (tmp_path / "parts" / "model.safetensors").stat().st_size
    assert stored < (lm_dir / "model.safetensors").stat().st_size
    loaded = MultimodalLM.from_pretrained(tmp_path / "parts")
    batch = processor([QUESTION], [[images[0]]])
    torch.testing.assert_close(model(**batch).logits, loaded(**batch).logits, rtol=0, atol=1e-6)
    assert loaded.config.saved_parts == ["projector", "vision_tower"]


def test_pretrained_parts_are_not_reinitialised_when_composed():
    model, _ = make_tiny("llama")
    lm, tower = model.language_model, model.vision_tower
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    rebuilt = MultimodalLM(model.config, language_model=lm, vision_tower=tower)
    for key, value in rebuilt.language_model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_image_size_is_checked_before_the_vision_tower():
    """Pixels of the wrong size are refused with a message, not silently interpolated by the tower."""
    model, processor = make_tiny("qwen2")
    image = Image.new("RGB", (300, 120), "green")
    pixels = processor.image_processor([image])
    assert pixels.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"\(64\*64\) doesn.t match model \(32\*32\)"):
        model.get_image_features(torch.zeros(1, 3, 64, 64))


def test_composed_pretrained_parts_keep_their_attention_backend():
    model, _ = make_tiny("qwen2")
    lm, tower = model.language_model, model.vision_tower
    from mmllm import MultimodalConfig

    # Composing configs (as build_model does) resets sub-configs' attention backend.
    config = MultimodalConfig(vision_config=tower.config, text_config=lm.config, image_token_id=1)
    rebuilt = MultimodalLM(config, language_model=lm, vision_tower=tower)
    assert rebuilt.language_model.config._attn_implementation == "sdpa"
    assert rebuilt.vision_tower.config._attn_implementation == "sdpa"
