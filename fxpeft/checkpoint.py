"""PEFT's checkpoint format: ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``).

Keys are ``base_model.model.<module path>.<container>.<tensor>`` with the adapter name removed
(``...q_proj.lora_A.weight``); state a method keeps once on the root (``Method.shared``) is
``base_model.<container>`` (VeRA's ``base_model.vera_A``); a modules_to_save copy is stored under the original module's
keys; trained biases under ``<path>.base_layer.bias`` when the module carries an adapter.
Adapters other than "default" live in a subfolder named after them.

Because fxpeft keeps PEFT's parameter names beside unchanged base keys, the conversion is a
rename computed from the module itself (:func:`adapter_key_map`), used both ways.
"""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
import warnings
from typing import Any, Optional

import torch

from . import progress
from .registry import DEFAULT
from .state import method_of
from .targets import model_embedding, requested_names

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"

# where PEFT's checkpoints keep state its tuner holds once for the whole model (Method.shared)
TUNER_PREFIX = "base_model."
# PEFT bookkeeping with no effect on the computation.
IGNORED_FIELDS = ("peft_version", "auto_mapping", "peft_type")


# --------------------------------------------------------------------------- key mapping


def _adapted_paths(gm) -> set[str]:
    methods = {method_of(gm, name) for name in gm.peft_config}
    return {path for path, module in gm.named_modules()
            if any(m.adapters_at and m.adapters_at(module) for m in methods)}


def adapter_key_map(gm, adapter: str, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """PEFT checkpoint key -> fxpeft state_dict name, for one adapter (``state`` is ``gm``'s
    ``state_dict(keep_vars=True)``)."""
    config = gm.peft_config[adapter]
    method = method_of(gm, adapter)
    prefix = method.checkpoint_prefix
    # a method that saves computed tensors (prompt learning) saves none of its containers' own
    containers = set() if method.saved_tensors else set(method.containers) - set(method.unsaved_containers)
    mapping: dict[str, str] = {}
    saved_roots = []
    for name in state:
        parts = name.split(".")
        for i in range(len(parts) - 1):
            if parts[i + 1] != adapter:
                continue
            root_state = parts[0] in method.shared and parts[0] in containers
            if parts[i] in containers or root_state:
                # state kept once on the root: PEFT keeps it on its tuner (``base_model.vera_A``), directly or
                # grouped by a key of the method's (FRoD's ``base_model.frod_V.<category>``)
                where = TUNER_PREFIX if root_state else prefix
                mapping[where + ".".join(parts[: i + 1] + parts[i + 2:])] = name
            elif parts[i] == "modules_to_save":
                mapping[prefix + ".".join(parts[:i] + parts[i + 2:])] = name
                saved_roots.append(".".join(parts[:i]) + ".")
            else:
                continue
            break
    for ours, theirs in method.checkpoint_renames:
        mapping = {(key[: -len(ours)] + theirs if key.endswith(ours) else key): name for key, name in mapping.items()}
    bias_mode = getattr(config, "bias", "none")
    if bias_mode != "none":
        adapted_here = {p for p, m in gm.named_modules() if adapter in (method.adapters_at(m) or [])}
        wrapped = _adapted_paths(gm)
        mapped = set(mapping.values())
        for name in state:
            path, _, leaf = name.rpartition(".")
            if leaf != "bias":
                continue
            root = next((r for r in saved_roots if name.startswith(r)), None)
            if bias_mode == "all" and root is not None:
                # PEFT's "all" also saves saved modules' biases under their wrapper's names
                rest = name[len(root):]
                copy_prefix = f"modules_to_save.{adapter}."
                wrapper = "modules_to_save." + rest[len(copy_prefix):] if rest.startswith(copy_prefix) \
                    else None if rest.startswith("modules_to_save.") else "original_module." + rest
                if wrapper is not None:
                    mapping[prefix + root + wrapper] = name
                continue
            if root is not None or name in mapped:
                continue
            if any(f".{c}." in f".{name}" for c in containers) or ".modules_to_save." in name:
                continue
            if bias_mode.endswith("_only") and path not in adapted_here:
                continue
            key = f"{path}.base_layer.bias" if path in wrapped else name
            mapping[prefix + key] = name
    return mapping


EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's: naming one in target_modules saves the embeddings


def embedding_keys(gm, adapter: str, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """PEFT checkpoint key -> fxpeft state_dict name for the base weights of the model's input and
    output embeddings that carry an adapter: what PEFT writes beside an adapter that targets an
    embedding layer (``save_embedding_layers``), and loads back into the base model."""
    source = gm._fxpeft_source
    names = {id(m): n for n, m in source.named_modules()}
    adapted = _adapted_paths(gm)
    prefix = method_of(gm, adapter).checkpoint_prefix
    keys = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        layer = model_embedding(source, getter)
        path = names.get(id(layer)) if layer is not None else None
        if path is not None and path in adapted and f"{path}.weight" in state:
            keys[f"{prefix}{path}.base_layer.weight"] = f"{path}.weight"
    return keys


def _saves_embeddings(gm, adapter: str, save_embedding_layers) -> bool:
    """PEFT's rule: True, False, or "auto" — on when ``target_modules`` names an embedding layer
    (and no trainable tokens replace it), with PEFT's warning. (PEFT's "auto" also saves the
    embeddings of a model whose vocabulary was resized, found by loading the base model's config
    from its path; fxpeft does not: pass True then.)"""
    if save_embedding_layers != "auto":
        return bool(save_embedding_layers)
    config = gm.peft_config[adapter]
    targets = getattr(config, "target_modules", None) or ()
    tokens = config.peft_type == "TRAINABLE_TOKENS" or getattr(config, "trainable_token_indices", None) is not None
    if tokens or not any(name in targets for name in EMBEDDING_LAYER_NAMES):
        return False
    warnings.warn("Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.")
    return True


# --------------------------------------------------------------------------- writing


def _config_dict(gm, config) -> dict[str, Any]:
    """The config as PEFT's ``save_pretrained`` writes it, filling what PEFT fills at save time."""
    data = config.to_dict()
    data["inference_mode"] = True
    base = gm._fxpeft_source  # fxpeft's copy of the caller's model: same class and attributes
    if data["base_model_name_or_path"] is None:
        # AutoPeftModel loads the base from here; transformers' from-config models hold "", no path (PEFT: None)
        data["base_model_name_or_path"] = base.__dict__.get("name_or_path") or None
    if "modules_to_save" in data:
        # PEFT writes the heads a SEQ_CLS task adds; fxpeft adds them when attaching (the same list, without
        # the duplicates PEFT appends on every wrap), so the file says which copies it holds
        data["modules_to_save"] = requested_names(config) or data["modules_to_save"]
    # without a task type, AutoPeftModel finds the base class here (PEFT writes null otherwise)
    data["auto_mapping"] = None if config.task_type is not None else {
        "base_model_class": type(base).__name__, "parent_library": type(base).__module__}
    return data


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage: give later ones their own."""
    seen, out = set(), {}
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        ptr = (tensor.untyped_storage().data_ptr(), tensor.device)
        out[key] = tensor.clone().contiguous() if ptr in seen else tensor.contiguous()
        seen.add(ptr)
    return out


STAGING_MARK = ".fxpeft-staging-"


def _staging_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}{re.escape(STAGING_MARK)}(\d+)-[0-9a-f]+")


def _alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would end the process on Windows: keep every leftover there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove_stale_staging(home: str, name: str) -> None:
    """Remove staging folders of writes to ``name`` whose process died before cleaning up. None is
    needed: a swapped write's target is complete at every instant, and an in-place write stopped
    between its renames left a folder without config, which nothing loads."""
    pattern = _staging_pattern(name)
    for entry in os.listdir(home):
        match = pattern.fullmatch(entry)
        if match and not _alive(int(match.group(1))):
            shutil.rmtree(os.path.join(home, entry), ignore_errors=True)


def _fsync(path: str) -> None:
    """Flush a file, or a folder's entries, to disk: a rename is only as durable as what it names."""
    folder = os.path.isdir(path)
    if folder and os.name != "posix":  # folders cannot be opened on Windows
        return
    fd = os.open(path, os.O_RDONLY if folder else os.O_RDWR)  # Windows flushes only files open for writing
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the OS or the
    filesystem cannot, and nothing moved."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if sys.platform == "linux" else None
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBUSY, errno.EXDEV):  # EBUSY, EXDEV: a mount
        return False
    raise OSError(error, os.strerror(error), a, None, b)


def _link_others(target: str, staging: str, unit: set[str]) -> None:
    """Hard-link everything in ``target`` that is not part of the checkpoint (the user's files, other
    adapters' subfolders) into ``staging``, so they are there before and after the swap."""
    for entry in os.listdir(target):
        if entry in unit:
            continue
        source, copy = os.path.join(target, entry), os.path.join(staging, entry)
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, copy, symlinks=True, copy_function=os.link)
        elif os.path.islink(source):
            os.symlink(os.readlink(source), copy)
        else:
            os.link(source, copy)


def _keep_late_entries(old: str, new: str, unit: set[str]) -> None:
    """Move into ``new`` what appeared in the old folder (or its subfolders) after it was linked,
    rather than delete it."""
    for entry in os.listdir(old):
        source, kept = os.path.join(old, entry), os.path.join(new, entry)
        if entry in unit:
            continue
        if not os.path.lexists(kept):
            os.rename(source, kept)
        elif all(os.path.isdir(p) and not os.path.islink(p) for p in (source, kept)):
            _keep_late_entries(source, kept, set())


def _cwd_inside(folder: str) -> Optional[str]:
    try:
        cwd = os.getcwd()
    except FileNotFoundError:  # the process stands in a deleted folder: nothing to follow
        return None
    return cwd if cwd == folder or cwd.startswith(folder + os.sep) else None


def _swap_in(staging: str, target: str, unit: set[str]) -> bool:
    """Exchange the staged folder with the target in one step; afterwards ``staging`` holds the old
    folder. False where folders cannot be exchanged here (nothing moved)."""
    cwd = _cwd_inside(target)
    if not _exchange(staging, target):
        return False
    _keep_late_entries(staging, target, unit)
    _fsync(os.path.dirname(target))
    if cwd is not None:
        os.chdir(cwd)  # the process stood in the old folder: step into the new one, same path
    return True


def _replace_in_place(staging: str, target: str, unit: set[str], new: list[str]) -> None:
    """File by file, where folders cannot be swapped (a mount point, a parent we may not write,
    no ``renameat2``): every old file of the unit goes before any new one comes, the config
    leaving first and arriving last, so the folder never pairs old and new files; a crash
    between leaves no config, which loaders report as no checkpoint."""
    for filename in sorted(unit, key=lambda f: f != CONFIG_NAME):
        if os.path.lexists(os.path.join(target, filename)):
            os.remove(os.path.join(target, filename))
    _fsync(target)
    for filename in sorted(new, key=lambda f: f == CONFIG_NAME):
        os.replace(os.path.join(staging, filename), os.path.join(target, filename))
    _fsync(target)


def atomic_write(directory: str, writers: dict[str, Any], unit: tuple[str, ...] = ()) -> None:
    """Replace the checkpoint in ``directory`` (the files of ``writers``, and any old file named in
    ``unit``) as a whole, keeping every other file and subfolder there.

    The new folder is staged beside the target (``.<name>.fxpeft-staging-<pid>-<hex>``: other files
    hard-linked, new files written and flushed) and swapped with it in one rename, so the path
    holds the complete old or the complete new checkpoint at every instant; the old folder is then
    deleted. Staging folders of crashed writes are deleted by the next write."""
    if os.path.isfile(directory):
        raise NotADirectoryError(f"Cannot save a checkpoint to {directory!r}: it is a file, not a folder.")
    target = os.path.realpath(directory)  # a symlinked folder: swap the real one, the link keeps pointing at it
    os.makedirs(target, exist_ok=True)
    parent, name = os.path.split(target)
    unit = set(unit) | set(writers)
    swap = sys.platform == "linux" and not os.path.ismount(target) and os.access(parent, os.W_OK)
    home = parent if swap else target
    _remove_stale_staging(home, name)
    staging = os.path.join(home, f".{name}{STAGING_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(staging)
    try:
        if swap:
            os.chmod(staging, stat.S_IMODE(os.stat(target).st_mode))
            try:
                _link_others(target, staging, unit)
            except OSError:  # no hard links here (or one we may not make): copying could be huge, go in place
                swap = False
        for count, (filename, write) in enumerate(writers.items()):
            progress.step(f"writing {filename}", count, len(writers))
            write(os.path.join(staging, filename))
            _fsync(os.path.join(staging, filename))
        _fsync(staging)
        if not (swap and _swap_in(staging, target, unit)):
            _replace_in_place(staging, target, unit, list(writers))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_folder_name(adapter: str) -> None:
    """Adapters other than "default" are saved in a subfolder named after them: the name must be
    one plain folder name, or the write would land outside the checkpoint folder."""
    separators = {"/", os.sep, os.altsep} - {None}
    if (not adapter or adapter in (".", "..") or any(s in adapter for s in separators) or "\0" in adapter
            or os.path.isabs(adapter) or os.path.splitdrive(adapter)[0]):
        raise ValueError(f"Cannot save adapter {adapter!r}: its name becomes a subfolder of the checkpoint folder, "
                         "so it must be one plain folder name (no path separator, not '.' or '..', not absolute).")


def check_initial_conversion(gm, adapter: str) -> None:
    """Raise unless the adapter's method converts checkpoints against an initial folder."""
    method = method_of(gm, adapter)
    if method.initial_conversion is None:
        raise NotImplementedError(
            f"save_pretrained(path_initial_model_for_weight_conversion=...) is not supported for {method.name} "
            f"adapters such as {adapter!r}: it converts LoRA adapters whose init rewrote the base weights (PiSSA, "
            "OLoRA …) into plain LoRA. Save without it.")


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)


def rewrite_config(directory: str, data: dict) -> None:
    """Replace the ``adapter_config.json`` of an existing checkpoint folder, keeping its other files."""
    atomic_write(directory, {CONFIG_NAME: lambda path: write_json(path, data)}, unit=(CONFIG_NAME,))


def save_adapter(gm, directory: str, adapter: str, safe_serialization: bool = True,
                 state_dict: Optional[dict[str, torch.Tensor]] = None, initial_directory: Optional[str] = None,
                 save_embedding_layers="auto") -> None:
    """Write one adapter. ``state_dict`` (keys as ``gm.state_dict()``'s) supplies the values instead
    of the module: Trainer passes the full weights it gathered under FSDP or DeepSpeed, where the
    module itself holds only shards. ``initial_directory`` (PEFT's
    ``path_initial_model_for_weight_conversion``: the adapter as saved right after it was created)
    has the method convert what is written (``Method.initial_conversion``)."""
    from safetensors.torch import save_file

    _check_folder_name(adapter)
    state = gm.state_dict(keep_vars=True)
    mapping = adapter_key_map(gm, adapter, state)
    method = method_of(gm, adapter)
    if initial_directory is not None:
        check_initial_conversion(gm, adapter)
    if state_dict is not None:
        if method.saved_tensors is not None:
            # what these methods save is computed by running the module (the prompt encoder), not read from a dict
            raise NotImplementedError(
                f"save_pretrained(state_dict=...) is not supported for {type(gm.peft_config[adapter]).__name__} "
                "adapters: they save prompt embeddings computed by the module. Save without state_dict.")
        missing = sorted(name for name in mapping.values() if name not in state_dict)
        if missing:
            raise ValueError(f"state_dict lacks tensors of adapter {adapter!r}: {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}; pass the module's full state_dict().")
        state = state_dict
    if _saves_embeddings(gm, adapter, save_embedding_layers):
        mapping.update(embedding_keys(gm, adapter, state))
    tensors = {key: state[name] for key, name in mapping.items()}
    if method.saved_state is not None:
        tensors = method.saved_state(gm, adapter, tensors)
    tensors = _unshared(tensors)
    if method.saved_tensors is not None:
        tensors.update(_unshared(method.saved_tensors(gm, adapter)))
    config = _config_dict(gm, gm.peft_config[adapter])
    if initial_directory is not None:
        tensors, config = method.initial_conversion(gm, adapter, tensors, config, initial_directory)

    def write_config(path):
        write_json(path, config)

    if safe_serialization:
        writers = {SAFETENSORS_NAME: lambda path: save_file(tensors, path, metadata={"format": "pt"})}
    else:
        writers = {BIN_NAME: lambda path: torch.save(tensors, path)}
    writers[CONFIG_NAME] = write_config
    # the other format's weights file belongs to the old checkpoint: left there, it would be loaded (safetensors
    # first) with the new config
    atomic_write(directory, writers, unit=(CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME))


# --------------------------------------------------------------------------- reading


def adapter_dir(directory: str, adapter: str) -> str:
    return directory if adapter == "default" else os.path.join(directory, adapter)


def load_config(directory: str, registry=DEFAULT):
    path = os.path.join(directory, CONFIG_NAME)
    if os.path.isfile(directory):
        raise NotADirectoryError(
            f"{directory!r} is a file, not a checkpoint folder: pass the folder that holds {CONFIG_NAME} and the "
            f"adapter weights (here maybe {os.path.dirname(os.path.abspath(directory))!r}).")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"Adapter directory {directory!r} does not exist.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {CONFIG_NAME} in {directory!r}: not an adapter checkpoint.")
    try:
        with open(path) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the checkpoint is corrupted.") from error
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(data), "number")
        raise ValueError(f"{path} holds a JSON {kind}, but an adapter config is a JSON object "
                         '({"peft_type": ..., ...}); the checkpoint is corrupted or not a PEFT adapter.')
    peft_type = data.get("peft_type")
    known = registry.config_types()
    if peft_type not in known:
        raise NotImplementedError(
            f"{path}: peft_type {peft_type!r} is not supported by fxpeft (supported: {sorted(known)})."
        )
    config_type = known[peft_type]
    fields = {f.name for f in dataclasses.fields(config_type)}
    unsupported = config_type.unsupported(data)
    if unsupported:
        raise NotImplementedError(f"{path} uses PEFT options fxpeft does not implement: {', '.join(unsupported)}.")
    unknown = sorted(k for k in data if k not in fields and k not in IGNORED_FIELDS
                     and k not in config_type.known_fields())
    if unknown:
        warnings.warn(f"{path}: ignoring fields unknown to fxpeft: {', '.join(unknown)}", stacklevel=3)
    return config_type(**{k: v for k, v in data.items() if k in fields})


def load_weights(directory: str, device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    safetensors_path = os.path.join(directory, SAFETENSORS_NAME)
    bin_path = os.path.join(directory, BIN_NAME)
    if os.path.isfile(safetensors_path):
        from safetensors.torch import load_file
        try:
            return load_file(safetensors_path, device=str(device or "cpu"))
        except Exception as error:
            raise ValueError(f"Could not read {safetensors_path}: {error}. The file is corrupted or truncated.") from error
    if os.path.isfile(bin_path):
        try:
            return torch.load(bin_path, map_location=device or "cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"Could not read {bin_path}: {error}. The file is corrupted or truncated.") from error
    raise FileNotFoundError(f"No {SAFETENSORS_NAME} or {BIN_NAME} in {directory!r}.")


def check_and_copy(gm, adapter: str, weights: dict[str, torch.Tensor]) -> None:
    """Copy a checkpoint's tensors into the adapter's parameters; all checks happen first,
    so a failure changes nothing."""
    state = gm.state_dict(keep_vars=True)
    mapping = adapter_key_map(gm, adapter, state)
    method = method_of(gm, adapter)
    if method.loaded_state is not None:
        weights = method.loaded_state(gm, adapter, dict(weights))
    if method.checkpoint_keys is not None:
        ignored = method.checkpoint_keys(gm.peft_config[adapter], set(weights))
        weights = {key: value for key, value in weights.items() if key not in ignored}
    computed = method.saved_tensors(gm, adapter) if method.saved_tensors is not None else {}
    # the embeddings' base weights PEFT may save beside the adapter: loaded into the base, as PEFT does
    if any(key.endswith(".base_layer.weight") and key not in mapping for key in weights):
        mapping.update({key: name for key, name in embedding_keys(gm, adapter, state).items() if key in weights})
    expected = {**{key: state[name] for key, name in mapping.items()}, **computed}
    unexpected = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if unexpected or missing:
        raise ValueError(
            f"Checkpoint does not fit adapter {adapter!r}: "
            + (f"unexpected keys {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}; " if unexpected else "")
            + (f"missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}; " if missing else "")
            + "was it saved for another model or config?"
        )
    for key, value in weights.items():
        target = expected[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"Checkpoint tensor {key!r} has shape {tuple(value.shape)} but the model expects "
                f"{tuple(target.shape)} for {mapping.get(key, key)!r}; the checkpoint is for another model or config."
            )
    if computed:
        method.load_saved(gm, adapter, {key: weights[key] for key in computed})
    with torch.no_grad():
        for key in mapping:
            state[mapping[key]].copy_(weights[key])
