"""The benchmark's one table of methods: per model family, each method's default config, its
learning-rate list and why it does not apply (if so). A method's own training steps (selection,
per-step hooks, extra loss, phases) come from its config, `AdapterConfig.training_steps`, as in
`peftkit train`.

Every method in `peftkit.core.config.METHODS` needs an entry here (a test fails otherwise), and
every entry either configures a family or says why it is skipped for it: the report shows a
"skipped: reason" row, never a silent gap. Families: "bert" (MiniLM and other BERT encoders),
"llama" (SmolLM2 and other Llama decoders), "cnn" (EfficientNet-Lite0), "vit" (DINOv2-small and other vision
transformers: transformers' Dinov2 and ViT, with a `classifier` head).

A row may also be a named variant of a method (`method=`): VPT-shallow beside VPT(-deep), AdaptFormer as the
bottleneck adapter's preset. Two reference rows sit beside the methods: full fine-tuning and the frozen-backbone
linear probe.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.config import METHODS
from ..methods import Bottleneck

FAMILIES = ("bert", "llama", "cnn", "vit")
FULL, PROBE = "full-finetune", "linear-probe"
REFERENCES = (FULL, PROBE)
REFERENCE = "reference"  # the backend column of the reference rows

# Where the weight deltas go, per family: BERT's, Llama's and the ViTs' attention query/value (as LoRA's paper),
# EfficientNet's 1x1 expand/project convolutions (the bulk of its weights; depthwise convs are tiny).
QV = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "cnn": r"_blocks\.\d+\._(expand|project)_conv",
      "vit": ["q_proj", "v_proj"]}
TRANSFORMERS = ("bert", "llama", "vit")
LINEAR_ONLY = "its layers are Linear-only, and EfficientNet-Lite0's only Linear is the classifier head (trained anyway)"


@dataclass(frozen=True)
class BenchMethod:
    """One row kind of the benchmark (a registered method or a reference row)."""

    name: str
    defaults: dict[str, dict[str, Any]]  # family -> config fields (targets, rank, ...)
    lrs: tuple[float, ...]  # the learning-rate sweep, best first (a profile or `--lrs N` tries the first N)
    skips: dict[str, str] = field(default_factory=dict)  # family -> why the method does not apply
    schedule: Callable[[int], dict[str, Any]] | None = None  # config fields that follow the step budget
    method: str | None = None  # a named variant's registered method (None: the row's name is the method)
    quick: bool = False  # part of the `--quick` profile
    peft: bool = False  # Hugging Face PEFT has the same method (`--compare-peft` runs its version too)

    def config_fields(self, family: str, steps: int) -> dict[str, Any]:
        """The method's config for a family and a step budget (without the task head, added by the protocol)."""
        return {"method": self.method or self.name, **self.defaults[family],
                **(self.schedule(steps) if self.schedule else {})}

    def skip_reason(self, family: str) -> str | None:
        if family in self.skips:
            return self.skips[family]
        if family not in self.defaults:
            return f"no bench default for the {family} family (add one in peftkit/bench/methods.py)"
        return None


def _not_trained(name: str) -> BenchMethod:
    """The row of a method `peftkit train` does not train (`not_trained_by_run`): skipped on every family, why."""
    why = METHODS[name].not_trained_by_run
    return BenchMethod(name, {}, (0.0,), skips={family: f"not trained by peftkit train: {why}" for family in FAMILIES})


def _adalora_schedule(steps: int) -> dict[str, Any]:
    """AdaLoRA prunes over the whole budget: 10% warm-up at full rank, 20% final at the target rank."""
    return {"total_step": steps, "tinit": steps // 10, "tfinal": steps // 5, "deltaT": max(1, steps // 20)}


def _lora_like(**fields: Any) -> dict[str, dict[str, Any]]:
    return {family: {"targets": targets, **fields} for family, targets in QV.items()}


def _linear_only(**fields: Any) -> dict[str, dict[str, Any]]:
    return {family: {"targets": QV[family], **fields} for family in TRANSFORMERS}


# Selective methods: every linear layer (conv on the CNN) is a candidate, the task head is trained whole.
ALL_WEIGHTS = {"bert": {"targets": "all-linear", "exclude": ["classifier"]}, "llama": {"targets": "all-linear"},
               "cnn": {"targets": ["type:Conv2d"]}, "vit": {"targets": "all-linear", "exclude": ["classifier"]}}
LINEARS_AND_NORMS = {"targets": ["type:Linear", "type:LayerNorm"], "exclude": ["classifier"]}
NO_TOKENS = "it adds tokens to a token sequence; a CNN has none"
NO_TOKEN_IDS = "it needs token ids and an input embedding table; a ViT reads pixels (its prompts: vpt)"
VIT_ONLY = "it works on a vision transformer's patch tokens"
PREFIX_PART = "its prefix part needs token ids and an input embedding table; a ViT reads pixels"
# A ViT's layers as SSF places its scale-shift (Lian et al.: after every linear, norm and the patch embedding), and
# the layers whose biases BitFit trains.
VIT_LAYERS = {"targets": ["type:Linear", "type:LayerNorm", "type:Conv2d"], "exclude": ["classifier"]}
HYBRID_CNN = "its parts are transformer methods (prefixes, FFN adapters, attention LoRA); a CNN has none of those layers"
NOT_LLAMA_ATTENTION = "LLaMA-Adapter's gated prompts need Llama-style attention (q/k/v/o_proj); BERT's differs"


def _selective(**fields: Any) -> dict[str, dict[str, Any]]:
    return {family: {**targets, **fields} for family, targets in ALL_WEIGHTS.items()}


LORA_LRS = (3e-3, 1e-3, 1e-2)
PROMPT_LRS = (3e-2, 1e-2, 1e-1)  # soft prompts need large steps (Lester et al. use 0.3)
SPARSE_LRS = (1e-2, 3e-3, 1e-3)  # a few selected entries (biases, 0.5% masks) need large steps, like vectors
BLOCK_LRS = (1e-3, 3e-4, 3e-3)  # whole blocks or large shares of base weights: fine-tuning-sized steps
VECTOR_LRS = (1e-2, 3e-3, 3e-2)  # methods that train only scaling vectors need larger steps
VPT_LRS = (1e-2, 3e-3, 3e-2, 1e-1, 1e-3)  # ViT prompts: VPT-deep fell to near chance at 3e-2 in 60 steps

BENCH_METHODS: dict[str, BenchMethod] = {m.name: m for m in [
    BenchMethod("lora", _lora_like(r=8, alpha=16), LORA_LRS, quick=True, peft=True),
    BenchMethod("dora", _lora_like(r=8, alpha=16), LORA_LRS, quick=True, peft=True),
    BenchMethod("lorafa", _lora_like(r=8, alpha=16), LORA_LRS),
    BenchMethod("loraplus", _lora_like(r=8, alpha=16), (1e-3, 3e-4, 3e-3)),  # B at 16x: LoRA's lr / 3
    BenchMethod("relora", _lora_like(r=8, alpha=16), LORA_LRS, schedule=lambda steps: {"restart_every": max(1, steps // 4)}),
    BenchMethod("vera", _linear_only(r=256), VECTOR_LRS, skips={"cnn": f"VeRA: {LINEAR_ONLY}"}, quick=True, peft=True),
    BenchMethod("adalora", _linear_only(init_r=8, target_r=4, alpha=16), (1e-2, 3e-3),
                skips={"cnn": f"AdaLoRA: {LINEAR_ONLY}"}, schedule=_adalora_schedule, peft=True),
    BenchMethod("dylora", _linear_only(r_min=1, r_max=8, alpha=16), LORA_LRS, skips={"cnn": f"DyLoRA: {LINEAR_ONLY}"}),
    BenchMethod("sora", _linear_only(r=8, alpha=16), LORA_LRS, skips={"cnn": f"SoRA: {LINEAR_ONLY}"}),
    BenchMethod("lora_moe", _linear_only(experts=4, top_k=2, r=4, alpha=8), LORA_LRS,
                skips={"cnn": f"LoRA-MoE: {LINEAR_ONLY}"}),  # 4 experts of rank 4: twice LoRA r=8's count
    BenchMethod("loha", _lora_like(r=4, alpha=8), LORA_LRS, peft=True),  # 2r(in + out) parameters: LoRA r=8's count
    BenchMethod("lokr", _lora_like(r=8, alpha=16), LORA_LRS, peft=True),
    BenchMethod("oft", _linear_only(oft_block_size=32), BLOCK_LRS, peft=True,
                skips={"cnn": "OFT: Linear-only here (PEFT's Conv2d OFT rotates overlapping patches: its forward is "
                              "not its merge)"}),
    BenchMethod("krona", _linear_only(a_shape=(16, 16), scale=4.0), LORA_LRS, skips={"cnn": f"KronA: {LINEAR_ONLY}"}),
    BenchMethod("compacter", _linear_only(phm_dim=4, phm_rank=4), LORA_LRS,
                skips={"cnn": f"Compacter: {LINEAR_ONLY}"}),
    BenchMethod("ia3", {"bert": {"targets": ["key", "value", "output.dense"], "feedforward": ["output.dense"]},
                        "llama": {"targets": ["k_proj", "v_proj", "down_proj"], "feedforward": ["down_proj"]},
                        "vit": {"targets": ["k_proj", "v_proj", "fc2"], "feedforward": ["fc2"]}},
                VECTOR_LRS, skips={"cnn": f"(IA)3: {LINEAR_ONLY}"}, quick=True, peft=True),
    BenchMethod("ssf", {"bert": LINEARS_AND_NORMS, "llama": {"targets": "all-linear"},
                        "cnn": {"targets": ["type:Conv2d"]}, "vit": VIT_LAYERS},
                VECTOR_LRS + (1e-3,)),  # 1e-3 last: on the ViT, SSF chose the low end (3e-3) of the first three
    BenchMethod("bottleneck", {family: Bottleneck.preset("parallel").model_dump(mode="json") for family in TRANSFORMERS},
                BLOCK_LRS, skips={"cnn": f"bottleneck adapters: {LINEAR_ONLY}"}, quick=True),
    BenchMethod("adaptformer", {"vit": Bottleneck.preset("adaptformer").model_dump(mode="json")}, LORA_LRS,
                method="bottleneck", skips={family: f"AdaptFormer: {VIT_ONLY} (the bottleneck row is the text models' "
                                                    "parallel adapter)" for family in ("bert", "llama", "cnn")}),
    BenchMethod("vpt", {"vit": {"num_tokens": 10, "depth": "deep"}}, VPT_LRS,
                skips={family: f"VPT: {VIT_ONLY} (text prompts: prompt_tuning)" for family in ("bert", "llama", "cnn")}),
    BenchMethod("vpt-shallow", {"vit": {"num_tokens": 10, "depth": "shallow"}}, VPT_LRS, method="vpt",
                skips={family: f"VPT: {VIT_ONLY} (text prompts: prompt_tuning)" for family in ("bert", "llama", "cnn")}),
    BenchMethod("convpass", {"vit": {}}, LORA_LRS,
                skips={family: f"Convpass: {VIT_ONLY}, laid on their patch grid" for family in ("bert", "llama", "cnn")}),
    BenchMethod("prompt_tuning", {"bert": {"num_virtual_tokens": 20}, "llama": {"num_virtual_tokens": 20}}, PROMPT_LRS,
                skips={"cnn": f"prompt tuning: {NO_TOKENS}", "vit": f"prompt tuning: {NO_TOKEN_IDS}"}),
    BenchMethod("prefix_tuning", {"bert": {"num_virtual_tokens": 20}, "llama": {"num_virtual_tokens": 20}}, PROMPT_LRS,
                skips={"cnn": f"prefix tuning: {NO_TOKENS}", "vit": f"prefix tuning: {NO_TOKEN_IDS}"}),
    BenchMethod("p_tuning", {"bert": {"num_virtual_tokens": 20}, "llama": {"num_virtual_tokens": 20}}, PROMPT_LRS,
                skips={"cnn": f"P-tuning: {NO_TOKENS}", "vit": f"P-tuning: {NO_TOKEN_IDS}"}),
    BenchMethod("llama_adapter", {"llama": {"adapter_len": 10, "adapter_layers": 10}}, PROMPT_LRS,
                skips={"bert": NOT_LLAMA_ATTENTION, "cnn": f"LLaMA-Adapter: {NO_TOKENS}",
                       "vit": "LLaMA-Adapter's gated prompts need Llama-style attention with rotary positions"}),
    BenchMethod("lst", {"bert": {"reduction": 8}, "llama": {"reduction": 8}}, LORA_LRS,
                skips={"cnn": "LST's side network is built from transformer layers (BERT or Llama); a CNN has none",
                       "vit": "LST's side network is built from BERT or Llama layers; a Dinov2 ViT is neither"}),
    BenchMethod("adapter_fusion", {}, LORA_LRS, skips={
        family: "AdapterFusion combines adapters already trained on other tasks; this single-task protocol has none "
                "to fuse" for family in FAMILIES}),
    *(_not_trained(name) for name in ("merged_diff", "bitdelta", "qalora", "coop", "cocoop", "clip_adapter",
                                       "tip_adapter")),
    BenchMethod("bitfit", {"bert": LINEARS_AND_NORMS, "vit": VIT_LAYERS}, SPARSE_LRS,
                skips={"llama": "Llama's linear layers and norms have no biases",
                       "cnn": "EfficientNet's convolutions have no biases (BatchNorm follows them)"}, quick=True),
    BenchMethod("layernorm", {"bert": {}, "vit": {}}, SPARSE_LRS,
                skips={"llama": "Llama's norms are RMSNorm, not LayerNorm",
                       "cnn": "EfficientNet normalises with BatchNorm, not LayerNorm"}),
    BenchMethod("lastk", {"bert": {"k": 1}, "llama": {"k": 2, "targets": "all-linear"},  # RMSNorm, BatchNorm: not hosts
                          "cnn": {"k": 2, "targets": ["type:Conv2d"]},
                          "vit": {"k": 1, "targets": ["type:Linear", "type:LayerNorm"]}}, BLOCK_LRS),  # no layer scale
    BenchMethod("pafi", _selective(fraction=0.005), SPARSE_LRS),
    BenchMethod("fishmask", _selective(fraction=0.005), SPARSE_LRS),
    BenchMethod("fishdip", _selective(fraction=0.005, samples=32), SPARSE_LRS,
                schedule=lambda steps: {"every": max(1, steps // 4)}),
    BenchMethod("child_tuning_d", _selective(fraction=0.3), BLOCK_LRS),
    BenchMethod("child_tuning_f", _selective(p=0.3), BLOCK_LRS),
    BenchMethod("diff_pruning", _selective(fraction=0.005), SPARSE_LRS),
    BenchMethod("ltsft", _selective(fraction=0.005), SPARSE_LRS),
    BenchMethod("structured", {family: {"fraction": 0.1} for family in TRANSFORMERS}, BLOCK_LRS,
                skips={"cnn": "structured units are attention heads and FFN rows; a CNN has neither"}),
    BenchMethod("compose", {family: {"parts": [{"method": "lora", "r": 8, "alpha": 16, "targets": QV[family]},
                                               {"method": "bottleneck", "preset": "parallel", "bottleneck": 64}]}
                            for family in TRANSFORMERS}, LORA_LRS, skips={"cnn": f"compose: {HYBRID_CNN}"}),
    BenchMethod("unipelt", {"bert": {}, "llama": {}}, LORA_LRS,
                skips={"cnn": f"UniPELT: {HYBRID_CNN}", "vit": f"UniPELT: {PREFIX_PART}"}),
    BenchMethod("mam", {"bert": {"bottleneck": 64}, "llama": {"bottleneck": 64}}, BLOCK_LRS,  # s = 4 diverges at 1e-2
                skips={"cnn": f"MAM adapter: {HYBRID_CNN}", "vit": f"MAM adapter: {PREFIX_PART}"}),
    BenchMethod("layer_groups", {family: {"shape": "uniform", "groups": [  # two groups: the bench's tiny models have 2 layers
        [{"method": "lora", "r": 4, "alpha": 8, "targets": QV[family]}],
        [{"method": "lora", "r": 8, "alpha": 16, "targets": QV[family]},
         {"method": "bottleneck", "preset": "parallel", "bottleneck": 64}]]} for family in TRANSFORMERS},
                LORA_LRS, skips={"cnn": f"layer groups: {HYBRID_CNN}"}),
    # 1e-5 comes last: the ViT's full fine-tuning chose the low end (3e-5) of the first three (`--full` runs it on
    # every task)
    BenchMethod(FULL, {family: {} for family in FAMILIES}, (1e-4, 3e-5, 3e-4, 1e-5), quick=True),
    BenchMethod(PROBE, {"bert": {}, "cnn": {}, "vit": {}}, (1e-2, 3e-3, 3e-2, 1e-1),  # 1e-1: the ViT's chose 3e-2
                skips={"llama": "a causal LM has no separate head to probe (SmolLM2 ties it to the input embeddings)"},
                quick=True),
]}


def bench_method(name: str) -> BenchMethod:
    """The bench entry of a method; a registered method without one still gets a (skipped) row."""
    if name in BENCH_METHODS:
        return BENCH_METHODS[name]
    if name in METHODS:
        return BenchMethod(name, {}, (), skips={f: "no bench entry in peftkit/bench/methods.py" for f in FAMILIES})
    raise KeyError(name)


def all_rows() -> list[str]:
    """Every registered method (registry order), each followed by its named variants, then the reference rows."""
    variants: dict[str, list[str]] = {}
    for entry in BENCH_METHODS.values():
        if entry.method is not None:
            variants.setdefault(entry.method, []).append(entry.name)
    return [row for method in METHODS for row in (method, *variants.get(method, ()))] + [*REFERENCES]
