"""The engine's shared parts without a model: the feature cache under threads, how requests group into
batches, and what the CLI may import at start-up."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import fields, replace

import numpy as np

from mmllm.engine.backend import FeatureLRU
from mmllm.engine.settings import PER_ROW, GenerationSettings


class Yielding(OrderedDict):
    """An OrderedDict that lets other threads run between its steps: races happen at once."""

    def __contains__(self, key) -> bool:
        time.sleep(0)
        return super().__contains__(key)

    def move_to_end(self, key, last: bool = True) -> None:
        time.sleep(0)
        super().move_to_end(key, last)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        time.sleep(0)


def test_the_feature_cache_stays_right_under_threads():
    cache = FeatureLRU(capacity=3)
    cache.entries = Yielding()
    images = np.arange(24 * 3 * 2 * 2, dtype=np.float32).reshape(24, 3, 2, 2)
    failures: list[BaseException] = []

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            for _ in range(100):
                chosen = rng.choice(len(images), size=rng.integers(1, 6))
                results = cache.through(
                    images[chosen], lambda rows, c=chosen: [images[c[r]].sum() for r in rows]
                )
                assert results == [images[i].sum() for i in chosen]
                with cache.lock:  # between operations, never more than it holds
                    assert len(cache.entries) <= cache.capacity
        except BaseException as err:  # reported in the main thread
            failures.append(err)

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, repr(failures[0])
    assert len(cache.entries) == cache.capacity


def test_requests_batch_together_by_setting_name_not_position():
    settings = GenerationSettings(max_new_tokens=5, temperature=0.7, seed=3)
    assert replace(settings, max_new_tokens=50).batch_key() == settings.batch_key()
    for field in fields(GenerationSettings):
        if field.name in PER_ROW:
            continue
        changed = {
            "ignore_eos": True,
            "seed": 4,
            "num_beams": 2,
            "top_k": 7,
            "min_tokens": 3,
            "logit_bias": {5: 1.0},
            "stop_token_ids": (5,),
            "logprobs": 2,
            "grammar": "start: /x/",
        }.get(field.name, 0.5)
        assert replace(settings, **{field.name: changed}).batch_key() != settings.batch_key(), field.name


def test_settings_and_the_backend_list_load_without_torch_or_numpy():
    code = (
        "import sys; from mmllm.engine.settings import GenerationSettings; "
        "from mmllm.engine import BACKENDS; "
        "print(sorted({'torch', 'transformers', 'numpy', 'PIL'} & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
