"""CLIP prompt learning and feature adaptation (docs/clip.md): methods on a `CLIPClassifier`'s class head.

They share one host, the head that turns CLIP's image feature into class logits, rather than a method family, so they
live together here: CoOp and CoCoOp (learned prompts), CLIP-Adapter (feature adapters), Tip-Adapter (a cache model).
"""
from .classifier import CLIPClassifier, ClassHead, class_text_features
from .clip_adapter import CLIPAdapter
from .cocoop import CoCoOp
from .coop import CoOp
from .tip_adapter import TipAdapter, build_cache

__all__ = ["CLIPAdapter", "CLIPClassifier", "ClassHead", "CoCoOp", "CoOp", "TipAdapter", "build_cache",
           "class_text_features"]
