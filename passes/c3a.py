"""C3A (PEFT's tuners/c3a), on the additive form: a block circular convolution of the input.

The input is cut into n = in/b chunks x_k of ``block_size`` b, the output into m = out/b blocks; each
(output block, input chunk) pair has a learned kernel w_jk (b,), PEFT's ``c3a_kernel`` (m, n, b):

    y_j[i] = (1/in) Σ_k Σ_t w_jk[t] x_k[(i + t) mod b]        (computed as PEFT: fft(ifft(x_k) · fft(w_jk)))
    ΔW[j-block, k-block][i, t'] = w_jk[(t' - i) mod b] / in     (a circulant block)

on linear sites (nn.Linear and quantized linears; PEFT's C3A takes no other layer), in float32
whatever the base dtype (PEFT's kernels are float32: FFTs take no half types on CPU). Several
active adapters each convolve the site's input (PEFT's forward feeds a second active adapter the
first one's output, which is no sum of adapters and fails unless in = out). The form's gate
``c3a_gate.<adapter>`` (value 1, 0 once merged) is not saved. Init as PEFT: ``init_weights`` True is
zeros (the identity start), "xavier_uniform" (the default) or False, "kaiming_uniform" and
"gaussian" draw the kernel; ``block_size_pattern`` sets b per layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_bias, check_layer_fields
from fxpeft.forms import AdapterGate, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads, suffix_pattern_value

# PEFT's TRANSFORMERS_MODELS_TO_C3A_TARGET_MODULES_MAPPING: LoRA's but for these (Conv1D layers, which C3A refuses)
DEFAULT_C3A_TARGETS = {**DEFAULT_LORA_TARGETS, "gpt2": ["mlp.c_proj"], "gpt_bigcode": ["mlp.c_proj"]}
INIT_WEIGHTS = (True, False, "gaussian", "kaiming_uniform", "xavier_uniform")


@dataclass
class C3AConfig(PeftConfigBase):
    """PEFT's C3AConfig: ``block_size`` (256, dividing each target's input and output size),
    ``block_size_pattern``, ``init_weights`` ("xavier_uniform"; True: zeros), ``bias`` ("none",
    "all", "c3a_only") and the targeting fields (PEFT's C3AConfig has no ``exclude_modules``)."""

    block_size: int = 256
    target_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    block_size_pattern: Optional[dict] = field(default_factory=dict)
    init_weights: Optional[Union[bool, Literal["gaussian", "kaiming_uniform", "xavier_uniform"]]] = "xavier_uniform"

    peft_type = "C3A"

    def __post_init__(self):
        super().__post_init__()
        self.block_size_pattern = self.block_size_pattern or {}
        # PEFT's checks, PEFT's words
        check_layer_fields(self, pattern=False)
        # what PEFT refuses only when it builds a layer, or marks biases trainable
        for key, size in [("block_size", self.block_size),
                          *((f"block_size_pattern[{k!r}]", v) for k, v in self.block_size_pattern.items())]:
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"`block_size` should be a positive integer value but the value passed is {size!r} "
                                 f"({key}).")
        if not any(self.init_weights is v or (isinstance(v, str) and self.init_weights == v) for v in INIT_WEIGHTS):
            raise ValueError(f"Unknown init_weights: {self.init_weights!r} (C3AConfig.init_weights must be one of "
                             f"{list(INIT_WEIGHTS)}).")
        check_bias(self, "c3a_only")


def check_site(module: nn.Module, site: Site, weight, config: C3AConfig) -> None:
    """PEFT's layer type and ``update_layer`` checks, PEFT's words, before any adapter is made."""
    if site.fan_in_fan_out:
        raise ValueError(f"Target module {site.path!r} ({type(module).__name__}) is not supported. Currently, only "
                         "`torch.nn.Linear` is supported (PEFT's C3A). Leave it out of target_modules.")
    out_f, in_f = weight.shape
    b = suffix_pattern_value(config.block_size_pattern, site.path, config.block_size)
    if in_f % b:
        raise ValueError(f"The block size should be a factor of the input size. However, the input size is {in_f} and "
                         f"the block size is {b} (at {site.path!r})")
    if out_f % b:
        raise ValueError(f"The block size should be a factor of the output size. However, the output size is {out_f} "
                         f"and the block size is {b} (at {site.path!r})")


def add_c3a(module: nn.Module, site: Site, weight, config: C3AConfig, adapter: str) -> None:
    """PEFT's ``update_layer`` and ``reset_c3a_parameters``: a float32 kernel, zeros or drawn."""
    out_f, in_f = weight.shape
    b = suffix_pattern_value(config.block_size_pattern, site.path, config.block_size)
    kernel = torch.zeros(out_f // b, in_f // b, b)
    init = config.init_weights
    if init == "gaussian":
        nn.init.normal_(kernel)
    elif init is False or init == "xavier_uniform":
        bound = math.sqrt(3.0) * math.sqrt(2.0 / float(in_f + out_f))
        nn.init.uniform_(kernel, -bound, bound)
    elif init == "kaiming_uniform":
        bound = math.sqrt(1.0 / float(in_f))
        nn.init.uniform_(kernel, -bound, bound)
    child_dict(module, "c3a_kernel", nn.ParameterDict)[adapter] = nn.Parameter(kernel.to(weight.device))
    child_dict(module, "c3a_gate")[adapter] = AdapterGate(1.0).to(weight.device)


def circular_delta(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """PEFT's ``BlockCircularConvolution`` (autograd's own backward) divided by the input size."""
    _, n, b = kernel.shape
    chunks = x.reshape(*x.shape[:-1], n, b)
    y = torch.fft.fft(torch.einsum("...nb,mnb->...mb", torch.fft.ifft(chunks), torch.fft.fft(kernel))).real
    return y.reshape(*y.shape[:-2], -1) / x.shape[-1]


def circulant_weight(kernel: torch.Tensor) -> torch.Tensor:
    """ΔW (out, in) without the 1/in: block (j, k) row i, column t is w_jk[(t - i) mod b]."""
    m, n, b = kernel.shape
    positions = torch.arange(b, device=kernel.device)
    blocks = kernel[:, :, (positions[None, :] - positions[:, None]) % b]  # (m, n, b rows, b columns)
    return blocks.permute(0, 2, 1, 3).reshape(m * b, n * b)


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    return lw.call(circular_delta, x, lw.attr(f"{site.path}.c3a_kernel.{adapter}"))


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: the circulant blocks over the input size."""
    weight = circulant_weight(module.c3a_kernel[adapter].float())
    return weight / weight.shape[1] * module.c3a_gate[adapter].scale


METHOD = register_method(additive(
    name="c3a", config_type=C3AConfig, create=add_c3a, delta=delta, delta_weight=delta_weight,
    containers=("c3a_kernel",), gates="c3a_gate", kinds=("linear",), check_site=check_site,
    dtype_of=lambda module, adapter: module.c3a_kernel[adapter].dtype,
    default_targets=DEFAULT_C3A_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"block_size={module.c3a_kernel[adapter].shape[-1]}"))
