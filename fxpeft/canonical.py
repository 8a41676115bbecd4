"""Canonical form: the one graph shape every pass sees, whatever produced it.

After :func:`canonicalize`:

- every linear-like op is an aten op whose weight is a ``get_attr`` of a parameter, and its
  node carries ``meta["fxpeft_module"]``, the path of the module it belongs to. The ops are
  ``aten.linear`` (weight (out, in), or ``aten.t`` of an (in, out) weight for transformers'
  ``Conv1D``), ``aten.addmm`` (export's form of ``Conv1D``), ``aten.conv{1,2,3}d`` and
  ``aten.embedding``; :func:`find_sites` turns them into :class:`Site` records;
- mode-dependent ops (dropout, SDPA with dropout) are ``call_module`` nodes, so the module
  follows ``.train()/.eval()`` although export baked the mode in;
- higher-order regions that torch.compile cannot re-trace (``wrap_with_set_grad_enabled``,
  disabled ``wrap_with_autocast``) are inlined, the no-grad ones with detached outputs;
- export's runtime guard and metadata assertions are gone, and constants the capture
  lifted are returned as ``extras`` to be registered (non-persistently) on the result.

A table maps each source op to its canonical rewrite; add a row to support another form.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch._ops import HigherOrderOperator

aten = torch.ops.aten

try:  # transformers' GPT-2 style linear with an (in, out) weight
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


class ModeSwitch(nn.Module):
    """Calls ``op`` with ``name=train_value`` in train mode and ``name=eval_value`` in eval mode."""

    def __init__(self, op: Callable, name: str, train_value: Any, eval_value: Any):
        super().__init__()
        self.op, self.name, self.train_value, self.eval_value = op, name, train_value, eval_value

    def forward(self, *args, **kwargs):
        kwargs[self.name] = self.train_value if self.training else self.eval_value
        return self.op(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{getattr(self.op, '__name__', self.op)}, {self.name}={self.train_value} in train mode"


class WeightSpec(NamedTuple):
    """A site weight's logical shape, dtype and device (quantized layers store packed data)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


def is_sharded(tensor) -> bool:
    """A DTensor: a parameter FSDP2 sharded (whole only inside its block's forward)."""
    return type(tensor).__name__ == "DTensor"


def is_quantized(module: nn.Module) -> bool:
    """A quantized layer (passes/quantize.py): it stores a packed weight and offers its logical
    ``weight_spec``, ``dequantize()``, ``requantize_(weight)`` and ``float_module(weight)``."""
    return hasattr(type(module), "weight_spec")


def float_weight(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """The weight a site's module computes with: its parameter ``name``, or a quantized layer's dequantized
    weight."""
    return module.dequantize() if is_quantized(module) else getattr(module, name)


def site_weight(root: nn.Module, site: "Site") -> WeightSpec:
    """The weight a site computes with, as the float layer had it: a quantized module reports
    its ``weight_spec``, any other site its weight parameter."""
    spec = getattr(submodule(root, site.path), "weight_spec", None)
    if spec is not None:
        return spec
    weight = _resolve(root, site.weight)
    return WeightSpec(weight.shape, weight.dtype, weight.device)


@dataclass
class Site:
    """A linear-like op in the canonical graph: what every adapter / quantization pass matches."""

    node: torch.fx.Node
    kind: str  # "linear" | "conv" | "embedding"
    path: str  # module path, e.g. model.layers.0.self_attn.q_proj
    input: torch.fx.Node  # the activation (token ids for embeddings)
    weight: str  # FQN of the weight parameter
    bias: Optional[str]
    fan_in_fan_out: bool = False  # weight stored (in, out): GPT-2's Conv1D
    output: Optional[torch.fx.Node] = None  # current output; passes move it as they add nodes

    def __post_init__(self):
        if self.output is None:
            self.output = self.node

    @property
    def weight_node(self) -> Optional[torch.fx.Node]:
        """The op's weight operand: the ``get_attr`` of the weight (or the ``aten.t`` of it, Conv1D)."""
        return next((arg for arg in self.node.all_input_nodes
                     if self.weight in (_attr_target(arg), _transposed_attr(arg))), None)


def adapter_dtype(weight) -> torch.dtype:
    """PEFT's autocast_adapter_dtype: half-precision bases get float32 adapters."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype

# --------------------------------------------------------------------------- helpers


def _attr_target(node) -> Optional[str]:
    return node.target if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def _transposed_attr(node) -> Optional[str]:
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in (aten.t.default,):
        return _attr_target(node.args[0])
    return None


def innermost_module(node: torch.fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else None


# --------------------------------------------------------------------------- site table


def _linear_site(node, root):
    weight = _attr_target(node.args[1])
    transposed = _transposed_attr(node.args[1])
    if weight is None and transposed is None:
        return None
    bias = _attr_target(node.args[2]) if len(node.args) > 2 else None
    return dict(kind="linear", input=node.args[0], weight=weight or transposed, bias=bias,
                fan_in_fan_out=transposed is not None)


def _addmm_site(node, root):
    weight, bias = _attr_target(node.args[2]), _attr_target(node.args[0])
    if weight is None:
        return None
    return dict(kind="linear", input=node.args[1], weight=weight, bias=bias, fan_in_fan_out=True)


def _conv_site(node, root):
    weight = _attr_target(node.args[1])
    if weight is None:
        return None
    bias = _attr_target(node.args[2]) if len(node.args) > 2 else None
    return dict(kind="conv", input=node.args[0], weight=weight, bias=bias)


def _embedding_site(node, root):
    weight = _attr_target(node.args[0])
    if weight is None:
        return None
    return dict(kind="embedding", input=node.args[1], weight=weight, bias=None)


BASE_SITE_OPS: dict[Any, Callable] = {  # op -> describe(node, root); registries add more
    aten.linear.default: _linear_site,
    aten.addmm.default: _addmm_site,
    torch.addmm: _addmm_site,  # transformers' Conv1D under symbolic_trace
    aten.conv1d.default: _conv_site,
    aten.conv2d.default: _conv_site,
    aten.conv3d.default: _conv_site,
    aten.conv1d.padding: _conv_site,
    aten.conv2d.padding: _conv_site,
    aten.conv3d.padding: _conv_site,
    aten.embedding.default: _embedding_site,
}


def site_path(node: torch.fx.Node, weight_fqn: str, root: nn.Module) -> str:
    """The module a site belongs to: the innermost module that owns this very weight tensor."""
    module_path = node.meta.get("fxpeft_module")
    if module_path is not None:
        module = submodule(root, module_path)
        if module is not None and getattr(module, "weight", None) is _resolve(root, weight_fqn):
            return module_path
    return weight_fqn[: -len(".weight")] if weight_fqn.endswith(".weight") else weight_fqn


# Module types that count as linear layers ("all-linear" targets); registries add more.
BASE_LINEAR_TYPES: tuple[type, ...] = (nn.Linear,) + ((Conv1D,) if isinstance(Conv1D, type) else ())


def _site_op(node: torch.fx.Node, root: nn.Module):
    """The op a site rule is keyed on: a call_function's target, or the op a ModeSwitch calls."""
    if node.op == "call_function":
        return node.target
    if node.op == "call_module":
        switch = submodule(root, node.target)
        return switch.op if isinstance(switch, ModeSwitch) else None
    return None


def find_sites(graph: torch.fx.Graph, root: nn.Module, registry=None) -> list[Site]:
    """The sites of ``graph``: nodes whose op ``registry.site_ops`` describes (default: fxpeft's
    registry, which knows the quantized ops of passes/quantize.py)."""
    if registry is None:
        from .registry import DEFAULT as registry
    sites = []
    for node in graph.nodes:
        rule = registry.site_ops.get(_site_op(node, root))
        found = rule(node, root) if rule else None
        if found is not None:
            sites.append(Site(node=node, path=site_path(node, found["weight"], root), **found))
    return sites


# --------------------------------------------------------------------------- canonicalize


@dataclass
class Canonical:
    graph: torch.fx.Graph
    extras: dict[str, Any] = field(default_factory=dict)  # name -> tensor | module to register


def _module_to_aten(node: torch.fx.Node, module: nn.Module, graph: torch.fx.Graph) -> Optional[torch.fx.Node]:
    """call_module of a linear-like leaf (symbolic traces) -> aten op on get_attr weights."""
    path = node.target
    x = node.args[0] if node.args else node.kwargs.get("input")
    has_bias = getattr(module, "bias", None) is not None
    if isinstance(module, (nn.Linear, Conv1D)):
        op, extra = aten.linear.default, ()
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode == "zeros":
        op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[module.weight.dim() - 2]
        string_padding = isinstance(module.padding, str)
        op = op.padding if string_padding else op.default
        padding = module.padding if string_padding else list(module.padding)
        extra = (list(module.stride), padding, list(module.dilation), module.groups)
    elif isinstance(module, nn.Embedding) and module.max_norm is None:
        padding_idx = -1 if module.padding_idx is None else module.padding_idx
        with graph.inserting_before(node):
            weight = graph.get_attr(f"{path}.weight")
            return graph.call_function(aten.embedding.default, (weight, x, padding_idx, module.scale_grad_by_freq, module.sparse))
    else:
        return None
    with graph.inserting_before(node):
        weight = graph.get_attr(f"{path}.weight")
        if isinstance(module, Conv1D):
            weight = graph.call_function(aten.t.default, (weight,))
        bias = graph.get_attr(f"{path}.bias") if has_bias else None
        return graph.call_function(op, (x, weight, bias, *extra))


def _functional_to_aten(node: torch.fx.Node, graph: torch.fx.Graph) -> Optional[torch.fx.Node]:
    """F.linear / F.embedding call_functions (symbolic traces) -> the aten site ops."""
    args = list(node.args) + [None] * 3
    with graph.inserting_before(node):
        if node.target is F.linear:
            return graph.call_function(aten.linear.default, (args[0], args[1], node.kwargs.get("bias", args[2])))
        if node.target is F.embedding and not node.kwargs.get("max_norm"):
            padding_idx = node.kwargs.get("padding_idx", args[2])
            return graph.call_function(aten.embedding.default, (args[1], args[0], -1 if padding_idx is None else padding_idx))
    return None


def _dropout_probability(node) -> Optional[float]:
    """p of a dropout op that was recorded as active, else None."""
    if node.target is aten.dropout.default:
        return node.args[1] if node.args[2] and node.args[1] else None
    if node.target is F.dropout:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
        return p if training and p else None
    return None


def _sdpa_dropout(node) -> Optional[float]:
    if node.target in (aten.scaled_dot_product_attention.default, F.scaled_dot_product_attention):
        p = node.kwargs.get("dropout_p", node.args[4] if len(node.args) > 4 else 0.0)
        return p if p else None
    return None


def _mode_module(node: torch.fx.Node, mode_keywords: dict):
    """(module, args, kwargs) of the call_module that replaces a mode-dependent op, or None:
    active dropout, SDPA with dropout, and the ops a registry lists in ``mode_keywords``."""
    if node.target in mode_keywords:
        keyword = mode_keywords[node.target]
        kwargs = {k: v for k, v in node.kwargs.items() if k != keyword}
        return ModeSwitch(node.target, keyword, True, False), node.args, kwargs
    p = _dropout_probability(node)
    if p is not None:
        return nn.Dropout(p), (node.args[0] if node.args else node.kwargs["input"],), {}
    sdpa_p = _sdpa_dropout(node)
    if sdpa_p is not None:
        kwargs = {k: v for k, v in node.kwargs.items() if k != "dropout_p"}
        if len(node.args) > 5:
            kwargs["is_causal"] = node.args[5]
        return ModeSwitch(F.scaled_dot_product_attention, "dropout_p", sdpa_p, 0.0), node.args[:4], kwargs
    return None


def _inline_region(node: torch.fx.Node, graph: torch.fx.Graph, owner: nn.Module, extras: dict, namespace: str) -> bool:
    """Copy a higher-order region's body into the parent graph."""
    name = node.target.name()
    if name == "wrap_with_set_grad_enabled":
        enabled, body_node, operands = node.args[0], node.args[1], node.args[2:]
    elif name == "wrap_with_autocast" and node.args[2] is False:
        enabled, body_node, operands = True, node.args[4], node.args[5:]
    else:
        return False
    body = owner.get_submodule(body_node.target)
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    value_map = dict(zip(placeholders, operands))
    with graph.inserting_before(node):
        for inner in body.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                outputs = torch.fx.map_arg(inner.args[0], lambda n: value_map[n])
                break
            if inner.op == "get_attr":
                local = f"{namespace}{body_node.target}_{inner.target}".replace(".", "_")
                extras[local] = _resolve(body, inner.target)
                value_map[inner] = graph.get_attr(local)
                continue
            value_map[inner] = graph.node_copy(inner, lambda n: value_map[n])
        if not enabled:
            outputs = torch.fx.map_arg(outputs, lambda n: graph.call_function(aten.detach.default, (n,)))
    for user in list(node.users):
        if user.op == "call_function" and user.target.__name__ == "getitem":
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(node)
    if not body_node.users:  # the body's get_attr, unless another region shares it
        graph.erase_node(body_node)
    return True


_DROPPED_OPS = {aten._assert_tensor_metadata.default}


# Ops that draw random numbers (aten overloads from export, torch functions from symbolic_trace).
_RANDOM_OPS = {getattr(getattr(aten, op), overload)
               for op in ("rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli", "normal",
                          "uniform", "multinomial", "randperm", "poisson")
               for overload in getattr(aten, op).overloads()} | {
    torch.rand, torch.randn, torch.randint, torch.rand_like, torch.randn_like, torch.randint_like, torch.bernoulli,
    torch.normal, torch.multinomial, torch.randperm, torch.poisson}


def _warn_random_draws(graph: torch.fx.Graph) -> None:
    """The capture runs in train mode and only dropout learns to follow ``.train()/.eval()``; any
    other random draw left in the graph was probably a training-only branch of the model (diffusers'
    class-label dropout in DiT, for one) and now runs in eval mode too. Say where."""
    where = sorted({innermost_module(n) or "the top-level forward" for n in graph.nodes
                    if n.op == "call_function" and n.target in _RANDOM_OPS})
    if where:
        warnings.warn(
            f"The captured graph draws random numbers outside dropout, in {', '.join(where)}. fxpeft captures in "
            "train mode and only dropout follows .train()/.eval(); if these modules draw only in training (e.g. "
            "diffusers' class-label dropout, class_dropout_prob), the draw also runs in eval mode. Turn it off before "
            "fxpeft.transform (e.g. set that module's dropout probability to 0).", stacklevel=3)


_TO_ARGS = {aten.to.dtype: ("dtype", "non_blocking", "copy", "memory_format"),
            aten.to.device: ("device", "dtype", "non_blocking", "copy", "memory_format")}


def _is_identity(node: torch.fx.Node) -> bool:
    """``to`` a tensor's own dtype and device without a copy (returns its input itself), and a slice
    of a whole dimension (a view of all of it)."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.target is aten.slice.Tensor:
        _dim, start, end, step = (list(node.args[1:]) + [0, None, None, 1][len(node.args) - 1:])[:4]
        return (not node.kwargs and start in (None, 0) and step == 1
                and (end is None or (isinstance(end, int) and end >= sys.maxsize)))
    names = _TO_ARGS.get(node.target)
    value = node.args[0].meta.get("val")
    if names is None or not isinstance(value, torch.Tensor):
        return False
    given = dict(zip(names, node.args[1:]), **node.kwargs)
    return (given.get("dtype", value.dtype) == value.dtype and given.get("device", value.device) == value.device
            and not given.get("copy", False) and given.get("memory_format") in (None, torch.preserve_format))


def canonicalize(graph: torch.fx.Graph, owner: nn.Module, source: nn.Module, namespace: str, registry) -> Canonical:
    """Rewrite ``graph`` (in place) into the canonical form. ``namespace`` keeps names of
    modules/constants it creates unique across the graphs of one result."""
    extras: dict[str, Any] = {}
    for node in list(graph.nodes):
        if node.op == "call_function" and isinstance(node.target, HigherOrderOperator):
            _inline_region(node, graph, owner, extras, namespace)
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _DROPPED_OPS:
            graph.erase_node(node)

    for node in list(graph.nodes):
        replacement = None
        if node.op == "call_module":
            module = source.get_submodule(node.target)
            replacement = _module_to_aten(node, module, graph)
            if replacement is not None:
                replacement.meta = dict(node.meta, fxpeft_module=node.target)
        elif node.op == "call_function" and node.target in (F.linear, F.embedding):
            replacement = _functional_to_aten(node, graph)
            if replacement is not None:
                replacement.meta = dict(node.meta)
        if replacement is not None:
            node.replace_all_uses_with(replacement)
            graph.erase_node(node)

    counter = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in registry.site_ops and "fxpeft_module" not in node.meta:
            node.meta["fxpeft_module"] = innermost_module(node)
        replaced = _mode_module(node, registry.mode_keywords)
        if replaced is None:
            if node.target in (aten.dropout.default, F.dropout):  # inactive dropout: identity
                node.replace_all_uses_with(node.args[0] if node.args else node.kwargs["input"])
                graph.erase_node(node)
            continue
        name = f"{namespace}mode_{counter}"
        counter += 1
        extras[name], args, kwargs = replaced
        with graph.inserting_before(node):
            replacement = graph.call_module(name, args, kwargs)
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)

    for node in list(graph.nodes):  # identities export leaves in: each costs an eager call per step
        if _is_identity(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)

    _warn_random_draws(graph)
    # constants the capture lifted (not parameters or buffers of the source): register them ourselves
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in extras and not _carried(source, node.target):
            local = f"{namespace}{node.target}".replace(".", "_")
            extras[local] = _resolve(owner, node.target)
            node.target = local
    for node in reversed(list(graph.nodes)):  # attributes only the removed ops read
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    graph.lint()
    return Canonical(graph=graph, extras=extras)


def submodule(root: nn.Module, path: str) -> Optional[nn.Module]:
    """The module at ``path`` under ``root``, or None."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _carried(root: nn.Module, fqn: str) -> bool:
    """Whether ``fqn`` is a module, parameter or buffer of ``root``: what the result's module tree
    carries. A plain tensor attribute is not, and symbolic_trace's tracer stores every tensor it
    meets in forward (a ``torch.arange`` there) as such an attribute on the traced module."""
    if submodule(root, fqn) is not None:
        return True
    module_path, _, name = fqn.rpartition(".")
    owner = submodule(root, module_path)
    return owner is not None and (name in owner._parameters or name in owner._buffers)


def _resolve(root: nn.Module, fqn: str):
    """The module, parameter, buffer or attribute at ``fqn`` under ``root``, or None."""
    found = submodule(root, fqn)
    if found is not None:
        return found
    module_path, _, name = fqn.rpartition(".")
    owner = submodule(root, module_path)
    return getattr(owner, name, None) if owner is not None else None


def annotate_shapes(graph: torch.fx.Graph, root: nn.Module, registry) -> bool:
    """Give a symbolic trace's nodes the ``meta["val"]`` (meta tensors) that export records: passes
    reading shapes (prefix tuning reads heads and head size) then need no example inputs. The graph
    runs once on fake tensors with small inputs guessed from what consumes each input: token ids
    for an embedding, features for a linear layer. False (nothing annotated) where no guess fits."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    consumers = {site.input: site for site in find_sites(graph, root, registry)}
    inputs = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        site = consumers.get(node)
        if site is None or site.kind not in ("embedding", "linear"):
            return False
        spec = site_weight(root, site)
        if site.kind == "embedding":
            inputs.append(torch.zeros(2, 4, dtype=torch.long, device=spec.device))
        else:
            features = spec.shape[0] if site.fan_in_fan_out else spec.shape[1]
            inputs.append(torch.zeros(2, 4, features, dtype=spec.dtype, device=spec.device))
    copy = torch.fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    module = torch.fx.GraphModule(root, copy)
    values: list = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            values.append(result)
            return result

    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            Recorder(module).run(*(mode.from_tensor(t) for t in inputs))
    except Exception:  # a guess the model rejects: leave the graph as it was
        return False
    for node, value in zip(graph.nodes, values):
        if isinstance(value, torch.Tensor):
            node.meta["val"] = torch.empty(value.shape, dtype=value.dtype, device="meta")
    return True
