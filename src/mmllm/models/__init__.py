"""Model parts: configuration, vision tower, projector, language model, the multimodal model."""
