"""PEFT methods by family. Importing this package registers every method's config."""
from .additive.bottleneck import Bottleneck
from .additive.ia3 import IA3
from .additive.ssf import SSF
from .reparameterized.adalora import AdaLoRA, AdaLoRAController
from .reparameterized.compacter import Compacter
from .reparameterized.krona import KronA
from .reparameterized.dora import DoRA
from .reparameterized.vera import VeRA
from .reparameterized.dylora import DyLoRA, dylora_sample_rank, dylora_truncate, set_rank
from .reparameterized.lora import LoRA
from .reparameterized.lorafa import LoRAFA
from .reparameterized.loraplus import loraplus_param_groups
from .reparameterized.relora import relora_restart
from .reparameterized.sora import SoRA, sora_proximal_step, sora_prune

__all__ = ["Bottleneck", "IA3", "SSF", "AdaLoRA", "AdaLoRAController", "Compacter", "KronA", "LoRA",
           "DyLoRA", "dylora_sample_rank", "dylora_truncate", "set_rank", "LoRAFA", "loraplus_param_groups",
           "relora_restart", "SoRA", "sora_proximal_step", "sora_prune", "DoRA", "VeRA"]
