"""peftkit: parameter-efficient fine-tuning with one frozen base, many named deltas, routed per row."""
from .api import (
    activate,
    active_adapters,
    adapter_parameters,
    adapters,
    attach,
    disabled,
    load,
    merge,
    remove,
    routed,
    set_trainable,
    summary,
    unload,
    unmerge,
)
from .core.config import AdapterConfig, config_from_dict
from .core.io import AdapterFileError, read_adapter, save
from .core.merging import MergeError
from .core.registry import UnknownAdapterError
from .core.sequence import SequenceError, SequenceLengthError
from .core.targets import TargetError
from .methods import AdaLoRA, AdaLoRAController, Compacter, KronA, LoRA
from .methods import DoRA, VeRA
from .methods import LoHa, LoKr, OFT
from .methods import Bottleneck
from .methods import IA3, SSF
from .methods import VPT, Convpass
from .methods import PrefixTuning, PromptTuning, PTuning
from .methods import AdapterFusion, LlamaAdapter, LST
from .efficient.adapter_drop import adapter_drop
from .efficient.sparse_adapter import prune_adapter
from .methods import (BitFit, ChildTuningD, ChildTuningF, FishDip, FishDipSchedule, FishMask, LastK, LayerNormTuning,
                      Mask, MaskError, MaskNotSelectedError, NoDataError, PaFi, SelectionError, fisher_scores, select)
from .methods import (DiffPruning, LTSFT, StructuredMask, StructureError, diff_pruning_penalty, diff_pruning_project,
                      ltsft_select, select_units)
from .methods import BitDelta, QALoRA
from .methods.hybrid import MAM, Compose, LayerGroups, UniPELT, s4_model
from .methods.clip import CLIPAdapter, CLIPClassifier, CoCoOp, CoOp, TipAdapter, build_cache
from .methods.reparameterized import bitdelta
from .compose import AdapterMerge, AdapterMergeError, ProxyTuning, lorahub, merge_adapters, proxy_generate
from .methods.reparameterized.lora_moe import LoRAMoE, expert_usage, lora_moe_balance_loss
from .efficient.quantize import QuantizeConfig, load_quantized, quantization_errors, quantize, save_quantized
from .efficient.int4 import quantize_int4
from .efficient.loftq import LoftQOptions, loftq_initialise
from .methods import (DyLoRA, LoRAFA, LoRAPlus, ReLoRA, SoRA, dylora_sample_rank, dylora_truncate, loraplus_param_groups,
                      relora_restart, set_rank, sora_proximal_step, sora_prune)

__version__ = "0.1.0"

__all__ = [
    "Bottleneck",
    "IA3", "SSF", "VPT", "Convpass",
    "PromptTuning", "PTuning", "PrefixTuning", "SequenceError", "SequenceLengthError",
    "AdapterFusion", "LlamaAdapter", "LST", "adapter_drop", "prune_adapter",
    "BitFit", "ChildTuningD", "ChildTuningF", "FishDip", "FishDipSchedule", "FishMask", "LastK", "LayerNormTuning",
    "Mask", "MaskError", "MaskNotSelectedError", "NoDataError", "PaFi", "SelectionError", "fisher_scores", "select",
    "DiffPruning", "LTSFT", "StructuredMask", "StructureError", "diff_pruning_penalty", "diff_pruning_project",
    "ltsft_select", "select_units",
    "AdaLoRA", "AdaLoRAController", "AdapterConfig", "AdapterFileError", "MergeError", "Compacter", "KronA", "LoRA", "TargetError", "UnknownAdapterError",
    "activate", "active_adapters", "adapter_parameters", "adapters", "attach", "config_from_dict", "disabled",
    "load", "merge", "read_adapter", "remove", "routed", "save", "set_trainable", "summary", "unload", "unmerge",
    "DyLoRA", "LoRAFA", "LoRAPlus", "ReLoRA", "SoRA", "dylora_sample_rank", "dylora_truncate", "loraplus_param_groups", "relora_restart",
    "set_rank", "sora_proximal_step", "sora_prune",
    "DoRA", "VeRA",
    "LoHa", "LoKr", "OFT",
    "BitDelta", "QALoRA", "bitdelta",
    "Compose", "LayerGroups", "MAM", "UniPELT", "s4_model",
    "CLIPAdapter", "CLIPClassifier", "CoCoOp", "CoOp", "TipAdapter", "build_cache",
    "AdapterMerge", "AdapterMergeError", "merge_adapters", "ProxyTuning", "lorahub", "proxy_generate",
    "LoRAMoE", "expert_usage", "lora_moe_balance_loss",
    "LoftQOptions", "QuantizeConfig", "load_quantized", "loftq_initialise", "quantization_errors", "quantize",
    "quantize_int4", "save_quantized",
]
