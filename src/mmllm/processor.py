"""`MultimodalProcessor`: chat template + `<image>` expansion + assistant-only labels + pixels.

Labels come from the chat template itself: each assistant turn's span is measured by rendering the
conversation up to that turn, so no separator strings or hand-tuned offsets can drift out of sync
with a tokenizer (the "tokenization mismatch" that silently zeroes LLaVA samples).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mmllm.conversation import IGNORE_INDEX, Message
from mmllm.images import CLIP_MEAN, CLIP_STD, ImageInput, ImageProcessor

if TYPE_CHECKING:
    import torch

PROCESSOR_FILE = "mmllm_processor.json"

# For tokenizers that ship no chat template (base models): one turn per line, EOS ends answers.
# Answers start on a fresh line so no token straddles the prompt/answer boundary.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize + ':\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:\n' }}{% endif %}"
)
# LLaVA's `plain` alignment format: bare questions and answers, no roles or system prompt. Stage 1
# only has to teach the projector (and a fresh vision tower) what images are; the template is dead weight.
ALIGN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + '\n' }}{% endif %}"
    "{% endfor %}"
)
_PROBE = "\x00mmllm-probe\x00"


class MultimodalProcessor:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        num_image_tokens: int,
        image_processor: ImageProcessor | None = None,
        image_token: str = "<image>",
    ):
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_processor = image_processor or ImageProcessor()
        self.image_token = image_token
        self.chat_template: str | None = None  # None: the tokenizer's own
        if image_token not in tokenizer.get_vocab():
            tokenizer.add_tokens(
                [AddedToken(image_token, special=True, normalized=False)], special_tokens=True
            )
        if tokenizer.chat_template is None:
            tokenizer.chat_template = PLAIN_TEMPLATE
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.end_of_turn = self._find_end_of_turn()

    # -- identity ------------------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-turn and EOS: generation must stop on either (LoRA models that never stop, LLaVA #682)."""
        ids = [self.tokenizer.convert_tokens_to_ids(self.end_of_turn), self.tokenizer.eos_token_id]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _find_end_of_turn(self) -> str:
        """The special token the template puts right after an answer (`<|im_end|>`, `<|end|>`, ...)."""
        rendered = self.render([{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}])
        suffix = rendered[rendered.index(_PROBE) + len(_PROBE) :]
        special = set(self.tokenizer.all_special_tokens) | {
            t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special
        }
        for token in self.tokenizer.tokenize(suffix):
            if token in special:
                return token
        if self.tokenizer.eos_token is None:
            raise ValueError(
                "the chat template ends answers with no special token and the tokenizer has no EOS"
            )
        return self.tokenizer.eos_token

    @property
    def template(self) -> str:
        """The template conversations are rendered with: an override (`ALIGN_TEMPLATE`) or the tokenizer's."""
        return self.chat_template or self.tokenizer.chat_template

    def with_template(self, chat_template: str | None) -> MultimodalProcessor:
        """A copy that renders conversations with another template (`None`: the tokenizer's own)."""
        other = copy.copy(self)
        other.chat_template = chat_template
        other.end_of_turn = other._find_end_of_turn()
        return other

    # -- text ----------------------------------------------------------------------------------------
    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=self.chat_template,
        )

    def _place_images(
        self, messages: list[Message], n_images: int, image_words: list[str] | None = None
    ) -> list[Message]:
        """Expand each `<image>` to N placeholders (or to its image's words, for a model that reads images
        as words); with no marker, images go before the first user text."""
        n_markers = sum(m["content"].count(self.image_token) for m in messages)
        if n_markers == 0 and n_images:
            first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
            if first_user is None:
                raise ValueError("images were given but the conversation has no user turn to attach them to")
            messages = list(messages)
            content = (self.image_token + "\n") * n_images + messages[first_user]["content"]
            messages[first_user] = {**messages[first_user], "content": content}
            n_markers = n_images
        if n_markers != n_images:
            raise ValueError(
                f"the conversation has {n_markers} '{self.image_token}' markers but {n_images} images"
            )
        if image_words is None:
            expanded = self.image_token * self.num_image_tokens
            return [{**m, "content": m["content"].replace(self.image_token, expanded)} for m in messages]
        words = iter(image_words)
        return [
            {**m, "content": "".join(_interleave(m["content"].split(self.image_token), words))}
            for m in messages
        ]

    def encode(
        self, messages: list[Message], images: list[ImageInput] | None = None, *, train: bool = False
    ) -> dict[str, Any]:
        """One conversation -> `input_ids` (and `labels` if `train`) as lists, `pixel_values` (I, 3, S, S)."""
        result = self.encode_text(messages, len(images or ()), train=train)
        result["pixel_values"] = self.image_processor(images) if images else None
        return result

    def encode_text(
        self,
        messages: list[Message],
        num_images: int = 0,
        *,
        train: bool = False,
        image_words: list[str] | None = None,
    ) -> dict[str, Any]:
        """Token ids (and labels) of a conversation about `num_images` images, without touching pixels
        (`image_words`: the words each image reads as, for a model that reads images as words).

        For training the whole conversation is rendered and only assistant answers plus their
        end-of-turn token get labels; otherwise the prompt ends with the generation prompt.
        """
        if not messages:
            raise ValueError("empty conversation")
        for message in messages:
            if message.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"unknown role {message.get('role')!r}; use system, user or assistant")
        messages = self._place_images(messages, num_images, image_words)
        text = self.render(messages, add_generation_prompt=not train)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=train)
        result: dict[str, Any] = {"input_ids": encoding["input_ids"]}
        if train:
            spans = self._answer_spans(messages, text)
            # A token is trained when it overlaps an answer span.
            result["labels"] = [
                token if any(start < e and end > s for s, e in spans) else IGNORE_INDEX
                for token, (start, end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
            ]
        return result

    def _answer_spans(self, messages: list[Message], text: str) -> list[tuple[int, int]]:
        """Character spans of each assistant answer + its end-of-turn token in the rendered `text`."""
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            if not text.startswith(prompt):
                raise ValueError(
                    "the chat template does not render conversations prefix-consistently; "
                    "labels cannot be derived from it"
                )
            # Templates may close a conversation (Phi-3 appends EOS), so compare, don't assume a prefix.
            through_turn = os.path.commonprefix([self.render(messages[: i + 1]), text])  # noqa: RUF071 (chars wanted)
            turn = text[len(prompt) : len(through_turn)]
            end = turn.find(self.end_of_turn)
            end = end + len(self.end_of_turn) if end >= 0 else len(turn.rstrip())
            spans.append((len(prompt), len(prompt) + end))
        return spans

    def __call__(
        self,
        conversations: list[list[Message]],
        images: list[list[ImageInput]] | None = None,
        *,
        train: bool = False,
        padding_side: str = "left",
    ) -> dict[str, torch.Tensor]:
        """A batch of conversations -> padded tensors; `pixel_values` concatenates all images in order.

        Left padding (the default) is what batched generation needs; training collators pad right.
        """
        images = images or [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        encoded = [self.encode(c, i, train=train) for c, i in zip(conversations, images, strict=True)]
        return self.pad(encoded, padding_side)

    def pad_arrays(self, encoded: list[dict[str, Any]], padding_side: str = "left") -> dict[str, np.ndarray]:
        """Encoded conversations -> (B, T) int64 arrays: ids, attention mask, labels padded with -100."""
        length = max(len(e["input_ids"]) for e in encoded)
        pad_id = self.tokenizer.pad_token_id

        def pad(values: list[int], fill: int) -> list[int]:
            padding = [fill] * (length - len(values))
            return padding + values if padding_side == "left" else values + padding

        batch = {
            "input_ids": np.array([pad(e["input_ids"], pad_id) for e in encoded], np.int64),
            "attention_mask": np.array([pad([1] * len(e["input_ids"]), 0) for e in encoded], np.int64),
        }
        if all("labels" in e for e in encoded):
            batch["labels"] = np.array([pad(e["labels"], IGNORE_INDEX) for e in encoded], np.int64)
        return batch

    def pad(self, encoded: list[dict[str, Any]], padding_side: str = "left") -> dict[str, torch.Tensor]:
        """Encoded conversations -> (B, T) tensors (`pad_arrays`'); pixels concatenated in order."""
        import torch

        arrays = self.pad_arrays(encoded, padding_side)
        batch = {key: torch.from_numpy(value) for key, value in arrays.items()}
        pixels = [e["pixel_values"] for e in encoded if e.get("pixel_values") is not None]
        if pixels:
            batch["pixel_values"] = torch.cat([torch.as_tensor(p) for p in pixels])
        return batch

    def decode(self, token_ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # -- persistence -----------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        settings = {
            "num_image_tokens": self.num_image_tokens,
            "image_token": self.image_token,
            "image_size": self.image_processor.size,
            "image_mean": list(self.image_processor.mean),
            "image_std": list(self.image_processor.std),
        }
        if self.chat_template is not None:
            # A model answers in the format it was trained on (e.g. LLaVA's plain format); the
            # tokenizer keeps its own template so a later stage can train in the chat format.
            settings["chat_template"] = self.chat_template
        (directory / PROCESSOR_FILE).write_text(json.dumps(settings, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, without_torch: bool = False) -> MultimodalProcessor:
        """`without_torch`: read the saved `tokenizer.json` as it is (`PreTrainedTokenizerFast`), not
        through `AutoTokenizer`, whose import loads torch — what the backends over an export do."""
        settings = json.loads((Path(path) / PROCESSOR_FILE).read_text())
        image_processor = ImageProcessor(
            size=settings["image_size"],
            mean=tuple(settings.get("image_mean", CLIP_MEAN)),
            std=tuple(settings.get("image_std", CLIP_STD)),
        )
        if without_torch:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        processor = cls(
            tokenizer,
            settings["num_image_tokens"],
            image_processor,
            settings["image_token"],
        )
        return (
            processor.with_template(settings["chat_template"]) if "chat_template" in settings else processor
        )


def _interleave(pieces: list[str], words: Iterator[str]) -> Iterator[str]:
    """Text pieces with the next image's words between each two."""
    for i, piece in enumerate(pieces):
        if i:
            yield next(words)
        yield piece
