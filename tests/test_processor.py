"""Processor: labels cover exactly the assistant answers + end-of-turn, image expansion, persistence."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny, make_tokenizer
from mmllm import MultimodalProcessor
from mmllm.conversation import IGNORE_INDEX
from mmllm.processor import ALIGN_TEMPLATE

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "<image>\nWhat shape is it?"},
    {"role": "assistant", "content": "It is a blue square."},
    {"role": "user", "content": "What colour is the triangle?"},
    {"role": "assistant", "content": "Green."},
    {"role": "user", "content": "How many?"},
    {"role": "assistant", "content": "Two."},
]
END_OF_TURN = {"qwen2": "<|im_end|>", "phi3": "<|end|>", "llama": "<|eot_id|>"}


def trained_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Contiguous runs of trained tokens."""
    runs, current = [], []
    for token, label in zip(input_ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token, "labels must equal input ids where trained (the LM shifts them)"
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("with_system", [True, False])
def test_labels_cover_exactly_each_answer_and_its_end_of_turn(lm_kind, images, with_system):
    processor = make_tiny(lm_kind)[1]
    conversation = CONVERSATION if with_system else CONVERSATION[1:]
    encoded = processor.encode(conversation, [images[0]], train=True)
    runs = trained_runs(encoded["input_ids"], encoded["labels"])
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    assert processor.end_of_turn == END_OF_TURN[lm_kind]
    assert [processor.tokenizer.decode(run) for run in runs] == [a + END_OF_TURN[lm_kind] for a in answers]


def test_end_of_turn_is_a_stop_token(lm_kind):
    processor = make_tiny(lm_kind)[1]
    eot_id = processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[lm_kind])
    assert eot_id in processor.stop_token_ids
    assert processor.tokenizer.eos_token_id in processor.stop_token_ids


def test_generation_prompt_ends_with_assistant_header(lm_kind):
    processor = make_tiny(lm_kind)[1]
    text = processor.tokenizer.decode(processor.encode(CONVERSATION[3:4])["input_ids"])
    header = {
        "qwen2": "<|im_start|>assistant\n",
        "phi3": "<|assistant|>\n",
        "llama": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    }[lm_kind]
    assert text.endswith(header)


def test_image_markers_expand_to_n_placeholders(images):
    processor = make_tiny("qwen2", feature_mode="patch")[1]
    ids = processor.encode([{"role": "user", "content": "<image> then <image>"}], images)["input_ids"]
    assert ids.count(processor.image_token_id) == 2 * 16
    with pytest.raises(ValueError, match="2 '<image>' markers but 1 images"):
        processor.encode([{"role": "user", "content": "<image> then <image>"}], images[:1])


def test_images_without_markers_go_before_the_first_user_text(images):
    processor = make_tiny("qwen2")[1]
    encoded = processor.encode([{"role": "user", "content": "What is it?"}], images)
    text = processor.tokenizer.decode(encoded["input_ids"])
    assert "user\n<image>\n<image>\nWhat is it?" in text
    assert encoded["pixel_values"].shape == (2, 3, 32, 32)


def test_bad_conversations_are_rejected():
    processor = make_tiny("qwen2")[1]
    with pytest.raises(ValueError, match="empty conversation"):
        processor.encode([])
    with pytest.raises(ValueError, match="unknown role"):
        processor.encode([{"role": "human", "content": "hi"}])


def test_batch_padding_sides(images):
    processor = make_tiny("qwen2")[1]
    short, long = CONVERSATION[1:3], CONVERSATION[1:5]
    left = processor([short, long], [[images[0]], [images[0]]], train=True)
    right = processor([short, long], [[images[0]], [images[0]]], train=True, padding_side="right")
    pad = processor.tokenizer.pad_token_id
    assert left["input_ids"][0, 0] == pad and left["attention_mask"][0, 0] == 0
    assert right["input_ids"][0, -1] == pad and right["labels"][0, -1] == IGNORE_INDEX
    n = int(right["attention_mask"][0].sum())
    assert torch.equal(right["input_ids"][0, :n], left["input_ids"][0, -n:])


def test_save_and_load_round_trip(tmp_path, images):
    processor = make_tiny("phi3", feature_mode="patch")[1]
    processor.save_pretrained(tmp_path)
    loaded = MultimodalProcessor.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == 16 and loaded.image_processor.size == 32
    assert loaded.image_token_id == processor.image_token_id
    assert loaded.end_of_turn == processor.end_of_turn
    a = processor.encode(CONVERSATION, [images[0]], train=True)
    b = loaded.encode(CONVERSATION, [images[0]], train=True)
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]


def test_tokenizer_without_template_uses_plain_template_ending_answers_with_eos():
    tokenizer = make_tokenizer("qwen2")
    tokenizer.chat_template = None
    processor = MultimodalProcessor(tokenizer, num_image_tokens=1)
    encoded = processor.encode(CONVERSATION[3:5], train=True)
    runs = trained_runs(encoded["input_ids"], encoded["labels"])
    assert [tokenizer.decode(r) for r in runs] == ["Green." + tokenizer.eos_token]


def test_align_template_is_bare_text_with_answers_ending_in_eos(lm_kind, images):
    processor = make_tiny(lm_kind)[1]
    aligned = processor.with_template(ALIGN_TEMPLATE)
    encoded = aligned.encode(CONVERSATION, [images[0]], train=True)
    text = aligned.tokenizer.decode(encoded["input_ids"])
    eos = processor.tokenizer.eos_token
    # No roles, no system prompt: image placeholders, then question / answer lines.
    assert text == (
        processor.image_token * processor.num_image_tokens
        + f"\nWhat shape is it?\nIt is a blue square.{eos}\nWhat colour is the triangle?\nGreen.{eos}\n"
        + f"How many?\nTwo.{eos}\n"
    )
    runs = trained_runs(encoded["input_ids"], encoded["labels"])
    assert [aligned.tokenizer.decode(r) for r in runs] == [
        a + eos for a in ("It is a blue square.", "Green.", "Two.")
    ]
    assert len(encoded["input_ids"]) < len(
        processor.encode(CONVERSATION, [images[0]], train=True)["input_ids"]
    )
    assert processor.chat_template is None  # the original is untouched


@pytest.mark.parametrize("template", ["chat", "plain", "align"])
def test_a_follow_up_is_prompted_as_training_renders_the_conversation(lm_kind, images, template):
    """The prompt for turn k is the training text of turns 1..k-1, then turn k's question: a chat
    page's second question reaches the model as the same words a multi-turn training sample gave it."""
    processor = make_tiny(lm_kind)[1]
    if template == "align":
        processor = processor.with_template(ALIGN_TEMPLATE)
    elif template == "plain":
        processor.tokenizer.chat_template = None
        processor = MultimodalProcessor(processor.tokenizer, num_image_tokens=processor.num_image_tokens)
    conversation = CONVERSATION[1:]
    trained = processor.encode(conversation, [images[0]], train=True)
    for turn in (2, 4):
        prompt = processor.encode(conversation[: turn + 1], [images[0]])["input_ids"]
        assert trained["input_ids"][: len(prompt)] == prompt
        assert trained["labels"][len(prompt) - 1] == IGNORE_INDEX
        assert trained["labels"][len(prompt)] != IGNORE_INDEX  # the next token is the answer's first
