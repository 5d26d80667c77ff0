"""Selective PEFT: train a chosen subset of the base's own parameters, stored sparsely beside it."""
from .bitfit import BitFit
from .child_tuning import ChildTuningD, ChildTuningF
from .diff_pruning import DiffPruning, diff_pruning_penalty, diff_pruning_project
from .fishmask import FishDip, FishDipSchedule, FishMask
from .lastk import LastK
from .layernorm import LayerNormTuning
from .ltsft import LTSFT, ltsft_select
from .pafi import PaFi
from .mask import Mask, MaskError, MaskNotSelectedError
from .selection import NoDataError, SelectionError, fisher_scores, select
from .structured import StructuredMask, StructureError, select_units

__all__ = ["BitFit", "ChildTuningD", "ChildTuningF", "FishDip", "FishDipSchedule", "FishMask", "LastK",
           "LayerNormTuning", "PaFi", "NoDataError", "SelectionError", "fisher_scores", "select", "Mask", "MaskError",
           "MaskNotSelectedError",
           "DiffPruning", "diff_pruning_penalty", "diff_pruning_project", "LTSFT", "ltsft_select", "StructuredMask",
           "StructureError", "select_units"]
