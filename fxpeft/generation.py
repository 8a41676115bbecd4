"""Generation: transformers' ``generate`` over fxpeft's graphs, with a KV cache the graphs write in place.

Decoding (greedy, sampling, beam search), logits processing, stopping and the output types are
transformers' own: the result's class inherits the model's class, so ``GenerationMixin.generate``
drives the loop. What fxpeft decides is how one forward step runs:

- ``generate`` asks for transformers' static cache (``cache_implementation="static"``): per layer a
  key and a value tensor (batch, kv_heads, max_len, head_dim) and a 0-d ``cumulative_length``,
  allocated once per ``generate`` call and written in place.
- A call with a cache passes those tensors to the graph as inputs (:func:`cache_tensors`). The
  graph for such calls is captured once, around a cache object rebuilt over the traced tensors
  (:func:`cache_shell`), so the writes it records (``index_copy_`` of the new keys and values,
  ``add_`` on the length) land in the caller's cache. Prefill and decode share that graph (the
  query length is a dynamic dim): a decode step reads one token and attends over the cache (on the
  CPU over its filled positions only, :func:`cache_shell`).
- ``adapter_names=`` becomes a per-sequence index tensor passed as a model keyword, which
  transformers repeats for beams and returned sequences like any per-sequence input; the
  dispatcher runs the signature's mixed graph with it.
- Seq2seq models: the encoder runs once through the whole model's graph (:func:`_encoder_outputs`);
  the cross-attention cache is written by the first decoder step and read by later ones (``SELF``).
- Prompt methods: their virtual tokens go into the cache once (``Method.prefill_cache``,
  :func:`_with_virtual_tokens`; an encoder-decoder's encoder runs first and may carry them in its
  outputs); graphs with a cache leave them to it. The steps after them get the 2-D attention mask
  (:func:`masks_for_generate`), as PEFT's forward gives it.
- ``compile_config``: transformers compiles the decode step; fxpeft checks the config first and lets
  it compile on the CPU too (:func:`checked_compile_config`).
- Deployment: :func:`decoding_files`, for ``export_merged(generation=True)``.
"""
from __future__ import annotations

import copy
import inspect
import itertools
import warnings
import weakref
from typing import Any, Callable, Optional

import torch
from torch.utils import _pytree as pytree

from . import capture as capture_mod
from .registry import optimizer_steps

CACHE_NAMES = ("cache", "past_key_values")  # transformers 5.24 renamed past_key_values (deprecated until 5.40)


def _kv_fixed(tensor: torch.Tensor) -> tuple:
    """A KV cache's (batch, heads, positions, head size) tensors: heads and head size are the model's, static
    when captured (T5's first generate call: 10.2-10.4 -> 8.9-9.2 s on the tests' tiny model)."""
    return (1, 3) if tensor.ndim == 4 else ()


CACHE_FIXED = {name: _kv_fixed for name in CACHE_NAMES}  # capture.export_program's fixed


def is_cache(value) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(value, Cache)


# An encoder-decoder cache reaches the graph as a dict: the decoder's self-attention layers, and the
# cross-attention layers under a name that says whether the encoder's keys and values are in them
# yet (the model branches on that in Python: the first decoder step writes them, later ones read them).
SELF, CROSS, CROSS_FILLED = "self_attention", "cross_attention", "cross_attention_filled"


def cache_tensors(gm, cache, query: Optional[torch.Tensor]):
    """The (keys, values, cumulative_length) of each layer of a static cache, allocated here if the
    cache has not been used yet (for an ``EncoderDecoderCache`` a dict, see ``SELF``). Raises for
    caches the graphs cannot write, and for a prompt longer than the cache. ``query``: the tokens the
    cache grows by, as ids (batch, tokens) or embeddings (batch, tokens, hidden)."""
    from transformers.cache_utils import EncoderDecoderCache

    if isinstance(cache, EncoderDecoderCache):
        filled = set(cache.is_updated.values())
        if len(filled) > 1:
            raise NotImplementedError("This EncoderDecoderCache holds the encoder's keys and values for some layers "
                                      "only; fxpeft graphs take a cross-attention cache that is empty or full.")
        return {SELF: _layer_tensors(gm, cache.self_attention_cache, query, own=True),
                (CROSS_FILLED if filled == {True} else CROSS): _layer_tensors(gm, cache.cross_attention_cache, query)}
    return _layer_tensors(gm, cache, query, own=True)


def _layer_tensors(gm, cache, query, own: bool = False) -> list[tuple[torch.Tensor, ...]]:
    """``own``: a self-attention cache (the tokens so far: checked against the prompt, and allocated with a
    spare position when ``generate`` made it, see :func:`allocate`); else a cross-attention one."""
    from transformers.cache_utils import StaticLayer

    kinds = {type(layer).__name__ for layer in getattr(cache, "layers", [cache]) if type(layer) is not StaticLayer}
    if kinds:
        raise NotImplementedError(
            f"fxpeft graphs decode with transformers' static cache (StaticCache, one StaticLayer per layer; a "
            f"decoder's DynamicCache of plain layers is read as one, except by a module torch.compile wraps: "
            f"generate's compile_config reads it); this {type(cache).__name__} holds "
            f"{sorted(kinds)}. Call generate without a cache object (fxpeft picks the static cache), or pass a "
            "transformers.StaticCache or DynamicCache.")
    if not all(layer.is_initialized for layer in cache.layers):
        shape = gm._get_static_cache_init_shape()
        if shape is None or query is None:
            raise NotImplementedError(f"Cannot allocate a static cache for {type(gm).__name__}: transformers gives no "
                                      "head shapes for it (or the call has neither input_ids nor inputs_embeds).")
        allocate(cache, query.shape[0], shape, gm.dtype, query.device,
                 spare=own and gm.__dict__.get("_fxpeft_generating", False))
    tensors = [(layer.keys, layer.values, layer.cumulative_length) for layer in cache.layers]
    if own and query is not None and query.shape[1] > 1:  # prefill: the only step that can overflow
        capacity, cached = tensors[0][0].shape[2] - getattr(cache, "_fxpeft_spare", 0), int(tensors[0][2])
        if cached + query.shape[1] > capacity:
            raise ValueError(
                f"The prompt has {query.shape[1]} tokens" + (f" (after {cached} cached)" if cached else "")
                + f" but the KV cache holds {capacity}: use a cache with max_cache_len >= "
                f"{cached + query.shape[1]} plus the tokens to generate.")
    return tensors


def mark_attended(call: dict) -> None:
    """Before a compiled call with a cache: the masks' last dim (cut by :func:`masks_for_generate`: the
    positions the step attends over, see :func:`cache_shell`) grows by one each step; dynamic from the
    first compile, so the decode step does not compile again for the second."""
    if cache_name_of(call) is None:
        return
    for name in ("attention_mask", "decoder_attention_mask"):
        for leaf in pytree.tree_leaves(call.get(name)):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "cpu":  # where masks_for_generate cuts
                torch._dynamo.maybe_mark_dynamic(leaf, leaf.ndim - 1)


def allocate(cache, rows: int, shape: tuple, dtype: torch.dtype, device: torch.device, spare: bool = True) -> None:
    """A static cache's tensors. With ``spare`` (a cache ``generate`` made, not the caller's), on the CPU
    one position longer than asked, so that the positions a step attends over (see :func:`cache_shell`)
    are never the whole tensor: a compiled step guards on whether they are (contiguity), and the last
    step of a ``generate`` call would fill the cache transformers sizes."""
    if spare:  # not the caller's: the error for a long prompt names the length asked for; a later call may grow it
        cache._fxpeft_spare = int(torch.device(device).type == "cpu")
        for layer in cache.layers:
            layer.max_cache_len += cache._fxpeft_spare
    cache.early_initialization(rows, *shape, dtype=dtype, device=device)


def fit_given_cache(gm, args: tuple, kwargs: dict) -> None:
    """A decoder's static cache passed to ``generate`` that cannot hold this call's tokens and the new ones
    (the last new token is never fed back: ``max_length - 1`` positions, as transformers sizes its own): grown,
    keeping what it holds, where an earlier ``generate`` made it (a returned one, to continue from:
    ``cache=out.cache``; sized for that call: PEFT's default dynamic cache grows, and a script continuing from
    it should run; a compiled decode step compiles again for the longer cache), else a clear error naming
    both lengths before any compute (transformers would fail at the step that overflows)."""
    from transformers.cache_utils import StaticLayer

    cache = kwargs.get(cache_name_of(kwargs))
    layers, prompt = getattr(cache, "layers", None), prompt_of(args, kwargs)
    if (not layers or getattr(gm.config, "is_encoder_decoder", False) or prompt is None
            or not all(type(layer) is StaticLayer for layer in layers)):
        return  # (other kinds are refused by the first step)
    needed = positions_needed(gm, kwargs, prompt)
    spare = getattr(cache, "_fxpeft_spare", None)
    capacity = layers[0].max_cache_len - (spare or 0)
    if needed <= capacity:
        return
    if spare is None:  # the caller's: sized as they chose
        raise ValueError((f"The prompt has {prompt.shape[1]} tokens but the KV cache holds {capacity}" if
                          prompt.shape[1] > capacity else f"The KV cache holds {capacity} positions but this call "
                          f"needs {needed} ({prompt.shape[1]} tokens so far, then the new ones)")
                         + f": use a cache with max_cache_len >= {needed}, or none.")
    for layer in layers:  # (made by generate: allocated)
        for name in ("keys", "values"):
            old = getattr(layer, name)
            new = old.new_zeros(*old.shape[:2], needed + spare, old.shape[3])
            new[:, :, :old.shape[2]] = old
            torch._dynamo.mark_static_address(new)
            setattr(layer, name, new)
        layer.max_cache_len = needed + spare


def positions_needed(gm, kwargs: dict, prompt: torch.Tensor) -> int:
    """The cache positions a ``generate`` call fills after ``prompt`` (the tokens so far): ``max_length - 1``,
    the last new token never being fed back (transformers sizes its own static cache so)."""
    return prompt.shape[1] + new_tokens(call_config(gm, kwargs), prompt.shape[1]) - 1


def prompt_of(args: tuple, kwargs: dict, names=("input_ids", "inputs", "inputs_embeds")) -> Optional[torch.Tensor]:
    """A call's prompt: its first positional argument, or the first of ``names`` it is given."""
    found = args[0] if args else next((kwargs[name] for name in names if kwargs.get(name) is not None), None)
    return found if isinstance(found, torch.Tensor) else None


def is_dynamic(cache) -> bool:
    """transformers' DynamicCache of plain layers (a decoder's default cache): fxpeft's graphs read it as a
    static cache over what it holds (:func:`static_over`), appended to after the call (:func:`written_back`)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


def static_over(gm, dynamic, length: int, spare: bool = False):
    """A static cache ``length`` positions long holding what ``dynamic`` holds (allocated now where that is
    anything, else by the first step; ``spare``: see :func:`allocate`), to be written back into it."""
    from transformers import StaticCache

    static, held = StaticCache(config=gm.config, max_cache_len=length), dynamic.get_seq_length()
    if held:
        first = dynamic.layers[0].keys
        allocate(static, first.shape[0], gm._get_static_cache_init_shape(), first.dtype, first.device, spare)
        with torch.no_grad():
            for mine, theirs in zip(static.layers, dynamic.layers):
                mine.keys[:, :, :held] = theirs.keys
                mine.values[:, :, :held] = theirs.values
                mine.cumulative_length.fill_(held)
    static._fxpeft_dynamic = (dynamic, held)
    return static


def cache_for_use_cache(gm, kwargs: dict, compiled: bool = False, warn: bool = True) -> None:
    """A forward call with ``use_cache=True`` and no cache object: transformers' model returns the cache it
    made, which a caller's own decoding loop passes back with the next token. fxpeft's graphs are captured
    without one and returned None (the next step then ran without the tokens before it, silently). A
    decoder's call gets a DynamicCache here, read and written as one the caller passed (:func:`static_over`);
    where none can be given (``compiled``: a call ``torch.compile(gm)`` runs), a warning says so (``warn``:
    a caller asking early, whose call will ask again, leaves the warning to that call)."""
    if kwargs.get("use_cache") is not True or cache_name_of(kwargs) is not None:
        return
    name = cache_argument(gm)
    if name is None:
        return
    from transformers import DynamicCache

    cache = None
    why = ("it runs under torch.compile (pass a transformers StaticCache to get one)" if compiled else
           "it is an encoder-decoder model (pass an EncoderDecoderCache of two StaticCaches to get one)"
           if getattr(gm.config, "is_encoder_decoder", False) else
           "autograd is on (training graphs take no cache)" if torch.is_grad_enabled() else
           f"adapter {gm._fxpeft_prefilled!r} puts its virtual tokens into the cache first (gm.generate does)"
           if gm._fxpeft_prefilled is not None else None)
    if why is None:
        cache = DynamicCache(config=gm.config)
        if not is_dynamic(cache):  # sliding-window or other layers the graphs cannot read as a static cache
            why = (f"the model's cache holds {sorted({type(layer).__name__ for layer in cache.layers})} (pass a "
                   "transformers StaticCache to get one)")
    if why is not None:
        if warn:
            warnings.warn(f"use_cache=True: this call returns no KV cache, as {why}; a decoding loop that passes "
                          "the returned cache back would run each step without the tokens before it.", stacklevel=4)
        return
    kwargs[name] = cache


def written_back(static):
    """The DynamicCache ``static`` was made over (:func:`static_over`), with the positions written since
    appended, as the model's own steps over it would have."""
    dynamic, held = static._fxpeft_dynamic
    for index, layer in enumerate(static.layers):
        filled = int(layer.cumulative_length) if layer.is_initialized else held
        if filled > held:
            dynamic.update(layer.keys[:, :, held:filled].clone(), layer.values[:, :, held:filled].clone(), index)
    return dynamic


def _dynamic_to_static(gm, args: tuple, kwargs: dict):
    """``generate`` with a DynamicCache (given, or ``cache_implementation="dynamic"``) on a decoder: the call
    decodes over a static cache holding what it holds, sized for the call (written back when it ends, see
    :func:`written_back`); the static cache, or None."""
    from transformers import DynamicCache

    name = cache_name_of(kwargs)
    config = kwargs.get("generation_config") or gm.generation_config
    asked = kwargs.get("cache_implementation", getattr(config, "cache_implementation", None)) == "dynamic"
    prompt = prompt_of(args, kwargs)
    if (getattr(gm.config, "is_encoder_decoder", False) or prompt is None
            or not (is_dynamic(kwargs.get(name)) or asked and name is None)):
        return None
    if name is None:  # asked for by name: the call returns a DynamicCache, as transformers' would
        name = cache_argument(gm) or "past_key_values"
        kwargs[name] = DynamicCache(config=gm.config)
        if kwargs.get("generation_config") is not None:
            kwargs["generation_config"] = copy.deepcopy(kwargs["generation_config"])
            kwargs["generation_config"].cache_implementation = None
        kwargs["cache_implementation"] = None  # (the model's config may name it too: not with a cache object)
    kwargs[name] = static = static_over(gm, kwargs[name], positions_needed(gm, kwargs, prompt), spare=True)
    return static


def call_config(gm, kwargs: dict):
    """A ``generate`` call's generation config: the one it is given or the model's, updated by its arguments."""
    config = copy.deepcopy(kwargs.get("generation_config") or gm.generation_config)
    config.update(**{k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask")})
    return config


def new_tokens(config, prompt_length: int) -> int:
    """The most tokens a ``generate`` call with this config makes after a prompt this long."""
    return config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_length


def cache_written(cache) -> None:
    """After a graph ran on ``cache``: the cross-attention keys and values are in it now (the graph
    wrote them but cannot set the Python flags the model reads on the next step)."""
    for layer in getattr(cache, "is_updated", {}):
        cache.is_updated[layer] = True


def cache_shell(tensors, seen_tokens=None, attended=None):
    """A transformers cache over the given (possibly traced) tensors; its length is the tensors' own
    (a dynamic dim under export, not a baked-in constant). ``seen_tokens``: what the self-attention
    layers answer to ``get_seq_length`` instead of their length tensor (see :func:`_with_shell`).
    ``attended``: how many of the self-attention cache's first positions a step attends over (the
    attention mask's length: the cached and the new tokens), where the static layer would attend over
    all it holds; the new keys and values are written into the whole tensors first, and the step
    reads a view of them (inductor copies a view written into whole every step, and reads a view
    of an input in place). On a CPU SDPA's time grows with the positions (per layer at batch 8: 65 us
    over 96, 300 over 400), and transformers sizes each static cache for the longest it has made."""
    from transformers.cache_utils import Cache, EncoderDecoderCache, StaticLayer

    if isinstance(tensors, dict):  # built field by field: __init__ would read the traced lengths as bools
        shell = EncoderDecoderCache.__new__(EncoderDecoderCache)
        cross = CROSS_FILLED if CROSS_FILLED in tensors else CROSS
        shell.self_attention_cache = cache_shell(tensors[SELF], seen_tokens, attended)
        shell.cross_attention_cache = cache_shell(tensors[cross])
        shell.is_updated = {index: cross == CROSS_FILLED for index in range(len(tensors[cross]))}
        return shell

    class ShellLayer(StaticLayer):
        def get_seq_length(self):
            return super().get_seq_length() if seen_tokens is None else seen_tokens

        def update(self, key_states, value_states, *args, **kwargs):
            keys, values = super().update(key_states, value_states, *args, **kwargs)
            return (keys, values) if attended is None else (keys[:, :, :attended], values[:, :, :attended])

        def get_mask_sizes(self, query_length):  # a 2-D mask's padding, the causal mask's columns
            return super().get_mask_sizes(query_length) if attended is None else (attended, 0)

    layers = []
    for keys, values, length in tensors:
        layer = ShellLayer(max_cache_len=keys.shape[2])
        layer.keys, layer.values, layer.cumulative_length = keys, values, length
        layer.device = keys.device
        layer.batch_size, layer.num_heads = keys.shape[:2]
        layer.k_head_dim, layer.v_head_dim = keys.shape[-1], values.shape[-1]
        layer.is_initialized = True
        layers.append(layer)
    return Cache(layers=layers)


def _with_shell(given: dict) -> dict:
    """The call with its cache tensors wrapped in a cache object. A call that leaves the positions to
    the model (no ``position_ids``: generation after virtual tokens, see :func:`_with_virtual_tokens`)
    and passes a 2-D attention mask gets a cache whose ``get_seq_length`` is the mask's length minus
    the new tokens: transformers' contract for such masks (past and new tokens), and a size export can
    reason about where the length tensor would be a data-dependent value (OPT slices its positions
    with it). Steps attend over the positions the mask covers (``attended``, see :func:`cache_shell`)."""
    seen = None
    prefix = "decoder_" if "decoder_input_ids" in given else ""
    mask, query = given.get(prefix + "attention_mask"), given.get(prefix + "input_ids", given.get(prefix + "inputs_embeds"))
    if prefix + "position_ids" not in given and mask is not None and mask.ndim == 2 and query is not None:
        seen = mask.shape[-1] - query.shape[1]
    attended = next((leaf.shape[-1] for leaf in pytree.tree_leaves(mask) if isinstance(leaf, torch.Tensor)), None)
    return {name: cache_shell(value, seen, attended) if name in CACHE_NAMES else value for name, value in given.items()}


def _without_cache(output):
    """The graph returns no cache object (the caller holds it; the graph wrote into its tensors)."""
    if isinstance(output, dict):
        return type(output)(**{k: v for k, v in output.items() if k not in CACHE_NAMES})
    return output


def _resized(tensor: torch.Tensor, shape) -> torch.Tensor:
    """``tensor`` tiled or cut to ``shape``."""
    reps = [-(-new // old) for new, old in zip(shape, tensor.shape)]
    return tensor.repeat(reps)[tuple(slice(0, n) for n in shape)].clone()


def small_example(call: dict, cache_name: str) -> dict:
    """An example of a call with a cache for torch.export: batch and query length at least 2 (export
    specialises sizes 1), a short self-attention cache (the example is kept, to capture again after
    ``.to()``). Encoder-side inputs (an encoder-decoder's ``attention_mask``, ``encoder_outputs``, the
    cross-attention cache) keep their length: the encoder's."""
    cache = call[cache_name]
    keys = (cache[SELF] if isinstance(cache, dict) else cache)[0][0]
    decoder = "decoder_input_ids" in call or isinstance(cache, dict)
    prefix = "decoder_" if decoder else ""
    batch, length = keys.shape[0], keys.shape[2]
    given = call.get(prefix + "input_ids", call.get(prefix + "inputs_embeds"))
    query = given.shape[1] if given is not None else 2
    new_batch, new_query = max(batch, 2), max(query, 2)
    new_length = max(new_query + 1, min(length, new_query + 2))

    def resized(name, value):
        if not isinstance(value, torch.Tensor) or value.ndim == 0:
            return value
        shape = list(value.shape)
        if shape[0] == batch:
            shape[0] = new_batch
        if name == prefix + "attention_mask" and value.ndim == 4:  # (batch, 1, query, positions attended)
            shape[2:] = [new_query, new_length - 1]  # fewer than the cache holds: export keeps the two apart
        elif name == prefix + "attention_mask":  # (batch, cached + query): shorter than the cache, as in
            shape[-1] = max(new_query, min(shape[-1], new_length - 1))  # generation (transformers pads it then)
        elif name in (prefix + "input_ids", prefix + "position_ids", "token_type_ids"):
            shape[-1] = new_query
        elif name == prefix + "inputs_embeds":
            shape[1] = new_query
        return _resized(value, shape)

    def layers(tensors, cache_length):
        return [(_resized(k, (new_batch, k.shape[1], cache_length or k.shape[2], k.shape[3])),
                 _resized(v, (new_batch, v.shape[1], cache_length or v.shape[2], v.shape[3])), n.clone())
                for k, v, n in tensors]

    example = {}
    for name, value in call.items():
        if name == cache_name and isinstance(value, dict):
            example[name] = {part: layers(tensors, new_length if part == SELF else None) for part, tensors in value.items()}
        elif name == cache_name:
            example[name] = layers(value, new_length)
        else:  # masks may come as a dict per attention kind (Qwen2: {"full_attention": mask})
            example[name] = pytree.tree_map(lambda leaf, name=name: resized(name, leaf), value)
    return example


def capture_with_cache(model, call: dict, cache_name: str, widen: bool) -> capture_mod.Captured:
    """Export ``model`` for a call whose ``cache_name`` input is a list of (keys, values, length)."""
    example = small_example(call, cache_name) if widen else call
    return capture_mod.export_call(model, example, convert_inputs=_with_shell, convert_output=_without_cache,
                                   fixed=CACHE_FIXED)


def cache_argument(gm) -> Optional[str]:
    """The name the model's forward takes its KV cache under (one of ``CACHE_NAMES``), or None: it takes none."""
    return next((name for name in CACHE_NAMES if name in gm._fxpeft_arg_names), None)


def cache_name_of(call: dict) -> Optional[str]:
    """The name a call gives its KV cache under (one of ``CACHE_NAMES``), or None: it has none."""
    return next((name for name in CACHE_NAMES if call.get(name) is not None), None)


def reads_cache(signature) -> bool:
    """Whether a captured signature's graphs read a KV cache (generation graphs: ``Lowering.cached``)."""
    return signature.example is not None and cache_name_of(signature.example) is not None


# ---------------------------------------------------------------------------------------------- generate


def generate(gm, mixin_generate: Optional[Callable], *args, adapter_names=None, **kwargs) -> Any:
    """``gm.generate``: transformers' generate over fxpeft's graphs (see the module docstring)."""
    source = type(gm._fxpeft_source).__name__
    can = getattr(type(gm), "can_generate", None)
    if mixin_generate is None or not capture_mod.is_transformers_model(gm) or not (can and can()):
        raise TypeError(
            f"{source} cannot generate: generate needs a transformers model with a language-model head "
            "(a *ForCausalLM class); an encoder or a classifier has none.")
    prefilled = [(gm._fxpeft_registry.method_for(gm.peft_config[name]), name) for name in gm._fxpeft_active]
    prefilled = [(method, name) for method, name in prefilled if method.exclusive]
    for method, name in prefilled:
        if method.prefill_cache is None:
            raise NotImplementedError(f"fxpeft cannot generate with {method.name} adapters ({name!r}).")
        if adapter_names is not None:
            raise ValueError(f"adapter_names picks adapters per sequence, but {method.name} adapter {name!r} is "
                             "one acting on the whole batch (as in PEFT): generate without adapter_names.")
    if adapter_names is not None:
        kwargs["adapter_names"] = _adapter_index(gm, adapter_names, args, kwargs)
    over_dynamic = None if prefilled else _dynamic_to_static(gm, args, kwargs)
    callers_cache = over_dynamic is None and cache_name_of(kwargs) is not None
    fit_given_cache(gm, args, kwargs)
    if prefilled:
        args = _with_virtual_tokens(gm, *prefilled[0], args, kwargs)
    _use_static_cache(kwargs, gm.generation_config)
    if getattr(gm.config, "is_encoder_decoder", False) and kwargs.get("encoder_outputs") is None:
        kwargs["encoder_outputs"] = _encoder_outputs(gm, args, kwargs)
    gm.__dict__["_fxpeft_generating"] = not callers_cache  # the cache transformers makes gets a spare position
    previous, _Generate.call = _Generate.call, object()
    try:
        output = mixin_generate(*args, **kwargs)
        if over_dynamic is not None:  # the caller's DynamicCache, holding what this call wrote
            dynamic = written_back(over_dynamic)
            for name in CACHE_NAMES if isinstance(output, dict) else ():
                if output.get(name) is over_dynamic:
                    output[name] = dynamic
        return output
    finally:
        gm.__dict__.pop("_fxpeft_generating", None)
        _Generate.call = previous
        if previous is None:  # not a generate call inside another's (an assistant's): that one reads them still
            release_kept(gm)


class _Generate:
    call = None  # a token of the generate call running (see generate_step)


class KeptTensors(torch.nn.Module):
    """What a method's ``prepare_call`` keeps for the sites of one lowering root, read by its generation
    graphs: key (a site's path from that root, and what) -> tensors. Not on the site: torch.compile
    reads a builtin module's tensors (an nn.Linear's) differently. Emptied when a ``generate`` call ends
    (:func:`release_kept`). ``sites`` (path -> the site's module) and ``token`` (a number no other live
    holder has, as a tensor a compiled graph reads) let an op in a compiled graph find a site of this
    root when it runs (kept.site_program): blocks sharing one graph pass their own holder."""

    def __init__(self):
        super().__init__()
        self.__dict__["tensors"] = {}
        self.__dict__["sites"] = {}
        self.register_buffer("token", torch.zeros((), dtype=torch.long), persistent=False)
        self.own_token()

    def own_token(self) -> None:
        """Take a token of its own unless it has one (a copied holder has its original's)."""
        if KEPT_HOLDERS.get(int(self.token)) is not self:
            with torch.no_grad():
                self.token.fill_(next(_TOKENS))
            KEPT_HOLDERS[int(self.token)] = self


KEPT_HOLDERS: "weakref.WeakValueDictionary[int, KeptTensors]" = weakref.WeakValueDictionary()  # token -> holder
_TOKENS = itertools.count(1)


def lowering_roots(gm) -> dict:
    """Path -> every module a graph is lowered for: the model (""), and each block."""
    return {"": gm, **{path: gm.get_submodule(path) for path in gm._fxpeft_block_paths}}


def kept_roots(gm, kept_name: str, kind: type = KeptTensors) -> dict:
    """:func:`lowering_roots`, each given a holder of its own (``kind``) under ``kept_name``: blocks sharing a
    lowering got the first one's, and a generation graph captured later finds them."""
    roots, seen = lowering_roots(gm), set()
    for root in roots.values():
        holder = root._modules.get(kept_name)
        if holder is None or id(holder) in seen:
            root._modules[kept_name] = holder = kind()
        elif isinstance(holder, KeptTensors):
            holder.own_token()
        seen.add(id(holder))
    return roots


def kept_places(roots: dict, kept_name: str, path: str) -> list:
    """Where ``prepare_call`` writes what it keeps for the site at ``path``: (the KeptTensors of each root the
    site is in, the site's path from there); a generation graph may be outlined into blocks."""
    return [(root._modules[kept_name], path[len(prefix) + 1:] if prefix else path) for prefix, root in roots.items()
            if not prefix or path.startswith(prefix + ".")]


def release_kept(gm) -> None:
    """After a ``generate`` call: what methods kept for it goes (a dense ΔW per adapted layer must not
    outlive the generation); the next call prepares it again, once."""
    for root in lowering_roots(gm).values():
        for child in root._modules.values():
            if isinstance(child, KeptTensors):
                child.__dict__["tensors"].clear()


def generate_step(*state) -> Optional[tuple]:
    """Inside a ``generate`` call, the key of what a step derives from the adapters (stacks, picks,
    factors, its signature): a token of the call (one for the process, as ``call_prepared``), the
    optimizer steps taken and ``state``, whatever else it depends on; None outside one. A later step
    whose key is equal reuses what the first derived: one generation reads one set of adapters (a change
    made while it runs, by a streamer or another thread, is read from the next call on; an optimizer
    step at once), and a decode step does not read every adapter tensor again."""
    return None if _Generate.call is None else (_Generate.call, optimizer_steps(), *state)


def virtual_tokens(cache) -> int:
    """How many virtual tokens (a prompt or prefixes, see :func:`_with_virtual_tokens`) the cache starts with."""
    return getattr(cache, "_fxpeft_virtual_tokens", 0)


def made_for_virtual_tokens(cache) -> bool:
    """Whether ``generate`` made the cache for a prompt method (its virtual tokens written in, or, in an
    encoder-decoder model, in the encoder's outputs): graphs with a cache skip those methods' rewrites."""
    return hasattr(cache, "_fxpeft_virtual_tokens")


def _with_virtual_tokens(gm, method, adapter: str, args, kwargs) -> tuple:
    """Generation with prompt or prefix tuning: a static cache sized for the virtual tokens too, their
    keys and values written into it once (``Method.prefill_cache``), and an attention mask with as many
    ones in front. Every graph call then reads only the real tokens and counts their positions on from
    the cache's length, as PEFT's model counts them from its n past tokens (the dispatcher drops
    ``position_ids`` for such a cache). Returns ``args`` without the prompt (it moves to ``input_ids``).

    Encoder-decoder models: the encoder runs first (its virtual tokens, if any, are in its outputs,
    and the mask gets as many ones in front); the decoder's virtual tokens, if any, go into the
    self-attention cache, computed against each row's encoder outputs."""
    from transformers import EncoderDecoderCache, StaticCache

    if cache_name_of(kwargs) is not None or kwargs.get("use_cache") is False:
        raise ValueError(f"generate with {method.name} builds its own KV cache (the virtual tokens go into it "
                         "first): call it without a cache object and without use_cache=False.")
    if args:
        kwargs["input_ids"], args = args[0], args[1:]
    ids = kwargs.get("input_ids", kwargs.pop("inputs", None))
    if ids is None or kwargs.get("inputs_embeds") is not None:
        raise ValueError(f"generate with {method.name} takes the prompt as input_ids (not inputs_embeds).")
    kwargs["input_ids"] = ids
    config = call_config(gm, kwargs)
    new = new_tokens(config, ids.shape[-1])
    count = gm.peft_config[adapter].num_virtual_tokens
    expand = max(config.num_beams or 1, config.num_return_sequences or 1)
    rows = ids.shape[0] * expand
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    if getattr(gm.config, "is_encoder_decoder", False):
        if config.max_new_tokens is None:
            new = config.max_length - 1  # the decoder starts from one token
        outputs = kwargs["encoder_outputs"] = _encoder_outputs(gm, (), kwargs)
        states = outputs.last_hidden_state
        mask = torch.cat([mask.new_ones(mask.shape[0], states.shape[1] - mask.shape[1]), mask], dim=1)
        decoder = gm.config.get_text_config(decoder=True)
        cache = EncoderDecoderCache(StaticCache(config=decoder, max_cache_len=count + 1 + new),
                                    StaticCache(config=decoder, max_cache_len=states.shape[1]))
        shape = gm._get_static_cache_init_shape()
        allocate(cache.self_attention_cache, rows, shape, gm.dtype, ids.device)
        allocate(cache.cross_attention_cache, rows, shape, gm.dtype, ids.device, spare=False)
        encoder = {"encoder_outputs": type(outputs)(last_hidden_state=states.repeat_interleave(expand, dim=0)),
                   "attention_mask": mask.repeat_interleave(expand, dim=0)}
        kwargs["attention_mask"] = mask
    else:
        cache = StaticCache(config=gm.config, max_cache_len=count + ids.shape[-1] + new)
        allocate(cache, rows, gm._get_static_cache_init_shape(), gm.dtype, ids.device)
        encoder = {}
        kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], count), mask], dim=1)
    # the per-call inputs the method reads (task_ids), one row per cache row as transformers will expand them
    call_inputs = {name: kwargs[name].repeat_interleave(expand, dim=0) for name in method.call_inputs
                   if isinstance(kwargs.get(name), torch.Tensor)}
    cache._fxpeft_virtual_tokens = count  # for the prefill's own forward calls over the cache (they write them)
    cache._fxpeft_virtual_tokens = method.prefill_cache(gm, adapter, cache, **encoder, **call_inputs)
    kwargs["cache"] = cache
    return args


def masks_for_generate(model_masks: Optional[Callable], **kwargs):
    """The attention mask of one generation step. After virtual tokens the 2-D mask itself, as PEFT's
    forward gives it to the model: the model then derives its positions as it would over the whole
    sequence (from the cache's length, or from the mask: OPT), and builds its causal mask in the
    graph. Otherwise (and in an encoder-decoder's decoder, whose positions count on from the cache's
    length) the model's (or transformers') 4-D mask, cut on the CPU to the positions filled so far and
    the new ones (the step attends over those only, :func:`cache_shell`)."""
    cache = kwargs.get("cache")
    if virtual_tokens(cache) and not kwargs["config"].is_encoder_decoder:
        return kwargs["attention_mask"]
    if model_masks is None:
        from transformers.masking_utils import create_masks_for_generate as model_masks
    masks, length = model_masks(**kwargs), _attended_length(cache, kwargs["inputs_embeds"])
    if length is None:
        return masks
    return pytree.tree_map(lambda mask: mask[..., :length] if isinstance(mask, torch.Tensor) and mask.ndim == 4
                           and mask.shape[-1] > length else mask, masks)


def _attended_length(cache, query: torch.Tensor) -> Optional[int]:
    """How many positions of a static cache a step attends over: those filled (none before the cache
    is allocated, by the prompt's step) and the ``query``'s (batch, new tokens, ...). Only on the CPU:
    elsewhere reading the length would wait for the device."""
    from transformers.cache_utils import EncoderDecoderCache, StaticLayer

    own = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
    layer = next(iter(getattr(own, "layers", None) or [None]))
    if not isinstance(layer, StaticLayer) or query.device.type != "cpu":
        return None
    return (int(layer.cumulative_length) if layer.is_initialized else 0) + query.shape[1]


def _encoder_outputs(gm, args, kwargs):
    """An encoder-decoder's encoder states through fxpeft's graph of the whole model (transformers
    would call ``get_encoder()``, a module of the tree that holds the adapters but not their math):
    one forward with a one-token decoder input, whose ``encoder_*`` outputs are the encoder's."""
    from transformers.modeling_outputs import BaseModelOutput

    inputs = {name: kwargs[name] for name in ("input_ids", "inputs_embeds", "attention_mask", "adapter_names",
                                              *gm._fxpeft_registry.call_inputs()) if kwargs.get(name) is not None}
    if args or kwargs.get("inputs") is not None:
        inputs["input_ids"] = args[0] if args else kwargs["inputs"]
    prompt = inputs.get("input_ids", inputs.get("inputs_embeds"))
    if prompt is None:
        raise ValueError(f"{type(gm._fxpeft_source).__name__} generates from an encoder input: pass input_ids (or "
                         "inputs_embeds).")
    config = kwargs.get("generation_config") or gm.generation_config
    for flag in ("output_hidden_states", "output_attentions"):
        if kwargs.get(flag, getattr(config, flag, False)):
            inputs[flag] = True
    start = torch.zeros((prompt.shape[0], 1), dtype=torch.long, device=prompt.device)  # any token: the decoder's output is not read
    output = gm(**inputs, decoder_input_ids=start, return_dict=True)
    return BaseModelOutput(last_hidden_state=output.encoder_last_hidden_state,
                           hidden_states=output.get("encoder_hidden_states"), attentions=output.get("encoder_attentions"))


def _adapter_index(gm, adapter_names, args, kwargs) -> torch.Tensor:
    """The per-sequence index, checked against the batch before anything runs."""
    from .state import adapter_indices

    inputs = args[0] if args else kwargs.get("input_ids", kwargs.get("inputs", kwargs.get("inputs_embeds")))
    if not isinstance(inputs, torch.Tensor):
        raise ValueError("generate(adapter_names=...) needs the prompts as a tensor (input_ids).")
    if isinstance(adapter_names, torch.Tensor):
        return gm._adapter_index(adapter_names, inputs)
    return adapter_indices(gm, adapter_names, batch_size=inputs.shape[0], device=inputs.device)


def _use_static_cache(kwargs: dict, default_config) -> None:
    """Ask transformers for its static cache, unless the caller chose a cache or none. Compilation
    stays off unless asked for (transformers would compile a static-cache decode on GPUs); asked for,
    it runs on every device (see :func:`checked_compile_config`)."""
    given = kwargs.get("generation_config")
    config = given if given is not None else default_config
    chosen = (cache_name_of(kwargs) is not None or kwargs.get("use_cache") is False
              or kwargs.get("cache_implementation") is not None
              or (config is not None and (config.cache_implementation is not None or config.use_cache is False)))
    compile_config = kwargs.get("compile_config")
    if compile_config is None and config is not None:
        compile_config = config.compile_config
    if compile_config is not None and not kwargs.get("disable_compile") and not (config is not None and config.disable_compile):
        compile_config = checked_compile_config(compile_config, kwargs, config)
    if given is not None:  # a copy: passing generation_config together with other generate arguments is deprecated
        config = kwargs["generation_config"] = copy.deepcopy(config)
        if not chosen:
            config.cache_implementation = "static"
        kwargs.pop("compile_config", None)
        config.compile_config = compile_config
        if compile_config is None:
            config.disable_compile = True
        return
    if not chosen:
        kwargs["cache_implementation"] = "static"
    if compile_config is not None:
        kwargs["compile_config"] = compile_config
    elif "disable_compile" not in kwargs:
        kwargs["disable_compile"] = True


def checked_compile_config(compile_config, kwargs: dict, config):
    """A copy of ``compile_config`` that transformers' ``generate`` compiles with on any device (it
    compiles only on accelerators unless ``_compile_all_devices`` is set; asked for explicitly, fxpeft
    compiles on the CPU too). Options torch.compile would reject at the first decode step, after the
    prompt ran, are rejected here, before any compute."""
    from transformers import CompileConfig

    if not isinstance(compile_config, CompileConfig):
        raise TypeError(f"compile_config must be a transformers.CompileConfig, got {type(compile_config).__name__}: "
                        "use CompileConfig(fullgraph=True, ...).")
    use_cache = kwargs.get("use_cache", config.use_cache if config is not None else True)
    implementation = kwargs.get("cache_implementation", config.cache_implementation if config is not None else None)
    if use_cache is False or implementation not in (None, "static"):
        raise ValueError(
            "compile_config compiles the decode step over transformers' static KV cache, but this call asks for "
            + ("no cache (use_cache=False)" if use_cache is False else f"cache_implementation={implementation!r}")
            + ": leave the cache to fxpeft (or pass cache_implementation='static'), or drop compile_config.")
    options = compile_config.to_dict()
    try:
        torch.compile(lambda: None, **options)  # validates backend, mode and options (compiles nothing yet)
    except Exception as error:
        raise ValueError(f"compile_config {options} is not valid for torch.compile: {error}") from error
    backend = options["backend"]
    if options.get("mode") not in (None, "default") and backend != "inductor":
        from torch._dynamo.backends.registry import lookup_backend

        parameters = inspect.signature(lookup_backend(backend)).parameters.values()
        if not any(p.name == "mode" or p.kind is p.VAR_KEYWORD for p in parameters):
            raise ValueError(
                f"compile_config has mode={options['mode']!r} (CompileConfig's default, an inductor mode) but backend "
                f"{getattr(backend, '__name__', backend)!r} takes no mode: pass CompileConfig(..., mode=None).")
    checked = copy.copy(compile_config)
    checked._compile_all_devices = True
    return checked


# -------------------------------------------------------------------------------------------- deployment

DECODING_LOOP = '''"""Greedy decoding with generate.pt2, with torch only (written by fxpeft.export_merged(..., generation=True)).

    import generate; tokens = generate.greedy(input_ids, attention_mask, max_new_tokens=32)

generate.pt2 is one program for the prompt and for every new token: it takes input_ids (batch, new
tokens), attention_mask (batch, cached + new tokens; 0 at left padding), position_ids (batch, new tokens)
and cache, per layer a tuple (keys, values, length): keys and values (batch, heads, capacity, head_dim),
length a 0-d int64 tensor of the tokens cached; it writes the new tokens' keys and values into the cache
in place and returns {"logits": (batch, new tokens, vocab)} (it also takes use_cache=True, return_dict=True). generation.json holds the cache's layout and
the model's eos and pad token ids. Finished sequences are padded with pad_token_id, as transformers does.
"""
import json
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def greedy(input_ids, attention_mask=None, max_new_tokens=32, eos_token_id="model", pad_token_id="model"):
    with open(os.path.join(HERE, "generation.json")) as file:
        spec = json.load(file)
    step = torch.export.load(os.path.join(HERE, "generate.pt2")).module()
    eos = spec["eos_token_id"] if eos_token_id == "model" else eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=input_ids.device)
    pad = spec["pad_token_id"] if pad_token_id == "model" else pad_token_id
    batch, length = input_ids.shape
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    shape = (batch, spec["heads"], length + max_new_tokens, spec["head_dim"])
    dtype = getattr(torch, spec["dtype"])
    cache = [(torch.zeros(shape, dtype=dtype, device=input_ids.device),
              torch.zeros(shape, dtype=dtype, device=input_ids.device),
              torch.zeros((), dtype=torch.int64, device=input_ids.device)) for _ in range(spec["layers"])]
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    tokens, new = input_ids, input_ids
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = step(input_ids=new, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                          return_dict=True)["logits"]
            new = logits[:, -1].argmax(-1)
            if pad is not None:
                new = torch.where(done, torch.full_like(new, pad), new)
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            done |= torch.isin(new, eos)
            if bool(done.all()):
                break
            new = new[:, None]
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            positions = positions[:, -1:] + 1
    return tokens
'''


def check_decodable(model) -> tuple[int, int]:
    """The (heads, head_dim) of ``model``'s static cache, or an error saying why its decoding cannot
    be exported (before anything is merged or exported)."""
    name = type(getattr(model, "_fxpeft_source", model)).__name__
    can = getattr(type(model), "can_generate", None)
    if not capture_mod.is_transformers_model(model) or not (can and can()):
        raise NotImplementedError(f"export_merged(generation=True) exports causal and seq2seq LMs; {name} is neither.")
    shape = model._get_static_cache_init_shape()
    if shape is None or not all(isinstance(n, int) for n in shape):
        raise NotImplementedError(f"{name} has no uniform static-cache layout to export.")
    return shape


def decoding_files(model) -> dict:
    """For ``export_merged(generation=True)``: writers of ``generate.pt2`` (``model``, a plain
    transformers causal LM, exported with a static cache: one program for the prompt and every new
    token, the cache written in place), ``generation.json`` (the cache's layout, eos and pad ids)
    and ``generate.py`` (a greedy loop over the program that needs only torch)."""
    import json

    from transformers import StaticCache

    heads, head_dim = check_decodable(model)
    if model.config.is_encoder_decoder:
        return _seq2seq_decoding_files(model, heads, head_dim)
    device = next(model.parameters()).device
    cache = StaticCache(config=model.config, max_cache_len=6)
    cache.early_initialization(2, heads, head_dim, dtype=model.dtype, device=device)
    ids = torch.ones(2, 4, dtype=torch.long, device=device)
    call = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": torch.arange(4, device=device).expand(2, 4),
            "cache": [(layer.keys, layer.values, layer.cumulative_length) for layer in cache.layers],
            "use_cache": True, "return_dict": True}
    with torch.no_grad():
        program = capture_mod.export_program(model.eval(), call, convert_inputs=_with_shell, fixed=CACHE_FIXED,
                                             convert_output=lambda output: {"logits": output.logits})
    config = model.generation_config
    spec = {"layers": len(cache.layers), "heads": heads, "head_dim": head_dim, "dtype": str(model.dtype).removeprefix("torch."),
            "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id}
    return {"generate.pt2": lambda path: torch.export.save(program, path),
            "generation.json": _text_writer(json.dumps(spec, indent=1)), "generate.py": _text_writer(DECODING_LOOP)}


def _seq2seq_decoding_files(model, heads: int, head_dim: int) -> dict:
    """:func:`decoding_files` for an encoder-decoder: ``encode.pt2`` (the encoder), ``generate_first.pt2``
    (the first decoder step, which writes the encoder's keys and values into the cross-attention cache)
    and ``generate.pt2`` (every later step, which reads them); both steps write the self-attention cache
    in place. ``generation.json`` and ``generate.py`` (:data:`SEQ2SEQ_DECODING_LOOP`) as for causal LMs."""
    import json

    from transformers import StaticCache

    device = next(model.parameters()).device
    ids = torch.ones(2, 5, dtype=torch.long, device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        encoder = capture_mod.export_program(model.get_encoder().eval(), {"input_ids": ids, "attention_mask": mask},
                                             lambda output: {"last_hidden_state": output.last_hidden_state})
        states = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    decoder_config = model.config.get_text_config(decoder=True)

    def layers(length):
        cache = StaticCache(config=decoder_config, max_cache_len=length)
        cache.early_initialization(2, heads, head_dim, dtype=model.dtype, device=device)
        return [(layer.keys, layer.values, layer.cumulative_length) for layer in cache.layers]

    start = torch.zeros(2, 1, dtype=torch.long, device=device)
    steps = {}
    for name, cross in (("generate_first.pt2", CROSS), ("generate.pt2", CROSS_FILLED)):
        cross_layers = layers(states.shape[1])
        if cross == CROSS_FILLED:
            cross_layers = [(k, v, n + states.shape[1]) for k, v, n in cross_layers]
        call = {"encoder_outputs": (states,), "attention_mask": mask, "decoder_input_ids": start,
                "cache": {SELF: layers(6), cross: cross_layers}, "use_cache": True, "return_dict": True}
        with torch.no_grad():
            steps[name] = capture_mod.export_program(model.eval(), call, convert_inputs=_with_shell, fixed=CACHE_FIXED,
                                                     convert_output=lambda output: {"logits": output.logits})
    config = model.generation_config
    spec = {"layers": len(call["cache"][SELF]), "heads": heads, "head_dim": head_dim,
            "dtype": str(model.dtype).removeprefix("torch."), "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
            "decoder_start_token_id": config.decoder_start_token_id if config.decoder_start_token_id is not None
            else model.config.decoder_start_token_id}
    return {"encode.pt2": lambda path: torch.export.save(encoder, path),
            **{name: (lambda path, program=program: torch.export.save(program, path)) for name, program in steps.items()},
            "generation.json": _text_writer(json.dumps(spec, indent=1)), "generate.py": _text_writer(SEQ2SEQ_DECODING_LOOP)}


SEQ2SEQ_DECODING_LOOP = '''"""Greedy decoding with encode.pt2, generate_first.pt2 and generate.pt2, with torch only (written by
fxpeft.export_merged(..., generation=True) for an encoder-decoder model).

    import generate; tokens = generate.greedy(input_ids, attention_mask, max_new_tokens=32)

encode.pt2 takes input_ids and attention_mask (batch, source tokens; 0 at padding) and returns
{"last_hidden_state": (batch, source tokens, hidden)}. The decoder programs take encoder_outputs (a
1-tuple of that state), attention_mask (the source mask), decoder_input_ids (batch, 1), use_cache=True,
return_dict=True and cache, a dict: "self_attention", per decoder layer a tuple (keys, values, length) of
the decoder's own tokens (keys and values (batch, heads, capacity, head_dim), length a 0-d int64 tensor),
and the cross-attention layers of the same form sized to the source, under "cross_attention" for the
first step (generate_first.pt2 writes the encoder's keys and values into them) and
"cross_attention_filled" for every later step (generate.pt2 reads them). Both write the new token's
keys and values in place and return {"logits": (batch, 1, vocab)}. generation.json holds the cache's
layout and the eos, pad and decoder start token ids. Finished sequences are padded with pad_token_id,
as transformers does; the returned tokens start with the decoder start token, as transformers' do.
"""
import json
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def greedy(input_ids, attention_mask=None, max_new_tokens=32, eos_token_id="model", pad_token_id="model"):
    with open(os.path.join(HERE, "generation.json")) as file:
        spec = json.load(file)
    programs = {name: torch.export.load(os.path.join(HERE, name + ".pt2")).module()
                for name in ("encode", "generate_first", "generate")}
    eos = spec["eos_token_id"] if eos_token_id == "model" else eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=input_ids.device)
    pad = spec["pad_token_id"] if pad_token_id == "model" else pad_token_id
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    batch, device, dtype = input_ids.shape[0], input_ids.device, getattr(torch, spec["dtype"])

    def layers(length):
        shape = (batch, spec["heads"], length, spec["head_dim"])
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                 torch.zeros((), dtype=torch.int64, device=device)) for _ in range(spec["layers"])]

    with torch.no_grad():
        states = programs["encode"](input_ids=input_ids, attention_mask=mask)["last_hidden_state"]
        own, cross = layers(max_new_tokens + 1), layers(states.shape[1])
        tokens = torch.full((batch, 1), spec["decoder_start_token_id"], dtype=torch.long, device=device)
        new = tokens
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for index in range(max_new_tokens):
            first = index == 0
            step = programs["generate_first" if first else "generate"]
            cache = {"self_attention": own, ("cross_attention" if first else "cross_attention_filled"): cross}
            logits = step(encoder_outputs=(states,), attention_mask=mask, decoder_input_ids=new, cache=cache,
                          use_cache=True, return_dict=True)["logits"]
            new = logits[:, -1].argmax(-1)
            if pad is not None:
                new = torch.where(done, torch.full_like(new, pad), new)
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            done |= torch.isin(new, eos)
            if bool(done.all()):
                break
            new = new[:, None]
    return tokens
'''


def _text_writer(text: str) -> Callable:
    def write(path):
        with open(path, "w") as file:
            file.write(text)
    return write
