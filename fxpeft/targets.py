"""Which module paths a config targets, with PEFT's exact matching rules.

- a str ``target_modules`` is ``re.fullmatch`` on the module path;
- a list matches an exact path or a dotted suffix, optionally filtered by layer index
  (``layers_to_transform`` / ``layers_pattern``);
- ``exclude_modules`` (same two forms) and ``modules_to_save`` paths are never targeted;
- ``rank_pattern`` / ``alpha_pattern`` keys match ``(.*\\.)?(key)$``, first key wins.
"""
from __future__ import annotations

import copy
import difflib
import re
from typing import Iterable, Optional, Sequence

from .configs import SEQ_CLS_HEAD_NAMES


def _matches_list_or_regex(spec, path: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return path in spec or any(path.endswith(f".{name}") for name in spec)


def _layer_index(path: str, layers_pattern) -> Optional[int]:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", path)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", path)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def is_saved_module(modules_to_save: Optional[Sequence[str]], path: str) -> bool:
    return bool(modules_to_save) and any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in modules_to_save)


def is_targeted(config, path: str) -> bool:
    """True when PEFT would put this config's adapter on the module at ``path``."""
    excluded = getattr(config, "exclude_modules", None)  # some of PEFT's configs have no such field (VeRA)
    if excluded and _matches_list_or_regex(excluded, path):
        return False
    if is_saved_module(getattr(config, "modules_to_save", None), path):
        return False
    if config.target_modules is None:
        return False
    if not _matches_list_or_regex(config.target_modules, path):
        return False
    layers = getattr(config, "layers_to_transform", None)
    # a module named in full is taken as it is: the layer filter narrows suffix matches only (PEFT's rule)
    if isinstance(config.target_modules, str) or path in config.target_modules or layers is None or layers == []:
        return True
    index = _layer_index(path, getattr(config, "layers_pattern", None))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: dict, path: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", path):
            return patterns[key]
    return default


def suffix_pattern_value(patterns: dict, path: str, default):
    """The older pattern lookup PEFT's FourierFT and C3A keep: the first key matching ``.*\\.<key>$``,
    else the path itself as a key."""
    key = next((k for k in patterns if re.match(rf".*\.{k}$", path)), path)
    return patterns.get(key, default)


def saved_module_paths(names: Iterable[str], module_paths: Iterable[str]) -> list[str]:
    """modules_to_save resolution as PEFT does it: a path ending with one of the names."""
    names = list(names)
    return [path for path in module_paths if path and any(path.endswith(name) for name in names)]


def unmatched_target_error(config, candidate_paths: Sequence[str], kind: str = "target_modules") -> ValueError:
    layers = getattr(config, "layers_to_transform", None)
    if layers not in (None, []):  # the names may match, and the layer filter exclude them all
        unfiltered = copy.copy(config)  # (not dataclasses.replace: the config's own checks would run on it)
        unfiltered.layers_to_transform = None
        named = [path for path in candidate_paths if is_targeted(unfiltered, path)]
        indices = sorted({i for i in (_layer_index(p, getattr(config, "layers_pattern", None)) for p in named)
                          if i is not None})
        if named:
            return ValueError(
                f"target_modules {config.target_modules!r} matched {len(named)} modules, but layers_to_transform="
                f"{layers!r} selects none of them: their layer indices are {indices or 'not found in their paths'}. "
                "Fix layers_to_transform (or layers_pattern).")
    spec = config.target_modules
    excluded = getattr(config, "exclude_modules", None)
    if excluded:  # the names may match, and exclude_modules leave none of them
        unexcluded = copy.copy(config)
        unexcluded.exclude_modules = None
        named = [path for path in candidate_paths if is_targeted(unexcluded, path)]
        if named:
            return ValueError(f"target_modules {spec!r} matched {len(named)} modules, but exclude_modules {excluded!r} "
                              "excludes all of them. Fix exclude_modules (or target_modules).")
    wanted = [spec] if isinstance(spec, str) else list(spec)
    short_names = sorted({path.rsplit(".", 1)[-1] for path in candidate_paths})
    hints = []
    for name in wanted:
        close = difflib.get_close_matches(name.rsplit(".", 1)[-1], short_names, n=5, cutoff=0.4)
        hints.append(f"{name!r} (closest: {', '.join(close) or 'none'})")
    return ValueError(
        f"{kind} {spec!r} matched no adaptable module in the model. Not found: {'; '.join(hints)}. "
        f"Adaptable modules are named: {', '.join(short_names[:30])}"
        + (" ..." if len(short_names) > 30 else "")
        + ". Fix target_modules to name one of them."
    )


def requested_names(config) -> list[str]:
    """The modules_to_save names a config asks for; SEQ_CLS tasks add PEFT's head names."""
    names = list(getattr(config, "modules_to_save", None) or [])
    if getattr(config, "task_type", None) == "SEQ_CLS":
        names += [n for n in SEQ_CLS_HEAD_NAMES if n not in names]
    return names


def model_embedding(model, getter: str):
    """``model.get_input_embeddings()`` / ``get_output_embeddings()``, or None where a model has none
    (transformers raises NotImplementedError for models without embeddings, such as ConvNeXt)."""
    get = getattr(model, getter, None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


def input_embedding_path(gm) -> Optional[str]:
    """The path of the model's input embedding (``get_input_embeddings``), as PEFT finds it; None
    for models without one."""
    source = gm._fxpeft_source
    embedding = model_embedding(source, "get_input_embeddings")
    if embedding is None:
        return None
    return next((name for name, m in source.named_modules() if m is embedding), None)


def tied_to_embedding(gm) -> list[str]:
    """Modules whose weight is the input embedding's, where the model declares the tie (PEFT's
    ``_get_module_names_tied_with_embedding``: ``_tied_weights_keys`` and a config whose
    ``tie_word_embeddings`` is true): the output head of a tied language model."""
    source = gm._fxpeft_source
    path = input_embedding_path(gm)
    if (path is None or not getattr(source, "_tied_weights_keys", None)
            or not getattr(getattr(source, "config", None), "tie_word_embeddings", False)):
        return []
    weight = gm.get_submodule(path).weight
    return [name for name, m in gm.named_modules() if name and name != path and getattr(m, "weight", None) is weight]


def output_heads(gm, config) -> set[str]:
    """What PEFT's "all-linear" leaves out, for every tuner: the output embedding, or a SEQ_CLS head."""
    source = gm._fxpeft_source
    heads = set()
    output = model_embedding(source, "get_output_embeddings")
    names = {id(m): n for n, m in source.named_modules()}
    if output is not None:
        heads.add(names[id(output)])
    elif config.task_type == "SEQ_CLS":
        for name in SEQ_CLS_HEAD_NAMES:
            head = getattr(source, name, None)
            if head is not None:
                heads.add(names[id(head)])
                break
    return heads
