"""Composing trained adapters: merging them into one (`merge_adapters`)."""
from .merge import AdapterMerge, AdapterMergeError, MergedDiff, MergeOptions, merge_adapters

__all__ = ["AdapterMerge", "AdapterMergeError", "MergedDiff", "MergeOptions", "merge_adapters"]
