"""Upper bound for the CPU recipe: easy-VQA questions with a perfect "image" made of words.

Each image is replaced by N words of text, its colour word N/2 times then its shape word N/2 times
(what an ideal vision tower + projector would hand SmolLM2), followed by the question in the plain
format. LoRA (r=16 on every linear layer, constant learning rate LR) or full fine-tuning then has to
learn only the comparison, on batches of 32 single questions with yes and no equally frequent, with
logits and loss on the answer only. Prints the loss and, every 25 steps, first-token accuracy on the
first 600 test questions.

    python docs/experiments/text_yes_no/words_as_image.py LR lora|full N
    python docs/experiments/text_yes_no/words_as_image.py 1e-3 lora 4 > words_as_image_fast_log.txt
"""

import random
import sys
import time

import torch
import torch.nn.functional as F
from easy_vqa import get_answers, get_test_questions, get_train_questions
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from mmllm.weights import resolve

LR = float(sys.argv[1])
MODE = sys.argv[2]
NIMG = int(sys.argv[3])
torch.manual_seed(0)
random.seed(0)
path = resolve("smollm2-135m-instruct").path
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
SHAPES = {"circle", "rectangle", "triangle"}
COLOURS = set(get_answers()) - SHAPES - {"yes", "no"}


def samples(split, balance):
    seen = {}
    for _, a, i in zip(*split, strict=True):
        if a in COLOURS | SHAPES:
            seen.setdefault(i, {})["c" if a in COLOURS else "s"] = a
    out = [
        (q, a, seen[i]["c"], seen[i]["s"])
        for q, a, i in zip(*split, strict=True)
        if len(seen.get(i, {})) == 2
    ]
    if balance:
        yes, no = [x for x in out if x[1] == "yes"], [x for x in out if x[1] == "no"]
        out = [x for x in out if x[1] not in ("yes", "no")] + no + yes * (len(no) // len(yes))
    random.shuffle(out)
    return out


def prompt(q, c, s):
    h = NIMG // 2
    return f"{(' ' + c) * h}{(' ' + s) * h}\n{q}\n"


train, test = samples(get_train_questions(), True), samples(get_test_questions(), False)[:600]
if MODE == "lora":
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
end = tok("<|im_end|>")["input_ids"]


def batch(items, with_answer):
    ids = []
    for q, a, c, s in items:
        x = tok(prompt(q, c, s))["input_ids"]
        if with_answer:
            x = x + tok(a)["input_ids"][:1] + end
        ids.append(x)
    w = max(map(len, ids))
    inp = torch.tensor([[0] * (w - len(x)) + x for x in ids])
    m = (inp != 0) | (torch.arange(w) >= w - torch.tensor([len(x) for x in ids])[:, None])
    m = m.long()
    pos = (m.cumsum(1) - 1).clamp(min=0)
    return inp, m, pos


def evaluate():
    model.eval()
    r = {}
    with torch.no_grad():
        for st in range(0, len(test), 100):
            ch = test[st : st + 100]
            inp, m, pos = batch(ch, False)
            ch_tok = (
                model(input_ids=inp, attention_mask=m, position_ids=pos, logits_to_keep=1)
                .logits[:, -1]
                .argmax(-1)
            )
            for (_, a, _, _), t in zip(ch, ch_tok, strict=True):
                k = "yn" if a in ("yes", "no") else "open"
                r.setdefault(k, [0, 0])
                r[k][0] += int(t) == tok(a)["input_ids"][0]
                r[k][1] += 1
    model.train()
    return {k: round(h / n, 3) for k, (h, n) in r.items()}


print("step 0", evaluate(), flush=True)
t0 = time.time()
for step in range(1, 401):
    items = train[(step - 1) * 32 : step * 32]
    inp, m, pos = batch(items, True)
    logits = model(input_ids=inp, attention_mask=m, position_ids=pos, logits_to_keep=3).logits[:, :2]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), inp[:, -2:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 10 == 0:
        print(step, round(loss.item(), 4), f"{time.time() - t0:.0f}s", flush=True)
    if step % 25 == 0:
        print("step", step, evaluate(), flush=True)
