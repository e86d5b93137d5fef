"""Prefix caching across requests: the KV of an answered request (its prompt and its answer) kept for a
later request that starts with the same tokens, as chat clients re-send the whole conversation each turn.

A row's cache is keyed token by token (`prompt_keys`): text tokens by id, an image's placeholders by the
image's pixels (two images behind the same placeholder ids never match), all under the request's salt
(its tenant: no request sees another tenant's timing). A new row takes the entry sharing the longest
common prefix with its prompt, as far as it goes: the next turn re-renders the answer through the chat
template, and the ids re-tokenised from its text need not equal the ids generated, so an entry helps up
to the first token where they part. Entries live under a byte budget, least recently used first out.
What an entry holds (tensors, a llama.cpp sequence) is its session's business (`Payload`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmllm.engine.backend import Prompt, image_digest

PLACEHOLDER_BITS = 16  # an image's placeholder index within its key (images have far fewer rows)
Payload = Any


def prompt_keys(prompt: Prompt, image_token_id: int) -> np.ndarray:
    """(P,) int64 keys of a prompt's tokens: text tokens are their ids (never negative), the k-th
    placeholder of image i is a negative number made of image i's pixel hash and k."""
    keys = np.asarray(prompt.input_ids, np.int64)
    placeholders = np.flatnonzero(keys == image_token_id)
    if prompt.pixel_values is None or not len(placeholders):
        return keys
    per_image = len(placeholders) // len(prompt.pixel_values)
    if per_image >= 2**PLACEHOLDER_BITS:
        raise ValueError(f"an image of {per_image} rows is more than the prefix cache keys")
    digests = [  # 47 bits of each image's hash, so hash and index fit in an int64
        int.from_bytes(image_digest(image)[:8], "little") % 2**47 for image in prompt.pixel_values
    ]
    index = np.arange(len(placeholders))
    image_hash = np.asarray(digests, np.int64)[index // per_image]
    keys[placeholders] = -1 - ((image_hash << PLACEHOLDER_BITS) | (index % per_image))
    return keys


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading keys `a` and `b` share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass(eq=False)
class Entry:
    salt: str
    keys: np.ndarray  # (L,) the keys of the tokens its payload holds
    payload: Payload
    nbytes: int


class PrefixCache:
    """Entries of finished rows under `budget` bytes (0: off) and at most `max_entries`, least recently
    used first out; `release(payload)` frees what an entry held when it leaves.

    `queries` and `hits` count prompt tokens looked up and found (vLLM's prefix-cache counters).
    """

    def __init__(
        self,
        budget: int = 0,
        max_entries: int | None = None,
        release: Callable[[Payload], None] | None = None,
    ):
        self.budget, self.max_entries, self.release = budget, max_entries, release
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # id(entry) -> entry, oldest first
        self.nbytes = 0
        self.rows: dict[int, tuple[str, np.ndarray, list[int]]] = {}
        """Per running row (by its session's handle): its salt, its prompt's keys, the tokens stepped."""

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def resize(self, budget: int) -> None:
        """A new byte budget (0 turns the cache off and empties it)."""
        self.budget = budget
        self._evict_to(0, 0)

    def begin(self, handle: int, prompt: Prompt, image_token_id: int) -> tuple[Payload | None, int]:
        """A row starts: what the cache holds of its prompt (see `match`); followed until `end`."""
        if not self.enabled:
            return None, 0
        keys = prompt_keys(prompt, image_token_id)
        self.rows[handle] = (prompt.salt, keys, [])
        return self.match(prompt.salt, keys)

    def append(self, handles: list[int], tokens: list[int]) -> None:
        """A step appended `tokens` to these rows' caches."""
        for handle, token in zip(handles, tokens, strict=True):
            if handle in self.rows:
                self.rows[handle][2].append(token)

    def end(self, handle: int, length: int, token_bytes: int, make: Callable[[], Payload]) -> None:
        """A row stops holding its first `length` tokens: they are kept, `make()` giving their payload
        (`token_bytes` a token)."""
        if (row := self.rows.pop(handle, None)) is None:
            return
        salt, keys, stepped = row
        keys = np.concatenate([keys, np.asarray(stepped, np.int64)])[:length]
        self.store(salt, keys, length * token_bytes, make)

    def forget(self, handle: int) -> None:
        """A row stops before its prompt is read: nothing of it is kept."""
        self.rows.pop(handle, None)

    def match(self, salt: str, keys: np.ndarray) -> tuple[Payload | None, int]:
        """The payload sharing the longest prefix with `keys` under `salt` and that prefix's length,
        leaving at least the last key to read (a row needs the logits after its prompt); (None, 0)
        when nothing matches."""
        best, length = None, 0
        for entry in reversed(self.entries.values()):  # the most recent first: it wins a tie
            if entry.salt == salt and (shared := common_prefix(entry.keys, keys[:-1])) > length:
                best, length = entry, shared
        if best is None:
            return None, 0
        self.entries.move_to_end(id(best))
        return best.payload, length

    def store(self, salt: str, keys: np.ndarray, nbytes: int, make: Callable[[], Payload]) -> bool:
        """Keep the tokens `keys` under `salt`: `make()` gives their payload (`nbytes`), called only once
        room is made. Entries that only repeat the start of `keys` leave; `keys` that only repeat the
        start of an entry's refresh that entry instead. Returns whether an entry was made."""
        if not self.enabled or nbytes > self.budget or not len(keys):
            return False
        for entry in list(self.entries.values()):
            if entry.salt != salt:
                continue
            shared = common_prefix(entry.keys, keys)
            if shared == len(keys):
                self.entries.move_to_end(id(entry))
                return False
            if shared == len(entry.keys):
                self._drop(entry)
        self._evict_to(nbytes, 1)
        entry = Entry(salt, keys, make(), nbytes)
        self.entries[id(entry)] = entry
        self.nbytes += nbytes
        return True

    def evict_oldest(self) -> bool:
        """Drop the least recently used entry (its memory is wanted by a running row); False when empty."""
        if not self.entries:
            return False
        self._drop(next(iter(self.entries.values())))
        return True

    def _evict_to(self, nbytes: int, count: int) -> None:
        """Evict until `nbytes` more bytes and `count` more entries fit."""
        limit = self.max_entries if self.max_entries is not None else len(self.entries) + count
        while self.entries and (self.nbytes + nbytes > self.budget or len(self.entries) + count > limit):
            self.evict_oldest()

    def _drop(self, entry: Entry) -> None:
        del self.entries[id(entry)]
        self.nbytes -= entry.nbytes
        if self.release is not None:
            self.release(entry.payload)
