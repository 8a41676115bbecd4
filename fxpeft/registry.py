"""The registry: everything fxpeft knows how to do, as one value the core is given.

A :class:`Registry` holds

- ``methods``: what attaches, folds and saves adapter state for a config (a :class:`Method`,
  usually built by one of the forms in fxpeft/forms.py);
- ``rules``: graph rewrites (:class:`Rule`), run by phase on every lowering;
- ``tree_passes``: edits of fxpeft's copy of the module tree before capture (quantization);
- ``site_ops``: op -> function describing the site it computes (linear, conv, embedding, a
  quantized linear …), used by capture and by :func:`fxpeft.canonical.find_sites`;
- ``mode_keywords``: ops whose behaviour follows ``.train()/.eval()``, by the keyword that says so;
- ``linear_types``: module types that count as linear layers ("all-linear");
- ``attach_hooks``: what any config may ask for besides its method's adapter (modules_to_save),
  run after every attach, with the child-module names they keep state in (``hook_containers``).

fxpeft's passes register into :data:`DEFAULT`. To add a method without changing fxpeft's own
registry, extend a copy and pass it to ``fxpeft.transform(model, config, registry=mine)``::

    mine = fxpeft.registry.DEFAULT.copy()
    mine.add_method(fxpeft.forms.additive(name="toy", config_type=ToyConfig, ...))

A transformed module keeps the registry it was made with; every later edit reads that one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .canonical import BASE_LINEAR_TYPES, BASE_SITE_OPS, Site


@dataclass(frozen=True)
class Rule:
    """``match(lowering)`` yields candidates; ``rewrite(lowering, candidate)`` edits the graph.

    For site rules (made with :func:`site_rule`) the driver inserts at the site's current output
    and re-points the output's original users at what ``rewrite`` returns.
    """

    name: str
    match: Callable[[Any], Iterable[Any]]
    rewrite: Callable[[Any, Any], Any]
    phase: int = 50
    on_sites: bool = False


def site_rule(name: str, constraint: Callable[[Site, nn.Module], bool], rewrite, phase: int = 50) -> Rule:
    """A rule on the sites whose module satisfies ``constraint(site, module)``."""

    def match(lowering):
        for site in lowering.sites:
            module = lowering.module(site.path)
            if module is not None and constraint(site, module):
                yield site

    return Rule(name=name, match=match, rewrite=rewrite, phase=phase, on_sites=True)


@dataclass(frozen=True)
class Method:
    """How one kind of adapter attaches to, changes, folds into and is saved from a transformed module.

    The forms (fxpeft/forms.py) fill most fields from a method's math; a method that fits no form
    fills them itself. Only ``name`` and ``config_type`` are required: a method with no ``attach``
    is a base change done by a tree pass (quantization).
    """

    name: str  # shown in inspection and errors; unique in a registry
    config_type: type
    # Several methods may serve one config type; a config goes to the last registered whose
    # ``applies(config)`` holds (DoRA: a LoraConfig with use_dora).
    applies: Optional[Callable[[Any], bool]] = None
    attach: Optional[Callable[..., list[str]]] = None  # (gm, sites, config, adapter) -> adapted module paths
    resolve_config: Optional[Callable] = None  # (gm, sites, config) -> the config as stored and saved
    # child-module names holding per-adapter state beside an adapted module (``lora_A`` …):
    # checkpoints drop the adapter name after them, deletion removes the adapter's entry
    containers: tuple[str, ...] = ()
    # containers kept once on the root instead of beside each site (fxpeft.forms.SharedTensors: VeRA's
    # projections): every graph, blocks included, reads them as ``<name>.<adapter>``; checkpoints hold
    # them under PEFT's tuner-level key ``base_model.<name>``
    shared: tuple[str, ...] = ()
    adapters_at: Optional[Callable[[nn.Module], list[str]]] = None  # the adapters this method put on a module
    gate: Optional[Callable] = None  # (module, adapter) -> its AdapterGate (``merged``, ``refresh()``)
    # (gm, site, module, adapter, weight, bias, sign) -> (weight, bias): fold the adapter into the
    # site's float weight and bias (sign 1) or take it out again (-1). None: it cannot be merged.
    fold: Optional[Callable] = None
    # ``exchange(module, adapter) -> {tensor name on module: the adapter's tensor}``: an adapter held as a
    # copy of a module that is no site (LN tuning) merges by exchanging values with the module's own
    # tensors (the module computes with the copy's, the copy keeps the originals: PEFT swaps the layers);
    # unmerging exchanges them back. Instead of ``fold``.
    exchange: Optional[Callable] = None
    rules: tuple[Rule, ...] = ()
    describe: Optional[Callable[[nn.Module, str], str]] = None  # (module, adapter) -> "r=8" for inspection
    # What sequence methods (prompt, prefix tuning) need, each its own switch:
    exclusive: bool = False  # its adapters share the model with no other method's (prompt learning)
    activity_in_graph: bool = False  # whether it acts changes the graph (set_adapter re-lowers)
    mixed_batches: bool = True  # adapter_names= may pick it per sample
    one_active: bool = False  # at most one of its adapters acts at a time (set_adapter refuses more, as PEFT)
    whole_graph: bool = False  # its rules see the whole model as one graph (no per-block graphs)
    # computed tensors its checkpoint holds (``saved_tensors(gm, adapter) -> {key: tensor}``, read
    # back by ``load_saved(gm, adapter, {key: tensor})``) instead of its containers' own, under this prefix
    saved_tensors: Optional[Callable] = None
    load_saved: Optional[Callable] = None
    checkpoint_prefix: str = "base_model.model."
    # (suffix in fxpeft's key, suffix in PEFT's file) where PEFT saves a tensor under another name
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    # containers whose tensors PEFT does not save (derived or constant state)
    unsaved_containers: tuple[str, ...] = ()
    # names of adapter parameters that never train, though saved (Cartridge's frozen leading tokens)
    untrained: tuple[str, ...] = ()
    # ``frozen(gm, adapter) -> parameters``: those of a new adapter that stay frozen, where a name cannot tell
    # (the embedding tables of a pretrained SHADOW backbone)
    frozen: Optional[Callable] = None
    # how its adapters join other methods' at a site in a mixed result (``transform(..., mixed=True)``, PEFT's
    # mixed model, which nests each new adapter's layer around the layer it targets): "adds" (its change is added
    # to the layer's output: the order does not matter), "wraps" (it changes the layer's input or weight, so it
    # acts on the adapters added before it); None: it is not mixed with other methods
    mixable: Optional[str] = None
    # ``saved_state(gm, adapter, {key: tensor}) -> {key: tensor}``: what a checkpoint holds, where it
    # is not the module's tensors as they are (AdaLoRA saves its sites cut to their allocated rank)
    saved_state: Optional[Callable] = None
    # ``loaded_state(gm, adapter, {key: tensor}) -> {key: tensor}``: the inverse of ``saved_state``, a
    # checkpoint's tensors (PEFT's keys) as the module holds them, before they are checked and copied (PEFT's
    # per-tuner _remap_adapter_state_dict_for_load: VBLoRA's top-k file back to dense logits)
    loaded_state: Optional[Callable] = None
    # ``checkpoint_keys(config, keys) -> keys to leave unloaded``: PEFT's own checks of a checkpoint's keys
    # before loading (raising or warning with PEFT's words); VeRA ignores saved projections its config
    # says are drawn from the key
    checkpoint_keys: Optional[Callable] = None
    # ``initial_conversion(gm, adapter, {key: tensor}, config_dict, initial_directory) -> ({key: tensor},
    # config_dict)``: what ``save_pretrained(path_initial_model_for_weight_conversion=initial_directory)``
    # writes instead of the checkpoint's tensors and config (LoRA: an adapter whose init rewrote the base
    # weights, as plain LoRA for the original base, PEFT's conversion). None: the method refuses the option
    initial_conversion: Optional[Callable] = None
    # ``adjust_loss(gm, adapter, loss) -> loss`` after every call returning a loss while the adapter exists
    # (AdaLoRA adds its regulariser)
    adjust_loss: Optional[Callable] = None
    # ``call_loss(gm, adapter, output, inputs) -> loss``: while the adapter acts, the loss of a call returning
    # one, computed by the method from the output and the call's inputs by name (inputs it drops included)
    # in place of the model's (CPT's weighted loss over its labels and ``input_type_mask``); before adjust_loss
    call_loss: Optional[Callable] = None
    # ``changes_base(config) -> bool``: attaching rewrites base weights (PiSSA, OLoRA, LoftQ inits):
    # edits with such a config keep a copy of the model's weights to put back if they fail
    changes_base: Optional[Callable[[Any], bool]] = None
    # functions a transformed module offers as its own methods while it holds such an adapter:
    # ``{"update_and_allocate": fn}`` makes ``gm.update_and_allocate(...)`` call ``fn(gm, ...)``
    module_methods: tuple[tuple[str, Callable], ...] = ()
    # ``dropped_inputs(config) -> frozenset`` of input names the model is called without while it acts
    dropped_inputs: Optional[Callable] = None
    # ``state_site(gm, path, module) -> Site``: for adapter state on no graph site (LoRA on a raw parameter),
    # the site merging folds it into (``kind`` "parameter", ``weight`` the parameter's name)
    state_site: Optional[Callable] = None
    # ``prefill_cache(gm, adapter, cache, **encoder) -> n``: generation with a method that adds n virtual
    # tokens (prompt, prefix tuning) writes their keys and values into every row of an empty KV cache
    # once (an encoder-decoder's: its decoder self-attention cache; ``encoder`` then holds
    # ``encoder_outputs`` and ``attention_mask``, one row per cache row); graphs that read a cache
    # (``Lowering.cached``) then leave the virtual tokens to it; the method's ``call_inputs`` given to generate
    # come as keywords too, one row per cache row. None: such a method cannot generate
    prefill_cache: Optional[Callable] = None
    # ``prepare_call(gm, mixed, cached, compiled)``: run outside compiled code before a call without autograd
    # that is compiled (``compiled``: the module or its blocks), eager without adapter_names, or eager with
    # adapter_names and a KV cache (``mixed``: with adapter_names; ``cached``: with a KV cache, a generation
    # step, whose graphs ``Lowering.cached`` lowered), while the method's
    # adapters are loaded: refreshes what its graphs may read instead of recomputing it per call (LoRA:
    # the active adapters' stacks, rebuilt only when a tensor they copy changed). A graph may trust
    # such state only while ``call_prepared()`` holds.
    prepare_call: Optional[Callable] = None
    # ``lowered(gm)``: after every re-lowering, while the method's adapters are loaded: per-module state its
    # graph nodes read at run time instead of as constants in the graph's code (LoRA: each site's adapter
    # names, positions and rank), so that adding or deleting an adapter leaves that code as it was and a
    # compiled caller does not recompile (the driver reuses code whose text did not change)
    lowered: Optional[Callable] = None
    # per-call inputs its graphs read besides the model's own (PEFT's ``task_ids``): the result's forward and
    # generate take them by name, and while an adapter of the method exists every lowered graph (blocks too)
    # takes each as an input (``Lowering.call_input``), so their values are data, never code (a compiled
    # graph does not recompile per value); a call without one while such an adapter acts is an error
    call_inputs: tuple[str, ...] = ()
    # ``fill_call_inputs(gm, adapter, args, kwargs, compiled) -> {name: tensor}``: the method's call inputs for a
    # call that gives none, computed by the method before the call runs (X-LoRA's scalings, from a first pass of
    # the model that it runs by calling ``gm`` with its inputs given); ``compiled``: the call runs compiled code.
    # Other keywords it returns replace the call's (SHADOW: the KV cache a use_cache=True call gets, made early)
    fill_call_inputs: Optional[Callable] = None

    @property
    def is_adapter(self) -> bool:
        return self.attach is not None


class _Prepared:
    now = False  # whether the call running went through the prepare hooks (see call_prepared)


class _Steps:
    count = 0  # torch.optim steps taken in this process


def optimizer_steps() -> int:
    """How many torch.optim steps this process has taken. Fused optimizers (torch's fused AdamW, Trainer's
    default) and writes through ``.data`` change a parameter in place without bumping its version counter:
    state derived from adapter tensors counts every step (third-party optimizers subclass torch.optim's) as
    a change of every tensor. A write through ``.data`` outside an optimizer stays unseen, as it is to
    autograd's own checks."""
    return _Steps.count


def _after_step(optimizer, args, kwargs) -> None:
    _Steps.count += 1


register_optimizer_step_post_hook(_after_step)


def call_prepared() -> bool:
    """True inside a call (without autograd) whose ``Method.prepare_call`` hooks ran just before it.
    A compiled graph reads this as a guarded constant: a module whose compiled code is inlined into
    a caller's compiled region (so ``PeftGraphModule.__call__`` is traced, and no hook runs) sees
    False and recomputes what the hooks would have prepared."""
    return _Prepared.now


class Registry:
    """Methods, rules, tree passes and site tables: see the module docstring."""

    def __init__(self):
        self.methods: list[Method] = []
        self.rules: list[Rule] = []
        self.tree_passes: list[Callable] = []
        self.site_ops: dict[Any, Callable] = dict(BASE_SITE_OPS)
        self.mode_keywords: dict[Any, str] = {}
        self.linear_types: list[type] = list(BASE_LINEAR_TYPES)
        self.attach_hooks: list[Callable] = []
        self.hook_containers: list[str] = []

    def copy(self) -> "Registry":
        """A registry with the same entries, extended independently."""
        twin = copy.copy(self)
        for name in ("methods", "rules", "tree_passes", "site_ops", "mode_keywords", "linear_types", "attach_hooks",
                     "hook_containers"):
            setattr(twin, name, copy.copy(getattr(self, name)))
        return twin

    def add_method(self, method: Method) -> Method:
        """Register ``method`` and its rules. A name already registered is an error: register a
        method once (or into a copy of the registry, to replace one there)."""
        if any(m.name == method.name for m in self.methods):
            raise ValueError(f"A method named {method.name!r} is already registered; each method is registered once "
                             "(to change one, register into DEFAULT.copy() under another name).")
        if any(m.config_type is method.config_type and m.applies is method.applies for m in self.methods):
            raise ValueError(f"{method.config_type.__name__} already has a method ({method.name!r} would shadow it): "
                             "give the new method its own config type, or an applies= test that tells them apart.")
        self.methods.append(method)
        for rule in method.rules:
            self.add_rule(rule)
        return method

    def add_rule(self, rule: Rule) -> Rule:
        self.rules.append(rule)
        self.rules.sort(key=lambda r: r.phase)  # stable: rules of one phase run in registration order
        return rule

    def add_attach_hook(self, hook: Callable, container: str) -> None:
        """``hook(gm, config, adapter)`` runs after every method's attach; it keeps per-adapter
        state in ``module.<container>.<adapter>``."""
        self.attach_hooks.append(hook)
        self.hook_containers.append(container)

    def add_site_op(self, op, describe: Callable, mode_keyword: Optional[str] = None) -> None:
        """Let ``op`` be a site: ``describe(node, root)`` returns the site's fields (see canonical.py)."""
        self.site_ops[op] = describe
        if mode_keyword is not None:
            self.mode_keywords[op] = mode_keyword

    def method_for(self, config) -> Method:
        for config_type in type(config).__mro__:
            for method in reversed(self.methods):
                if method.config_type is config_type and (method.applies is None or method.applies(config)):
                    return method
        known = ", ".join(sorted({m.config_type.__name__ for m in self.methods}))
        raise TypeError(f"No fxpeft method handles {type(config).__name__}; supported configs: {known}. "
                        "A custom method is registered with fxpeft.register_method (see fxpeft/registry.py).")

    def call_inputs(self) -> tuple[str, ...]:
        """Every per-call input some method reads (``Method.call_inputs``), in registration order."""
        return tuple(dict.fromkeys(name for m in self.methods for name in m.call_inputs))

    def config_types(self) -> dict[str, type]:
        """peft_type -> config class, for every adapter method (what checkpoints may name)."""
        return {m.config_type.peft_type: m.config_type for m in self.methods if m.is_adapter}

    def containers(self) -> set[str]:
        return {*self.hook_containers, *(c for m in self.methods for c in m.containers)}

    def base_modules(self, root: nn.Module, keep: tuple[str, ...] = ()):
        """``root.named_modules()`` without what adapters added (their containers' subtrees, fxpeft's
        own ``_fxpeft*`` modules): a walk whose length does not grow with the adapters loaded. ``keep``:
        containers walked into all the same (one that nests the base module itself, PEFT's ``base_layer``)."""
        skip = self.containers() - set(keep)
        rule = lambda path, module: (SKIP, skip | {n for n in module._modules if n.startswith("_fxpeft")})  # noqa: E731
        return ((path, module) for path, module, _ in walk_modules(root, rule))

    def modules_but_adapters(self, root: nn.Module, adapters) -> Iterator[tuple[str, nn.Module]]:
        """``root.named_modules()`` without the state of ``adapters`` (a container's entries named by one
        of them): what adding another adapter can change, walked in a time that grows with the
        containers, not with the adapters they hold."""
        rule = adapter_entries(self.containers(), adapters, SKIP)
        return ((path, module) for path, module, _ in walk_modules(root, rule))

    def is_adapter_state(self, path: str) -> bool:
        """Whether a module path lies inside some adapter's state (``...q_proj.lora_A.default``)."""
        containers = self.containers()
        return any(part in containers for part in path.split("."))


DEFAULT = Registry()

# what walk_modules does with the children a rule names: yield each without its subtree, or leave it out
ALONE, SKIP = "alone", "skip"


def walk_modules(root: nn.Module, rule: Callable) -> Iterator[tuple[str, nn.Module, bool]]:
    """(path, module, descended) in ``root.named_modules()``'s order, a module shared by two parents
    once. ``rule(path, module)`` names the module's children walked otherwise: ``(what, names)``, the
    children in ``names`` yielded without their subtrees (ALONE) or left out (SKIP); or None."""
    seen, stack = set(), [("", root, True)]
    while stack:
        path, module, descend = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module, descend
        if descend:
            what, names = rule(path, module) or (SKIP, ())
            stack.extend(reversed([(f"{path}.{name}" if path else name, child, name not in names)
                                   for name, child in module._modules.items()
                                   if child is not None and not (what == SKIP and name in names)]))  # pre-order


def adapter_entries(containers, adapters, what: str) -> Callable:
    """A ``walk_modules`` rule: ``what`` for the entries of ``adapters`` in a container
    (``q_proj.lora_A.<adapter>``)."""
    containers, adapters = set(containers), set(adapters)
    return lambda path, module: (what, adapters) if path.rpartition(".")[2] in containers else None


def register_method(method: Method, registry: Optional[Registry] = None) -> Method:
    """Register a method (and its rules) in ``registry`` (default: fxpeft's own)."""
    return (registry or DEFAULT).add_method(method)


def registry_of(module) -> Registry:
    """The registry a transformed module was made with (fxpeft's own for anything else)."""
    return getattr(module, "_fxpeft_registry", None) or DEFAULT
