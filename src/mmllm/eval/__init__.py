"""Evaluation: official VQA accuracy, COCO caption metrics (pycocoevalcap), perplexity, reports."""

# The tasks `mmllm eval --task` takes (here, so the CLI lists them without importing torch).
TASKS = ("coco-captions", "vqav2", "easy-vqa", "photo-qa", "perplexity", "custom")
