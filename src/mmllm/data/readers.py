"""Readers: every supported dataset format -> `Sample`s.

Small annotation files are read whole; webdataset shards and TSV files stream, so a CC3M/LAION
subset never has to fit in memory. Every reader fails on malformed annotations with a message
that names the file and record, and leaves image problems to the loader (skipped and counted).
"""

from __future__ import annotations

import glob
import io
import json
import random
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mmllm.data.config import DataConfig, DatasetSpec
from mmllm.data.easy_vqa import read_easy_vqa
from mmllm.data.records import Sample, caption_sample, vqa_conversation
from mmllm.data.vqa import vqa_samples
from mmllm.errors import MmllmError
from mmllm.images import SAMPLE_PREFIX

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        raise MmllmError(f"{path}: no such file") from None
    except json.JSONDecodeError as err:
        raise MmllmError(f"{path}: invalid JSON ({err})") from None


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Lines of a text file, numbered from 1, read lazily."""
    try:
        file = path.open(encoding="utf-8")
    except FileNotFoundError:
        raise MmllmError(f"{path}: no such file") from None
    with file:
        yield from enumerate(file, 1)


def _json_records(path: Path) -> Iterator[tuple[int, dict]]:
    """Records of a JSON list or of a JSONL file, with their position for error messages."""
    if path.suffix == ".jsonl":
        for number, line in _numbered_lines(path):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as err:
                raise MmllmError(f"{path}:{number}: invalid JSON ({err})") from None
        return
    data = _load_json(path)
    if not isinstance(data, list):
        raise MmllmError(f"{path}: expected a JSON list of records")
    yield from enumerate(data)


def _image_root(spec: DatasetSpec) -> Path:
    return Path(spec.images) if spec.images else Path(spec.path).parent


def _image_list(value: Any, root: Path, where: str) -> list[str]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) and v for v in values):
        raise MmllmError(f"{where}: 'image' must be a path or a list of paths")
    return [v if v.startswith(SAMPLE_PREFIX) else str(root / v) for v in values]


def _conversation(turns: Any, where: str) -> list[dict[str, str]]:
    """LLaVA turns ({"from": "human"|"gpt", "value"}) or chat messages ({"role", "content"})."""
    if not isinstance(turns, list) or not turns:
        raise MmllmError(f"{where}: needs a non-empty 'conversations' list")
    conversation = []
    for turn in turns:
        role = ROLES.get(turn.get("from", turn.get("role", "")) if isinstance(turn, dict) else None)
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or not isinstance(text, str):
            raise MmllmError(f"{where}: each turn needs 'from' (human/gpt/...) and 'value'")
        conversation.append({"role": role, "content": text})
    return conversation


def read_llava(spec: DatasetSpec, cfg: DataConfig) -> Iterator[Sample]:
    """LLaVA conversations: {"id", "image": path | [paths], "conversations": [{"from", "value"}]}."""
    path, root = Path(spec.path), _image_root(spec)
    for index, record in _json_records(path):
        where = f"{path} record {index}"
        if not isinstance(record, dict):
            raise MmllmError(f"{where}: expected a JSON object")
        conversation = _conversation(record.get("conversations"), where)
        images = _image_list(record.get("image", record.get("images")), root, where)
        yield Sample(images, conversation, str(record.get("id", index)))


def read_coco(spec: DatasetSpec, cfg: DataConfig) -> Iterator[Sample]:
    """COCO captions_*.json: `images` (id, file_name) and `annotations` (image_id, caption)."""
    path, root = Path(spec.path), _image_root(spec)
    data = _load_json(path)
    try:
        files = {image["id"]: image["file_name"] for image in data["images"]}
        captions: dict[int, list[str]] = defaultdict(list)
        for annotation in data["annotations"]:
            captions[annotation["image_id"]].append(annotation["caption"])
    except (KeyError, TypeError) as err:
        raise MmllmError(f"{path}: not a COCO captions file (missing {err})") from None
    entries = [(str(root / files[i]), captions[i], f"coco-{i}") for i in files if captions[i]]
    yield from _caption_samples(entries, spec, cfg)


def read_karpathy(spec: DatasetSpec, cfg: DataConfig) -> Iterator[Sample]:
    """Karpathy's dataset_coco.json: images with `filepath`, `filename`, `split`, `sentences[].raw`."""
    path, root = Path(spec.path), _image_root(spec)
    wanted = {"train", "restval"} if spec.split == "train" else {spec.split}
    try:
        images = _load_json(path)["images"]
        entries = [
            (
                str(root / image.get("filepath", "") / image["filename"]),
                [s["raw"] for s in image["sentences"]],
                f"karpathy-{image.get('cocoid', image['filename'])}",
            )
            for image in images
            if image["split"] in wanted
        ]
    except (KeyError, TypeError) as err:
        raise MmllmError(f"{path}: not a Karpathy split file (missing {err})") from None
    yield from _caption_samples(entries, spec, cfg)


def _caption_samples(entries: Iterable[tuple[str, list[str], str]], spec: DatasetSpec, cfg: DataConfig):
    """Per caption (training) or per image (evaluation: all captions kept as references)."""
    rng = random.Random(cfg.seed)
    instructions = tuple(cfg.instructions)
    for image, captions, sample_id in entries:
        if spec.per_image:
            yield caption_sample(image, captions, instructions, rng, sample_id)
        else:
            for n, caption in enumerate(captions):
                yield caption_sample(image, captions, instructions, rng, f"{sample_id}-{n}", caption)


def most_common_answer(answers: list[str]) -> str:
    """The training target for a VQAv2 question: the answer most annotators gave (first on ties)."""
    return Counter(answers).most_common(1)[0][0]


def read_vqav2(spec: DatasetSpec, cfg: DataConfig) -> Iterator[Sample]:
    """VQAv2: questions JSON (+ annotations JSON with 10 answers each); COCO_<subtype>_<id>.jpg images."""
    path, root = Path(spec.path), _image_root(spec)
    data = _load_json(path)
    try:
        questions = data["questions"]
        subtype = data.get("data_subtype", "")
        answers = {}
        if spec.annotations:
            for annotation in _load_json(Path(spec.annotations))["annotations"]:
                answers[annotation["question_id"]] = annotation
    except (KeyError, TypeError) as err:
        raise MmllmError(f"{path}: not a VQAv2 questions/annotations file (missing {err})") from None

    def image_path(image_id: int) -> str:
        return str(root / f"COCO_{subtype}_{image_id:012d}.jpg")

    def meta(question: dict) -> dict:
        annotation = answers.get(question["question_id"])
        if annotation is None:
            return {"question_id": question["question_id"]}
        all_answers = [a["answer"] for a in annotation["answers"]]
        return {
            "question_id": question["question_id"],
            "answers": all_answers,
            "answer_type": annotation.get("answer_type", ""),
            "question_type": annotation.get("question_type", ""),
            "answer": most_common_answer(all_answers),
        }

    records = [(q["image_id"], q["question"], meta(q)) for q in questions]
    yield from vqa_samples(records, image_path, spec, "vqav2", cfg.seed)


def read_jsonl(spec: DatasetSpec, cfg: DataConfig) -> Iterator[Sample]:
    """Custom data: one JSON object per line with `image`/`images` and one of `conversations`,
    `question` + `answer`/`answers`, or `caption`/`captions`."""
    path, root = Path(spec.path), _image_root(spec)
    rng = random.Random(cfg.seed)
    for number, record in _json_records(path):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise MmllmError(f"{where}: expected a JSON object")
        images = _image_list(record.get("image", record.get("images")), root, where)
        sample_id = str(record.get("id", number))
        if "conversations" in record:
            yield Sample(images, _conversation(record["conversations"], where), sample_id)
        elif "question" in record:
            answers = record.get("answers") or ([record["answer"]] if "answer" in record else [])
            if not answers:
                raise MmllmError(f"{where}: a question needs 'answer' or 'answers'")
            answer = most_common_answer(answers)
            kinds = {key: record[key] for key in ("question_type", "answer_type") if key in record}
            yield Sample(
                images,
                vqa_conversation([record["question"]], [answer]),
                sample_id,
                {"answers": answers, "answer": answer, **kinds},
            )
        elif "caption" in record or "captions" in record:
            captions = record.get("captions") or [record["caption"]]
            yield caption_sample(images[0], captions, tuple(cfg.instructions), rng, sample_id)
        else:
            raise MmllmError(f"{where}: needs 'conversations', 'question' + 'answer', or 'caption'")


def read_tsv(spec: DatasetSpec, cfg: DataConfig) -> Iterator[Sample]:
    """CC3M-style TSV, streamed: `caption<TAB>image path` per line (a header line is skipped)."""
    path, root = Path(spec.path), _image_root(spec)
    rng = random.Random(cfg.seed)
    for number, line in _numbered_lines(path):
        fields = line.rstrip("\n").split("\t")
        if len(fields) < 2:
            raise MmllmError(f"{path}:{number}: expected caption<TAB>image")
        caption, image = fields[0], fields[1]
        if number == 1 and caption.lower() == "caption":
            continue
        yield caption_sample(str(root / image), [caption], tuple(cfg.instructions), rng, f"tsv-{number}")


def read_webdataset(spec: DatasetSpec, cfg: DataConfig) -> Iterator[Sample]:
    """Webdataset .tar shards (key.jpg + key.txt/key.json), streamed member by member."""
    shards = sorted(glob.glob(spec.path))
    if not shards:
        raise MmllmError(f"no webdataset shards match {spec.path!r}")
    rng = random.Random(cfg.seed)
    for shard in shards:
        for key, members in _tar_groups(shard):
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            caption = _webdataset_caption(members)
            if image is None or caption is None:
                continue  # e.g. a sample whose download failed: webdataset shards hold such keys
            yield caption_sample(image, [caption], tuple(cfg.instructions), rng, f"{Path(shard).name}/{key}")


def _tar_groups(shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Consecutive tar members sharing a key (the name up to the first dot), streamed."""
    current, members = None, {}
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = Path(member.name).name
                key, _, extension = name.partition(".")
                if key != current and members:
                    yield current, members
                    members = {}
                current = key
                members[extension.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError) as err:
        raise MmllmError(f"{shard}: unreadable tar shard ({err})") from None
    if members:
        yield current, members


def _webdataset_caption(members: dict[str, bytes]) -> str | None:
    if "txt" in members:
        return members["txt"].decode("utf-8").strip()
    if "json" in members:
        meta = json.load(io.BytesIO(members["json"]))
        return meta.get("caption") or meta.get("text")
    return None


def read_label_qa(spec: DatasetSpec, cfg: DataConfig) -> Iterator[Sample]:
    """Generated text-only questions about classifier verdicts (`mmllm.data.label_qa`), `limit` of them."""
    from mmllm.data.label_qa import label_qa_pairs

    for number, (prompt, answer) in enumerate(label_qa_pairs(spec.limit or LABEL_QA_COUNT, cfg.seed)):
        conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        yield Sample([], conversation, f"label-qa-{number}")


READERS = {
    "llava": read_llava,
    "coco": read_coco,
    "karpathy": read_karpathy,
    "vqav2": read_vqav2,
    "webdataset": read_webdataset,
    "tsv": read_tsv,
    "easy-vqa": read_easy_vqa,
    "jsonl": read_jsonl,
    "label-qa": read_label_qa,
}
LABEL_QA_COUNT = 6000
STREAMED = {"webdataset", "tsv"}


def read(spec: DatasetSpec, cfg: DataConfig) -> Iterator[Sample]:
    """All samples of one dataset, up to `spec.limit`."""
    samples = READERS[spec.format](spec, cfg)
    for n, sample in enumerate(samples):
        if spec.limit is not None and n >= spec.limit:
            return
        yield sample
