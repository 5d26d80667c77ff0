"""Composing trained adapters: merging them into one (`merge_adapters`), searching the weights of a LoRA composition
for a new task (`lorahub`), and steering a model's decoding by a tuned and untuned pair (`ProxyTuning`)."""
from .lorahub import Candidate, LoRAHubResult, lorahub
from .merge import AdapterMerge, MergedDiff, MergeOptions, merge_adapters
from .proxy import ProxyTuning, VocabularyError, proxy_generate
from .sources import AdapterMergeError

__all__ = ["AdapterMerge", "AdapterMergeError", "Candidate", "LoRAHubResult", "MergedDiff", "MergeOptions",
           "ProxyTuning", "VocabularyError", "lorahub", "merge_adapters", "proxy_generate"]
