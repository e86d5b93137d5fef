"""Data readers, loading, and the feature cache, on tiny fixtures written here in every format."""

from __future__ import annotations

import io
import json
import random
import tarfile
from collections import Counter

import pytest
import torch
from PIL import Image, ImageDraw

from conftest import make_tiny
from mmllm.cli import main
from mmllm.data.config import DataConfig, DatasetSpec, data_config_from_arg
from mmllm.data.easy_vqa import EASY_VQA_COLORS, EASY_VQA_SHAPES
from mmllm.data.features import FeatureCache, build_feature_cache, encoder_fingerprint
from mmllm.data.loading import Collator, LoadReport, MixtureBatchSampler, build_dataloader, open_dataset
from mmllm.data.readers import read
from mmllm.data.vqa import YES_NO
from mmllm.errors import MmllmError
from mmllm.images import MAX_IMAGE_PIXELS


def draw(path, colour="red", shape="ellipse", size=(48, 40), fmt=None):
    image = Image.new("RGB", size, "white")
    getattr(ImageDraw.Draw(image), shape)([6, 6, size[0] - 6, size[1] - 6], fill=colour)
    image.save(path, fmt)
    return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for i, colour in enumerate(["red", "blue", "green"]):
        draw(root / f"img{i}.png", colour)
    (root / "corrupt.png").write_bytes(b"\x89PNG not really")
    full = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(full, "JPEG")
    (root / "truncated.jpg").write_bytes(full.getvalue()[:300])
    side = int(MAX_IMAGE_PIXELS**0.5) + 10
    Image.new("1", (side, side)).save(root / "huge.png")
    return root


def samples(spec: DatasetSpec, **cfg) -> list:
    return list(read(spec, DataConfig(datasets=[spec], **cfg)))


# -- readers ---------------------------------------------------------------------------------------


def test_llava_json_and_jsonl(folder, tmp_path):
    records = [
        {
            "id": "a",
            "image": "img0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour?"},
                {"from": "gpt", "value": "Red."},
            ],
        },
        {
            "id": "b",
            "image": ["img0.png", "img1.png"],
            "conversations": [
                {"from": "human", "value": "<image> vs <image>"},
                {"from": "gpt", "value": "Different."},
            ],
        },
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    (tmp_path / "chat.json").write_text(json.dumps(records))
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    for name in ("chat.json", "chat.jsonl"):
        got = samples(DatasetSpec("llava", str(tmp_path / name), images=str(folder)))
        assert [s.id for s in got] == ["a", "b", "c"]
        assert got[0].images == [str(folder / "img0.png")] and len(got[1].images) == 2 and not got[2].images
        assert got[0].conversation == [
            {"role": "user", "content": "<image>\nWhat colour?"},
            {"role": "assistant", "content": "Red."},
        ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"a": 1}', "expected a JSON list"),
        ('[{"image": "x.png"}]', "needs a non-empty 'conversations'"),
        ('[{"conversations": [{"from": "robot", "value": "x"}]}]', "each turn needs"),
    ],
)
def test_llava_bad_annotations_name_file_and_record(tmp_path, content, message):
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(MmllmError, match=message):
        samples(DatasetSpec("llava", str(tmp_path / "bad.json")))


def coco_file(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "img0.png"}, {"id": 2, "file_name": "img1.png"}],
        "annotations": [
            {"image_id": 1, "caption": "A red circle."},
            {"image_id": 1, "caption": "Red ball. "},
            {"image_id": 2, "caption": "A blue circle."},
        ],
    }
    (tmp_path / "captions_val2014.json").write_text(json.dumps(data))
    return tmp_path / "captions_val2014.json"


def test_coco_per_caption_and_per_image(folder, tmp_path):
    path = str(coco_file(tmp_path))
    per_caption = samples(DatasetSpec("coco", path, images=str(folder)), instructions=["Caption it."])
    assert len(per_caption) == 3
    assert per_caption[1].conversation == [
        {"role": "user", "content": "<image>\nCaption it."},
        {"role": "assistant", "content": "Red ball."},
    ]
    per_image = samples(DatasetSpec("coco", path, images=str(folder), per_image=True))
    assert [s.meta["references"] for s in per_image] == [["A red circle.", "Red ball."], ["A blue circle."]]


def test_karpathy_split_train_includes_restval(folder, tmp_path):
    images = [
        {
            "filepath": "",
            "filename": f"img{i}.png",
            "split": split,
            "cocoid": i,
            "sentences": [{"raw": f"caption {i}"}],
        }
        for i, split in enumerate(["train", "restval", "test"])
    ]
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images}))
    spec = {"format": "karpathy", "path": str(tmp_path / "dataset_coco.json"), "images": str(folder)}
    assert len(samples(DatasetSpec(**spec))) == 2
    test = samples(DatasetSpec(**spec, split="test", per_image=True))
    assert [s.meta["references"] for s in test] == [["caption 2"]]


def vqa_files(tmp_path, folder):
    for image_id in (42, 7):
        Image.open(folder / "img0.png").save(folder / f"COCO_val2014_{image_id:012d}.jpg")
    questions = {
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 42, "question": "What colour is it?", "question_id": 420},
            {"image_id": 42, "question": "Is it round?", "question_id": 421},
            {"image_id": 7, "question": "How many?", "question_id": 70},
        ],
    }
    answers = {
        420: ["red"] * 6 + ["orange"] * 4,
        421: ["yes"] * 9 + ["no"],
        70: ["2", "two", "2", "3"] + ["2"] * 6,
    }
    annotations = {
        "annotations": [
            {
                "question_id": q,
                "image_id": 42 if q != 70 else 7,
                "answer_type": "other" if q == 420 else ("yes/no" if q == 421 else "number"),
                "question_type": "what color",
                "answers": [{"answer": a, "answer_id": n + 1} for n, a in enumerate(a_list)],
            }
            for q, a_list in answers.items()
        ]
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return DatasetSpec(
        "vqav2", str(tmp_path / "q.json"), images=str(folder), annotations=str(tmp_path / "a.json")
    )


def test_vqav2_most_common_answer_trains_all_answers_kept(folder, tmp_path):
    spec = vqa_files(tmp_path, folder)
    got = samples(spec)
    assert [s.conversation[1]["content"] for s in got] == ["red", "yes", "2"]
    assert got[0].meta["answers"].count("orange") == 4 and len(got[0].meta["answers"]) == 10
    assert got[2].meta["answer_type"] == "number"
    assert got[0].images == [str(folder / "COCO_val2014_000000000042.jpg")]
    spec.per_image = True
    grouped = samples(spec)
    assert len(grouped) == 2 and len(grouped[0].conversation) == 4
    assert grouped[0].conversation[2] == {"role": "user", "content": "Is it round?"}  # image only once


def test_tsv_with_header_and_webdataset_shards_stream(folder, tmp_path):
    (tmp_path / "cc.tsv").write_text("caption\timage\nA red circle.\timg0.png\nA blue one.\timg1.png\n")
    got = samples(DatasetSpec("tsv", str(tmp_path / "cc.tsv"), images=str(folder)))
    assert [s.conversation[1]["content"] for s in got] == ["A red circle.", "A blue one."]
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for n in range(3):
                key = f"{shard:02d}{n:04d}"
                image = (folder / f"img{n}.png").read_bytes()
                text = f"caption {shard}-{n}".encode()
                members = [
                    (f"{key}.png", image),
                    (
                        f"{key}.txt" if n != 1 else f"{key}.json",
                        text if n != 1 else json.dumps({"caption": text.decode()}).encode(),
                    ),
                ]
                if n == 2:
                    members = members[1:]  # an image that failed to download: skipped
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    spec = DatasetSpec("webdataset", str(tmp_path / "shard-*.tar"))
    got = samples(spec)
    assert [s.conversation[1]["content"] for s in got] == [
        "caption 0-0",
        "caption 0-1",
        "caption 1-0",
        "caption 1-1",
    ]
    assert isinstance(got[0].images[0], bytes)
    # Streamed through DataLoader workers, every sample arrives exactly once.
    cfg = DataConfig(datasets=[spec], batch_size=2, num_workers=2)
    processor = make_tiny("qwen2")[1]
    loader = build_dataloader(cfg, processor)
    report = LoadReport()
    for batch in loader:
        report.update(batch)
    assert report.counts["kept"] == 4 and report.counts["samples"] == 4


def test_easy_vqa_package(tmp_path):
    test = samples(DatasetSpec("easy-vqa", split="test"))
    assert len(test) == 9673
    assert Counter(s.meta["answer_type"] for s in test)["yes/no"] == 7136
    templates = Counter(s.meta["question_type"] for s in test)
    assert len(templates) == 24 and templates["is no COLOR shape present?"] == 689
    assert templates["does the image not contain a SHAPE?"] == 238
    grouped = samples(DatasetSpec("easy-vqa", split="test", per_image=True))
    assert len(grouped) == 1000 and sum(len(s.conversation) for s in grouped) == 2 * 9673
    shuffled = samples(DatasetSpec("easy-vqa", split="test", per_image=True, shuffle_turns=True))
    assert [s.id for s in shuffled] == [s.id for s in grouped]
    pairs = [(t["question_id"], t["answer"]) for s in shuffled for t in s.meta["turns"]]
    assert sorted(pairs) == sorted((t["question_id"], t["answer"]) for s in grouped for t in s.meta["turns"])
    assert sum(s.conversation != g.conversation for s, g in zip(shuffled, grouped, strict=True)) > 900
    # easy-VQA asks the colour first; shuffled, the first turn is a yes/no question most of the time.
    first = Counter(s.meta["turns"][0]["answer_type"] for s in shuffled)
    assert (
        first["yes/no"] > 600 and Counter(g.meta["turns"][0]["answer_type"] for g in grouped)["yes/no"] < 100
    )
    assert (
        samples(DatasetSpec("easy-vqa", split="test", per_image=True, shuffle_turns=True))[0] == shuffled[0]
    )
    open_questions = samples(DatasetSpec("easy-vqa", split="test", answer_types=["color", "shape"]))
    assert len(open_questions) == 9673 - 7136
    assert {s.meta["answer_type"] for s in open_questions} == {"color", "shape"}
    with pytest.raises(MmllmError, match="splits train and test"):
        samples(DatasetSpec("easy-vqa", split="val"))


def test_easy_vqa_describe_agrees_with_every_question_of_the_image():
    described = samples(DatasetSpec("easy-vqa", split="train", describe=True))
    assert len(described) == 3578  # of 4,000 images: the others' questions leave colour or shape open
    captions = {s.id.rsplit("-", 1)[1]: s.conversation[1]["content"] for s in described}
    assert all(c.startswith(" ") for c in captions.values())  # the words as a sentence's questions name them
    checked = Counter()
    for question in samples(DatasetSpec("easy-vqa", split="train")):
        image = question.images[0].rsplit("/", 1)[1].removesuffix(".png")
        if image not in captions:
            continue
        color, shape = captions[image].split()
        answer, words = question.meta["answer"], set(question.conversation[0]["content"].rstrip("?").split())
        named = words & (EASY_VQA_COLORS | EASY_VQA_SHAPES)
        if answer in YES_NO:
            holds = named <= {color, shape}
            assert (answer == "yes") == (holds != bool(words & {"not", "no"})), (question.id, captions[image])
        else:
            assert answer in (color, shape) and named <= {color, shape}, (question.id, captions[image])
        checked[question.meta["answer_type"]] += 1
    assert checked["yes/no"] > 25_000 and checked["color"] > 3_000 and checked["shape"] > 3_000


def test_balance_yes_no_removes_the_wording_prior():
    def answer_counts(questions: list) -> dict[str, Counter]:
        counts: dict[str, Counter] = {}
        for s in questions:
            counts.setdefault(s.meta["question_type"], Counter())[s.meta["answer"]] += 1
        return counts

    test = samples(DatasetSpec("easy-vqa", split="test"))
    before = answer_counts(test)
    # easy-VQA asks mostly about colours the shape does not have: the wording alone gives "no".
    assert before["is there a COLOR shape?"]["no"] > 4 * before["is there a COLOR shape?"]["yes"]
    balanced = samples(DatasetSpec("easy-vqa", split="test", balance_yes_no=True))
    after = answer_counts(balanced)
    for template, counts in after.items():
        if set(counts) <= {"yes", "no"}:
            assert counts["yes"] == counts["no"] == max(before[template].values()), template
        else:  # open questions are left as they are
            assert counts == before[template]
    assert {s.id for s in balanced} == {s.id for s in test}  # repeats, nothing made up


def test_custom_jsonl_forms(folder, tmp_path):
    lines = [
        {"image": "img0.png", "question": "Colour?", "answers": ["red", "red", "pink"]},
        {"image": "img1.png", "caption": "A blue circle."},
        {
            "image": "img2.png",
            "conversations": [
                {"role": "user", "content": "<image> hi"},
                {"role": "assistant", "content": "Green."},
            ],
        },
    ]
    (tmp_path / "custom.jsonl").write_text("\n".join(map(json.dumps, lines)))
    got = samples(DatasetSpec("jsonl", str(tmp_path / "custom.jsonl"), images=str(folder)))
    assert got[0].conversation[1]["content"] == "red" and got[0].meta["answers"] == ["red", "red", "pink"]
    assert got[1].meta["references"] == ["A blue circle."]
    assert got[2].conversation[1]["content"] == "Green."
    (tmp_path / "bad.jsonl").write_text('{"image": "img0.png"}\n')
    with pytest.raises(MmllmError, match=r"bad\.jsonl:1: needs"):
        samples(DatasetSpec("jsonl", str(tmp_path / "bad.jsonl")))


# -- loading ---------------------------------------------------------------------------------------


def llava_spec(tmp_path, folder, names):
    records = [
        {
            "id": name,
            "image": name,
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "A circle."},
            ],
        }
        for name in names
    ]
    (tmp_path / "mixed.json").write_text(json.dumps(records))
    return DatasetSpec("llava", str(tmp_path / "mixed.json"), images=str(folder))


def test_bad_images_are_skipped_and_counted(folder, tmp_path):
    names = ["img0.png", "corrupt.png", "truncated.jpg", "huge.png", "missing.png", "img1.png"]
    cfg = DataConfig(datasets=[llava_spec(tmp_path, folder, names)], batch_size=3, num_workers=0)
    report = LoadReport()
    shapes = []
    for batch in build_dataloader(cfg, make_tiny("qwen2")[1], shuffle=False):
        batch = report.update(batch)
        shapes.append(batch["pixel_values"].shape[0])
    assert report.counts["bad images"] == 4 and report.counts["kept"] == 2 and shapes == [1, 1]
    summary = report.summary()
    assert "2/6 sample draws used" in summary and "4 bad images" in summary
    assert "no such file" in summary and "too large" in summary


def test_truncation_cuts_answers_never_images(folder, tmp_path):
    processor = make_tiny("qwen2", feature_mode="patch")[1]  # 16 image tokens
    long_answer = " ".join(["The answer is yes."] * 20)
    sample_records = [
        {
            "id": "long",
            "image": "img0.png",
            "conversations": [
                {"from": "human", "value": "<image>\nQ?"},
                {"from": "gpt", "value": long_answer},
            ],
        },
        {
            "id": "late-image",
            "image": "img0.png",
            "conversations": [
                {"from": "human", "value": "Q?"},
                {"from": "gpt", "value": long_answer},
                {"from": "human", "value": "<image>\nAnd this?"},
                {"from": "gpt", "value": "Yes."},
            ],
        },
    ]
    (tmp_path / "long.json").write_text(json.dumps(sample_records))
    cfg = DataConfig(
        datasets=[DatasetSpec("llava", str(tmp_path / "long.json"), images=str(folder))], max_length=48
    )
    dataset = open_dataset(cfg)
    batch = Collator(processor, cfg)([dataset[0], dataset[1]])
    assert batch["input_ids"].shape == (1, 48)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 16
    assert (batch["labels"] != -100).any()
    assert batch["stats"]["truncated"] == 1 and batch["stats"]["dropped: images beyond max_length"] == 1


def test_mixture_weights_and_length_grouping():
    sampler = MixtureBatchSampler([10, 4], [1.0, 2.5], batch_size=3, seed=1)
    drawn = Counter(i < 10 for batch in sampler for i in batch)
    assert drawn == {True: 10, False: 10} and len(sampler) == 7
    lengths = [i * 7 % 23 for i in range(300)]
    grouped = MixtureBatchSampler([300], [1.0], batch_size=10, lengths=lengths, seed=0)
    plain = MixtureBatchSampler([300], [1.0], batch_size=10, seed=0)

    def padding(sampler) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in sampler)

    assert padding(grouped) < padding(plain) / 3
    assert sorted(i for b in grouped for i in b) == list(range(300))


def test_data_argument_forms(tmp_path):
    assert data_config_from_arg("easy-vqa:test").datasets[0].split == "test"
    cfg = data_config_from_arg("llava:x.json", ["max_length=64"], images="imgs")
    assert (cfg.datasets[0].path, cfg.datasets[0].images, cfg.max_length) == ("x.json", "imgs", 64)
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        "datasets:\n  - {format: easy-vqa, split: train, weight: 0.5}\n"
        "  - {format: coco, path: c.json, per_image: true}\naugment: {enabled: true}\n"
    )
    cfg = data_config_from_arg(str(recipe))
    assert cfg.datasets[0].weight == 0.5 and cfg.datasets[1].per_image and cfg.augment.enabled
    with pytest.raises(MmllmError, match="FORMAT:PATH"):
        data_config_from_arg("parquet:x")
    with pytest.raises(MmllmError, match=r"datasets\[0\].weight"):
        data_config_from_arg("easy-vqa", ["datasets=[{format: easy-vqa, weight: lots}]"])


# -- feature cache ---------------------------------------------------------------------------------


def test_feature_cache_matches_encoder_resumes_and_refuses_stale(folder, tmp_path):
    model, processor = make_tiny("qwen2", feature_mode="patch")
    spec = llava_spec(tmp_path, folder, ["img0.png", "img1.png", "img2.png", "img0.png", "corrupt.png"])
    cfg = DataConfig(datasets=[spec], batch_size=5, num_workers=0)
    dataset = open_dataset(cfg)
    cache_dir = tmp_path / "cache"
    first = build_feature_cache(model, processor, dataset.samples[:1], cache_dir, batch_size=2)
    assert first["added"] == 1
    # An interrupted append: half a record and half a key line must be trimmed on reopen.
    with open(cache_dir / "features.f16", "ab") as file:
        file.write(b"\0" * 100)
    with open(cache_dir / "keys.txt", "a") as file:
        file.write("deadbeef")
    rest = build_feature_cache(model, processor, dataset.samples, cache_dir, batch_size=2)
    # img0 is listed twice but is one distinct image, already cached by the first run.
    assert (rest["added"], rest["cached"], rest["bad images"]) == (2, 1, 1)
    cache = FeatureCache.open(cache_dir, encoder_fingerprint(model, processor))
    assert len(cache) == 3

    live = Collator(processor, cfg)(dataset.samples[:3])
    cached = Collator(processor, cfg, cache)(dataset.samples[:3])
    assert "pixel_values" not in cached and cached["image_features"].dtype == torch.float16
    torch.testing.assert_close(
        cached["image_features"].float(), model.get_image_features(live["pixel_values"]), atol=2e-3, rtol=2e-3
    )
    loss_live = model(**{k: v for k, v in live.items() if k not in ("stats", "problems")}).loss
    loss_cached = model(**{k: v for k, v in cached.items() if k not in ("stats", "problems")}).loss
    torch.testing.assert_close(loss_live, loss_cached, atol=1e-3, rtol=1e-3)
    # A batch with an image missing from the cache falls back to pixels, counted.
    draw(folder / "new.png", "yellow")
    new_sample = next(read(llava_spec(tmp_path, folder, ["new.png"]), cfg))
    mixed = Collator(processor, cfg, cache)([dataset[0], new_sample])
    assert "pixel_values" in mixed and mixed["stats"]["cache misses"] == 1

    with torch.no_grad():
        next(p for n, p in model.vision_tower.named_parameters() if "post_layernorm" in n).add_(0.1)
    with pytest.raises(MmllmError, match="stale"):
        FeatureCache.open(cache_dir, encoder_fingerprint(model, processor))


def test_features_and_stats_commands(folder, tmp_path, capsys):
    model, processor = make_tiny("llama")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    spec = llava_spec(tmp_path, folder, ["img0.png", "img1.png", "corrupt.png"])
    data = f"llava:{spec.path}"
    args = [
        "features",
        "--model",
        str(tmp_path / "model"),
        "--data",
        data,
        "--images",
        str(folder),
        "--out",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    assert "2 images encoded, 0 already cached, 1 bad images skipped" in capsys.readouterr().out
    assert main(args) == 0
    assert "0 images encoded, 2 already cached" in capsys.readouterr().out
    assert (
        main(
            [
                "data",
                "stats",
                data,
                "--model",
                str(tmp_path / "model"),
                "--images",
                str(folder),
                "--out",
                str(tmp_path / "stats"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "samples: 3   images: 3   user turns: 3" in out and "1 not an image file" in out
    assert f"  {folder / 'corrupt.png'}: not an image file PIL can read" in out.splitlines()
    stats = json.loads((tmp_path / "stats" / "stats.json").read_text())
    assert stats["top answers"] == [["A circle.", 3]]
    assert (tmp_path / "stats" / "token_lengths.png").stat().st_size > 1000


def test_cache_is_used_only_for_a_frozen_tower_and_plain_images(folder, tmp_path):
    from mmllm.data.features import cache_for_training

    model, processor = make_tiny("qwen2")
    spec = llava_spec(tmp_path, folder, ["img0.png"])
    build_feature_cache(model, processor, open_dataset(DataConfig(datasets=[spec])).samples, tmp_path / "c")
    directory = str(tmp_path / "c")
    assert cache_for_training("", False, False, model, processor) is None
    assert cache_for_training(directory, True, False, model, processor) is None
    assert cache_for_training(directory, False, True, model, processor) is None
    assert len(cache_for_training(directory, False, False, model, processor)) == 1


def test_augmentation_is_off_by_default_and_varies_images_when_on(folder):
    from mmllm.data.augment import augment
    from mmllm.data.config import AugmentConfig

    image = Image.open(folder / "img0.png").convert("RGB")
    assert augment(image, AugmentConfig(), random.Random(0)) is image
    on = AugmentConfig(enabled=True, crop_scale=0.5, jitter=0.3)
    outputs = {augment(image, on, random.Random(seed)).tobytes() for seed in range(4)}
    assert len(outputs) == 4
    unflipped = AugmentConfig(enabled=True, crop_scale=1.0)
    assert augment(image, unflipped, random.Random(0)).tobytes() == image.tobytes()


def test_flips_and_quarter_turns_give_the_eight_symmetries_of_the_square():
    import random

    import numpy as np

    from mmllm.data.augment import augment
    from mmllm.data.config import AugmentConfig

    pixels = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)  # every pixel distinct
    image = Image.fromarray(pixels)
    symmetric = AugmentConfig(enabled=True, crop_scale=1.0, hflip=True, vflip=True, rot90=True)
    views = {augment(image, symmetric, random.Random(seed)).tobytes() for seed in range(200)}
    expected = {
        np.ascontiguousarray(np.rot90(flipped, turns)).tobytes()
        for flipped in (pixels, pixels[:, ::-1])
        for turns in range(4)
    }
    assert views == expected


def test_question_case_augmentation_capitalises_user_turns_only():
    import random

    from mmllm.data.augment import augment_questions
    from mmllm.data.config import AugmentConfig

    conversation = [
        {"role": "user", "content": "<image>\nwhat is the shape?"},
        {"role": "assistant", "content": "circle"},
        {"role": "user", "content": "is it red?"},
    ]
    assert augment_questions(conversation, AugmentConfig(enabled=True), random.Random(0)) is conversation
    always = AugmentConfig(enabled=True, capitalize=1.0)
    assert augment_questions(conversation, always, random.Random(0)) == [
        {"role": "user", "content": "<image>\nWhat is the shape?"},
        {"role": "assistant", "content": "circle"},
        {"role": "user", "content": "Is it red?"},
    ]
    assert conversation[0]["content"] == "<image>\nwhat is the shape?"  # the sample itself is untouched
    half = AugmentConfig(enabled=True, capitalize=0.5)
    firsts = {augment_questions(conversation, half, random.Random(s))[2]["content"][0] for s in range(20)}
    assert firsts == {"i", "I"}


def test_packing_places_every_sample_once_within_max_length_and_never_pads_more():
    from mmllm.data.loading import pack_rows

    rng = random.Random(0)
    for _ in range(200):
        max_length = rng.choice([64, 256, 1024])
        lengths = [rng.randint(1, max_length) for _ in range(rng.randint(1, 40))]
        rows = pack_rows([{"input_ids": [0] * n} for n in lengths], max_length)
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        fills = [sum(lengths[i] for i in row) for row in rows]
        assert max(fills) <= max_length
        assert len(rows) * max(fills) <= len(lengths) * max(lengths)  # the padded batch's tokens
    # Short samples share a row up to the longest one's length: no padding at all.
    lengths = [100, 50] * 4 + [60, 40]
    rows = pack_rows([{"input_ids": [0] * n} for n in lengths], 400)
    assert len(rows) * max(sum(lengths[i] for i in row) for row in rows) == sum(lengths)


def _loss_and_gradients(model, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    inputs = {k: v for k, v in batch.items() if k not in ("stats", "problems", "real_tokens")}
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_a_packed_batch_has_the_loss_and_gradients_of_the_padded_one(kind):
    model, processor = make_tiny(kind, feature_mode="patch", lm_init_std=0.3)  # fp32
    spec = DatasetSpec("easy-vqa", split="train", per_image=True, limit=8)
    cfg = DataConfig(datasets=[spec], batch_size=8, num_workers=0, max_length=1024)
    samples = open_dataset(cfg).samples[:8]
    padded = Collator(processor, cfg)(samples)
    packed = Collator(processor, DataConfig(**{**vars(cfg), "pack": True}))(samples)
    rows, width = packed["input_ids"].shape
    assert rows < len(samples) and width <= cfg.max_length
    assert packed["real_tokens"] == int(padded["attention_mask"].sum())  # the same tokens, less padding
    assert rows * width < padded["input_ids"].numel()
    assert int((packed["input_ids"] == processor.image_token_id).sum()) == 8 * processor.num_image_tokens
    loss, gradients = _loss_and_gradients(model, padded)
    packed_loss, packed_gradients = _loss_and_gradients(model, packed)
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=0)
    assert gradients.keys() == packed_gradients.keys()
    assert any("vision" in name for name in gradients) and any("projector" in name for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(packed_gradients[name], gradient, rtol=1e-4, atol=1e-6, msg=name)
    # Attention really is confined to each sample: a causal row over the packed samples differs.
    crossed = {**packed, "position_ids": torch.arange(width).expand(rows, -1)}
    assert not torch.allclose(_loss_and_gradients(model, crossed)[0], loss)
