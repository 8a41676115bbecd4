"""LoRA+ (https://huggingface.co/papers/2402.12354): an optimizer whose LoRA B matrices learn
``loraplus_lr_ratio`` times faster than the A matrices, as PEFT's
``peft.optimizers.create_loraplus_optimizer`` builds it.

Not a graph rewrite: the adapters are ordinary parameters of the transformed module, so this only
sorts ``gm.named_parameters()`` into PEFT's four groups, in PEFT's order (empty groups kept):

1. ``groupA`` (lr, ``loraplus_weight_decay``): every other trainable parameter (lora_A, heads in
   modules_to_save, ...);
2. ``embedding`` (``loraplus_lr_embedding``, ``loraplus_weight_decay``): the parameters of a
   LoRA'd embedding (``<path>.lora_embedding_A/B.<adapter>``, and its base weight if trainable);
3. ``groupB`` (lr · ratio, ``loraplus_weight_decay``): lora_B and 1-d parameters that
   transformers' Trainer would decay (not under an ``nn.LayerNorm``, no "bias" in the name);
4. ``groupB_no_decay`` (lr · ratio, weight decay 0): the other lora_B / 1-d parameters.

fxpeft's parameter names are PEFT's without ``base_model.model.``, except that a site's base
weight keeps its own key (``<path>.weight``, PEFT's ``<path>.base_layer.weight``); the
embedding test below accounts for that.
"""
from __future__ import annotations

import numbers

from torch import nn
from torch.optim import Optimizer

_EIGHT_BIT = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def _embedding_site(gm: nn.Module, path: str) -> bool:
    if not path:
        return False
    try:
        module = gm.get_submodule(path)
    except AttributeError:
        return False
    return "lora_embedding_A" in module._modules


def _in_lora_embedding(gm: nn.Module, name: str) -> bool:
    """PEFT's test: the module two levels above the parameter is a LoRA embedding layer, i.e. the
    parameter is an entry of its adapter dicts or its ``base_layer.weight`` (here ``<path>.weight``)."""
    parts = name.split(".")
    return _embedding_site(gm, ".".join(parts[:-2])) or _embedding_site(gm, ".".join(parts[:-1]))


def _decay_parameter_names(gm: nn.Module) -> set[str]:
    # what transformers' Trainer decays, as PEFT computes it
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names
    return {name for name in get_parameter_names(gm, ALL_LAYERNORM_LAYERS) if "bias" not in name}


def create_loraplus_optimizer(gm: nn.Module, optimizer_cls: type[Optimizer], *, lr: float, loraplus_lr_ratio: float,
                              loraplus_lr_embedding: float = 1e-6, loraplus_weight_decay: float = 0.0,
                              **optimizer_kwargs) -> Optimizer:
    """``optimizer_cls`` over ``gm``'s trainable parameters in PEFT's LoRA+ groups (see the module
    docstring). ``optimizer_kwargs`` go to ``optimizer_cls`` as defaults; every group sets its own
    lr and weight_decay, so a ``weight_decay`` given there has no effect (as in PEFT): use
    ``loraplus_weight_decay``.

    Unlike PEFT, a ``loraplus_lr_ratio`` that is not a positive number raises instead of giving
    the B matrices a zero or negative learning rate.
    """
    from fxpeft.lifecycle import _require_transformed
    _require_transformed(gm)
    if not isinstance(loraplus_lr_ratio, numbers.Real) or isinstance(loraplus_lr_ratio, bool):
        raise TypeError(f"loraplus_lr_ratio must be a number (lr_B / lr_A), got {type(loraplus_lr_ratio).__name__}.")
    if not loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be positive (lr_B / lr_A, usually >= 1), got {loraplus_lr_ratio}.")

    decay = _decay_parameter_names(gm)
    groups = {"groupA": [], "embedding": [], "groupB": [], "groupB_no_decay": []}
    for name, param in gm.named_parameters():
        if not param.requires_grad:
            continue
        if _in_lora_embedding(gm, name):
            groups["embedding"].append(param)
        elif "lora_B" in name or param.ndim == 1:
            groups["groupB" if name in decay else "groupB_no_decay"].append(param)
        else:
            groups["groupA"].append(param)

    optimizer = optimizer_cls([
        {"params": groups["groupA"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["groupB"], "weight_decay": loraplus_weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": groups["groupB_no_decay"], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], lr=lr, **optimizer_kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT:  # bitsandbytes: embeddings keep 32-bit optimizer state
        import bitsandbytes
        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in gm.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
