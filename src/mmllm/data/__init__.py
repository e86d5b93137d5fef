"""Data: readers for every supported format -> `Sample`s, loading and batching, the feature cache."""

from mmllm.data.config import AugmentConfig, DataConfig, DatasetSpec
from mmllm.data.records import Sample

__all__ = ["AugmentConfig", "DataConfig", "DatasetSpec", "Sample"]
