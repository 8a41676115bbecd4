"""VB-LoRA (vector bank LoRA), PEFT's tuners/vblora, on the additive form:

    Δ(x) = B (A dropout(x))          ΔW = B A

on linear sites (nn.Linear, GPT-2's Conv1D, quantized linears), as PEFT. A (r, in) and B (out, r) are
not stored: they are tiled from a bank of ``num_vectors`` vectors of length ``vector_length`` kept once
on the transformed module (``vblora_vector_bank.<adapter>``, a trainable parameter, PEFT's tuner-level
``base_model.vblora_vector_bank``). Each tile of A (r, in / L tiles) and of B (out / L tiles, r) is the
softmax-weighted sum of the ``topk`` bank vectors its logits rank highest; the per-site logits
``<path>.vblora_logits_A.<adapter>`` (r, in/L, num_vectors) and ``<path>.vblora_logits_B.<adapter>``
(out/L, r, num_vectors) train with the bank. ``<path>.vblora_gate.<adapter>`` is the form's gate (scale
1; not saved) and holds ``topk``.

``save_only_topk_weights`` checkpoints hold, instead of each logits tensor, PEFT's
``<key>_topk_indices`` (the smallest integer type that fits ``num_vectors``) and ``<key>_topk_weights``
(the top-k softmax weights but the last); loading turns them back into logits that are -inf but at the
top k, as PEFT does, which gives the same A and B (such a checkpoint is for inference and merging).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site
from fxpeft.configs import PeftConfigBase, check_bias, check_dropout, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from .vera import out_in

aten = torch.ops.aten

# PEFT's TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING (the models fxpeft is tested on and their kin)
DEFAULT_VBLORA_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "bert": ["query", "value"], "roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"], "gpt_bigcode": ["c_attn"],
    "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
}
LOGITS = ("vblora_logits_A", "vblora_logits_B")
CONTAINERS = (*LOGITS, "vblora_dropout", "vblora_vector_bank")
SHARED = ("vblora_vector_bank",)


@dataclass
class VBLoRAConfig(PeftConfigBase):
    """PEFT's VBLoRAConfig, its fields and defaults: ``r`` (4), ``num_vectors`` (256), ``vector_length``
    (256, must divide every targeted layer's in and out features), ``topk`` (2), ``save_only_topk_weights``,
    ``vblora_dropout``, ``fan_in_fan_out``, ``bias`` ("none", "all", "vblora_only"),
    ``init_vector_bank_bound`` (the bank starts uniform in ±bound), ``init_logits_std`` and the targeting
    fields."""

    r: int = 4
    num_vectors: int = 256
    vector_length: int = 256
    topk: int = 2
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    save_only_topk_weights: bool = False
    vblora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_vector_bank_bound: float = 0.02
    init_logits_std: float = 0.1
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    peft_type = "VBLORA"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's check, PEFT's words
        check_layer_fields(self, regex=())
        # what PEFT refuses only when it builds a layer (r, topk), or fails on later (a top-k larger than the bank
        # when the adapter first runs, an unknown bias when it marks biases trainable)
        for name in ("r", "topk", "num_vectors", "vector_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"`{name}` {value!r} should be a positive integer value (VBLoRAConfig.{name}).")
        if self.topk > self.num_vectors:
            raise ValueError(f"VBLoRAConfig.topk ({self.topk}) picks that many vectors from the bank, which holds "
                             f"num_vectors={self.num_vectors}: topk must not exceed num_vectors (PEFT fails when the "
                             "adapter first runs).")
        check_dropout(self, "vblora_dropout")
        check_bias(self, "vblora_only")


def check_site(module: nn.Module, site: Site, weight, config: VBLoRAConfig) -> None:
    """PEFT's checks in ``update_layer``, PEFT's words, before any adapter is made."""
    out_f, in_f = out_in(site, weight)
    if in_f % config.vector_length != 0:
        raise ValueError(f"`in_features` {in_f} must be divisible by `vector_length` {config.vector_length} "
                         f"(at {site.path!r})")
    if out_f % config.vector_length != 0:
        raise ValueError(f"`out_features` {out_f} must be divisible by `vector_length` {config.vector_length} "
                         f"(at {site.path!r})")


def prepare(gm, targets, config: VBLoRAConfig, adapter: str) -> None:
    """The bank and every site's logits, drawn in PEFT's order so a seed gives PEFT's weights: PEFT draws
    a bank (uniform in ±bound) before each targeted layer's logits (normal, std ``init_logits_std``, A then
    B) and keeps the last bank. ``create`` then adds each site's dropout and gate."""
    bank = None
    for module, site, weight in targets:
        bank = torch.empty(config.num_vectors, config.vector_length).uniform_(
            -config.init_vector_bank_bound, config.init_vector_bank_bound)
        out_f, in_f = out_in(site, weight)
        length = config.vector_length
        logits_a = torch.empty(config.r, in_f // length, config.num_vectors).normal_(0, config.init_logits_std)
        logits_b = torch.empty(out_f // length, config.r, config.num_vectors).normal_(0, config.init_logits_std)
        for name, logits in zip(LOGITS, (logits_a, logits_b)):
            child_dict(module, name, nn.ParameterDict)[adapter] = nn.Parameter(
                logits.to(weight.device, adapter_dtype(weight)))
    first_weight = targets[0][2]
    child_dict(gm, "vblora_vector_bank", nn.ParameterDict)[adapter] = nn.Parameter(
        bank.to(first_weight.device, adapter_dtype(first_weight)))


class VBLoRAGate(AdapterGate):
    """The form's gate (scale 1: VB-LoRA has no scaling) and the adapter's ``topk``."""

    def __init__(self, topk: int, dropout: float):
        super().__init__(1.0, dropout)
        self.topk = int(topk)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, topk={self.topk}"


def add_vblora(module: nn.Module, site: Site, weight, config: VBLoRAConfig, adapter: str) -> None:
    child_dict(module, "vblora_dropout")[adapter] = nn.Dropout(config.vblora_dropout) if config.vblora_dropout > 0 \
        else nn.Identity()
    child_dict(module, "vblora_gate")[adapter] = VBLoRAGate(config.topk, config.vblora_dropout).to(weight.device)


def tiles(logits: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """PEFT's ``_get_low_rank_matrix``: per tile, the softmax over its top-k logits weighting those bank
    vectors: (..., num_vectors) logits -> (..., vector_length)."""
    top, index = logits.topk(topk, dim=-1)
    return (torch.softmax(top, dim=-1).unsqueeze(-1) * bank[index]).sum(-2)


def matrix_a(logits_a: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """A (r, in): the tiles of each rank row side by side."""
    return tiles(logits_a, bank, topk).reshape(logits_a.shape[0], -1)


def matrix_b(logits_b: torch.Tensor, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """B (out, r): (out/L, r, L) tiles laid down the rows."""
    return tiles(logits_b, bank, topk).transpose(1, 2).reshape(-1, logits_b.shape[1])


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    topk = module.vblora_gate[adapter].topk
    bank = lw.attr(f"vblora_vector_bank.{adapter}")
    a = lw.call(matrix_a, lw.attr(f"{site.path}.vblora_logits_A.{adapter}"), bank, topk)
    b = lw.call(matrix_b, lw.attr(f"{site.path}.vblora_logits_B.{adapter}"), bank, topk)
    return lw.call(aten.linear.default, lw.call(aten.linear.default, x, a), b)


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: B A (in float32 for a half-precision adapter on the CPU, as PEFT),
    transposed for Conv1D."""
    a, b = delta_factors(gm, site, module, adapter)
    weight = b @ a
    return weight.T if site.fan_in_fan_out else weight


def delta_factors(gm, site: Site, module: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW as (out, in) = B A, B times the scale."""
    logits_a, logits_b = module.vblora_logits_A[adapter], module.vblora_logits_B[adapter]
    bank = gm._modules["vblora_vector_bank"][adapter]
    if logits_a.device.type == "cpu" and logits_a.dtype in (torch.float16, torch.bfloat16):
        logits_a, logits_b, bank = logits_a.float(), logits_b.float(), bank.float()
    topk = module.vblora_gate[adapter].topk
    return matrix_a(logits_a, bank, topk), matrix_b(logits_b, bank, topk) * module.vblora_gate[adapter].scale


def index_dtype(num_vectors: int) -> torch.dtype:
    """PEFT's choice: the smallest integer type holding a bank index."""
    for bound, dtype in ((2 ** 8, torch.uint8), (2 ** 15, torch.int16), (2 ** 31, torch.int32)):
        if num_vectors < bound:
            return dtype
    return torch.int64


def saved_state(gm, adapter: str, tensors: dict) -> dict:
    """``save_only_topk_weights``: PEFT's ``_get_adapter_state_dict`` writes each logits tensor as its
    top-k indices and the top-k softmax weights but the last (they sum to 1)."""
    config = gm.peft_config[adapter]
    if not config.save_only_topk_weights:
        return tensors
    saved = {}
    for key, value in tensors.items():
        if key.rpartition(".")[2] not in LOGITS:
            saved[key] = value
            continue
        top, index = value.detach().topk(config.topk)
        saved[key + "_topk_indices"] = index.to(index_dtype(config.num_vectors))
        saved[key + "_topk_weights"] = torch.softmax(top, dim=-1)[:, :, :-1].contiguous()
    return saved


def loaded_state(gm, adapter: str, tensors: dict) -> dict:
    """PEFT's ``_remap_adapter_state_dict_for_load``: top-k indices and weights back to logits, -inf but at
    the top k, whose log weights they hold (the last weight is one minus the others)."""
    config = gm.peft_config[adapter]
    if not config.save_only_topk_weights:
        return tensors
    if not config.inference_mode:  # PEFT raises when such an adapter runs in training mode; graphs cannot branch
        warnings.warn(f"VB-LoRA adapter {adapter!r} is loaded trainable from a save_only_topk_weights checkpoint, which "
                      "holds the top-k logits only (the others load as -inf and would never be picked): such "
                      "checkpoints are for inference and merging, not for resuming training (PEFT raises when it "
                      "runs in training mode).")
    num_vectors = gm._modules["vblora_vector_bank"][adapter].shape[0]
    for key in [k for k in tensors if k.endswith("_topk_indices")]:
        stem = key.removesuffix("_topk_indices")
        index = tensors.pop(key).to(torch.long)
        weights = tensors.pop(stem + "_topk_weights")
        weights = torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1)
        logits = torch.full((*weights.shape[:-1], num_vectors), float("-inf"), device=weights.device)
        tensors[stem] = logits.scatter(-1, index, torch.log(weights).to(logits.dtype))
    return tensors


def savable_parameters(gm, adapter: str = "default") -> tuple[int, int]:
    """PEFT's ``get_nb_savable_parameters``: (float32-equivalent VB-LoRA numbers a checkpoint holds, other
    trainable numbers); with ``save_only_topk_weights`` the logits count as their top-k weights and indices."""
    logits = bank = other = 0
    for name, param in gm.named_parameters():
        if "vblora_logits" in name:
            logits += param.numel()
        elif "vblora_vector_bank" in name:
            bank += param.numel()
        elif param.requires_grad:
            other += param.numel()
    config = gm.peft_config[adapter]
    if not config.save_only_topk_weights:
        return bank + logits, other
    factor = {torch.uint8: 0.25, torch.int16: 0.5, torch.int32: 1, torch.int64: 2}[index_dtype(config.num_vectors)]
    per_tile = logits / config.num_vectors
    return int(bank + per_tile * (config.topk - 1) + per_tile * config.topk * factor), other


def print_savable_parameters(gm) -> None:
    vblora, other = savable_parameters(gm)
    print(f"VB-LoRA params to-be-saved (float32-equivalent): {vblora:,d} "
          f"|| total params to-be-saved: {(vblora + other):,d}")


METHOD = register_method(additive(
    name="vblora", config_type=VBLoRAConfig, create=add_vblora, delta=delta, delta_weight=delta_weight,
    delta_factors=delta_factors,
    containers=CONTAINERS, shared=SHARED, gates="vblora_gate", dropouts="vblora_dropout", kinds=("linear",),
    dtype_of=lambda module, adapter: module.vblora_logits_A[adapter].dtype, check_site=check_site, prepare=prepare,
    saved_state=saved_state, loaded_state=loaded_state,
    module_methods=(("get_nb_savable_parameters", savable_parameters),
                    ("print_savable_parameters", print_savable_parameters)),
    default_targets=DEFAULT_VBLORA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"r={module.vblora_logits_A[adapter].shape[0]}, "
                                     f"topk={module.vblora_gate[adapter].topk}"))
