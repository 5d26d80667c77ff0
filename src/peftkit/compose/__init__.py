"""Composing trained adapters: merging them into one (`merge_adapters`)."""
from .merge import AdapterMerge, MergedDiff, MergeOptions, merge_adapters
from .sources import AdapterMergeError

__all__ = ["AdapterMerge", "AdapterMergeError", "MergedDiff", "MergeOptions", "merge_adapters"]
