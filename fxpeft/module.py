"""The result of fxpeft: a GraphModule over the original module tree, one graph per call signature.

``PeftGraphModule`` holds:

- the module tree of the original model, re-created module by module (new module objects,
  the same parameter and buffer tensors), so every base state_dict key is unchanged and
  adapter parameters sit beside the module they adapt;
- one :class:`Signature` per call signature (a set of keyword names): its canonical graph
  and its lowered graph. ``self.graph`` is the first signature's lowered graph;
- ``forward``, a small dispatcher with the model's own signature: it binds the call to keyword
  names, picks the signature's compiled graph (capturing it on first use: a causal LM called
  with ``labels``, say), and unflattens the output into the original output type.

Each result has a class of its own (:func:`result_class`): PeftGraphModule, then, for a
transformers model, that model's class, so tools that read the class (Trainer's label and
column detection, ``save_pretrained`` dispatch, accelerate's ``_no_split_modules``) treat the
result as they treat the model. PEFT's methods (``save_pretrained``, ``merge_and_unload`` …)
come first, from :class:`~fxpeft.peft_methods.PeftModelMethods`.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx
from torch import nn
from torch.fx.graph import _format_target
from torch.fx.graph_module import GraphModule, _forward_from_src
from torch.utils import _pytree as pytree

from . import capture as capture_mod
from . import generation, progress
from .blocks import (Outlined, extend, find_block_paths, fingerprint, forget_entry_prints, inline, install_blocks,
                     outline, repeated_lists, truncated)
from .canonical import annotate_shapes, canonicalize, is_sharded
from .peft_methods import PeftModelMethods
from .registry import DEFAULT, Registry, _Prepared
from .rewrite import call_input_name, lower

# without a cache object fxpeft graphs return no KV cache: a caller's use_cache is replaced by use_cache=False
# (a call asking for one with use_cache=True is given a DynamicCache first: generation.cache_for_use_cache)
IGNORED_KWARGS = frozenset({"use_cache"})


@dataclass
class Signature:
    canonical: torch.fx.Graph
    in_spec: Any = None
    out_spec: Any = None
    example: Optional[dict] = None  # the inputs it was exported with, to capture it again after .to()
    graph: Optional[torch.fx.Graph] = None  # lowered
    fn: Optional[Callable] = None  # compiled lowered graph, called as fn(module, *flat_inputs)
    mixed_graph: Optional[torch.fx.Graph] = None  # lowered for per-sample adapters (adapter_names=...)
    mixed_fn: Optional[Callable] = None  # called as mixed_fn(module, adapter_index, *flat_inputs)
    mixed_error: Optional[Exception] = None  # why no mixed graph could be lowered (raised on adapter_names=)
    outlined: Optional[Outlined] = None  # the canonical graph split into a top graph and block graphs

    def fresh(self, memo: Optional[dict] = None) -> "Signature":
        """The same canonical graphs (never mutated, so shared), not yet lowered. ``memo`` (id -> object,
        as a deepcopy's memo): each block's extras (mode switches, dropouts, constants a block holds as
        its own) for the new module, which must not hold the original's (``.train()`` on one would switch
        the other's dropout)."""
        outlined = self.outlined
        if memo is not None and outlined is not None:
            outlined = Outlined(outlined.top, {path: dataclasses.replace(block, extras={
                name: memo.get(id(value), value) for name, value in block.extras.items()})
                for path, block in outlined.blocks.items()})
        return Signature(self.canonical, self.in_spec, self.out_spec, self.example, outlined=outlined)


def own_block_extras(gm) -> dict:
    """For a new module over ``gm``'s signatures (``Signature.fresh``): a copy of each module its
    blocks hold as extras (mode switches, dropouts: they follow their owner's ``.train()``), by id."""
    return {id(value): copy.deepcopy(value) for signature in gm._fxpeft_signatures.values()
            if signature.outlined is not None for block in signature.outlined.blocks.values()
            for value in block.extras.values() if isinstance(value, nn.Module)}


def canonical_signature(captured, source: nn.Module, root: nn.Module, index: int, registry: Registry) -> Signature:
    """Canonicalize a capture into a signature whose graph reads ``root``; the modules and
    constants canonicalize creates are registered on ``root`` (modules in ``root``'s mode)."""
    progress.step("canonicalizing")
    canonical = canonicalize(captured.graph, captured.owner, source, f"_fxpeft_s{index}_", registry)
    register_extras(root, canonical.extras)
    for extra in canonical.extras.values():
        if isinstance(extra, nn.Module):
            extra.train(root.training)
    return Signature(canonical.graph, captured.in_spec, captured.out_spec, captured.example)


def capture_canonical(source: nn.Module, root: nn.Module, index: int, block_paths: Sequence[str],
                      capture: Callable, registry: Registry) -> Signature:
    """``capture(model) -> Captured`` on a copy of ``source``, canonicalized into a signature whose
    graph reads ``root``. Where a list of blocks repeats (``blocks.repeated_lists``), only its first two
    blocks are captured and the rest are called like the second: a 32-layer model exports like a
    2-layer one. Anything the two-block graph cannot vouch for captures the whole model."""
    lists = repeated_lists(source, list(block_paths)) if block_paths else {}
    progress.step("capturing")
    if lists:
        small = truncated(source, lists)
        signature = canonical_signature(capture(small), small, root, index, registry)
        outlined = outline(signature.canonical, root, list(block_paths))
        extended = extend(outlined, lists) if outlined is not None else None
        if extended is not None:
            signature.canonical, signature.outlined = inline(extended), extended
            return signature
    return canonical_signature(capture(clone_tree(source)), source, root, index, registry)


def clone_tree(module: nn.Module, memo: Optional[dict] = None) -> nn.Module:
    """New module objects all the way down that share every parameter and buffer tensor."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    new = copy.copy(module)
    memo[id(module)] = new
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_state_dict_hooks",
                  "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_state_dict_pre_hooks"):
        if hasattr(module, hooks):
            setattr(new, hooks, type(getattr(module, hooks))())
    new._modules = {name: (clone_tree(child, memo) if child is not None else None)
                    for name, child in module._modules.items()}
    return new


def graph_source(graph: torch.fx.Graph, root: nn.Module) -> tuple[str, dict]:
    """(source, globals) of the graph's Python function for ``root`` (and modules alike), calling
    common aten ops through their Python bindings (``FAST_CALLS``) and reading parameters, buffers
    and submodules from the module dicts (``_attribute_path``)."""
    code = graph.python_code(root_module="self")
    # one pass over the source for each kind of rewrite (a flat 32-layer graph holds hundreds of reads)
    calls = {f"torch.ops.{op.namespace}.{op._opname}.{op._overloadname}": name for op, name in FAST_CALLS.items()}
    src = re.sub(r"torch\.ops\.\w+\.\w+\.\w+(?=\()", lambda m: calls.get(m[0], m[0]), code.src)
    reads = {}
    for node in graph.nodes:
        path = _attribute_path(root, node.target) if node.op == "get_attr" else None
        if path is not None:
            reads[f"{node.name} = {_format_target('self', node.target)}"] = f"{node.name} = self{path}"
    src = re.sub(r"(?<= )\w+ = [^;\n]*", lambda m: reads.get(m[0], m[0]), src)  # statements end at ; or a line's end
    return src, code.globals


def _attribute_path(root: nn.Module, target: str) -> Optional[str]:
    """``self.a.b.w`` as dict reads (``._modules['a']._modules['b']._parameters['w']``): each step of
    the generated ``self.a.b.w`` is a Python-level ``nn.Module.__getattr__``, most of a small model's
    eager step after the ops. None where a step is no child, parameter or buffer (a plain attribute)."""
    *prefix, name = target.split(".")
    module, path = root, ""
    for part in prefix:
        module = module._modules.get(part)
        if module is None:
            return None
        path += f"._modules[{part!r}]"
    for store in ("_parameters", "_buffers", "_modules"):
        if getattr(module, store).get(name) is not None:
            return path + f".{store}[{name!r}]"
    return None


aten = torch.ops.aten
# Eager calls spend most of a small model's time in per-op Python: an OpOverload call parses its
# arguments against the schema (boxed), while torch's Python bindings call the same aten overload
# directly, about twice as fast. Each entry takes the overload's arguments as the graph holds them
# (same order, same keyword names) and reaches that overload; dynamo and export trace both alike.
FAST_CALLS = {
    aten.add.Tensor: "torch.add", aten.sub.Tensor: "torch.sub", aten.mul.Tensor: "torch.mul",
    aten.div.Tensor: "torch.div", aten.neg.default: "torch.neg", aten.pow.Tensor_Scalar: "torch.pow",
    aten.rsqrt.default: "torch.rsqrt", aten.sqrt.default: "torch.sqrt", aten.exp.default: "torch.exp",
    aten.cos.default: "torch.cos", aten.sin.default: "torch.sin", aten.tanh.default: "torch.tanh",
    aten.relu.default: "torch.relu", aten.sigmoid.default: "torch.sigmoid", aten.where.self: "torch.where",
    aten.mean.dim: "torch.mean", aten.sum.dim_IntList: "torch.sum", aten.cat.default: "torch.cat",
    aten.matmul.default: "torch.matmul", aten.bmm.default: "torch.bmm", aten.mm.default: "torch.mm",
    aten.addmm.default: "torch.addmm", aten.t.default: "torch.t", aten.transpose.int: "torch.transpose",
    aten.permute.default: "torch.permute", aten.unsqueeze.default: "torch.unsqueeze",
    aten.squeeze.dim: "torch.squeeze", aten.reshape.default: "torch.reshape", aten.select.int: "torch.select",
    aten.flatten.using_ints: "torch.flatten", aten.clone.default: "torch.clone", aten.arange.default: "torch.arange",
    aten.arange.start: "torch.arange", aten.contiguous.default: "torch.Tensor.contiguous",
    aten.view.default: "torch.Tensor.view", aten.to.dtype: "torch.Tensor.to", aten.to.device: "torch.Tensor.to",
    aten.add_.Tensor: "torch.Tensor.add_", aten.index_copy_.default: "torch.Tensor.index_copy_",
    aten.linear.default: "torch._C._nn.linear", aten.silu.default: "torch._C._nn.silu",
    aten.gelu.default: "torch._C._nn.gelu",
    aten.scaled_dot_product_attention.default: "torch._C._nn.scaled_dot_product_attention",
    aten.embedding.default: "torch.embedding", aten.layer_norm.default: "torch.layer_norm",
    aten.conv1d.default: "torch.conv1d", aten.conv2d.default: "torch.conv2d",
}


def register_extras(root: nn.Module, extras: dict) -> None:
    for name, value in extras.items():
        if isinstance(value, nn.Module):
            root.add_module(name, value)
        elif isinstance(value, torch.Tensor):
            root.register_buffer(name, value, persistent=False)
        else:
            setattr(root, name, value)


def _signed_forward(source: type, call_inputs: tuple[str, ...] = ()) -> Callable:
    """The result's forward: the dispatcher behind the source class's forward signature (names,
    defaults, annotations), plus PEFT's ``adapter_names`` and the per-call inputs methods read
    (``call_inputs``: PEFT's ``task_ids``) where the model takes no ``**kwargs``."""

    def forward(self, *args, **kwargs):
        return self._dispatch(*args, **kwargs)

    signature = inspect.signature(source.forward)
    params = list(signature.parameters.values())
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
                   for name in ("adapter_names", *call_inputs) if name not in signature.parameters]
    forward.__signature__ = signature.replace(parameters=params)
    forward.__doc__ = source.forward.__doc__
    return forward


@functools.lru_cache(maxsize=None)
def _model_class(source: type) -> type:
    """``source`` (a transformers model class) without its ``__init__``: a base that lends the
    result its class attributes and methods while the result's state stays its own."""
    return type(source.__name__, (source,), {"__init__": lambda self, *args, **kwargs: nn.Module.__init__(self),
                                             "__module__": source.__module__})


def result_class(tree: nn.Module, registry: Registry = DEFAULT) -> type:
    """The class of one result: PeftGraphModule behind the model's forward signature and, for a
    transformers model, in front of the model's own class."""
    source = type(tree)
    bases = (PeftGraphModule,) + ((_model_class(source),) if capture_mod.is_transformers_model(tree) else ())
    forward = _signed_forward(source, registry.call_inputs())
    return type(f"Fxpeft{source.__name__}", bases, {"forward": forward, "_fxpeft_forward": forward,
                                                    "_fxpeft_result_class": True})


class PeftGraphModule(PeftModelMethods, GraphModule):
    """A GraphModule whose forward accepts every call the original model accepted."""

    def __new__(cls, *args, **kwargs):
        # GraphModule makes a class per instance (recompile sets class attributes); ours also carries
        # the model's signature and class. A copy (deepcopy) shares its original's result class.
        if "_fxpeft_result_class" in vars(cls):
            return object.__new__(cls)
        tree = args[0] if args else kwargs["tree"]
        return object.__new__(result_class(tree, args[6] if len(args) > 6 else kwargs.get("registry", DEFAULT)))

    def __init__(self, tree: nn.Module, signatures: dict, primary_key, source: nn.Module, arg_names: list[str],
                 block_paths: Sequence[str] = (), registry: Registry = DEFAULT):
        primary = signatures[primary_key]
        root = install_blocks(tree, list(block_paths)) if block_paths else tree
        GraphModule.__init__(self, root, copy.deepcopy(primary.canonical), class_name=type(self).__name__)
        # what the model holds besides modules and tensors (config, generation_config, name_or_path …)
        for name, value in tree.__dict__.items():
            self.__dict__.setdefault(name, value)
        # take the whole tree, not only what the first graph references (frozen copies, all adapters)
        self._modules = root._modules
        self._parameters = root._parameters
        self._buffers = root._buffers
        self._non_persistent_buffers_set = root._non_persistent_buffers_set
        self.__dict__["_fxpeft_block_paths"] = list(block_paths)
        self.__dict__["_fxpeft_registry"] = registry  # the methods and rules its adapters use
        if block_paths:  # what accelerate wraps (FSDP) or keeps on one device: the blocks are Block modules now
            self.__dict__["_no_split_modules"] = {"Block"}
        self.__dict__["_fxpeft_signatures"] = signatures
        self.__dict__["_fxpeft_primary"] = primary_key
        # tracing template for signatures seen later: the original model's class over *our* module
        # dicts, so it sees what .to() did to our parameters and buffers
        self.__dict__["_fxpeft_source"] = source
        self.__dict__["_fxpeft_arg_names"] = list(arg_names)
        self.__dict__["_fxpeft_no_cache"] = "use_cache" in arg_names and primary_key is not None
        self.__dict__["peft_config"] = {}
        self.__dict__["_fxpeft_active"] = []
        # capture swaps fake tensors into the modules it traces and flips their modes: one at a time,
        # and on a clone of the tree, so that calls running in other threads never see either
        self.__dict__["_fxpeft_capture_lock"] = threading.Lock()
        self.train(tree.training)
        self.relower()

    # ------------------------------------------------------------------ graphs

    def relower(self) -> None:
        """Re-derive every signature's graph from its canonical graph and the current adapter state."""
        self.sync_gates()
        self.__dict__.pop("_fxpeft_merged", None)  # adapters added or deleted: state.merged_adapters walks again
        self.__dict__["_fxpeft_dropped"] = self._dropped_inputs()
        methods = [(self._fxpeft_registry.method_for(config), name) for name, config in self.peft_config.items()]
        # the active adapter whose virtual tokens a graph with a KV cache reads from the cache (Method.prefill_cache:
        # prompt and prefix methods, one of theirs acting at a time), or None
        self.__dict__["_fxpeft_prefilled"] = next((name for m, name in methods if m.prefill_cache is not None
                                                   and name in self._fxpeft_active), None)
        self.__dict__["_fxpeft_loss_hooks"] = [(m, name) for m, name in methods if m.adjust_loss is not None]
        self.__dict__["_fxpeft_call_losses"] = [(m, name) for m, name in methods if m.call_loss is not None]
        self.__dict__["_fxpeft_fillers"] = [(m, name) for m, name in methods if m.fill_call_inputs is not None]
        self.__dict__["_fxpeft_prepare_hooks"] = list(dict.fromkeys(m.prepare_call for m, _ in methods
                                                                     if m.prepare_call is not None))
        self.__dict__["_fxpeft_memo"] = {}  # what prepare hooks derive from the adapters that exist (gone on relower)
        # code of the last lowering, by its text: a graph whose code did not change keeps its function (and
        # so the code object a compiled caller guards on); only this lowering's code is kept after it
        self.__dict__["_fxpeft_code_before"] = self.__dict__.get("_fxpeft_code", {})
        self.__dict__["_fxpeft_code"] = {}
        try:
            # kept until the next re-lowering (or dtype/device change): a signature captured later reuses these
            # lowerings, so a block structure keeps one function whichever signatures were captured when
            self.__dict__["_fxpeft_lowered_blocks"] = lowered_blocks = {}
            for signature in self._fxpeft_signatures.values():
                self._lower_signature(signature, lowered_blocks)
        finally:
            del self.__dict__["_fxpeft_code_before"]
        self.graph = self._fxpeft_signatures[self._fxpeft_primary].graph
        self._after_lowering()

    def _after_lowering(self) -> None:
        """The methods' ``lowered`` hooks, once each."""
        methods = [self._fxpeft_registry.method_for(config) for config in self.peft_config.values()]
        for hook in dict.fromkeys(m.lowered for m in methods if m.lowered is not None):
            hook(self)

    def _function(self, graph: torch.fx.Graph, root: nn.Module) -> Callable:
        """The graph's function (``graph_source``), or the one the last lowering made from the same code."""
        src, names = graph_source(graph, root)
        key = (src, tuple((name, id(value)) for name, value in names.items()))
        fn = self._fxpeft_code.get(key) or self.__dict__.get("_fxpeft_code_before", {}).get(key)
        if fn is None:
            fn = _forward_from_src(src, names, {})
        self._fxpeft_code[key] = fn
        return fn

    def _lower_signature(self, signature: Signature, lowered_blocks: Optional[dict] = None) -> None:
        """Lower the signature's graphs: with blocks, the top graph here and each block's graph on
        the block (blocks of equal structure and adapter state share one lowering, kept in
        ``lowered_blocks`` across the signatures of one relower, with each block's fingerprint)."""
        top, mixed_error = signature.canonical, None
        cached = generation.reads_cache(signature)
        if self._fxpeft_block_paths:
            if signature.outlined is None:
                signature.outlined = outline(signature.canonical, self, self._fxpeft_block_paths, cached)
            if signature.outlined is not None:
                top = signature.outlined.top
                if lowered_blocks is None:
                    lowered_blocks = self.__dict__.setdefault("_fxpeft_lowered_blocks", {})
                mixed_error = self._lower_blocks(signature.outlined, lowered_blocks)
        call_inputs = self._fxpeft_call_inputs
        signature.graph = lower(top, self, self._fxpeft_registry, mixed=False, cached=cached, call_inputs=call_inputs)
        signature.fn = self._function(signature.graph, self)
        signature.mixed_graph = signature.mixed_fn = None
        signature.mixed_error = mixed_error
        if self.peft_config and mixed_error is None:
            try:
                signature.mixed_graph = lower(top, self, self._fxpeft_registry, mixed=True, cached=cached,
                                              call_inputs=call_inputs)
                signature.mixed_fn = self._function(signature.mixed_graph, self)
            except NotImplementedError as error:  # only calls with adapter_names= need this graph; kept without
                signature.mixed_error = error.with_traceback(None)  # its frames (they hold the capturing call's inputs)

    def _lower_blocks(self, outlined: Outlined, lowered: dict) -> Optional[Exception]:
        """Give each block the lowered code for its graph; the first reason a block has no mixed graph."""
        order = list(self.peft_config)
        mixed_error = None
        shared = {name for method in self._fxpeft_registry.methods for name in method.shared}
        containers = self._fxpeft_registry.containers()
        for count, (path, block_graph) in enumerate(outlined.blocks.items()):
            progress.step(f"lowering block {count + 1}/{len(outlined.blocks)}", count, len(outlined.blocks))
            block = self.get_submodule(path)
            register_extras(block, block_graph.extras)
            for name in shared:  # state kept once on the root (Method.shared): the block reads it as its own
                if name in self._modules:
                    block.__dict__[name] = self._modules[name]  # an alias, not a child: no state_dict entry
                else:
                    block.__dict__.pop(name, None)
            if ("fingerprint", path) not in lowered:  # once per relower
                lowered["fingerprint", path] = fingerprint(block, containers, order)
            key = (block_graph.key, lowered["fingerprint", path])  # what lowering reads of the block, adapters included
            if key not in lowered:
                before = set(block._modules)
                dense = lower(block_graph.graph, block, self._fxpeft_registry, mixed=False, adapter_order=order,
                              cached=block_graph.cached, call_inputs=self._fxpeft_call_inputs)
                mixed, error = None, None
                if order:
                    try:
                        mixed = self._function(lower(block_graph.graph, block, self._fxpeft_registry, mixed=True,
                                                     adapter_order=order, cached=block_graph.cached,
                                                     call_inputs=self._fxpeft_call_inputs), block)
                    except NotImplementedError as caught:  # kept without its frames (they hold the call's inputs)
                        error = caught.with_traceback(None)
                # helper modules rules registered while lowering (stateless): every block sharing the code reads them
                helpers = {name: block._modules[name] for name in set(block._modules) - before}
                lowered[key] = (self._function(dense, block), mixed, dense, error, helpers)
            dense_fn, mixed_fn, dense, error, helpers = lowered[key]
            register_extras(block, {name: m for name, m in helpers.items() if name not in block._modules})
            block.variants[block_graph.key] = (dense_fn, mixed_fn)
            block.graphs[block_graph.key] = dense
            mixed_error = mixed_error or error
        return mixed_error

    def _dropped_inputs(self) -> frozenset:
        """The inputs the active adapters' methods call the model without."""
        dropped = set()
        for name in self._fxpeft_active:
            config = self.peft_config.get(name)
            method = self._fxpeft_registry.method_for(config) if config is not None else None
            if method is not None and method.dropped_inputs is not None:
                dropped |= method.dropped_inputs(config)
        return frozenset(dropped)

    def sync_gates(self) -> None:
        """The graph reads which adapters act from two buffers, updated in place (no recompile):
        ``_fxpeft_gates``, one float per adapter in ``peft_config`` order, and ``_fxpeft_slots``,
        the indices of the active adapters padded with ``len(peft_config)`` (an empty slot). The
        slot count only grows, when more adapters are active at once than ever before."""
        names = list(self.peft_config)
        active = [names.index(name) for name in self._fxpeft_active if name in names]
        current = self._buffers.get("_fxpeft_slots")
        count = max(1, len(active), current.numel() if current is not None else 1)
        self._write_buffer("_fxpeft_gates", torch.tensor([1.0 if n in self._fxpeft_active else 0.0 for n in names]))
        self._write_buffer("_fxpeft_slots", torch.tensor(active + [len(names)] * (count - len(active))))
        # per-call inputs (Method.call_inputs): every graph takes those of the methods whose adapters exist; the
        # active adapters' methods need theirs. Plain data for the dispatcher, kept here (activity changes call this)
        registry = self._fxpeft_registry
        methods = {name: registry.method_for(config) for name, config in self.peft_config.items()}
        # what a call may pass (any registered method's, unless the model takes the name itself)
        self.__dict__["_fxpeft_call_names"] = tuple(n for n in registry.call_inputs() if n not in self._fxpeft_arg_names)
        self.__dict__["_fxpeft_call_inputs"] = tuple(dict.fromkeys(
            n for method in methods.values() for n in method.call_inputs if n not in self._fxpeft_arg_names))
        self.__dict__["_fxpeft_needed_inputs"] = {  # input -> an active adapter that cannot run without it
            n: name for name in self._fxpeft_active if name in methods
            for n in methods[name].call_inputs if n in self._fxpeft_call_inputs}

    def _write_buffer(self, name: str, values: torch.Tensor) -> None:
        current = self._buffers.get(name)
        if current is not None and current.shape == values.shape:
            with torch.no_grad():
                current.copy_(values)
        else:
            device = current.device if current is not None else _device_of(self)
            self.register_buffer(name, values.to(device), persistent=False)
        for path in self._fxpeft_block_paths:  # block graphs read the same tensor as their own buffer
            self.get_submodule(path).register_buffer(name, self._buffers[name], persistent=False)

    def recompile(self):
        python_code = super().recompile()
        cls = type(self)
        cls.forward = cls._fxpeft_forward  # the generated code serves self.code / print only
        cls.__call__ = PeftGraphModule.__call__  # GraphModule.recompile installs its own
        return python_code

    def __call__(self, *args, **kwargs):
        """Under ``torch.compile(gm)`` (dynamo skips this frame, see below and ``_skip_call_frame``),
        captures a call signature seen for the first time before the forward runs, eagerly, so a
        compiled module works from its very first call (eager calls capture in the dispatcher). Runs
        the methods' prepare hooks before calls without autograd (not eager mixed calls without a cache,
        whose picks keep their own memo; a generation step reads what they keep once per generate call)
        and marks the call as prepared while it runs (``call_prepared``: one flag for the process, so a
        call in another thread that skipped the hooks may see it set)."""
        if not torch.compiler.is_compiling():
            frame = runs_compiled()  # this call runs compiled code
            if self.__dict__.get("_fxpeft_fillers"):
                kwargs = self._fill_call_inputs(args, kwargs, frame)
            mixed = kwargs.get("adapter_names") is not None
            compiled = frame or bool(self.__dict__.get("_fxpeft_compiled_blocks"))
            prepare = bool(self._fxpeft_prepare_hooks) and not torch.is_grad_enabled() and (
                compiled or not mixed or generation.cache_name_of(kwargs) is not None)
            if frame:  # eager calls capture in the dispatcher: no second binding of the arguments
                self._before_compiled_call(args, kwargs, mixed, prepare)
            elif prepare:
                self._prepare_call(mixed, kwargs, compiled)
            if prepare:
                previous, _Prepared.now = _Prepared.now, True
                try:
                    return nn.Module.__call__(self, *args, **kwargs)
                finally:
                    _Prepared.now = previous
        return nn.Module.__call__(self, *args, **kwargs)

    @torch.compiler.disable  # runs the module itself: never traced
    def _fill_call_inputs(self, args, kwargs: dict, compiled: bool) -> dict:
        """The call inputs a method computes for a call that did not give them (``Method.fill_call_inputs``:
        X-LoRA's scalings, from a first pass it runs by calling the module with them given), before the call
        (compiled or not) binds its inputs."""
        for method, adapter in self._fxpeft_fillers:
            if adapter in self._fxpeft_active and any(kwargs.get(n) is None for n in method.call_inputs):
                kwargs = {**kwargs, **method.fill_call_inputs(self, adapter, args, kwargs, compiled)}
        return kwargs

    @torch.compiler.disable  # called from the frame dynamo skips: its callees would be traced (one call: each costs)
    def _before_compiled_call(self, args, kwargs, mixed: bool, prepare: bool) -> None:
        # a decode step of a generate call passes what the step before it passed: no second look
        step = generation.generate_step(len(args), tuple((name, _step_value(value)) for name, value in kwargs.items()))
        if self._fxpeft_primary is not None and (step is None or self.__dict__.get("_fxpeft_step") != step):
            call, _, _ = self._bind(args, dict(kwargs))  # capture (torch.export) must run untraced
            self._signature(call)
            self.__dict__["_fxpeft_step"] = step
        generation.mark_attended(kwargs)
        generation.cache_for_use_cache(self, kwargs, compiled=True)  # warns only: none can be made under compile
        if prepare:
            self._prepare_call(mixed, kwargs, True)

    def _prepare_call(self, mixed: bool, kwargs: dict, compiled: bool) -> None:
        cached = generation.cache_name_of(kwargs) is not None
        for hook in self._fxpeft_prepare_hooks:
            hook(self, mixed, cached, compiled)

    def _signature(self, call: dict) -> Signature:
        key = capture_mod.signature_key(call, ranks=generation.cache_name_of(call) is not None)
        signature = self._fxpeft_signatures.get(key)
        if signature is None:
            if torch.compiler.is_compiling():
                raise RuntimeError(
                    f"This module has no graph yet for a call with {list(key)}, and torch.compile cannot capture "
                    "one inside a compiled region: call the compiled module itself (torch.compile(gm)), or call "
                    "the module once with these arguments before compiling.")
            with self._fxpeft_capture_lock:
                signature = self._fxpeft_signatures.get(key) or self._capture_signature(call, key)
        return signature

    def _capture_signature(self, kwargs: dict, key, index: Optional[int] = None, widen: bool = True) -> Signature:
        if any(is_sharded(p) for p in self.parameters()):
            raise RuntimeError(
                f"This module was sharded (FSDP2) before a call with {sorted(kwargs)} was captured, and capture traces "
                "the full weights: call it once with these keywords before fully_shard / fxpeft.shard.")
        index = len(self._fxpeft_signatures) if index is None else index
        cache_name = generation.cache_name_of(kwargs)
        if cache_name is None:
            block_paths, capture = self._fxpeft_block_paths, lambda model: capture_mod.export_call(model, kwargs,
                                                                                                   widen=widen)
        else:  # each layer reads its own cache input: the whole model is exported (no repeated-block shortcut)
            block_paths, capture = (), lambda model: generation.capture_with_cache(model, kwargs, cache_name, widen)
        signature = capture_canonical(self._fxpeft_source, self, index, block_paths, capture, self._fxpeft_registry)
        self._lower_signature(signature)
        new = key not in self._fxpeft_signatures  # not one captured again after .to() (which runs the hooks)
        self._fxpeft_signatures[key] = signature
        if cache_name is not None and new:  # a generation graph: what methods keep for those (Method.lowered)
            self._after_lowering()
        return signature

    def _apply(self, fn, recurse=True):
        """``.to()/.half()/.cuda()``: export baked dtypes and devices into the graphs, so a change
        of either captures every signature again (from the same module tree, now converted)."""
        before = self._placement()
        result = super()._apply(fn, recurse)
        forget_entry_prints()  # adapters' dtypes may have changed
        if self._fxpeft_primary is not None and self._placement() != before:
            device, dtype = self._placement()
            self.__dict__["_fxpeft_lowered_blocks"] = {}  # lowered for the old dtype or device
            for index, (key, signature) in enumerate(list(self._fxpeft_signatures.items())):
                example = {k: pytree.tree_map(lambda t: _convert(t, device, dtype), v)  # also a cache's tensors
                           for k, v in signature.example.items()}
                self._capture_signature(example, key, index=index, widen=False)
            self.graph = self._fxpeft_signatures[self._fxpeft_primary].graph
            self._after_lowering()  # what they derived may hold dtypes and devices too
        if "_fxpeft_gates" in self._buffers:
            self.sync_gates()  # .to() gave each block its own copy of the gates: share one again
        return result

    def _placement(self):
        floating = [t for t in self.state_dict(keep_vars=True).values() if t.is_floating_point()]
        devices = {t.device for t in floating}
        dtypes = {t.dtype for t in floating}
        return (next(iter(devices)) if len(devices) == 1 else tuple(sorted(map(str, devices))),
                next(iter(dtypes)) if len(dtypes) == 1 else tuple(sorted(map(str, dtypes))))

    def _call_inputs(self, kwargs: dict, args: tuple = ()) -> dict:
        """The per-call inputs (``Method.call_inputs``: PEFT's ``task_ids``) taken out of ``kwargs``, as the
        keywords the graphs take them under; checked against what the adapters read and need."""
        given = {name: kwargs.pop(name) for name in self._fxpeft_call_names if name in kwargs}
        for name, value in given.items():
            if value is not None and name not in self._fxpeft_call_inputs:
                readers = sorted({m.name for m in self._fxpeft_registry.methods if name in m.call_inputs})
                raise ValueError(f"{name} was passed, but no adapter of this model reads it (adapters: "
                                 f"{sorted(self.peft_config) or 'none'}; {name} is read by {', '.join(readers)} "
                                 f"adapters): call the model without {name}.")
        rows = next((v.shape[0] for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim), None)
        for name, value in given.items():
            if isinstance(value, torch.Tensor) and rows is not None and value.shape[:1] != (rows,):
                raise ValueError(f"{name} has {value.shape[0] if value.ndim else 'no'} entries for a batch of {rows} "
                                 f"samples: pass one per sample ({name} of shape ({rows},)).")
        for name, adapter in self._fxpeft_needed_inputs.items():
            if given.get(name) is None:
                config = self.peft_config[adapter]
                raise ValueError(f"{name} cannot be None: the active adapter {adapter!r} "
                                 f"({type(config).__name__}) reads it per sample; pass {name}=<tensor of shape "
                                 "(batch,)> to the call (and to generate).")
        return {call_input_name(name): given.get(name) for name in self._fxpeft_call_inputs}

    def _bind(self, args, kwargs: dict) -> tuple[dict, Any, dict]:
        """An exported graph's call as the keyword inputs it takes, ``adapter_names`` and the per-call
        inputs (``_call_inputs``). A KV cache object becomes its tensors (the graph writes into them)."""
        for name, value in zip(self._fxpeft_arg_names, args):
            if name in kwargs:
                raise TypeError(f"forward() got multiple values for argument {name!r}")
            kwargs[name] = value
        adapter_names = kwargs.pop("adapter_names", None)
        call_inputs = self._call_inputs(kwargs)
        kwargs = {k: v for k, v in kwargs.items()
                  if v is not None and k not in IGNORED_KWARGS and k not in self._fxpeft_dropped}
        cache_name = generation.cache_name_of(kwargs)
        if cache_name is not None:
            cache = kwargs.pop(cache_name)
            if generation.is_cache(cache):
                if self._fxpeft_prefilled is not None and not generation.made_for_virtual_tokens(cache):
                    raise ValueError(
                        f"Adapter {self._fxpeft_prefilled!r} ({self.peft_config[self._fxpeft_prefilled].peft_type}) "
                        "puts its virtual tokens into the KV cache first, and the cache object given does not "
                        "hold them (the call would run without the adapter). Use gm.generate(...), which fills the "
                        "cache so and decodes over it, or call without a cache object.")
                # the model's own name for it (transformers 5.24 calls it cache, earlier ones past_key_values)
                name = generation.cache_argument(self) or "past_key_values"
                query = generation.prompt_of((), kwargs, ("decoder_input_ids", "decoder_inputs_embeds", "input_ids",
                                                          "inputs_embeds"))  # what the cache grows by
                kwargs[name] = generation.cache_tensors(self, cache, query)
                kwargs["use_cache"] = True
                if generation.virtual_tokens(cache):  # the model counts positions on from the cache's length
                    kwargs.pop("position_ids", None)
                return kwargs, adapter_names, call_inputs
            kwargs[cache_name] = cache
        if self._fxpeft_no_cache:
            kwargs["use_cache"] = False
        return kwargs, adapter_names, call_inputs

    def _dispatch(self, *args, **kwargs):
        # the call's inputs by name, for a method computing the loss itself (before any is dropped)
        named = dict(zip(self._fxpeft_arg_names, args), **kwargs) if self._fxpeft_call_losses else None
        if self._fxpeft_primary is None:  # symbolic trace: the graph takes the original arguments
            adapter_names = kwargs.pop("adapter_names", None)
            call_inputs = self._call_inputs(kwargs, args)
            batch_input = None if adapter_names is None else (args[0] if args else next(iter(kwargs.values())))
            output = self._run(self._fxpeft_signatures[None], adapter_names, batch_input, *args, **kwargs,
                               **call_inputs)
        else:
            if not torch.compiler.is_compiling():
                generation.cache_for_use_cache(self, kwargs)
            name = generation.cache_name_of(kwargs)
            given = cache = kwargs.get(name)
            if generation.is_dynamic(cache) and not getattr(self.config, "is_encoder_decoder", False):
                query = generation.prompt_of(args, kwargs, ("input_ids", "inputs_embeds"))
                cache = kwargs[name] = generation.static_over(self, cache, cache.get_seq_length() + query.shape[1])
            kwargs, adapter_names, call_inputs = self._bind(args, kwargs)
            signature = self._signature(kwargs)
            batch_input = None if adapter_names is None else next(
                v for v in kwargs.values() if isinstance(v, torch.Tensor))
            flat = self._run(signature, adapter_names, batch_input, *capture_mod.flatten_call(kwargs, signature.in_spec),
                             **call_inputs)
            output = capture_mod.unflatten_output(list(flat), signature.out_spec)
            written = generation.cache_name_of(kwargs)
            if written is not None:
                generation.cache_written(cache)
                if cache is not given:  # the caller's DynamicCache, holding what the graph wrote
                    cache = generation.written_back(cache)
                if isinstance(output, dict):
                    output[written] = cache  # what the graph wrote into
        # the loss first: a call without one (inference, generate) never reads the hooks, so its compiled code
        # does not depend on how many adapters have one (loading an AdaLoRA adapter recompiled a decode step)
        if isinstance(getattr(output, "loss", None), torch.Tensor):
            for method, adapter in self._fxpeft_call_losses:
                if adapter in self._fxpeft_active:
                    output.loss = method.call_loss(self, adapter, output, named)
            for method, adapter in self._fxpeft_loss_hooks:  # e.g. a regulariser
                output.loss = method.adjust_loss(self, adapter, output.loss)
        return output

    def __getattr__(self, name: str):
        """Attributes of the module tree, then the functions the adapters' methods offer as the
        module's own (``Method.module_methods``: AdaLoRA's ``update_and_allocate``)."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            registry, configs = self.__dict__.get("_fxpeft_registry"), self.__dict__.get("peft_config") or {}
            for config in configs.values():
                offered = dict(registry.method_for(config).module_methods)
                if name in offered:
                    return functools.partial(offered[name], self)
            raise

    def _run(self, signature: Signature, adapter_names, batch_input, *args, **kwargs):
        """The signature's dense graph, or its mixed graph with per-sample adapter indices."""
        if adapter_names is None:
            try:
                return signature.fn(self, *args, **kwargs)
            except RuntimeError as error:
                if "DTensor" in str(error) and signature.outlined is None:
                    from .distributed import called_blocks
                    called_blocks(self)  # raises, saying why per-module sharding cannot work on a flat graph
                raise
        index = self._adapter_index(adapter_names, batch_input)
        if signature.mixed_error is not None:
            raise NotImplementedError(str(signature.mixed_error)) from signature.mixed_error
        if signature.mixed_fn is None:  # no adapters: every sample is "__base__"
            return signature.fn(self, *args, **kwargs)
        return signature.mixed_fn(self, index, *args, **kwargs)

    def _adapter_index(self, adapter_names, batch_input: torch.Tensor) -> torch.Tensor:
        """Per-sample adapter indices into ``peft_config`` order (its length means: no adapter)."""
        if isinstance(adapter_names, torch.Tensor):  # from fxpeft.adapter_indices: no Python values to specialise on
            if adapter_names.dtype != torch.long:
                raise ValueError(f"adapter_names as a tensor must be int64 indices from fxpeft.adapter_indices, "
                                 f"got {adapter_names.dtype}.")
            if adapter_names.shape != (batch_input.shape[0],):
                raise ValueError(f"adapter_names has shape {tuple(adapter_names.shape)} but the batch has "
                                 f"{batch_input.shape[0]} samples: build it with fxpeft.adapter_indices(gm, names).")
            if not torch.compiler.is_compiling():  # a value check would break the compiled graph
                self._check_index(adapter_names)
            return adapter_names
        from .state import adapter_indices
        return adapter_indices(self, adapter_names, batch_size=batch_input.shape[0], device=batch_input.device)

    def _check_index(self, index: torch.Tensor) -> None:
        """Indices within 0..len(peft_config). Reading them syncs a GPU, so a tensor passed again
        unchanged (generate passes one at every step) is checked once: the last few checked are held
        with their storage and version counter, which any write bumps."""
        count = len(self.peft_config)
        key = None if index.is_inference() else (id(index), index.data_ptr(), index._version, count)  # no counter
        checked = self.__dict__.setdefault("_fxpeft_checked_indices", {})
        if key is not None and key in checked:
            return
        if index.numel() and not 0 <= int(index.min()) <= int(index.max()) <= count:
            raise ValueError(f"adapter_names holds indices outside 0..{count} (the module has {count} "
                             "adapters): build it again with fxpeft.adapter_indices(gm, names).")
        if key is None:
            return
        if len(checked) >= 8:
            checked.pop(next(iter(checked)))
        checked[key] = index  # held: its id and memory cannot be reused while the key is kept

    # ------------------------------------------------------------------ copying

    def __deepcopy__(self, memo):
        result = type(self).__new__(type(self))
        memo[id(self)] = result
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_graph", "_fxpeft_signatures", "_fxpeft_capture_lock", "_fxpeft_registry",
                              "_fxpeft_lowered_blocks")}
        result.__dict__.update(copy.deepcopy(state, memo))
        result.__dict__["_fxpeft_capture_lock"] = threading.Lock()
        result.__dict__["_fxpeft_registry"] = self._fxpeft_registry  # shared, as the methods are
        # canonical graphs are never mutated: share them; lowered graphs are rebuilt for the copy
        result.__dict__["_fxpeft_signatures"] = {key: sig.fresh(memo) for key, sig in self._fxpeft_signatures.items()}
        result.__dict__["_graph"] = torch.fx.Graph()
        result.relower()
        return result

    def __copy__(self):
        raise TypeError("copy.copy of a PeftGraphModule would share its graphs; use copy.deepcopy.")

    def __reduce__(self):
        raise TypeError(
            "A PeftGraphModule cannot be pickled (torch.save(module)). Save the adapter with "
            "fxpeft.save_pretrained, or the weights with module.state_dict()."
        )


def _step_value(value):
    """What tells one generate step's keyword apart from another's (the cache: the same object)."""
    if isinstance(value, torch.Tensor):
        return value.ndim
    return value if isinstance(value, (bool, int, float, str, type(None))) else id(value)


try:  # set while torch.compile runs a call: dynamo skips __call__'s frame, not the frames it calls
    from torch._C._dynamo.eval_frame import get_eval_frame_callback as _dynamo_callback
except ImportError:  # another torch: prepare every call without autograd (correct, only slower eagerly)
    _dynamo_callback = lambda: True  # noqa: E731


def runs_compiled() -> bool:
    """Whether this call runs compiled, so that the prepare hooks' state will be read (eager calls
    read the adapters themselves)."""
    return _dynamo_callback() is not None


def _skip_call_frame() -> None:
    """torch.compile(gm) starts tracing at ``gm.__call__``: dynamo runs that frame eagerly (where a
    new signature can be captured) and compiles from ``nn.Module.__call__`` on. Not
    ``torch.compiler.disable(recursive=False)``: its wrapper refuses to run while any thread exports.
    Inlined into a compiled caller, ``__call__`` is traced as usual."""
    from torch._dynamo.eval_frame import skip_code

    skip_code(PeftGraphModule.__call__.__code__)


_skip_call_frame()


def build(model: nn.Module, example_inputs=None, configs=(), registry: Registry = DEFAULT) -> PeftGraphModule:
    """Capture and canonicalize ``model``; the result has no adapters yet. Tree passes
    (quantization) first change fxpeft's copy of the tree, which is then captured."""
    if isinstance(model, PeftGraphModule):
        raise TypeError("This module is already the result of fxpeft.transform: add another adapter with "
                        "gm.add_adapter(adapter_name, config) (or fxpeft.add_adapter(gm, config, adapter_name)) "
                        "instead of transforming it again.")
    tree = clone_tree(model)
    for tree_pass in registry.tree_passes:
        tree_pass(tree, configs)
    flat = any(registry.method_for(config).whole_graph for config in configs)
    block_paths = [] if flat else find_block_paths(tree)
    exported = example_inputs is not None or capture_mod.is_transformers_model(tree)
    signature = capture_canonical(tree, tree, 0, block_paths if exported else (),
                                  lambda source: capture_mod.capture(source, example_inputs), registry)
    if signature.example is None:  # a symbolic trace: shapes from one run on fake tensors, where inputs can be guessed
        annotate_shapes(signature.canonical, tree, registry)
    key = None if signature.example is None else capture_mod.signature_key(signature.example)
    return PeftGraphModule(tree, {key: signature}, key, tree, capture_mod.forward_arg_names(model), block_paths,
                           registry)


def _device_of(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


def _convert(value, device, dtype):
    if not isinstance(value, torch.Tensor):
        return value
    value = value.to(device) if isinstance(device, torch.device) else value
    if value.is_floating_point() and isinstance(dtype, torch.dtype):
        value = value.to(dtype)
    return value
