"""LoRA: ``y = W x + b + s * B(A(dropout(x)))`` on linear, Conv1D, conv and embedding sites.

State (attached beside the adapted module, PEFT's names):
    <path>.lora_A.<adapter>.weight, <path>.lora_B.<adapter>.weight          linear / conv
    <path>.lora_embedding_A.<adapter>, <path>.lora_embedding_B.<adapter>    embedding
    <path>.lora_dropout.<adapter>    (nn.Dropout / nn.Identity, no parameters)
    <path>.lora_scaling.<adapter>.value / .p   non-persistent buffers: s (0 once merged), dropout p
Rewrite (phase 50, output deltas), added to the site output:
    linear / embedding sites: the module's adapters stacked (padded to one rank, s folded into
    B) and gathered by the active slots (dense graph) or per sample (mixed graph);
    linear sites with a single adapter (dense graph without a KV cache) and conv sites: a gated
    delta per adapter.
Folding: ``delta_weight`` is what merging adds to the base weight.
Inits that read the base weight (``init_lora_weights`` "pissa", "olora", "orthogonal", "loftq":
passes/lora_init.py) replace A and B at linear sites after they are built, as PEFT does, and
rewrite the base weight in place where the init changes it; ``check_site`` checks every targeted
site first, so a config failing at any site changes no weight.
"""
from __future__ import annotations

import math
import operator
import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn

from fxpeft.canonical import Site, is_quantized, is_sharded, site_weight
from fxpeft.configs import DEFAULT_LORA_TARGETS, LoraConfig
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.generation import generate_step, kept_roots
from fxpeft.kept import slot_lookup, slots_of
from fxpeft.registry import call_prepared, optimizer_steps, register_method, registry_of
from fxpeft.rewrite import Lowering
from fxpeft.targets import output_heads, pattern_value

from .lora_init import (LoftQConfig, check_init, init_weights, layer_init, modifies_base, plain_lora_config,
                        plain_lora_state)
from .layer_replication import with_replication
from .lora_parameters import NESTED, ParamGate, with_parameters
from .trainable_tokens import with_tokens
from .weight_tying import with_tying

aten = torch.ops.aten

# child modules holding per-adapter state beside an adapted module (PEFT's names)
CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout", "lora_scaling")


def _conv_geometry(site: Site):
    args = list(site.node.args) + [None] * 7
    stride, padding, dilation, groups = args[3] or 1, args[4] or 0, args[5] or 1, args[6] or 1
    return stride, padding, dilation, groups


def _new_lora_weights(site: Site, weight: torch.Tensor, r: int, init, bias: bool = False):
    """(A, B) parameter holders for one site, initialised as PEFT does."""
    if site.kind == "embedding":
        num, dim = weight.shape
        a, b = nn.Parameter(torch.randn(r, num)), nn.Parameter(torch.randn(dim, r))
        if init is not False:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        return a, b
    if site.kind == "linear":
        out_f, in_f = weight.shape[::-1] if site.fan_in_fan_out else weight.shape
        a, b = nn.Linear(in_f, r, bias=False), nn.Linear(r, out_f, bias=bias)
    else:
        stride, padding, _, groups = _conv_geometry(site)
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(weight.shape)]
        kernel = tuple(weight.shape[2:])
        ones = (1,) * len(kernel)
        a = conv(weight.shape[1] * groups, r, kernel, stride, padding, bias=False)
        b = conv(r, weight.shape[0], ones, ones, groups=groups, bias=bias)
    if init is True:
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    elif isinstance(init, str) and init.lower() == "gaussian":
        nn.init.normal_(a.weight, std=1 / r)
    if init is not False:
        nn.init.zeros_(b.weight)
        if b.bias is not None:
            nn.init.zeros_(b.bias)
    return a, b


def linear_pair(in_f: int, out_f: int, r: int, zero_b: bool) -> tuple[nn.Linear, nn.Linear]:
    """A plain LoRA pair as PEFT's variants build one beside their own state (GraLoRA's hybrid part,
    Super-Tuning's LoRA): A kaiming-uniform, B zeros or (``zero_b`` False) kaiming-uniform too, drawn
    in PEFT's order."""
    a, b = nn.Linear(in_f, r, bias=False), nn.Linear(r, out_f, bias=False)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    if zero_b:
        nn.init.zeros_(b.weight)
    else:
        nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
    return a, b


def _rank_and_scale(site: Site, config: LoraConfig) -> tuple[int, float]:
    r = pattern_value(config.rank_pattern, site.path, config.r)
    alpha = pattern_value(config.alpha_pattern, site.path, config.lora_alpha)
    return r, (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def _weight_init(config: LoraConfig, site: Site) -> Optional[str]:
    """The init of passes/lora_init.py this site gets (one that reads the base weight), or None for
    ``_new_lora_weights``' own. Raises what PEFT raises where it cannot initialise such a site
    (conv; LoftQ on embeddings); embeddings get the default init, as in PEFT."""
    init = config.init_lora_weights
    if not isinstance(init, str) or LoraConfig.init_family(init) == "gaussian":
        return None
    return init if layer_init(init, site.kind) else None


def changes_base(config: LoraConfig) -> bool:
    """Whether attaching rewrites base weights (PiSSA, OLoRA, LoftQ …)."""
    init = config.init_lora_weights
    return isinstance(init, str) and LoraConfig.init_family(init) != "gaussian" and modifies_base(init)


def _loftq_config(config: LoraConfig) -> Optional[LoftQConfig]:
    data = config.loftq_config
    return LoftQConfig(data["loftq_bits"], data["loftq_iter"]) if config.init_lora_weights == "loftq" else None


def _linear_layout(shape, site: Site) -> tuple:
    """A linear site's (out, in): Conv1D stores (in, out)."""
    return tuple(shape)[::-1] if site.fan_in_fan_out else tuple(shape)


def check_site(module: nn.Module, site: Site, weight, config: LoraConfig) -> None:
    """What ``add_lora`` would raise at this site, found before any site is created (so an init
    that rewrites base weights never runs for a config that fails somewhere): PEFT's errors for the
    site's kind, dtype and shape, and a quantized base under an init that reads its weight (PEFT
    fails there too, except OLoRA, which it runs on the dequantized weight and quantizes again:
    not implemented here)."""
    kind = _weight_init(config, site)
    if kind is None:
        return
    if is_quantized(module):
        what = ("rewrites the base weight" if modifies_base(kind) else
                "casts A and B to the base weight's dtype in PEFT, which fails on a packed weight")
        raise ValueError(
            f"init_lora_weights={kind!r} is not supported on the quantized layer {site.path!r} "
            f"({type(module).__name__}): it {what}. Initialise on the float model and quantize afterwards, or use "
            "init_lora_weights=True / 'gaussian'.")
    r, _ = _rank_and_scale(site, config)
    check_init(kind, _linear_layout(weight.shape, site), weight.dtype, r, fan_in_fan_out=site.fan_in_fan_out,
               loftq_config=_loftq_config(config), eigens=getattr(module, "eigens", None))


def add_lora(module: nn.Module, site: Site, weight, config: LoraConfig, adapter: str) -> None:
    r, scale = _rank_and_scale(site, config)
    if config.lora_bias and site.kind == "embedding":
        raise ValueError(f"lora_bias=True is not supported for embedding layers such as {site.path!r} (as in PEFT).")
    if config.lora_bias and site.bias is None:
        warnings.warn(f"lora_bias=True was passed but the targeted layer {site.path!r} has no bias. This means that "
                      "merging LoRA weights won't be possible.")
    groups = _conv_geometry(site)[3] if site.kind == "conv" else 1
    if r % groups:  # B is a grouped conv over the rank, so PEFT needs the rank divisible by groups
        raise ValueError(f"Targeting the conv layer {site.path!r} with groups={groups} and rank {r}: the rank must be "
                         f"divisible by groups (as in PEFT). Use a rank that is a multiple of {groups} for it "
                         "(rank_pattern) or leave it out of target_modules.")
    a, b = _new_lora_weights(site, weight, r, config.init_lora_weights, bias=config.lora_bias)
    kind = _weight_init(config, site)
    if kind is not None:  # as PEFT: A and B built (drawing their default init) first, then replaced
        _init_from_base(module, site, kind, a, b, r, scale, config)
    dtype, device = adapter_dtype(weight), weight.device
    if site.kind == "embedding":
        child_dict(module, "lora_embedding_A", nn.ParameterDict)[adapter] = nn.Parameter(a.data.to(device, dtype))
        child_dict(module, "lora_embedding_B", nn.ParameterDict)[adapter] = nn.Parameter(b.data.to(device, dtype))
    else:
        child_dict(module, "lora_A")[adapter] = a.to(device, dtype)
        child_dict(module, "lora_B")[adapter] = b.to(device, dtype)
    dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
    child_dict(module, "lora_dropout")[adapter] = dropout
    child_dict(module, "lora_scaling")[adapter] = AdapterGate(scale, config.lora_dropout).to(device)


def _init_from_base(module: nn.Module, site: Site, kind: str, a: nn.Module, b: nn.Module, r: int, scale: float,
                    config: LoraConfig) -> None:
    """PiSSA, OLoRA, orthogonal, LoftQ (passes/lora_init.py) at a linear site: A and B replaced, and
    the base weight rewritten in place where the init changes it (as PEFT does: the tensor is the
    caller's model's)."""
    base = getattr(module, site.weight.rpartition(".")[2])
    weight = base.detach()
    new_a, new_b, new_weight = init_weights(kind, weight.t() if site.fan_in_fan_out else weight, r, scale,
                                            fan_in_fan_out=site.fan_in_fan_out, loftq_config=_loftq_config(config),
                                            eigens=getattr(module, "eigens", None))
    if kind.startswith("corda"):  # preprocess_corda's decomposition is used once, as in PEFT
        del module.eigens
    a.weight = nn.Parameter(new_a)  # PiSSA / OLoRA on a layer of rank below r: the smaller rank, as PEFT
    b.weight = nn.Parameter(new_b)
    if new_weight is not None:
        with torch.no_grad():
            base.copy_(new_weight.t() if site.fan_in_fan_out else new_weight)


def initial_conversion(gm, adapter: str, tensors: dict, config: dict, initial_directory: str):
    """PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=initial_directory)``: the
    trained adapter, which acts on base weights its init rewrote (PiSSA, OLoRA …), as a plain LoRA
    adapter for the original base: ΔW = BA − B₀A₀ = [B | −B₀][A; A₀], rank 2r, A₀/B₀ read from the
    folder saved right after the adapter was created (``plain_lora_state``: only lora_A / lora_B
    keys, as PEFT); the config with r, lora_alpha and the patterns doubled and
    ``init_lora_weights=True`` (``plain_lora_config``: rslora with patterns raises, other inits
    warn, as PEFT). As PEFT, the initial folder's config is then rewritten: the adapter's config
    with ``init_lora_weights=True`` (what PEFT reloads it with)."""
    from fxpeft.checkpoint import load_weights, rewrite_config

    source = gm.peft_config[adapter]
    fields = plain_lora_config(source.init_lora_weights, source.r, source.lora_alpha, source.use_rslora,
                               source.rank_pattern, source.alpha_pattern)
    device = next(iter(tensors.values())).device if tensors else None
    initial = load_weights(initial_directory, device)
    wrong = [key for key, value in tensors.items() if ("lora_A" in key or "lora_B" in key)
             and (key not in initial or initial[key].shape != value.shape)]
    if wrong:
        raise ValueError(f"{initial_directory!r} does not hold adapter {adapter!r} as it was created: "
                         f"{', '.join(wrong[:4])}{' …' if len(wrong) > 4 else ''} missing or of another shape. "
                         "path_initial_model_for_weight_conversion is the folder it was saved to right after "
                         "fxpeft.transform / add_adapter, before training.")
    converted = plain_lora_state(tensors, {key: value.to(tensors[key].dtype) for key, value in initial.items()
                                           if key in tensors})
    rewrite_config(initial_directory, {**config, "init_lora_weights": True})
    return converted, {**config, **fields}


# ----------------------------------------------------------------------------- rewrite



def delta(lw: Lowering, site: Site, module: nn.Module, adapter: str, x, b_weight=None, b_bias=None):
    """``B(A(x))`` at a linear or conv site (the form scales, gates and adds it). ``b_weight`` /
    ``b_bias`` replace B's tensors (DoRA folds per-feature factors into them)."""
    path = site.path
    a_weight = lw.attr(f"{path}.lora_A.{adapter}.weight")
    if b_weight is None:
        b_weight = lw.attr(f"{path}.lora_B.{adapter}.weight")
        b_bias = lw.attr(f"{path}.lora_B.{adapter}.bias") if module.lora_B[adapter].bias is not None else None
    if site.kind == "linear":
        return lw.call(aten.linear.default, lw.call(aten.linear.default, x, a_weight), b_weight, b_bias)
    a_conv, b_conv = module.lora_A[adapter], module.lora_B[adapter]
    op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[a_conv.weight.dim() - 2]
    a_op = op.padding if isinstance(a_conv.padding, str) else op.default
    a_padding = a_conv.padding if isinstance(a_conv.padding, str) else list(a_conv.padding)
    hidden = lw.call(a_op, x, a_weight, None, list(a_conv.stride), a_padding)
    ones = [1] * len(b_conv.stride)
    return lw.call(op.default, hidden, b_weight, b_bias, ones, [0] * len(ones), ones, b_conv.groups)


def lower_site(lw: Lowering, site: Site, module: nn.Module, present: list[str]):
    """Linear and embedding sites with several adapters (or in the mixed graph): one node reads the
    site's adapters through the site module and picks those the index names (dense graph: the
    module's ``_fxpeft_slots``; mixed graph: each sample's adapter), so a call costs what the
    adapters it uses cost, however many are loaded (``select_adapters``). Conv sites and linear
    sites with one adapter in the dense graph of a call without a KV cache keep the form's plain
    gated delta (None): its dropout draws are PEFT's, and inspection shows its A and B."""
    # a generation graph (one reading a KV cache) picks a lone adapter too: loading a second one between
    # compiled generate calls then leaves its code as it was (no recompile)
    if site.kind == "conv" or (site.kind == "linear" and not (lw.mixed or lw.cached) and len(present) == 1) or (
            site.kind == "linear" and _with_bias(module, present)):  # lora_bias: plain deltas (or the form's kept ones)
        return None
    base_dtype = site_weight(lw.root, site).dtype
    dtype = adapter_dtype(site_weight(lw.root, site))
    # the site module: its adapters are read there (only those in use), by the layout ``lowered`` keeps on it;
    # the stacks kept for calls without autograd, on the lowering root's own KeptStacks under the site's path
    owner = lw.attr(site.path)
    if KEPT_MODULE not in lw.root._modules:
        lw.root.add_module(KEPT_MODULE, KeptStacks())
    kept = lw.attr(KEPT_MODULE)
    embedding = site.kind == "embedding"
    if lw.mixed:
        picked = lw.call(select_adapters, owner, kept, site.path, lw.sample_index, embedding, True)
        stacks = [lw.call(operator.getitem, picked, i) for i in range(3)]
        if embedding:
            padding_idx = site.node.args[2] if len(site.node.args) > 2 else -1
            delta = lw.call(lora_mixed_embedding, site.input, *stacks, padding_idx)
        else:
            x = lw.cast(site.input, dtype, base_dtype)
            delta = lw.call(lora_mixed_linear, x, *stacks)
    elif embedding:
        padding_idx = site.node.args[2] if len(site.node.args) > 2 else -1
        picked = lw.call(select_adapters, owner, kept, site.path, lw.slots(), True, False)
        a, b_t = lw.call(operator.getitem, picked, 0), lw.call(operator.getitem, picked, 1)
        delta = lw.call(lora_slots_embedding, site.input, a, b_t, padding_idx)
    else:
        x = lw.cast(site.input, dtype, base_dtype)
        delta = lw.call(lora_slots, x, owner, kept, site.path, lw.slots())
    return lw.call(aten.add.Tensor, site.output, lw.cast(delta, base_dtype, dtype))


# ----------------------------------------------------------------------------- picking adapters
#
# A site's adapters are picked by an index tensor (graph data, so switching never recompiles).
# Eager, the index is read on the host and only the adapters it names are touched: the
# parameters themselves, through autograd as usual (an adapter no entry names gets no
# gradient, as in PEFT, where inactive adapters are frozen). Under torch.compile all the site's
# adapters are stacked and gathered on the device (``_stacked``): no data-dependent Python, no
# host read, and nothing is cached either way, so every call reads the parameters as they are
# (an optimizer's in-place step is seen by the next call); unused adapters get zero gradients.


def _adapter_tensors(site: nn.Module, name: str, embedding: bool):
    # read through the module dicts directly: this runs per adapter, site and call (nn.Module.__getattr__
    # was most of a mixed decode step's Python)
    modules = site._modules
    value = modules["lora_scaling"]._modules[name]._buffers["value"]
    if embedding:
        return (modules["lora_embedding_A"]._parameters[name], modules["lora_embedding_B"]._parameters[name], value)
    return (modules["lora_A"]._modules[name]._parameters["weight"], modules["lora_B"]._modules[name]._parameters["weight"],
            value)


def _host_list(index: torch.Tensor) -> list[int]:
    """``index`` on the host. Off the CPU the last few reads are remembered by the tensor object
    itself (held here, so neither it nor its memory can be reused) and its version counter (every
    in-place write bumps it): the slots buffer, read at every site, costs one copy per change."""
    if index.device.type == "cpu" or index.is_inference():  # inference tensors keep no version counter
        return index.tolist()
    key = (id(index), index.data_ptr(), index._version)
    hit = _HOST_LISTS.get(key)
    if hit is None:
        if len(_HOST_LISTS) >= 8:
            _HOST_LISTS.pop(next(iter(_HOST_LISTS)))
        hit = _HOST_LISTS[key] = (index, index.tolist())
    return hit[1]


_HOST_LISTS: dict = {}


def _pick(host: list[int], positions, fetch, rank: int, dedupe: bool, slots: Optional[int] = None,
          memo: Optional[dict] = None, own: bool = False):
    """The stacks for ``host`` (global adapter indices): A (S, R, n) and s·B^T (S, R, m), padded to the
    site's largest rank R with zeros, an adapter the site lacks (or the empty index) reading zeros;
    the slot each entry reads (K,); and the local adapter each slot holds (S,), -1 for none (both
    lists: callers that need them on the device convert them).

    ``dedupe=False`` (dense graph): slot k is entry k. ``dedupe=True`` (mixed graph): one slot per
    distinct adapter the entries use, then a zero slot if any entry needs one, then zero slots up to
    ``slots`` (the compiled op's fixed count; never read). ``fetch(j)`` gives local adapter j's
    (A, B, scale): only the adapters in use are read. One slot (one adapter active, the common
    case) is a view of that adapter's tensors, not a copy. ``memo`` (a dict the caller keeps, for calls
    without autograd): several slots' stacks are kept there and reused while the same adapters fill
    the slots and none of their tensors changed (identity, storage and version counter: an optimizer
    step, a load or a ``.to()`` rebuilds them), so a decode step does not copy the adapters again.
    ``own``: the stacks are new contiguous tensors (kept in ``memo``) even for one slot.
    """
    local = {p: j for j, p in enumerate(positions)}
    wanted = [local.get(g, -1) for g in host]
    if dedupe:
        owners = list(dict.fromkeys(j for j in wanted if j >= 0))
        if -1 in wanted or not owners:
            owners.append(-1)
        where = {j: s for s, j in enumerate(owners)}
        entry_slot = [where[j] for j in wanted]
    else:
        owners, entry_slot = wanted, list(range(len(wanted)))
    if slots is not None and len(owners) < slots:
        owners = owners + [-1] * (slots - len(owners))
    tensors = {j: fetch(j) for j in owners if j >= 0}
    key = None
    if memo is not None and (own or len(owners) > 1):
        key = (rank, tuple(owners), tuple((id(t), t.data_ptr(), _version(t)) for j in owners if j >= 0
                                          for t in tensors[j] if isinstance(t, torch.Tensor)))
        kept = memo.get(MEMO)
        if kept is not None and kept[0] == key:
            return kept[1], kept[2], entry_slot, owners
    a0, b0, _ = next(iter(tensors.values())) if tensors else fetch(0)
    zeros = None
    a_rows, b_rows = [], []
    for j in owners:
        if j < 0:
            if zeros is None:
                zeros = a0.new_zeros(rank, a0.shape[1]), b0.new_zeros(rank, b0.shape[0])
            a_rows.append(zeros[0])
            b_rows.append(zeros[1])
            continue
        a, b, scale = tensors[j]
        b_t = (b * scale).t()
        pad = rank - a.shape[0]
        a_rows.append(torch.nn.functional.pad(a, (0, 0, 0, pad)) if pad else a)
        b_rows.append(torch.nn.functional.pad(b_t, (0, 0, 0, pad)) if pad else b_t)
    if len(a_rows) == 1 and not own:
        return a_rows[0][None], b_rows[0][None], entry_slot, owners
    a_stack, b_stack = torch.stack(a_rows), torch.stack(b_rows)
    if key is not None:
        memo[MEMO] = (key, a_stack, b_stack)
    return a_stack, b_stack, entry_slot, owners


MEMO = "_fxpeft_lora_stacks"  # the site module's __dict__ key of _pick's kept stacks


def _version(tensor: torch.Tensor):
    """The version counter and the optimizer steps taken so far (``registry.optimizer_steps``); for an
    inference tensor (which keeps no counter) a value no later key equals."""
    return object() if tensor.is_inference() else (tensor._version, optimizer_steps())


def select_adapters(site: nn.Module, kept: nn.Module, path: str, index: torch.Tensor, embedding: bool, dedupe: bool):
    """(A stack, s·B^T stack, slot of each index entry, local adapter of each slot) for the adapters
    ``index`` names at ``site`` (see ``_pick``): eager reads only those; compiled, see ``_stacked``.
    ``kept``, ``path``: where ``prepare_call`` keeps the site's stacks."""
    kept = _prepared(kept, path, dedupe) if torch.compiler.is_compiling() or not dedupe else None  # eager mixed: _picked
    if kept is not None and dedupe:  # every adapter and the zero slot, as _stacked gives them
        a, b_t, lookup = kept  # tensor ops only: adapters loaded later change shapes, not this code
        owners = torch.arange(a.shape[0], device=index.device)
        return a, b_t, slots_of(lookup, index), torch.where(owners == a.shape[0] - 1, -1, owners)
    if kept is not None:  # owners are only read with dropout, which embeddings have not
        slots = torch.arange(index.shape[0], device=index.device)
        return kept[0], kept[1], slots, slots
    layout = site.__dict__[LAYOUT]
    if torch.compiler.is_compiling():
        return _stacked(site, *layout[:3], index, embedding, dedupe)
    return _picked(site, layout, index, embedding, dedupe, True)


def _device_list(values: list[int], device: torch.device) -> torch.Tensor:
    """``values`` as a long tensor on ``device``. Off the CPU the last few are kept (read-only by
    the ops that take them): a mixed decode step asks for the same slots at every site, and each
    new tensor there is a copy from the host that waits for it."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=torch.long)
    key = (tuple(values), device)
    hit = _DEVICE_LISTS.get(key)
    if hit is None:
        if len(_DEVICE_LISTS) >= 16:
            _DEVICE_LISTS.pop(next(iter(_DEVICE_LISTS)))
        hit = _DEVICE_LISTS[key] = torch.tensor(values, dtype=torch.long, device=device)
    return hit


_DEVICE_LISTS: dict = {}


def _picked(site: nn.Module, layout: tuple, index: torch.Tensor, embedding: bool, dedupe: bool, on_device: bool):
    """Eager :func:`select_adapters` (``on_device``: the slot lists as tensors, else lists). Without autograd
    kept on the site: a later step of the same generate call with the same index takes it as it is, without
    reading the adapters again (generate_step)."""
    names, positions, rank, _ = layout
    host = _host_list(index)
    memo = None if torch.is_grad_enabled() else site.__dict__  # with autograd, stacks are built per call
    step = None if memo is None else generate_step(layout, tuple(host), dedupe, on_device)
    if step is not None and memo.get(PICKED, (None,))[0] == step:
        return memo[PICKED][1]
    fetch = lambda j: _adapter_tensors(site, names[j], embedding)  # noqa: E731
    picked = a, b_t, entry_slot, owners = _pick(host, positions, fetch, rank, dedupe, memo=memo)
    if on_device:
        picked = a, b_t, _device_list(entry_slot, a.device), _device_list(owners, a.device)
    if step is not None:
        memo[PICKED] = step, picked
    return picked


PICKED = "_fxpeft_lora_picked"  # the site module's __dict__ key: the step _picked last answered, and its answer


def _stacked(site: nn.Module, names: tuple, positions: tuple, rank: int, index: torch.Tensor, embedding: bool,
             dedupe: bool):
    """``_pick`` in tensor ops for compiled graphs: every adapter of the site stacked (plus a zero slot)
    and gathered by the index on the device — no host read (which would sync a GPU at every site) and
    nothing opaque to the compiler, at the cost of stacking the site's adapters on every call."""
    a_rows, b_rows = [], []
    for name in names:
        a, b, scale = _adapter_tensors(site, name, embedding)
        pad = rank - a.shape[0]
        a_rows.append(torch.nn.functional.pad(a, (0, 0, 0, pad)))
        b_rows.append(torch.nn.functional.pad((b * scale).t(), (0, 0, 0, pad)))
    a_rows.append(torch.zeros_like(a_rows[0]))
    b_rows.append(torch.zeros_like(b_rows[0]))
    a_stack, b_stack = torch.stack(a_rows), torch.stack(b_rows)  # (P + 1, R, n), (P + 1, R, m)
    if dedupe:  # every slot stays; each entry reads its adapter's
        return (a_stack, b_stack, *_local_slots(positions, index))
    none = len(names)
    local = _local_slots(positions, index)[0]
    return (a_stack.index_select(0, local), b_stack.index_select(0, local),
            torch.arange(index.shape[0], device=index.device), torch.where(local == none, -1, local))


# Compiled calls without autograd read stacks kept for the site instead of stacking every loaded adapter
# per call (which grows with the adapters loaded): ``prepare_call`` keeps them, outside the compiled
# code, before each such call, and the graph trusts them only while ``call_prepared()``. The dense
# graph reads the active slots' stacks; the mixed graph (a call with adapter_names) every adapter of
# the site plus the zero slot, in ``_stacked``'s order.

KEPT_MODULE = "_fxpeft_lora_kept"


class KeptStacks(nn.Module):
    """What ``prepare_call`` keeps for the sites of one lowering root (the model, or one block, each its
    own): site path (relative to the root) -> (dense graph's memo, mixed graph's memo), ``_pick``'s kept
    stacks and what is derived from them. Not on the site itself: torch.compile gives tensors reached
    through a builtin module (nn.Linear) static shapes, and these change size when adapters are loaded
    (they are marked dynamic); reached from the root, blocks sharing one code share its compiled form."""

    def __init__(self):
        super().__init__()
        self.__dict__["stacks"] = {}


def _memo(kept: nn.Module, path: str, mixed: bool) -> Optional[dict]:
    memos = kept.__dict__["stacks"].get(path)
    return None if memos is None else memos[mixed]


SITES = "_fxpeft_lora_sites"  # gm._fxpeft_memo key: _slot_sites' list


FLAT = "flat"  # beside _pick's memo: the dense stacks as two matrices (S·R, in) and (S·R, out)


DERIVED = "derived"  # beside _pick's memo: the stacks FLAT / LOOKUP were derived from


LOOKUP = "lookup"  # beside the mixed graph's memo: (positions, global adapter index -> local slot)


def _prepared(kept: nn.Module, path: str, mixed: bool, flat: bool = False):
    """The (A, s·B^T) stacks ``prepare_call`` kept for the site at ``path`` for this call (``flat``: as the
    matrices (S·R, in) and (S·R, out); ``mixed``: and the slot each global adapter index reads), or None."""
    if torch.is_grad_enabled() or not call_prepared():
        return None
    kept = _memo(kept, path, mixed)
    if kept is None or MEMO not in kept:
        return None
    if mixed:
        return (*kept[MEMO][1:], kept[LOOKUP][1])
    return kept[FLAT] if flat else kept[MEMO][1:]


LAYOUT = "_fxpeft_lora_layout"  # site __dict__ key: (names, global positions, rank, dropout), set by ``lowered``


def lowered(gm) -> None:
    """After every lowering: the layout each index-picking site's graph nodes read at run time (names,
    global positions and rank of its adapters, whether any has dropout), so that their code, the same
    for any adapters, survives adding one (a compiled caller does not recompile); and a KeptStacks of
    its own for every lowering root (blocks sharing a lowering got the first one's)."""
    kept_roots(gm, KEPT_MODULE, KeptStacks)
    sites = gm._fxpeft_memo[SITES] = _slot_sites(gm)
    for s in sites:
        s.site.__dict__[LAYOUT] = (s.names, s.positions, s.rank,
                                   any(s.site.lora_scaling[a].dropout > 0 for a in s.names))


class SlotSite(NamedTuple):
    """A module whose graphs pick its adapters by an index (``lower_site``: embeddings, and linear sites
    without LoRA bias)."""

    site: nn.Module
    names: tuple[str, ...]  # its adapters
    positions: tuple[int, ...]  # theirs in peft_config
    rank: int  # the largest of theirs
    embedding: bool
    dense: bool  # the dense graph picks too (embeddings, several adapters; a graph with a KV cache always does)
    kept: nn.Module  # the KeptStacks of its lowering root
    path: str  # its path from that root
    named: dict  # position -> adapter name


def _slot_sites(gm) -> list[SlotSite]:
    position = {name: index for index, name in enumerate(gm.peft_config)}
    blocks = sorted(gm._fxpeft_block_paths, key=len, reverse=True)
    found = []
    for path, module in registry_of(gm).base_modules(gm, keep=(NESTED,)):  # not into any adapter's state
        present = _lora_adapters(module)
        if not present:
            continue
        embedding = "lora_embedding_A" in module._modules and present[0] in module.lora_embedding_A
        if not embedding and (not isinstance(module.lora_A[present[0]], nn.Linear) or _with_bias(module, present)):
            continue
        rank = max(_adapter_tensors(module, a, embedding)[0].shape[0] for a in present)
        block = next((b for b in blocks if path.startswith(b + ".")), None)
        root = gm if block is None else gm.get_submodule(block)
        found.append(SlotSite(module, tuple(present), tuple(position[a] for a in present), rank, embedding,
                              embedding or len(present) > 1, root._modules[KEPT_MODULE],
                              path if block is None else path[len(block) + 1:],
                              {position[a]: a for a in present}))
    return found


def prepare_call(gm, mixed: bool, cached: bool, compiled: bool) -> None:
    """Before a call without autograd: each index-picking site's stacks for the graph the call runs,
    rebuilt only when the slots or an adapter they hold changed (``_pick``'s memo: identity, storage,
    version of each tensor), checked once per ``generate`` call and per other call. A lone adapter in a
    generation graph is read as it is when eager (``lora_slots``); compiled, from stacks, so that a second one
    loaded later leaves the code as it was."""
    if mixed and not compiled:  # eager mixed graphs pick the adapters each call names (_picked)
        return
    lowering, lone_too = gm._fxpeft_memo.get(SITES, ()), cached and compiled
    sites = [s for s in lowering if mixed or s.dense or lone_too]  # those whose graph reads kept stacks
    if not sites:
        return
    host = None if mixed else _host_list(gm._buffers["_fxpeft_slots"])
    # a later step of the same generate call reads the adapters as its first step found them (generate_step)
    step = generate_step(lowering, None if host is None else tuple(host), lone_too)
    if step is not None and gm._fxpeft_memo.get((STEP, mixed)) == step:
        return
    # a decode step usually finds everything as the last call of its kind left it: one check for all sites
    stamp = _call_stamp(lowering, sites, host, lone_too)
    if stamp is not None and gm._fxpeft_memo.get((STAMP, mixed)) == stamp:
        gm._fxpeft_memo[STEP, mixed] = step
        return
    for site, names, positions, rank, embedding, dense, kept, path, _ in sites:
        fetch = lambda j, site=site, names=names, embedding=embedding: _adapter_tensors(site, names[j], embedding)  # noqa: E731
        if is_sharded(fetch(0)[0]):  # sharded (FSDP2) until its block's forward: stack per call
            (_memo(kept, path, mixed) or {}).clear()
            continue
        memo = kept.__dict__["stacks"].setdefault(path, ({}, {}))[mixed]
        # mixed: every adapter once, then the zero slot (an index no adapter has; dedupe keeps first-use order)
        _pick(list(positions) + [-1] if mixed else host, positions, fetch, rank, mixed, memo=memo, own=True)
        stacks = memo[MEMO]
        if memo.get(DERIVED) is stacks and (not mixed or memo[LOOKUP][0] == positions):
            continue
        memo[DERIVED] = stacks
        # sizes that adapters loaded later change (slots, rank) are dynamic in the compiled code from its
        # first compile: loading one does not recompile it
        if mixed:
            memo[LOOKUP] = (positions, slot_lookup(positions, stacks[1].device))
            for tensor in (*stacks[1:], memo[LOOKUP][1]):
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
            for tensor in stacks[1:]:
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
        else:
            # not views (detach: the same storage, no _base): dynamo guards a view's base too, in Python
            memo[FLAT] = (stacks[1].flatten(0, 1).detach(), stacks[2].flatten(0, 1).detach())
            for tensor in memo[FLAT]:
                torch._dynamo.maybe_mark_dynamic(tensor, 0)
            for tensor in stacks[1:]:
                torch._dynamo.maybe_mark_dynamic(tensor, 1)
    gm._fxpeft_memo[STAMP, mixed] = stamp
    gm._fxpeft_memo[STEP, mixed] = step


STAMP = "lora_call_stamp"  # gm._fxpeft_memo key (with the call's mixed flag): _call_stamp of the last prepare_call
STEP = "lora_generate_step"  # beside it: the generate call, steps, lowering and slots the last prepare_call found


def _call_stamp(lowering: list, sites: list, host: Optional[list], lone_too: bool) -> Optional[tuple]:
    """What ``prepare_call`` reads, in one value: the lowering's sites list (a new one per lowering; ``sites``,
    those the call prepares, follow from it and ``lone_too``), the slots, and the identity, storage and version
    of each tensor of the adapters the call's stacks hold (as ``_pick``'s memo keys: the dense graph's, those
    in the slots, however many are loaded; the mixed graph's, all), with the optimizer steps taken. Equal to
    the last call's: every site's kept stacks are still right. None (no shortcut) when a tensor keeps no
    version counter (inference tensors) or is sharded (stacked per call)."""
    tensors = [t for s in sites for name in (s.names if host is None else [s.named[p] for p in host if p in s.named])
               for t in _adapter_tensors(s.site, name, s.embedding)]
    if any(is_sharded(t) for t in tensors[::3]):  # FSDP2 shards a site's adapters together
        return None
    try:
        prints = tuple([(id(t), t.data_ptr(), t._version) for t in tensors])
    except RuntimeError:  # an inference tensor: no version counter
        return None
    return lowering, None if host is None else tuple(host), lone_too, optimizer_steps(), prints


def _local_slots(positions: tuple, index: torch.Tensor):
    """Tensor ops: each index entry's local adapter (global -> local; ``len(positions)``, the zero
    slot, for an adapter the site lacks or the empty index) and each stacked slot's local adapter
    (-1 for the zero slot)."""
    none, owners = len(positions), torch.arange(len(positions) + 1, device=index.device)
    return slots_of(slot_lookup(positions, index.device), index), torch.where(owners == none, -1, owners)


def lora_slots(x, site: nn.Module, kept: nn.Module, path: str, slots: torch.Tensor) -> torch.Tensor:
    """The active adapters of a linear site in one computation: ``x [A_s1^T|A_s2^T|…] [s1·B_s1^T; …]``;
    LoRA dropout while the site module trains (its probability per adapter is data,
    ``<path>.lora_scaling.<adapter>.p``). A lone adapter (a generation graph's) is read as it is when
    eager: two linears, as PEFT computes it."""
    compiling = torch.compiler.is_compiling()
    if not compiling:
        names, positions, _, dropout = site.__dict__[LAYOUT]
        if len(names) == 1 and not (site.training and dropout):
            a, b, value = _adapter_tensors(site, names[0], False)
            if positions[0] in _host_list(slots):
                return torch.nn.functional.linear(torch.nn.functional.linear(x, a), b) * value
            return x.new_zeros(*x.shape[:-1], b.shape[0])
    # compiled: dynamo guards on what it reads, so the layout (which a load changes) is read only where needed
    dropout = site.training and site.__dict__[LAYOUT][3]
    kept = None if dropout else _prepared(kept, path, False, flat=True)
    if kept is not None:
        return torch.matmul(torch.nn.functional.linear(x, kept[0]), kept[1])
    layout = site.__dict__[LAYOUT]
    names, positions, rank, _ = layout
    if compiling:
        a, b_t, _, owners = _stacked(site, names, positions, rank, slots, False, False)  # (S, R, in/out)
    else:
        a, b_t, _, owners = _picked(site, layout, slots, False, False, dropout)
    if dropout:  # each active adapter sees its own dropout of x
        p = [site.lora_scaling[n].p for n in names]
        p = torch.stack(p + [torch.zeros_like(p[0])]).index_select(0, owners % (len(names) + 1))  # -1: none
        out = None
        for slot in range(a.shape[0]):
            dropped = x * (torch.rand_like(x) >= p[slot]).to(x.dtype) / (1 - p[slot])
            term = (dropped @ a[slot].t()) @ b_t[slot]
            out = term if out is None else out + term
        return out
    return torch.matmul(torch.matmul(x, a.reshape(-1, a.shape[-1]).t()), b_t.reshape(-1, b_t.shape[-1]))


def lora_slots_embedding(ids, a, b_t, padding_idx: int = -1):
    """Embedding sites, the active adapters (``a`` (S, R, num), ``b_t`` (S, R, dim)): one lookup in
    the concatenated A tables."""
    table = a.permute(2, 0, 1).reshape(a.shape[2], -1)
    hidden = torch.nn.functional.embedding(ids, table, padding_idx if padding_idx >= 0 else None)
    return hidden @ b_t.reshape(-1, b_t.shape[-1])


# per-sample adapters (adapter_names=[...]): one gathered computation for the whole batch


def lora_mixed_linear(x, a, b_t, entry_slot):
    """Row b of the batch gets ``x_b A_j^T s_j B_j^T``, j its adapter: the stacks hold the adapters
    the batch uses (A (S, R, in), s·B^T (S, R, out)) and a zero slot for "no adapter"; gathering per
    sample and two batched matmuls replace a loop over adapters. Eager, with few tokens per row against
    the slots (a decode step: one token), two plain matmuls over all slots, each row's hidden masked to
    its own slot, cost less than gathering a copy of the stacks per row (S times LoRA's flops, no copy).
    Compiled code always gathers: inductor's gather is as fast there at 9 slots and does not grow with
    them, and a choice by the slot count would guard on it (a load past the threshold would recompile)."""
    batch = entry_slot.shape[0]
    rows = x.reshape(batch, -1, x.shape[-1])
    slots, rank = a.shape[0], a.shape[1]
    if not torch.compiler.is_compiling() and rows.shape[1] * slots <= 16:
        hidden = rows @ a.reshape(slots * rank, -1).t()  # (batch, T, S·R)
        own = (entry_slot[:, None] == torch.arange(slots, device=x.device)).to(hidden.dtype)  # (batch, S): one-hot
        hidden = (hidden.unflatten(-1, (slots, rank)) * own[:, None, :, None]).flatten(-2)
        delta = hidden @ b_t.reshape(slots * rank, -1)
        return delta.reshape(*x.shape[:-1], delta.shape[-1])
    hidden = torch.bmm(rows, a.index_select(0, entry_slot).transpose(1, 2))
    delta = torch.bmm(hidden, b_t.index_select(0, entry_slot))
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def lora_mixed_embedding(ids, a, b_t, entry_slot, padding_idx: int = -1):
    """Embedding sites: each token reads its own sample's adapter's A column, no table copied."""
    batch = entry_slot.shape[0]
    flat = ids.reshape(batch, -1)
    hidden = a[entry_slot.unsqueeze(1), :, flat]  # (batch, T, R)
    if padding_idx >= 0:  # as F.embedding's padding_idx: that row takes no gradient
        hidden = torch.where((flat == padding_idx).unsqueeze(-1), hidden.detach(), hidden)
    delta = torch.bmm(hidden, b_t.index_select(0, entry_slot))
    return delta.reshape(*ids.shape, delta.shape[-1])


# ----------------------------------------------------------------------------- folding


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """s * B A in the layout of the site's weight (what merging adds to it)."""
    scale = module.lora_scaling[adapter].scale
    if site.kind == "embedding":
        a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
        return (b @ a).T * scale
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if site.kind == "linear":
        delta = b @ a
        return (delta.T if site.fan_in_fan_out else delta) * scale
    if module.lora_B[adapter].groups != 1:
        raise NotImplementedError(f"Merging LoRA into the grouped convolution {site.path} is not supported.")
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[a.dim()]
    return conv(a.transpose(0, 1), b).transpose(0, 1) * scale


def delta_factors(gm, site: Site, module: nn.Module, adapter: str) -> Optional[tuple]:
    """A linear site's ΔW as (out, in) = (s B) A (generation graphs of ``lora_bias`` sites)."""
    if site.kind != "linear":
        return None
    return module.lora_A[adapter].weight, module.lora_B[adapter].weight * module.lora_scaling[adapter].scale


def delta_bias(gm, site: Site, module: nn.Module, adapter: str) -> Optional[torch.Tensor]:
    """lora_bias: s * (B's bias), what merging adds to the base bias."""
    b = module.lora_B[adapter] if "lora_B" in module._modules and adapter in module.lora_B else None
    return None if b is None or b.bias is None else b.bias * module.lora_scaling[adapter].scale


def _rank(module: nn.Module, adapter: str) -> str:
    a = module.lora_A[adapter].weight if "lora_A" in module._modules and adapter in module.lora_A \
        else module.lora_embedding_A[adapter]
    return f"r={a.shape[0]}"


def _with_bias(module: nn.Module, adapters) -> bool:
    """Whether one of ``adapters`` at a linear site has ``lora_bias`` (a bias on B)."""
    holder = module._modules.get("lora_B")
    return holder is not None and any(a in holder and holder[a].bias is not None for a in adapters)


def _declined(site: Site, module: nn.Module, adapters) -> bool:
    """The sites of generation graphs lower_site leaves to the form's kept deltas: conv sites, lora_bias ones."""
    return site.kind == "conv" or _with_bias(module, adapters)


def _lora_adapters(module: nn.Module) -> list[str]:
    """The module's plain LoRA adapters (DoRA adapters, passes/dora.py, share LoRA's state)."""
    scales = module._modules.get("lora_scaling")
    if scales is None:
        return []
    dora = module._modules.get("lora_magnitude_vector") or {}
    return [name for name, gate in scales.items() if name not in dora and not isinstance(gate, ParamGate)]


METHOD = register_method(with_parameters(with_replication(with_tying(with_tokens(additive(
    name="lora", config_type=LoraConfig, create=add_lora, delta=delta, delta_weight=delta_weight, delta_bias=delta_bias,
    delta_factors=delta_factors, kept_where=_declined,
    containers=CONTAINERS, gates="lora_scaling", dropouts="lora_dropout",
    dtype_of=lambda module, adapter: module.lora_A[adapter].weight.dtype,
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads, lower_site=lower_site, adapters_at=_lora_adapters,
    describe=_rank, check_site=check_site, initial_conversion=initial_conversion, changes_base=changes_base,
    prepare_call=prepare_call, lowered=lowered, mixable="adds")), add_lora))))
