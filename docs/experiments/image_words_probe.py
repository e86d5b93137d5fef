"""Which word does each image token of an easy-VQA model read as? For models whose image tokens were
trained toward the words of the image's description (`configs/easyvqa/smollm2_words.yaml`): on the first
N test (or train) images that easy-VQA's questions describe fully, the share whose token j is nearest
(over the whole vocabulary, `MultimodalLM.nearest_words`) to the description's word j, and the commonest
confusions.

    python docs/experiments/image_words_probe.py runs/easyvqa_words_more/model [400 [train]]
"""

import sys
from collections import Counter

import torch

from mmllm.data.config import DataConfig, DatasetSpec
from mmllm.data.easy_vqa import read_easy_vqa
from mmllm.models.build import load_model
from mmllm.train.losses import projected_images

model, processor = load_model(sys.argv[1])
count = int(sys.argv[2]) if len(sys.argv) > 2 else 400
split = sys.argv[3] if len(sys.argv) > 3 else "test"
samples = list(read_easy_vqa(DatasetSpec(format="easy-vqa", split=split, describe=True), DataConfig()))[
    :count
]
decode = processor.tokenizer.decode
right, confusions = None, Counter()
with torch.no_grad():
    for start in range(0, len(samples), 50):
        chunk = samples[start : start + 50]
        batch = processor([s.conversation for s in chunk], [s.images for s in chunk], padding_side="right")
        words = model.nearest_words(projected_images(model, batch))  # (B, N)
        slots = words.shape[1]
        right = torch.zeros(slots) if right is None else right
        for sample, row in zip(chunk, words.tolist(), strict=True):
            described = processor.tokenizer(sample.conversation[1]["content"])["input_ids"]
            targets = [described[j * len(described) // slots] for j in range(slots)]
            for j, (word, target) in enumerate(zip(row, targets, strict=True)):
                right[j] += word == target
                if word != target:
                    confusions[(decode([target]), decode([word]))] += 1
print("nearest word right, per image token:", [f"{r:.1%}" for r in (right / len(samples)).tolist()])
print("commonest confusions (described, read):", confusions.most_common(8))
