"""Training: two stages (projector alignment, then LoRA/QLoRA/full), accelerate, exact resume, merge."""
