"""`mmllm export llava-hf`: a transformers `LlavaForConditionalGeneration` checkpoint.

It fits a model with LLaVA's own design: patch features from a CLIP layer and the `mlp_gelu` projector
(Linear-GELU-Linear). LoRA is merged first. The weights are saved in the hub's llava-hf layout
(llava-hf/llava-1.5-7b-hf) and its chat template takes the standard multimodal message, as the hub's
llava-hf checkpoints do.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from mmllm.errors import MmllmError
from mmllm.models.build import load_model

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration

log = logging.getLogger("mmllm")

# LlavaForConditionalGeneration's own names -> the hub's llava-hf layout. transformers 5 saves its new
# layout (`vision_tower.embeddings.*`, ...), which vLLM's Llava loader refuses; the hub's, transformers
# reads back through its conversion mapping and vLLM reads as it is.
HUB_PREFIXES = {
    "model.vision_tower.": "vision_tower.vision_model.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
}


def hub_state_dict(llava: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """`llava`'s weights under the hub's llava-hf names; a head tied to the embeddings is stored once."""
    state = llava.state_dict()
    if llava.config.tie_word_embeddings:
        del state["lm_head.weight"]
    renamed = {}
    for key, tensor in state.items():
        prefix = next(p for p in HUB_PREFIXES if key.startswith(p))
        renamed[HUB_PREFIXES[prefix] + key.removeprefix(prefix)] = tensor
    return renamed


def multimodal_template(template: str, image_token: str) -> str:
    """The LM's chat `template` for messages whose content may also be a list of parts (the standard
    multimodal message transformers and vLLM render): an image part becomes `image_token`, a text part
    its text, joined by newlines, then the LM's template renders the strings. That is the prompt mmllm
    makes of the same conversation (an image on its own line before the question: `_place_images`)."""
    image = json.dumps(image_token)  # a Jinja string literal
    return (
        "{% set turns = namespace(messages=[]) %}{% for message in messages %}"
        "{% if message['content'] is string or message['content'] is not iterable %}"
        "{% set turns.messages = turns.messages + [message] %}{% else %}"
        "{% set parts = namespace(texts=[]) %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' %}}{{% set parts.texts = parts.texts + [{image}] %}}"
        "{% elif part['type'] == 'text' %}{% set parts.texts = parts.texts + [part['text']] %}"
        "{% else %}{{ raise_exception('this model reads text and image parts, not ' + part['type']) }}"
        "{% endif %}{% endfor %}"
        "{% set turns.messages = turns.messages + [dict(message, content=parts.texts | join('\\n'))] %}"
        "{% endif %}{% endfor %}{% set messages = turns.messages %}" + template
    )


def to_llava(model, processor):
    """(LlavaForConditionalGeneration, LlavaProcessor) with our weights; logits equal ours."""
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    config = model.config
    if config.vision_feature_mode != "patch" or config.projector_type != "mlp_gelu":
        raise MmllmError(
            "llava-hf export needs patch features and the mlp_gelu projector (LLaVA's design); this "
            f"model has {config.vision_feature_mode} features and the {config.projector_type} projector"
        )
    if config.projector_snap_to_vocab:
        raise MmllmError(
            "llava-hf export cannot carry projector_snap_to_vocab (Llava feeds its projector's output to "
            "the LM as it is, with no step that replaces each image token by its nearest word); export "
            "this model with `mmllm export onnx` or serve it with mmllm"
        )
    if config.vision_pixel_shuffle > 1:
        raise MmllmError(
            "llava-hf export cannot carry vision_pixel_shuffle (LLaVA feeds every patch token to its "
            "projector); export this model with `mmllm export onnx` or serve it with mmllm"
        )
    model.merge_lora()
    text_config = model.language_model.config
    image_token_id = processor.image_token_id
    # Llava looks the image token up in the LM's embeddings: the table must hold its row. The new
    # row is zero (its input is replaced by image features; as an output its logit is 0).
    old_vocab = text_config.vocab_size
    if image_token_id >= old_vocab:
        model.language_model.resize_token_embeddings(image_token_id + 1, mean_resizing=False)
        with torch.no_grad():
            model.language_model.get_input_embeddings().weight[old_vocab:] = 0
            model.language_model.get_output_embeddings().weight[old_vocab:] = 0
        text_config = model.language_model.config
    llava_config = LlavaConfig(
        vision_config=model.vision_tower.config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=processor.num_image_tokens,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full" if config.vision_use_cls else "default",
        vision_feature_layer=config.vision_feature_layer,
        multimodal_projector_bias=True,
        tie_word_embeddings=bool(getattr(text_config, "tie_word_embeddings", False)),
    )
    llava = LlavaForConditionalGeneration(llava_config).to(model.dtype)
    llava.model.vision_tower.load_state_dict(model.vision_tower.state_dict())
    first, second = model.projector.linears  # Linear, GELU, Linear
    llava.model.multi_modal_projector.linear_1.load_state_dict(first.state_dict())
    llava.model.multi_modal_projector.linear_2.load_state_dict(second.state_dict())
    llava.model.language_model.load_state_dict(model.language_model.get_decoder().state_dict())
    llava.lm_head.load_state_dict(model.language_model.get_output_embeddings().state_dict())

    chat_template = multimodal_template(processor.template, processor.image_token)
    tokenizer = copy.deepcopy(processor.tokenizer)  # mmllm's processor keeps its own template
    tokenizer.chat_template = chat_template
    size = processor.image_processor.size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(processor.image_processor.mean),
        image_std=list(processor.image_processor.std),
    )
    llava_processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=model.vision_tower.config.patch_size,
        vision_feature_select_strategy=llava_config.vision_feature_select_strategy,
        image_token=processor.image_token,
        num_additional_image_tokens=1,  # CLIP's CLS
        chat_template=chat_template,
    )
    return llava.eval(), llava_processor


def export_llava_hf(model_name: str, out: str | Path, dtype: torch.dtype | None = None) -> Path:
    model, processor = load_model(model_name, dtype=dtype)
    llava, llava_processor = to_llava(model, processor)
    out = Path(out)
    llava.save_pretrained(out, state_dict=hub_state_dict(llava), save_original_format=False)
    llava_processor.save_pretrained(out)
    log.info("wrote %s (LlavaForConditionalGeneration)", out)
    return out
