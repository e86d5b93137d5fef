"""VQA metrics with the official VQAv2 answer normalisation.

The normalisation and accuracy follow the VQA evaluation protocol (visualqa.org/evaluation):
punctuation is removed or spaced, number words become digits, articles are dropped, common
contractions are restored; accuracy is min(#humans who gave the answer / 3, 1), averaged over the
10 leave-one-annotator-out subsets of the 10 human answers.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

from mmllm.data.readers import most_common_answer

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
]
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the protocol's pattern, quirk included
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The protocol's contraction table (apostrophe-less spelling -> canonical), as data.
CONTRACTIONS = dict(
    pair.split(":")
    for pair in [
        "aint:ain't",
        "arent:aren't",
        "cant:can't",
        "couldve:could've",
        "couldnt:couldn't",
        "couldn'tve:couldn't've",
        "couldnt've:couldn't've",
        "didnt:didn't",
        "doesnt:doesn't",
        "dont:don't",
        "hadnt:hadn't",
        "hadnt've:hadn't've",
        "hadn'tve:hadn't've",
        "hasnt:hasn't",
        "havent:haven't",
        "hed:he'd",
        "hed've:he'd've",
        "he'dve:he'd've",
        "hes:he's",
        "howd:how'd",
        "howll:how'll",
        "hows:how's",
        "Id've:I'd've",
        "I'dve:I'd've",
        "Im:I'm",
        "Ive:I've",
        "isnt:isn't",
        "itd:it'd",
        "itd've:it'd've",
        "it'dve:it'd've",
        "itll:it'll",
        "let's:let's",
        "maam:ma'am",
        "mightnt:mightn't",
        "mightnt've:mightn't've",
        "mightn'tve:mightn't've",
        "mightve:might've",
        "mustnt:mustn't",
        "mustve:must've",
        "neednt:needn't",
        "notve:not've",
        "oclock:o'clock",
        "oughtnt:oughtn't",
        "ow's'at:'ow's'at",
        "'ows'at:'ow's'at",
        "'ow'sat:'ow's'at",
        "shant:shan't",
        "shed've:she'd've",
        "she'dve:she'd've",
        "she's:she's",
        "shouldve:should've",
        "shouldnt:shouldn't",
        "shouldnt've:shouldn't've",
        "shouldn'tve:shouldn't've",
        "somebody'd:somebodyd",
        "somebodyd've:somebody'd've",
        "somebody'dve:somebody'd've",
        "somebodyll:somebody'll",
        "somebodys:somebody's",
        "someoned:someone'd",
        "someoned've:someone'd've",
        "someone'dve:someone'd've",
        "someonell:someone'll",
        "someones:someone's",
        "somethingd:something'd",
        "somethingd've:something'd've",
        "something'dve:something'd've",
        "somethingll:something'll",
        "thats:that's",
        "thered:there'd",
        "thered've:there'd've",
        "there'dve:there'd've",
        "therere:there're",
        "theres:there's",
        "theyd:they'd",
        "theyd've:they'd've",
        "they'dve:they'd've",
        "theyll:they'll",
        "theyre:they're",
        "theyve:they've",
        "twas:'twas",
        "wasnt:wasn't",
        "wed've:we'd've",
        "we'dve:we'd've",
        "weve:we've",
        "werent:weren't",
        "whatll:what'll",
        "whatre:what're",
        "whats:what's",
        "whatve:what've",
        "whens:when's",
        "whered:where'd",
        "wheres:where's",
        "whereve:where've",
        "whod:who'd",
        "whod've:who'd've",
        "who'dve:who'd've",
        "wholl:who'll",
        "whos:who's",
        "whove:who've",
        "whyll:why'll",
        "whyre:why're",
        "whys:why's",
        "wont:won't",
        "wouldve:would've",
        "wouldnt:wouldn't",
        "wouldnt've:wouldn't've",
        "wouldn'tve:wouldn't've",
        "yall:y'all",
        "yall'll:y'all'll",
        "y'allll:y'all'll",
        "yall'd've:y'all'd've",
        "y'alld've:y'all'd've",
        "y'all'dve:y'all'd've",
        "youd:you'd",
        "youd've:you'd've",
        "you'dve:you'd've",
        "youll:you'll",
        "youre:you're",
        "youve:you've",
    ]
)


def _punctuation(text: str) -> str:
    out = text
    for mark in PUNCTUATION:
        # Marks next to a space (or digit groups like 1,000) vanish; marks inside words become spaces.
        if f"{mark} " in text or f" {mark}" in text or COMMA_BETWEEN_DIGITS.search(text):
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(answer: str) -> str:
    """The protocol's normalisation of a predicted answer: punctuation, then numbers/articles/contractions."""
    return _digits_articles(_punctuation(_clean(answer)))


OFFICIAL_ANSWERS = 10  # VQAv2 collects ten human answers per question; the official formula needs them
FORMULAS = {
    "official": "min(#matches/3, 1) averaged over the 10 leave-one-out subsets of 10 answers (VQAv2)",
    "fewer answers": "min(#matches / min(3, n), 1) over all n < 10 answers (one answer: exact match)",
}


def vqa_formula(answers: list[str]) -> str:
    """Which formula scores a question with these answers (a key of FORMULAS)."""
    if not answers:
        raise ValueError("a VQA question needs at least one reference answer")
    return "official" if len(answers) >= OFFICIAL_ANSWERS else "fewer answers"


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy of one prediction against the human answers, in [0, 1].

    With ten (or more) answers, the official formula. With fewer, the leave-one-out average is not
    defined (one answer left it at 0 for every prediction), so a prediction scores fully when at
    least min(3, n) of the n answers agree with it: exact match for a single answer. As the protocol
    does, human answers get punctuation processing only, and only when they disagree with each other.
    """
    predicted = normalize_answer(prediction)
    humans = [_clean(a) for a in answers]
    if len(set(humans)) > 1:
        humans = [_punctuation(h) for h in humans]
    if vqa_formula(answers) == "fewer answers":
        return min(1.0, sum(h == predicted for h in humans) / min(3, len(humans)))
    scores = []
    for left_out in range(len(humans)):
        others = humans[:left_out] + humans[left_out + 1 :]
        scores.append(min(1.0, sum(h == predicted for h in others) / 3))
    return sum(scores) / len(scores)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the normalised strings agree (single-answer sets such as easy-VQA)."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def token_f1(prediction: str, answers: list[str]) -> float:
    """Best token-overlap F1 (SQuAD-style) of the normalised prediction against any answer."""
    predicted = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        reference = normalize_answer(answer).split()
        common = sum((Counter(predicted) & Counter(reference)).values())
        if common:
            precision, recall = common / len(predicted), common / len(reference)
            best = max(best, 2 * precision * recall / (precision + recall))
        elif not predicted and not reference:
            best = 1.0
    return best


def answer_metrics(
    rows: list[dict[str, Any]], score: Callable[[str, list[str]], float], name: str
) -> dict[str, Any]:
    """Predictions-file rows scored against their `answers` by `score` (reported as `name`), token F1,
    and both broken down: per answer and question type, and per question type by true yes/no."""
    per_type: dict[str, dict[str, list[float]]] = {
        "answer_type": defaultdict(list),
        "question_type": defaultdict(list),
    }
    scores = []
    for row in rows:
        value = score(row["prediction"], row["answers"])
        scores.append(value)
        for kind, groups in per_type.items():
            if row.get(kind):
                groups[row[kind]].append(value)
    metrics: dict[str, Any] = {
        name: sum(scores) / len(scores),
        "token_f1": sum(token_f1(r["prediction"], r["answers"]) for r in rows) / len(rows),
    }
    for kind, groups in per_type.items():
        if groups:
            metrics[f"per_{kind}"] = {
                k: {name: sum(v) / len(v), "count": len(v)} for k, v in sorted(groups.items())
            }
    by_truth: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row, value in zip(rows, scores, strict=True):
        truth = normalize_answer(most_common_answer(row["answers"]))
        if row.get("question_type") and truth in ("yes", "no"):
            by_truth[row["question_type"]][truth].append(value)
    if by_truth:  # a wording answered the same whatever the image shows scores 0 on one side
        metrics["per_question_type_yes_no"] = {
            kind: {truth: {name: sum(v) / len(v), "count": len(v)} for truth, v in sorted(sides.items())}
            for kind, sides in sorted(by_truth.items())
        }
    return metrics


def exact_match_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`answer_metrics` by exact match with each row's first answer, as `accuracy`."""
    return answer_metrics(rows, lambda prediction, answers: exact_match(prediction, answers[0]), "accuracy")


def vqav2_metrics(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """`answer_metrics` by VQA accuracy, saying how each question was scored: the official formula
    needs 10 answers."""
    metrics = answer_metrics(rows, vqa_accuracy, "vqa_accuracy")
    formulas = Counter(vqa_formula(row["answers"]) for row in rows)
    formula = {kind: {"questions": formulas[kind], "formula": FORMULAS[kind]} for kind in formulas}
    first = dict(list(metrics.items())[:2])  # the formula goes beside the scores it explains
    return {**first, "vqa_formula": formula, **metrics}
