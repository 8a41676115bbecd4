"""bitsandbytes quantization of the frozen base (4-bit nf4/fp4, 8-bit LLM.int8()): QLoRA's base.

Quantizing changes what the graph reads, so this is a *tree pass*: it runs on fxpeft's copy of
the module tree before capture (a later capture of another call signature sees the same
layers). Every linear layer not skipped becomes a :class:`Linear4bit` / :class:`Linear8bit`
holding bitsandbytes' packed weight and statistics under bitsandbytes' own state-dict keys
(``<path>.weight``, ``<path>.weight.absmax`` …, or ``<path>.weight`` + ``<path>.SCB``). Its
forward is one custom op, ``fxpeft::linear_4bit`` / ``fxpeft::linear_8bit``, with a fake kernel
and an autograd formula, so:

- the captured graph holds one opaque quantized-linear node per layer (no Python
  ``QuantState`` object anywhere: torch.compile(fullgraph=True) has nothing to break on);
- backward keeps only the packed weight and dequantizes it again for the input gradient;
- a site-table row makes those nodes linear sites, so LoRA (and every adapter method)
  applies on top unchanged.

Each op computes what bitsandbytes' ``Linear4bit`` / ``Linear8bitLt`` compute (the same bnb
kernels, in the same order). The 8-bit op is mode-dependent as ``Linear8bitLt`` is on CPU
(int8 matmul with outlier decomposition in eval mode, dequantized float matmul in train
mode), so canonicalize routes it through a ModeSwitch. Layers transformers already quantized
(``bitsandbytes.nn.Linear4bit`` / ``Linear8bitLt``) are adopted the same way, sharing tensors.

Whenever the tree holds quantized layers, the rest of what PEFT's
``prepare_model_for_kbit_training`` does happens here too: the base is frozen (as always) and
float16/bfloat16 parameters (norms, embeddings, head) become float32 copies in fxpeft's tree.
Gradient checkpointing's input-grad hook is not needed: fxpeft graphs do not checkpoint.
"""
from __future__ import annotations

import copy

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxpeft.canonical import (Conv1D, WeightSpec, _attr_target,
                              is_quantized)
from fxpeft.configs import BnbConfig
from fxpeft.registry import DEFAULT, Method, register_method
from fxpeft.targets import model_embedding

NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for double-quantized statistics (gemm_4bit requires it)
BLOCKSIZE = 64  # Params4bit's default


try:  # transformers' own config is accepted as it is
    from transformers import BitsAndBytesConfig
    CONFIG_TYPES = (BnbConfig, BitsAndBytesConfig)
except ImportError:  # pragma: no cover - transformers is a dependency
    CONFIG_TYPES = (BnbConfig,)


def _bnb():
    # an optional dependency (43 MB that most users never need): the `bnb` extra installs it
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError("Quantization (BnbConfig, or a model quantized by bitsandbytes) needs the bitsandbytes "
                          "package, which fxpeft installs only with its bnb extra: pip install 'fxpeft[bnb]' "
                          "(or pip install 'bitsandbytes>=0.45').") from error
    return bitsandbytes


# ----------------------------------------------------------------------------- custom ops


def _block_scales(absmax, nested_absmax, nested_code, nested_offset):
    """The per-block float scales; double quantization stores them as 8-bit codes."""
    if nested_absmax is None:
        return absmax
    return torch.ops.bitsandbytes.dequantize_blockwise.default(
        absmax, nested_absmax, nested_code, NESTED_BLOCKSIZE, torch.float32) + nested_offset


@torch.library.custom_op("fxpeft::linear_4bit", mutates_args=())
def linear_4bit(x: Tensor, weight: Tensor, absmax: Tensor, bias: Optional[Tensor], shape: list[int],
                blocksize: int, quant_type: str, compute_dtype: torch.dtype,
                nested_absmax: Optional[Tensor] = None, nested_code: Optional[Tensor] = None,
                nested_offset: Optional[Tensor] = None) -> Tensor:
    """``bitsandbytes.nn.Linear4bit.forward``: the input in the compute dtype, bnb's gemm_4bit."""
    compute = x.to(compute_dtype)
    bias = bias.to(compute_dtype) if bias is not None else None
    nested = {} if nested_absmax is None else dict(absmax_8bit=absmax, absmax_code=nested_code,
                                                    absmax_offset=nested_offset)
    scales = absmax if nested_absmax is None else nested_absmax
    out = torch.ops.bitsandbytes.gemm_4bit.default(compute, weight.view(-1, 1), shape, scales, blocksize,
                                                   quant_type, bias=bias, **nested)
    return out.to(x.dtype)


@linear_4bit.register_fake
def _(x, weight, absmax, bias, shape, blocksize, quant_type, compute_dtype, nested_absmax=None,
      nested_code=None, nested_offset=None):
    return x.new_empty((*x.shape[:-1], shape[0]))


def _setup_4bit(ctx, inputs, output):
    x, weight, absmax, bias, shape, blocksize, quant_type, compute_dtype, nested_absmax, nested_code, nested_offset = inputs
    ctx.save_for_backward(weight, absmax, nested_absmax, nested_code, nested_offset)
    ctx.layout = (shape, blocksize, quant_type, compute_dtype, x.dtype)


def _backward_4bit(ctx, grad):
    """bitsandbytes' MatMul4Bit.backward: the input gradient from the dequantized weight, in
    the compute dtype (only the packed weight was kept)."""
    weight, absmax, nested_absmax, nested_code, nested_offset = ctx.saved_tensors
    shape, blocksize, quant_type, compute_dtype, x_dtype = ctx.layout
    grad = grad.to(compute_dtype)
    scales = _block_scales(absmax, nested_absmax, nested_code, nested_offset)
    dense = torch.ops.bitsandbytes.dequantize_4bit.default(weight, scales, blocksize, quant_type, shape, compute_dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
    return (grad @ dense).to(x_dtype), None, None, grad_bias, None, None, None, None, None, None, None


linear_4bit.register_autograd(_backward_4bit, setup_context=_setup_4bit)


def _int8_dense(weight: Tensor, scb: Tensor, dtype: torch.dtype) -> Tensor:
    # bitsandbytes' dequantization of row-wise int8 weights, in its exact form
    return weight.to(dtype).mul_(scb.unsqueeze(1).mul(1.0 / 127.0))


@torch.library.custom_op("fxpeft::linear_8bit", mutates_args=())
def linear_8bit(x: Tensor, weight: Tensor, scb: Tensor, bias: Optional[Tensor], threshold: float, *,
                training: bool = True) -> Tensor:
    """``bitsandbytes.nn.Linear8bitLt.forward`` with frozen int8 weights: on CPU/XPU in train mode
    a float matmul of the dequantized weight (bnb's MatMul8bitFp), otherwise LLM.int8() (int8
    matmul, input columns above ``threshold`` in 16-bit)."""
    bias = bias.to(x.dtype) if bias is not None and bias.dtype != x.dtype else bias
    if training and x.device.type in ("cpu", "xpu"):
        return F.linear(x, _int8_dense(weight, scb, x.dtype), bias)
    rows = x.reshape(-1, x.shape[-1])
    quantized, row_scales, outliers = torch.ops.bitsandbytes.int8_vectorwise_quant.default(
        rows.to(torch.float16), threshold)
    if threshold > 0.0:
        out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm.default(
            rows, quantized, weight, row_scales, scb, outliers, bias)
    else:
        out = torch.ops.bitsandbytes.int8_scaled_mm.default(quantized, weight, row_scales, scb, bias=bias,
                                                             dtype=rows.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


@linear_8bit.register_fake
def _(x, weight, scb, bias, threshold, *, training=True):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _setup_8bit(ctx, inputs, keyword_only_inputs, output):
    x, weight, scb = inputs[:3]
    ctx.save_for_backward(weight, scb)
    ctx.x_dtype = x.dtype


def _backward_8bit(ctx, grad):
    weight, scb = ctx.saved_tensors
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
    grad_x = grad.to(ctx.x_dtype) @ _int8_dense(weight, scb, ctx.x_dtype)
    return grad_x, None, None, grad_bias, None


linear_8bit.register_autograd(_backward_8bit, setup_context=_setup_8bit)


# ----------------------------------------------------------------------------- modules


class _Quantized(nn.Module):
    """What both quantized layers share: the float layer they replace, for merging back."""

    def __init__(self, in_features: int, out_features: int, bias: Optional[Tensor], weight_dtype: torch.dtype,
                 transposed: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_dtype = weight_dtype  # the float weight's dtype (what adapters and merges use)
        self.transposed = transposed  # replaced a GPT-2 Conv1D ((in, out) weight)
        self.bias = nn.Parameter(bias.detach(), requires_grad=False) if bias is not None else None

    @property
    def weight_spec(self) -> WeightSpec:
        return WeightSpec(torch.Size((self.out_features, self.in_features)), self.weight_dtype, self.weight.device)

    def float_module(self, weight: Optional[Tensor] = None) -> nn.Module:
        """The float layer this one replaced, with ``weight`` (out, in) or the dequantized one."""
        weight = self.dequantize() if weight is None else weight
        if self.transposed:
            layer = Conv1D(self.out_features, self.in_features)
            layer.weight = nn.Parameter(weight.T.contiguous(), requires_grad=False)
        else:
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
            layer.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            layer.bias = self.bias
        return layer.train(self.training)


class Linear4bit(_Quantized):
    """A frozen linear layer stored by bitsandbytes in 4 bits (nf4 / fp4, optionally with
    double-quantized statistics). State dict: bitsandbytes' ``Linear4bit`` keys."""

    STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "nested_offset")

    def __init__(self, packed: Tensor, quant_state, bias: Optional[Tensor], compute_dtype: torch.dtype,
                 transposed: bool = False):
        out_features, in_features = quant_state.shape
        super().__init__(in_features, out_features, bias, quant_state.dtype, transposed)
        self.compute_dtype = compute_dtype
        self.blocksize, self.quant_type = quant_state.blocksize, quant_state.quant_type
        self.register_buffer("weight", packed.detach())
        self._set_stats(quant_state)

    def _set_stats(self, quant_state) -> None:
        nested = quant_state.nested
        stats = dict(absmax=quant_state.absmax, quant_map=quant_state.code,
                     nested_absmax=quant_state.state2.absmax if nested else None,
                     nested_quant_map=quant_state.state2.code if nested else None,
                     nested_offset=torch.as_tensor(quant_state.offset, dtype=torch.float32,
                                                   device=self.weight.device) if nested else None)
        if nested and quant_state.state2.blocksize != NESTED_BLOCKSIZE:
            raise NotImplementedError(
                f"Double-quantized 4-bit statistics with blocksize {quant_state.state2.blocksize} are not supported "
                f"(bitsandbytes' gemm_4bit needs {NESTED_BLOCKSIZE}).")
        for name, value in stats.items():  # saved under bnb's keys by _save_to_state_dict
            self.register_buffer(name, value, persistent=False)

    @classmethod
    def from_float(cls, weight: Tensor, bias: Optional[Tensor], config: BnbConfig, transposed: bool = False):
        functional = _bnb().functional
        packed, quant_state = functional.quantize_4bit(
            weight.detach().contiguous(), blocksize=BLOCKSIZE, compress_statistics=config.bnb_4bit_use_double_quant,
            quant_type=config.bnb_4bit_quant_type, quant_storage=torch.uint8)
        return cls(packed, quant_state, bias, getattr(torch, config.bnb_4bit_compute_dtype), transposed)

    def quant_state(self):
        """bitsandbytes' QuantState over this module's current tensors."""
        functional = _bnb().functional
        state2 = None
        if self.nested_absmax is not None:
            state2 = functional.QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                                           blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return functional.QuantState(
            absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)), code=self.quant_map,
            blocksize=self.blocksize, quant_type=self.quant_type, dtype=self.weight_dtype,
            offset=self.nested_offset, state2=state2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.fxpeft.linear_4bit.default(  # the overload: what both capture routes record
            x, self.weight, self.absmax, self.bias, [self.out_features, self.in_features], self.blocksize,
            self.quant_type, self.compute_dtype, self.nested_absmax, self.nested_quant_map, self.nested_offset)

    def dequantize(self) -> Tensor:
        return _bnb().functional.dequantize_4bit(self.weight, self.quant_state())

    def requantize_(self, weight: Tensor) -> None:
        """Store ``weight`` (out, in) quantized in place of the current one (what merging into a
        4-bit layer does, as PEFT: dequantize, add, quantize again)."""
        packed, quant_state = _bnb().functional.quantize_4bit(
            weight.to(self.weight_dtype).contiguous(), blocksize=self.blocksize,
            compress_statistics=self.nested_absmax is not None, quant_type=self.quant_type, quant_storage=torch.uint8)
        with torch.no_grad():
            self.weight.copy_(packed)
        self._set_stats(quant_state)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, value in self.quant_state().as_dict(packed=True).items():
            destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        stats = {key[len(prefix) + len("weight."):]: value for key, value in state_dict.items()
                 if key.startswith(prefix + "weight.")}
        for key in stats:  # torch takes dotted names below a buffer for unknown submodules
            if prefix + "weight." + key in unexpected_keys:
                unexpected_keys.remove(prefix + "weight." + key)
        if stats:
            self._set_stats(_bnb().functional.QuantState.from_dict(stats, self.weight.device))
        elif strict:
            missing_keys.append(prefix + "weight.absmax")

    def _apply(self, fn, recurse=True):
        # bitsandbytes keeps its statistics in float32 whatever the model's dtype (.half() etc.)
        result = super()._apply(fn, recurse)
        for name in self.STATS:
            value = self._buffers.get(name)
            if value is not None and value.is_floating_point() and value.dtype != torch.float32:
                self._buffers[name] = value.float()
        return result

    @property
    def storage(self) -> str:
        return self.quant_type + ("-dq" if self.nested_absmax is not None else "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, quant_type={self.quant_type}, "
                f"double_quant={self.nested_absmax is not None}, compute_dtype={self.compute_dtype}")


class Linear8bit(_Quantized):
    """A frozen linear layer stored as int8 rows with one float scale per row (LLM.int8()).
    State dict: bitsandbytes' ``Linear8bitLt`` keys (``weight``, ``SCB``, ``weight_format``)."""

    def __init__(self, int8_weight: Tensor, row_scales: Tensor, bias: Optional[Tensor], threshold: float,
                 weight_dtype: torch.dtype, transposed: bool = False):
        out_features, in_features = int8_weight.shape
        super().__init__(in_features, out_features, bias, weight_dtype, transposed)
        self.threshold = float(threshold)
        self.register_buffer("weight", int8_weight.detach())
        self.register_buffer("SCB", row_scales.detach())

    @classmethod
    def from_float(cls, weight: Tensor, bias: Optional[Tensor], config: BnbConfig, transposed: bool = False):
        int8_weight, row_scales, _ = _bnb().functional.int8_vectorwise_quant(
            weight.detach().contiguous().to(torch.float16))
        return cls(int8_weight, row_scales, bias, config.llm_int8_threshold, weight.dtype, transposed)

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.fxpeft.linear_8bit.default(x, self.weight, self.SCB, self.bias, self.threshold,
                                            training=self.training)

    def dequantize(self) -> Tensor:
        return _int8_dense(self.weight, self.SCB, torch.float32).to(self.weight_dtype)

    def requantize_(self, weight: Tensor) -> None:
        int8_weight, row_scales, _ = _bnb().functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        with torch.no_grad():
            self.weight.copy_(int8_weight)
            self.SCB.copy_(row_scales)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight_format"] = torch.tensor(0, dtype=torch.uint8)  # row-major, as bnb writes

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict = {k: v for k, v in state_dict.items() if k != prefix + "weight_format"}
        super()._load_from_state_dict(state_dict, prefix, *args)

    storage = "int8"

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"


QUANTIZED_TYPES = (Linear4bit, Linear8bit)


# ----------------------------------------------------------------------------- the tree pass


def _adopt(module: nn.Module) -> Optional[nn.Module]:
    """fxpeft's layer for a bitsandbytes layer transformers created (sharing its tensors)."""
    bnb = _bnb()
    if isinstance(module, bnb.nn.Linear4bit):
        state = getattr(module.weight, "quant_state", None) or module.quant_state
        if state is None:
            raise ValueError(
                f"The bitsandbytes Linear4bit layer {type(module).__name__} holds no quantized weight yet; move the "
                "model to its device (which quantizes it) before fxpeft.transform.")
        weight = module.weight.data
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacked it for its CPU inference kernel (after an eval call under no_grad on an
            # AVX512-BF16 CPU): unpack a copy, as bnb's own state_dict does in place, and leave the caller's
            weight, state = bnb.functional._convert_weight_packed_for_cpu_inverse(weight.clone(), copy.deepcopy(state))
        compute = module.compute_dtype or torch.float32
        return Linear4bit(weight, state, module.bias, compute)
    if isinstance(module, bnb.nn.Linear8bitLt):
        state = module.state
        int8_weight = state.CB if state.CB is not None else module.weight.data
        row_scales = state.SCB if state.SCB is not None else module.weight.SCB
        if int8_weight is None or int8_weight.dtype != torch.int8 or row_scales is None:
            raise ValueError("The bitsandbytes Linear8bitLt layer holds no int8 weights (has_fp16_weights=True?); "
                             "fxpeft adopts frozen int8 layers only.")
        bias_dtype = module.bias.dtype if module.bias is not None else torch.float16
        return Linear8bit(int8_weight, row_scales, module.bias, state.threshold, bias_dtype)
    return None


def _skipped(path: str, skip: list[str]) -> bool:
    # transformers' rule for llm_int8_skip_modules (a name, or a dotted prefix of the path)
    return any(key + "." in path or key == path for key in skip) or any(path.endswith("." + key) for key in skip)


def _default_skip(tree: nn.Module) -> list[str]:
    """What transformers leaves unquantized by default: the output embedding (lm_head)."""
    output = model_embedding(tree, "get_output_embeddings")
    return [name for name, module in tree.named_modules() if output is not None and module is output]


def _replace_children(tree: nn.Module, make) -> int:
    """Swap every child ``make(path, child)`` returns a module for; the number swapped."""
    done: dict[int, nn.Module] = {}
    for path, parent in list(tree.named_modules()):
        for name, child in list(parent._modules.items()):
            if child is None or is_quantized(child):
                continue
            if id(child) not in done:
                new = make(f"{path}.{name}" if path else name, child)
                if new is None:
                    continue
                done[id(child)] = new
            parent._modules[name] = done[id(child)]
    return len(done)


def _upcast_half_parameters(tree: nn.Module) -> None:
    """prepare_model_for_kbit_training: float16/bfloat16 parameters as float32 (new tensors in
    fxpeft's tree; the caller's model keeps its own). Activations are then float32, and so is
    what quantized layers dequantize to (adapters and merges work in it)."""
    upcast: dict[int, nn.Parameter] = {}
    for module in tree.modules():
        if is_quantized(module):
            module.weight_dtype = torch.float32
        for name, param in list(module._parameters.items()):
            if param is not None and param.dtype in (torch.float16, torch.bfloat16):
                if id(param) not in upcast:
                    upcast[id(param)] = nn.Parameter(param.detach().float(), requires_grad=False)
                module._parameters[name] = upcast[id(param)]


def quantize_tree(tree: nn.Module, configs) -> None:
    """Adopt layers transformers quantized; with a BnbConfig, quantize every other linear layer
    that is not skipped; then prepare the tree for k-bit training."""
    bnb_configs = [c if isinstance(c, BnbConfig) else BnbConfig.from_transformers(c)
                   for c in configs if isinstance(c, CONFIG_TYPES)]
    if len(bnb_configs) > 1:
        raise ValueError("Several BnbConfigs given; a model is quantized once: pass one.")
    if bnb_configs:
        _bnb()  # missing: say so before any work
    adopted = 0
    if any(type(m).__module__.startswith("bitsandbytes") for m in tree.modules()):
        adopted = _replace_children(tree, lambda path, child: _adopt(child))
    quantized = 0
    if bnb_configs:
        config = bnb_configs[0]
        if adopted:
            raise ValueError("This model is already quantized by bitsandbytes; drop the BnbConfig from the "
                             "configs given to fxpeft.transform.")
        skip = config.llm_int8_skip_modules if config.llm_int8_skip_modules is not None else _default_skip(tree)
        layer_type = Linear4bit if config.load_in_4bit else Linear8bit

        def make(path, child):
            if _skipped(path, skip) or not isinstance(child, (nn.Linear, Conv1D)):
                return None
            if isinstance(child, Conv1D):
                return layer_type.from_float(child.weight.T, child.bias, config, transposed=True)
            return layer_type.from_float(child.weight, child.bias, config)

        quantized = _replace_children(tree, make)
        if not quantized:
            raise ValueError("BnbConfig: the model has no linear layer left to quantize "
                             f"(llm_int8_skip_modules={skip}).")
    if adopted or quantized:
        _upcast_half_parameters(tree)


def _quantized_site(node, root):
    weight = _attr_target(node.args[1])
    if weight is None:
        return None
    bias = _attr_target(node.args[3]) if len(node.args) > 3 else _attr_target(node.kwargs.get("bias"))
    return dict(kind="linear", input=node.args[0], weight=weight, bias=bias)


DEFAULT.add_site_op(torch.ops.fxpeft.linear_4bit.default, _quantized_site)
DEFAULT.add_site_op(torch.ops.fxpeft.linear_8bit.default, _quantized_site, mode_keyword="training")
DEFAULT.linear_types.extend(QUANTIZED_TYPES)
DEFAULT.tree_passes.append(quantize_tree)
for config_type in CONFIG_TYPES:
    register_method(Method(name=f"quantize_{config_type.__name__}", config_type=config_type))
