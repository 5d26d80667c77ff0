"""Composing trained adapters: merging them into one (`merge_adapters`), searching the weights of a LoRA composition
for a new task (`lorahub`), and steering a model's decoding by a tuned and untuned pair (`ProxyTuning`)."""
from .lorahub import Candidate, LoRAHubResult, lorahub
from .merge import AdapterMerge, MergedDiff, MergeOptions, merge_adapters
from .sources import AdapterMergeError

__all__ = ["AdapterMerge", "AdapterMergeError", "Candidate", "LoRAHubResult", "MergedDiff", "MergeOptions",
           "lorahub", "merge_adapters"]
