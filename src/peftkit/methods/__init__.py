"""PEFT methods by family. Importing this package registers every method's config."""
from .additive.bottleneck import Bottleneck
from .additive.convpass import Convpass
from .additive.fusion import AdapterFusion
from .additive.ia3 import IA3
from .additive.prefix import PrefixTuning
from .additive.prompt_tuning import PromptTuning
from .additive.ptuning import PTuning
from .additive.llama_adapter import LlamaAdapter
from .additive.lst import LST
from .additive.ssf import SSF
from .additive.vpt import VPT
from .hybrid import MAM, Compose, LayerGroups, UniPELT
from .clip import CLIPAdapter, CLIPClassifier, CoCoOp, CoOp, TipAdapter, build_cache
from .reparameterized.adalora import AdaLoRA, AdaLoRAController
from .reparameterized.compacter import Compacter
from .reparameterized.krona import KronA
from .reparameterized.dora import DoRA
from .reparameterized.vera import VeRA
from .reparameterized.bitdelta import BitDelta, compress, distill_scales
from .reparameterized.dylora import DyLoRA, dylora_sample_rank, dylora_truncate, set_rank
from .reparameterized.lora import LoRA
from .reparameterized.loha import LoHa
from .reparameterized.lokr import LoKr
from .reparameterized.oft import OFT
from .reparameterized.lorafa import LoRAFA
from .reparameterized.lora_moe import LoRAMoE, expert_usage, lora_moe_balance_loss
from .reparameterized.qalora import QALoRA
from .reparameterized.loraplus import LoRAPlus, loraplus_param_groups
from .reparameterized.relora import ReLoRA, relora_restart
from .reparameterized.sora import SoRA, sora_proximal_step, sora_prune
from .selective import (BitFit, ChildTuningD, ChildTuningF, FishDip, FishDipSchedule, FishMask, LastK, LayerNormTuning,
                        Mask, MaskError, MaskNotSelectedError, NoDataError, PaFi, SelectionError, fisher_scores, select)
from .selective import (DiffPruning, LTSFT, StructuredMask, StructureError, diff_pruning_penalty, diff_pruning_project,
                        ltsft_select, select_units)

__all__ = ["AdapterFusion", "Bottleneck", "IA3", "LlamaAdapter", "LST", "SSF", "AdaLoRA", "AdaLoRAController", "Compacter", "KronA", "LoRA",
           "DyLoRA", "dylora_sample_rank", "dylora_truncate", "set_rank", "LoRAFA", "LoRAPlus", "loraplus_param_groups",
           "ReLoRA", "relora_restart", "SoRA", "sora_proximal_step", "sora_prune", "DoRA", "VeRA", "LoHa", "LoKr", "OFT",
           "PromptTuning", "PTuning", "PrefixTuning", "VPT", "Convpass",
           "BitFit", "ChildTuningD", "ChildTuningF", "FishDip", "FishDipSchedule", "FishMask", "LastK", "LayerNormTuning",
           "Mask", "MaskError", "MaskNotSelectedError", "NoDataError", "PaFi", "SelectionError", "fisher_scores", "select",
           "DiffPruning", "LTSFT", "StructuredMask", "StructureError", "diff_pruning_penalty", "diff_pruning_project",
           "ltsft_select", "select_units",
           "CLIPAdapter", "CLIPClassifier", "CoCoOp", "CoOp", "TipAdapter", "build_cache"]
