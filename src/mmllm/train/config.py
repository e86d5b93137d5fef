"""`mmllm train` recipes: what trains, how it is optimised, where checkpoints go."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmllm.data.config import DataConfig
from mmllm.models.design import ModelConfig

# Attention and MLP projections of Llama/Qwen2 (q, k, v, o, gate, up, down) and Phi-3's fused ones.
LORA_TARGETS = [
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj",
]  # fmt: skip


@dataclass
class PartsConfig:
    """Which parts train. Stage 1: projector only; stage 2: projector plus the LM (LoRA or full)."""

    vision_tower: Literal["frozen", "full"] = "frozen"
    """`full` trains the CLIP tower too (needed when it has no pretrained weights)."""
    projector: Literal["frozen", "full"] = "full"
    """The projector nearly always trains."""
    language_model: Literal["frozen", "full", "lora", "qlora"] = "frozen"
    """`lora`: PEFT LoRA on the LM's own modules; `qlora`: the same over a 4-bit NF4 LM (bitsandbytes: CPU
    or CUDA; the LM must be loaded by name, not stored in `init_from`)."""


@dataclass
class LoraSettings:
    """LoRA adapters on the language model (never on CLIP, whose attention shares the names)."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator: updates are scaled by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """LM module names that get adapters; names this LM does not have are skipped (one must match)."""


@dataclass
class OptimConfig:
    """AdamW with a cosine schedule; one learning rate per part."""

    lr_projector: float = 1e-3
    """Learning rate of the projector."""
    lr_vision: float = 2e-5
    """Learning rate of the vision tower (when it trains)."""
    lr_language: float = 2e-5
    """Learning rate of the full language model (stage2_full)."""
    lr_lora: float = 2e-4
    """Learning rate of LoRA adapters."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to norms and biases."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.999
    """AdamW beta2."""
    warmup_ratio: float = 0.03
    """Fraction of steps with linear warm-up before the cosine decay."""
    min_lr_ratio: float = 0.0
    """The cosine decays to this fraction of each learning rate."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""


@dataclass
class TrainConfig:
    """A training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Parts of a new model (ignored when init_from is set)."""
    init_from: str = ""
    """Start from a saved mmllm model or checkpoint (e.g. stage 2 from stage 1's output)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data."""
    eval_data: DataConfig = field(default_factory=DataConfig)
    """Held-out data for periodic evaluation (none: no evaluation)."""
    parts: PartsConfig = field(default_factory=PartsConfig)
    """Which parts train."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA settings (with language_model: lora or qlora)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and schedule."""
    max_steps: int = 0
    """Optimiser steps; 0: as many as `epochs` of the training data."""
    epochs: float = 1.0
    """Passes over the training data (when max_steps is 0)."""
    stop_after: int = 0
    """End the run after this many steps; the learning-rate schedule still spans max_steps/epochs
    (nanoGPT's max_iters vs lr_decay_iters). 0: run the whole schedule."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast precision; fp16 uses a gradient scaler."""
    gradient_checkpointing: bool = False
    """Recompute LM activations in the backward pass to save memory."""
    compile: bool = False
    """torch.compile each LM decoder layer (inductor; sequence lengths dynamic). The first steps
    take longer while it compiles."""
    contrastive_weight: float = 0.0
    """Weight of the CLIP-style image-text contrastive loss on projector outputs (0: off)."""
    token_target_weight: float = 0.0
    """Weight of a loss that regresses each image's projected tokens onto the LM's input embeddings of its
    answer's tokens, in order (e.g. 2 tokens "red circle" over 4 image tokens: red, red, circle, circle),
    so that the LM reads an image as the words that describe it. Needs answers that describe every image
    fully (easy-VQA's `describe`); 0: off."""
    token_target_vocab_weight: float = 0.0
    """With token_target_weight: add the cross-entropy of each image token's dot products with the whole
    embedding table against its target word, so that the nearest word is the right one (a squared error
    misses in any direction, and SmolLM2's colour words have cosine 0.46 to each other); 0: off."""
    language_loss_weight: float = 1.0
    """Weight of the LM's next-token loss. 0 with contrastive_weight or token_target_weight > 0: a stage
    that trains the vision tower and projector against the LM's frozen token embeddings with no LM forward
    (LiT-style: the embedding table is the locked text tower); one process only."""
    seed: int = 0
    """Seed for initialisation, data order and dropout."""
    output_dir: str = "runs/mmllm"
    """Where checkpoints, the final model and logs go. A new run refuses one that holds a previous
    run (`--resume auto` continues it)."""
    overwrite_output_dir: bool = False
    """Start clean in a used output_dir: remove the previous run's checkpoints, model and logs."""
    save_every: int = 500
    """Checkpoint every N optimiser steps (and always at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted."""
    eval_every: int = 0
    """Evaluate on eval_data every N steps (0: only at the end)."""
    log_every: int = 10
    """Write metrics every N steps."""
    tensorboard: bool = True
    """Write TensorBoard event files (needs the tensorboard package)."""
    wandb: bool = False
    """Log to Weights & Biases when it is installed (offline mode works)."""
