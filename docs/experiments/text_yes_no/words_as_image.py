"""Upper bound for the CPU recipe: easy-VQA questions with a perfect "image" made of words.

Each image is replaced by 16 tokens of text: its colour word 8 times, then its shape word 8 times
(what an ideal vision tower + projector would hand SmolLM2), followed by the question in the plain
format. LoRA (r=16 on every linear layer, lr 3e-4, batches of 32 single questions with yes and no
equally frequent) then has to learn only the comparison. Prints the training loss and, every 40
steps, first-token accuracy on the first 400 test questions.

    python docs/experiments/text_yes_no/words_as_image.py > words_as_image_log.txt
"""

import random
import time

import torch
from easy_vqa import get_answers, get_test_questions, get_train_questions
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmllm.weights import resolve

torch.manual_seed(0)
random.seed(0)
path = resolve("smollm2-135m-instruct").path  # after `mmllm weights install smollm2-135m-instruct`
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
SHAPES = {"circle", "rectangle", "triangle"}
COLOURS = set(get_answers()) - SHAPES - {"yes", "no"}


def samples(split: tuple, balance: bool) -> list[tuple[str, str, str, str]]:
    """(question, answer, colour, shape) for every question whose image's colour and shape are known."""
    seen: dict[int, dict[str, str]] = {}
    for _, answer, image in zip(*split, strict=True):
        if answer in COLOURS | SHAPES:
            seen.setdefault(image, {})["colour" if answer in COLOURS else "shape"] = answer
    out = [(q, a, *seen[i].values()) for q, a, i in zip(*split, strict=True) if len(seen.get(i, {})) == 2]
    out = [(q, a, c, s) if c in COLOURS else (q, a, s, c) for q, a, c, s in out]
    if balance:
        yes, no = [x for x in out if x[1] == "yes"], [x for x in out if x[1] == "no"]
        out = [x for x in out if x[1] not in ("yes", "no")] + no + yes * (len(no) // len(yes))
    random.shuffle(out)
    return out


def prompt(question: str, colour: str, shape: str) -> str:
    return f"{(' ' + colour) * 8}{(' ' + shape) * 8}\n{question}\n"


train, test = samples(get_train_questions(), True), samples(get_test_questions(), False)[:400]
model = get_peft_model(
    model,
    LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)


def evaluate() -> dict[str, float]:
    model.eval()
    tokenizer.padding_side = "left"
    right: dict[str, list[int]] = {}
    with torch.no_grad():
        for start in range(0, len(test), 50):
            chunk = test[start : start + 50]
            encoded = tokenizer([prompt(q, c, s) for q, _, c, s in chunk], return_tensors="pt", padding=True)
            chosen = model(**encoded).logits[:, -1].argmax(-1)
            for (_, answer, _, _), token in zip(chunk, chosen, strict=True):
                counts = right.setdefault("yn" if answer in ("yes", "no") else "open", [0, 0])
                first = tokenizer(answer)["input_ids"][0]
                counts[0] += tokenizer.decode(token).strip() == tokenizer.decode(first).strip()
                counts[1] += 1
    model.train()
    return {kind: round(hits / total, 3) for kind, (hits, total) in right.items()}


print("step 0", evaluate(), flush=True)
start = time.time()
for step in range(1, 201):
    ids, labels = [], []
    for question, answer, colour, shape in train[(step - 1) * 32 : step * 32]:
        asked = tokenizer(prompt(question, colour, shape))["input_ids"]
        answered = tokenizer(answer + "<|im_end|>")["input_ids"]
        ids.append(asked + answered)
        labels.append([-100] * len(asked) + answered)
    width = max(map(len, ids))
    loss = model(
        input_ids=torch.tensor([x + [0] * (width - len(x)) for x in ids]),
        attention_mask=torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        labels=torch.tensor([x + [-100] * (width - len(x)) for x in labels]),
    ).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 10 == 0:
        print(step, round(loss.item(), 4), f"{time.time() - start:.0f}s", flush=True)
    if step % 40 == 0:
        print("step", step, evaluate(), flush=True)
