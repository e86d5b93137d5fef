"""Evaluation: official VQA accuracy, COCO caption metrics (pycocoevalcap), perplexity, reports."""
