"""Capture: turn a model (or one call signature of it) into a torch.fx graph.

- plain ``nn.Module`` without example inputs: ``torch.fx.symbolic_trace``;
- transformers models and anything given example inputs: ``torch.export`` (non-strict),
  every tensor dimension dynamic (``Dim.AUTO``), duck sizing off so that equal example
  sizes do not force equal dimensions, the module in train mode so dropout is recorded
  (canonicalize makes it follow ``.train()/.eval()`` again), and the KV cache off.

transformers models need no example inputs: they are synthesised from the config.
A later call with other keyword names (``labels``, ``token_type_ids`` …) is captured again
by :func:`capture_call`; every captured graph addresses the same parameters by name.
"""
from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx
from torch import nn
from torch.utils import _pytree as pytree


class CaptureError(RuntimeError):
    """The model could not be turned into a graph."""


@dataclass
class Captured:
    """One captured call signature.

    ``graph`` reads parameters by their FQN in the source model; ``owner`` is the module the
    capture produced (it resolves anything else the graph names: lifted constants,
    higher-order-op bodies). ``in_spec``/``out_spec`` are None for symbolic traces, whose graph
    takes the original arguments directly.
    """

    graph: torch.fx.Graph
    owner: nn.Module
    in_spec: Any = None
    out_spec: Any = None
    example: Optional[dict] = None  # the keyword inputs an export was made with


def is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def forward_arg_names(model: nn.Module) -> list[str]:
    params = inspect.signature(model.forward).parameters.values()
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def synthesize_inputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Example inputs for a transformers model, from its config and forward signature. Drawn from
    a private generator: the caller's random stream (which then initialises the adapters, as after
    PEFT's get_peft_model) must not move."""
    config = model.config
    generator = torch.Generator().manual_seed(0)  # on the CPU, whatever the model's device (tiny tensors)
    names = set(forward_arg_names(model))
    device = next(model.parameters()).device
    batch, seq = 2, 8
    inputs: dict[str, torch.Tensor] = {}
    if "input_ids" in names:
        vocab = getattr(config, "vocab_size", None) or 2
        inputs["input_ids"] = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
        if "attention_mask" in names:
            inputs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long, device=device)
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in names:
            inputs["decoder_input_ids"] = torch.randint(0, vocab, (batch, seq - 2), generator=generator).to(device)
    elif "pixel_values" in names:
        size = getattr(config, "image_size", 224)
        size = (size, size) if isinstance(size, int) else tuple(size)
        channels = getattr(config, "num_channels", 3)
        dtype = next(model.parameters()).dtype
        inputs["pixel_values"] = torch.randn(batch, channels, *size, generator=generator).to(device, dtype)
    else:
        raise CaptureError(
            f"Cannot synthesise example inputs for {type(model).__name__}: its forward takes neither "
            "input_ids nor pixel_values. Pass example_inputs=dict(...) to fxpeft.transform."
        )
    return inputs


@contextlib.contextmanager
def _tracing_state(model: nn.Module):
    """Train mode (records dropout) and no KV cache while exporting; restored afterwards."""
    was_training = {m: m.training for m in model.modules()}
    config = getattr(model, "config", None)
    had_cache = getattr(config, "use_cache", None)
    model.train()
    if had_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        for module, mode in was_training.items():
            module.training = mode
        if had_cache is not None:
            config.use_cache = had_cache


def _widen(value):
    """Export specialises sizes 0 and 1: repeat a tensor until every dim has at least 2."""
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return value
    for dim, size in enumerate(value.shape):
        if size == 1:
            value = torch.cat([value, value], dim=dim)
    return value


def keyword_module(module: nn.Module, names: list[str], convert_output=None, convert_inputs=None) -> nn.Module:
    """``module``'s namespace (the same parameter and buffer keys) behind a forward with explicit
    keyword-only parameters ``names``, which calls ``module(**given)`` (``convert_inputs(given)``
    first, where given: e.g. tensors into the cache object the model takes).

    torch.export cannot give dynamic shapes to inputs that reach a forward through ``**kwargs``
    (``return_dict`` in transformers 5, or any input of our dispatcher), and interprets a
    GraphModule's own graph instead of calling its forward.
    """

    class KeywordModule(nn.Module):
        def __init__(self):
            super().__init__()
            self._modules, self._parameters, self._buffers = module._modules, module._parameters, module._buffers
            self._non_persistent_buffers_set = module._non_persistent_buffers_set
            self.__dict__["_wrapped"] = module

        def forward(self, **given):
            given = {k: v for k, v in given.items() if v is not None}
            output = self._wrapped(**(convert_inputs(given) if convert_inputs is not None else given))
            return convert_output(output) if convert_output is not None else output

    P = inspect.Parameter
    KeywordModule.forward.__signature__ = inspect.Signature(
        [P("self", P.POSITIONAL_OR_KEYWORD)] + [P(name, P.KEYWORD_ONLY, default=None) for name in names])
    return KeywordModule()


def export_program(module: nn.Module, kwargs: dict[str, Any], convert_output=None, convert_inputs=None,
                   fixed: Optional[dict] = None):
    """torch.export of ``module(**kwargs)``, non-strict, every tensor dim ``Dim.AUTO`` (also of tensors
    nested in lists, tuples and dicts) and duck sizing off, so that equal example sizes do not force equal
    dimensions. ``fixed``: input name -> ``dims(tensor)``, the dims of each tensor under it that stay static
    (sizes the model fixes: export's symbolic reasoning about them costs time).

    Fake-tensor dispatch caching is off for the export: with symbolic sizes a cache hit rebuilds its
    output through symbolic stride arithmetic that costs more than running the op's meta function
    (measured on the tests' tiny models: T5's first ``generate`` capture 7.0 → 4.4 s, Llama's
    transform and first call 1.2 → 1.0 s). The flag is read when export makes its fake mode."""
    def auto(value, keep):  # sizes 1 would be specialised anyway (with a warning): left static
        if not isinstance(value, torch.Tensor):
            return None
        kept = keep(value)
        return {d: torch.export.Dim.AUTO for d in range(value.ndim) if value.shape[d] != 1 and d not in kept}

    def spec(value, keep):  # the dynamic_shapes tree export wants: other pytree nodes (a ModelOutput) as lists of children
        if type(value) in (list, tuple):
            return type(value)(spec(v, keep) for v in value)
        if type(value) is dict:
            return {k: spec(v, keep) for k, v in value.items()}
        if type(value) in pytree.SUPPORTED_NODES:
            return [spec(child, keep) for child in pytree.SUPPORTED_NODES[type(value)].flatten_fn(value)[0]]
        return auto(value, keep)

    fixed = fixed or {}
    dynamic = {name: spec(value, fixed.get(name, _no_dims)) for name, value in kwargs.items()}
    with _EXPORTING, torch.fx.experimental._config.patch(use_duck_shape=False), \
            torch._dynamo.config.patch(fake_tensor_cache_enabled=False), _without_stack_traces():
        return torch.export.export(keyword_module(module, list(kwargs), convert_output, convert_inputs), (), kwargs,
                                   dynamic_shapes=dynamic, strict=False)


# torch.export is not thread-safe (its dispatch modes and config patches are process-wide): two modules
# capturing in two threads at once made both fail with misleading errors. One export at a time.
_EXPORTING = threading.RLock()  # re-entrant: an export that reaches a capture in the same thread goes on


@contextlib.contextmanager
def _without_stack_traces():
    """Export without recording each node's Python stack (``torch.fx.config.do_not_emit_stack_traces``, a
    module-level flag, set under ``_EXPORTING``): about 7% of a capture's time, and fxpeft reads no
    ``stack_trace``; export's own error messages (guards, data-dependent sizes) keep theirs."""
    config = torch.fx.config
    before = getattr(config, "do_not_emit_stack_traces", False)
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def _unaliased(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Export turns inputs that share memory into one graph input: captured with
    ``labels=input_ids``, the graph would read its tokens from ``labels`` on every later call.
    Each input gets its own copy."""
    seen, out = set(), {}
    for name, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.numel():
            storage = (value.untyped_storage().data_ptr(), value.device)
            if storage in seen:
                value = value.clone()
            seen.add(storage)
        out[name] = value
    return out


def _no_dims(tensor: torch.Tensor) -> tuple:
    return ()


def export_call(model: nn.Module, kwargs: dict[str, Any], widen: bool = False, convert_inputs=None,
                convert_output=None, fixed: Optional[dict] = None) -> Captured:
    """Capture one keyword signature with torch.export (``convert_inputs``/``convert_output``: see
    :func:`keyword_module`; ``fixed``: see :func:`export_program`)."""
    if widen:
        kwargs = {name: _widen(value) for name, value in kwargs.items()}
    kwargs = _unaliased(kwargs)
    try:
        with _tracing_state(model):
            program = export_program(model, kwargs, convert_output, convert_inputs, fixed)
    except Exception as error:
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__} with inputs {sorted(kwargs)}: "
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
            "Check that the example inputs are valid for the model's forward."
        ) from error
    owner = program.module()
    info = owner.graph._codegen.pytree_info
    graph = _detached(owner.graph)
    graph._codegen = torch.fx.graph.CodeGen()  # the dispatcher flattens / unflattens instead
    return Captured(graph=graph, owner=owner, in_spec=info.in_spec, out_spec=info.out_spec, example=kwargs)


def symbolic_call(model: nn.Module) -> Captured:
    try:
        with _tracing_state(model):
            traced = torch.fx.symbolic_trace(model)
    except Exception as error:
        raise CaptureError(
            f"torch.fx.symbolic_trace failed on {type(model).__name__} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). Pass example_inputs=(...) or dict(...) "
            "to fxpeft.transform so the model can be captured with torch.export instead."
        ) from error
    return Captured(graph=_detached(traced.graph), owner=traced)


def _detached(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy owned by no module, so canonicalize may name modules the capture does not have."""
    new = torch.fx.Graph()
    new.output(new.graph_copy(graph, {}))
    new._codegen = graph._codegen
    return new


def normalize_inputs(model: nn.Module, example_inputs) -> dict[str, Any]:
    if isinstance(example_inputs, dict):
        return dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    names = forward_arg_names(model)
    if len(example_inputs) > len(names):
        raise CaptureError(f"{len(example_inputs)} example inputs given but forward takes only {names}.")
    return dict(zip(names, example_inputs))


def capture(model: nn.Module, example_inputs=None) -> Captured:
    """The first capture of a model, by the strategy described in the module docstring."""
    if example_inputs is None and not is_transformers_model(model):
        return symbolic_call(model)
    kwargs = normalize_inputs(model, example_inputs) if example_inputs is not None else synthesize_inputs(model)
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k != "use_cache"}
    if "use_cache" in forward_arg_names(model):
        kwargs["use_cache"] = False  # a KV cache in the output cannot be captured
    return export_call(model, kwargs)


def signature_key(kwargs: dict[str, Any], ranks: bool = False) -> tuple:
    """Calls with the same key share one graph: tensor inputs by name (with their rank where
    ``ranks``: a graph for a 4-d mask cannot take a 2-d one), lists and dicts of tensors by name,
    structure and which entries are tensors (a mask dict holding None exports another graph than one
    holding a mask), other values by value."""
    parts = []
    for name in sorted(kwargs):
        value = kwargs[name]
        if isinstance(value, torch.Tensor):
            parts.append((name, value.ndim) if ranks else name)
        elif isinstance(value, (list, tuple, dict)):
            parts.append((name, _structure(value, ranks)))
        else:
            parts.append((name, value))
    return tuple(parts)


def _structure(value, ranks: bool = False):
    """The nesting of lists, tuples and dicts (their types, lengths and keys) and the kind of each leaf
    (a tensor, with its rank where ``ranks``; None; another value's type): what ``pytree.tree_structure``
    tells apart here, a fraction of its cost (a KV cache's per-layer tensors on every generation step)."""
    if isinstance(value, dict):
        return type(value), tuple((key, _structure(item, ranks)) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return type(value), tuple(_structure(item, ranks) for item in value)
    if isinstance(value, torch.Tensor):
        return value.ndim if ranks else torch.Tensor
    return None if value is None else type(value)


def flatten_call(kwargs: dict[str, Any], in_spec) -> list:
    return torch.fx._pytree.tree_flatten_spec(((), kwargs), in_spec)


def unflatten_output(flat, out_spec):
    return pytree.tree_unflatten(flat, out_spec)
