"""Forward hooks on the modules a transformed module's sites belong to.

A transformed module computes its linear, conv and embedding layers inside its graphs (each weight
read with ``get_attr``), so forward hooks registered on those modules never fire. Inside
``with site_hooks(gm):`` they do: every site calls its module's forward hooks as ``nn.Module``
would, ``hook(module, (input,), output)`` (``hook(module, (input,), {}, output)`` for hooks
registered ``with_kwargs=True``), with the input the layer received and the base op's output.
Statistics of layer inputs collected this way are what data-driven inits read (and what a user's
own calibration code reads). Hooks only observe: what they return is ignored.

Entering and leaving lower every graph again (with one more rule, then without it); nothing is
captured again, and calls inside the block run eagerly as usual (compiled code is not meant to
run there). Hooks may be added and removed inside the block: each site reads its module's hooks
on every call.
"""
from __future__ import annotations

import contextlib

import torch

from .registry import registry_of, site_rule

aten = torch.ops.aten

# ops that flatten a layer's input before a matmul (transformers' Conv1D: addmm on x.view(-1, in)):
# the hooks get the tensor the layer itself was called with
_FLATTENING = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_FLAT_MATMULS = (aten.addmm.default, torch.addmm)


def fire_forward_hooks(module: torch.nn.Module, layer_input: torch.Tensor, output: torch.Tensor,
                       unflatten: bool = False) -> None:
    """Call ``module``'s forward hooks on one of its site's (input, output); ``unflatten``: the op ran
    on the input flattened to 2-D, and its output gets the input's leading dims back."""
    if unflatten:
        output = output.reshape(*layer_input.shape[:-1], output.shape[-1])
    for key, hook in list(module._forward_hooks.items()):
        if key in module._forward_hooks_with_kwargs:
            hook(module, (layer_input,), {}, output)
        else:
            hook(module, (layer_input,), output)


def _flattened(site) -> bool:
    node = site.input
    if not (site.node.op == "call_function" and site.node.target in _FLAT_MATMULS and isinstance(node, torch.fx.Node)):
        return False
    return ((node.op == "call_function" and node.target in _FLATTENING)
            or (node.op == "call_method" and node.target in ("view", "reshape")))  # symbolic trace


def _fire(lowering, site):
    # the module is read from the graph's own root, so blocks sharing one lowering each fire their own
    flat = _flattened(site)
    layer_input = site.input.args[0] if flat else site.input
    lowering.call(fire_forward_hooks, lowering.attr(site.path), layer_input, site.output, flat)
    return None  # the site's output is unchanged


RULE = site_rule("site_hooks", lambda site, module: True, _fire, phase=0)


@contextlib.contextmanager
def site_hooks(gm):
    """Within the block, forward hooks registered on ``gm``'s site modules (``gm.get_submodule(path)``
    of a linear, conv or embedding layer) fire on every call; see the module docstring. Any other
    module is run by its modules' own calls, which fire their hooks anyway: it is left alone."""
    registry = registry_of(gm)
    if "_fxpeft_signatures" not in gm.__dict__ or RULE in registry.rules:  # not transformed; or nested
        yield gm
        return
    observing = registry.copy()
    observing.add_rule(RULE)
    gm.__dict__["_fxpeft_registry"] = observing
    try:
        gm.relower()
        yield gm
    finally:
        gm.__dict__["_fxpeft_registry"] = registry
        gm.relower()
