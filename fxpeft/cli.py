"""The ``fxpeft`` command line: inspect, merge, export, convert and describe adapters saved on disk.

    fxpeft inspect MODEL_DIR [ADAPTER_DIR] [--site PATH] [--out pic.svg]
    fxpeft merge   MODEL_DIR ADAPTER_DIR OUT_DIR [--safe]
    fxpeft export  MODEL_DIR ADAPTER_DIR OUT_DIR
    fxpeft convert ADAPTER_DIR OUT_DIR [--model MODEL_DIR]
    fxpeft info    ADAPTER_DIR

MODEL_DIR is what ``save_pretrained`` of a transformers model writes (config.json + weights);
ADAPTER_DIR what PEFT's or fxpeft's ``save_pretrained`` writes (adapter_config.json + weights).
Built on argparse: five subcommands over positional folders need nothing more, and the command
line adds no dependency. Errors print one line naming the fix and exit with status 1
(``FXPEFT_DEBUG=1`` shows the traceback instead); ``--quiet`` (or FXPEFT_PROGRESS=0) hides progress.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings

FOLDERS = {  # what each positional folder is, for --help
    "MODEL_DIR": "folder written by a transformers model's save_pretrained (config.json + weights)",
    "ADAPTER_DIR": "adapter folder written by PEFT's or fxpeft's save_pretrained (adapter_config.json + weights)",
    "OUT_DIR": "folder to write (created if missing)",
}
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class UsageError(Exception):
    """A mistake in what the user passed: printed as one line, without a traceback."""


# --------------------------------------------------------------------------- folders


def _check_folder(path: str, what: str) -> None:
    if os.path.isfile(path):
        raise UsageError(f"{path} is a file; pass the {what} folder that holds it ({os.path.dirname(path) or '.'}).")
    if not os.path.isdir(path):
        raise UsageError(f"{path} does not exist; pass the {what} folder.")


def check_model_dir(path: str) -> None:
    _check_folder(path, "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        hint = (" It holds adapter_config.json: it is an adapter; pass the base model's folder first."
                if os.path.isfile(os.path.join(path, "adapter_config.json")) else "")
        raise UsageError(f"{path} is not a model folder: config.json is missing (save the model with "
                         f"model.save_pretrained(folder)).{hint}")
    if not any(os.path.isfile(os.path.join(path, name)) for name in MODEL_WEIGHTS):
        raise UsageError(f"{path} has config.json but no weights: model.safetensors (or pytorch_model.bin) is missing; "
                         "save the model with model.save_pretrained(folder).")


def check_adapter_dir(path: str) -> None:
    from .checkpoint import BIN_NAME, CONFIG_NAME, SAFETENSORS_NAME

    _check_folder(path, "adapter")
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        hint = " It holds config.json: it is a model, not an adapter." if os.path.isfile(
            os.path.join(path, "config.json")) else ""
        raise UsageError(f"{path} is not an adapter folder: {CONFIG_NAME} is missing (save the adapter with "
                         f"save_pretrained of PEFT or fxpeft).{hint}")
    if not any(os.path.isfile(os.path.join(path, name)) for name in (SAFETENSORS_NAME, BIN_NAME)):
        raise UsageError(f"{path} has {CONFIG_NAME} but no weights: {SAFETENSORS_NAME} (or {BIN_NAME}) is missing.")


def load_model(path: str):
    """The transformers model saved in ``path``, as the class its config.json names."""
    check_model_dir(path)
    import transformers

    from . import progress

    progress.step(f"loading {path}")

    with open(os.path.join(path, "config.json")) as handle:
        architectures = json.load(handle).get("architectures") or []
    cls = next((getattr(transformers, name) for name in architectures if hasattr(transformers, name)),
               transformers.AutoModel)
    return cls.from_pretrained(path).eval()


def load_adapted(model_dir: str, adapter_dir: str):
    check_adapter_dir(adapter_dir)
    import fxpeft

    model = load_model(model_dir)
    return model, fxpeft.from_pretrained(model, adapter_dir)


# --------------------------------------------------------------------------- commands


def cmd_inspect(args) -> None:
    import fxpeft

    model_dir, adapter_dir = args.model_dir, args.adapter_dir
    if adapter_dir is None:
        if args.site or args.out:
            raise UsageError("--site and --out draw what an adapter rewrote: pass ADAPTER_DIR too "
                             "(fxpeft inspect MODEL_DIR ADAPTER_DIR --out pic.svg).")
        _print_sites(load_model(model_dir))
        return
    _, gm = load_adapted(model_dir, adapter_dir)
    report = fxpeft.inspect(gm)
    print(report)
    if args.site:
        picture = report.site(args.site)
        print(f"\n{report.diff(args.site)}")
    else:
        picture = report.summary()
    if args.out:
        picture.save(args.out)
        print(f"\nwrote {args.out}")


def _print_sites(model) -> None:
    """What fxpeft can adapt in a model without an adapter: its sites, by kind and shape."""
    from .canonical import find_sites
    from .module import build

    gm = build(model)
    sites = find_sites(gm._fxpeft_signatures[gm._fxpeft_primary].canonical, gm)
    width = max((len(s.path) for s in sites), default=6)
    print(f"{'module':<{width}}  kind       weight")
    for site in sites:
        print(f"{site.path:<{width}}  {site.kind:<9}  {'x'.join(map(str, gm.get_parameter(site.weight).shape))}")
    print(f"{len(sites)} sites an adapter can target (target_modules names them by path or last name)")


def cmd_merge(args) -> None:
    import fxpeft

    model, gm = load_adapted(args.model_dir, args.adapter_dir)
    merged = fxpeft.merge_and_unload(gm, safe_merge=args.safe)
    from . import progress

    progress.step(f"writing {args.out_dir}")
    model.save_pretrained(args.out_dir, state_dict=merged.state_dict())  # base keys: the original class loads it
    copied = _copy_side_files(args.model_dir, args.out_dir)
    print(f"merged {args.adapter_dir} into {args.model_dir}: wrote {args.out_dir} "
          f"(load it with {type(model).__name__}.from_pretrained){'; copied ' + ', '.join(copied) if copied else ''}")


def _copy_side_files(source: str, target: str) -> list:
    """Tokenizer and other files beside the weights, so the merged folder is complete."""
    copied = []
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        weights = name.endswith((".safetensors", ".bin", ".index.json", ".pt2"))
        if os.path.isfile(path) and not weights and not os.path.exists(os.path.join(target, name)):
            shutil.copy2(path, os.path.join(target, name))
            copied.append(name)
    return copied


def cmd_export(args) -> None:
    import fxpeft

    _, gm = load_adapted(args.model_dir, args.adapter_dir)
    paths = fxpeft.export_merged(gm, args.out_dir)
    print(f"wrote {paths['weights']} (merged weights) and {paths['program']} (torch.export program: "
          "torch.export.load(path).module())")


def _adapter_dirs(path: str) -> list:
    """The adapter at ``path`` and those saved in its subfolders (adapters other than "default")."""
    from .checkpoint import CONFIG_NAME

    found = [("default", path)] if os.path.isfile(os.path.join(path, CONFIG_NAME)) else []
    for entry in sorted(os.listdir(path)) if os.path.isdir(path) else []:
        if os.path.isfile(os.path.join(path, entry, CONFIG_NAME)):
            found.append((entry, os.path.join(path, entry)))
    if not found:
        check_adapter_dir(path)  # raises, naming the missing file
    return found


def _loadability(path: str):
    """(config or None, lines saying what fxpeft can and cannot load of the checkpoint)."""
    from .checkpoint import load_config

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            config = load_config(path)
        except (NotImplementedError, ValueError) as error:
            return None, [f"fxpeft cannot load it: {error}"]
    lines = ["fxpeft can load it"] + [f"note: {w.message}" for w in caught]
    return config, lines


def cmd_convert(args) -> None:
    from safetensors.torch import save_file

    from .checkpoint import CONFIG_NAME, SAFETENSORS_NAME, _unshared, atomic_write, load_weights
    from .registry import DEFAULT

    adapters = _adapter_dirs(args.adapter_dir)
    for name, path in adapters:
        check_adapter_dir(path)
        config, lines = _loadability(path)
        target = args.out_dir if name == "default" else os.path.join(args.out_dir, name)
        if args.model is not None and config is not None:
            import fxpeft

            model = load_model(args.model)  # a fresh model per adapter: from_pretrained shares its weights
            gm = fxpeft.from_pretrained(model, path, adapter_name=name)  # every key and shape checked
            fxpeft.save_pretrained(gm, args.out_dir, adapter_names=[name])
            lines.append(f"checked against {args.model}: every tensor fits; re-saved by fxpeft")
        else:
            weights = load_weights(path)
            with open(os.path.join(path, CONFIG_NAME)) as handle:
                data = json.load(handle)
            if config is not None:
                prefix = DEFAULT.method_for(config).checkpoint_prefix
                odd = sorted(k for k in weights if not k.startswith(prefix))
                if odd:
                    lines.append(f"warning: {len(odd)} keys do not start with {prefix!r} (e.g. {odd[0]}); "
                                 "fxpeft will reject them")
            tensors = _unshared(weights)
            atomic_write(target, {SAFETENSORS_NAME: lambda p: save_file(tensors, p, metadata={"format": "pt"}),
                                  CONFIG_NAME: lambda p: write_json(p, data)})
            lines.append(f"{len(weights)} tensors re-saved as safetensors"
                         + ("" if args.model else " (pass --model MODEL_DIR to check every key against the model)"))
        print(f"{path} -> {target}:")
        for line in lines:
            print(f"  {line}")


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)


def _tensor_shapes(path: str) -> tuple:
    """({key: shape}, file name) without loading the tensors where the format allows."""
    from .checkpoint import BIN_NAME, SAFETENSORS_NAME

    file = os.path.join(path, SAFETENSORS_NAME)
    if os.path.isfile(file):
        from safetensors import safe_open

        with safe_open(file, "pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}, file
    import torch

    file = os.path.join(path, BIN_NAME)
    return {k: tuple(v.shape) for k, v in torch.load(file, map_location="cpu", weights_only=True,
                                                     mmap=True).items()}, file


def cmd_info(args) -> None:
    from math import prod

    from .registry import DEFAULT

    for name, path in _adapter_dirs(args.adapter_dir):
        check_adapter_dir(path)
        with open(os.path.join(path, "adapter_config.json")) as handle:
            data = json.load(handle)
        config, loadable = _loadability(path)
        shapes, file = _tensor_shapes(path)
        method = DEFAULT.method_for(config) if config is not None else None
        containers = set(method.containers if method else ()) | {"modules_to_save"}
        prefix = method.checkpoint_prefix if method else "base_model.model."
        modules: dict = {}
        for key, shape in shapes.items():
            parts = key[len(prefix):].split(".") if key.startswith(prefix) else key.split(".")
            cut = next((i for i, part in enumerate(parts) if part in containers), len(parts) - 1)
            modules.setdefault(".".join(parts[:cut]) or key, []).append((".".join(parts[cut:]), shape))
        total = sum(prod(shape) for shape in shapes.values())
        print(f"adapter {name!r} in {path}")
        print(f"  method: {data.get('peft_type')}" + (f" (fxpeft: {method.name})" if method else ""))
        print(f"  {'; '.join(loadable)}")
        print(f"  base model: {data.get('base_model_name_or_path') or '(not recorded)'}; task: {data.get('task_type')}")
        if config is not None:  # what differs from the method's defaults, and where it goes
            defaults = type(config)().to_dict()
            settings = {k: v for k, v in sorted(data.items()) if k in defaults and (v != defaults[k] or k in (
                "target_modules", "r")) and k not in ("base_model_name_or_path", "task_type", "inference_mode")}
            print("  config: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
        print(f"  weights: {os.path.basename(file)}, {os.path.getsize(file):,d} bytes, {len(shapes)} tensors, "
              f"{total:,d} parameters (trainable when loaded with is_trainable=True)")
        print(f"  {len(modules)} modules:")
        for module, tensors in sorted(modules.items()):
            print(f"    {module}: " + ", ".join(f"{t} {'x'.join(map(str, s))}" for t, s in tensors))


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fxpeft", description="Inspect, merge, export, convert and describe "
                                     "PEFT / fxpeft adapters saved on disk.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bar (same as FXPEFT_PROGRESS=0)")

    def command(name, run, help_text, *positional):
        sub = commands.add_parser(name, help=help_text, description=help_text, parents=[common])
        sub.set_defaults(run=run)
        for metavar in positional:
            sub.add_argument(metavar.lower(), metavar=metavar, help=FOLDERS[metavar])
        return sub

    sub = command("inspect", cmd_inspect, "Print the table of rewritten sites and draw a picture (without "
                  "ADAPTER_DIR: list the sites an adapter can target).",
                  "MODEL_DIR")
    sub.add_argument("adapter_dir", metavar="ADAPTER_DIR", nargs="?", help=FOLDERS["ADAPTER_DIR"])
    sub.add_argument("--site", metavar="PATH", help="draw (and diff) one site, e.g. model.layers.0.self_attn.q_proj")
    sub.add_argument("--out", metavar="PIC", help="write the picture: .svg, .png (needs Graphviz) or .dot")

    sub = command("merge", cmd_merge, "Fold the adapter into the base weights and save a model folder that "
                  "from_pretrained of the original class loads.", "MODEL_DIR", "ADAPTER_DIR", "OUT_DIR")
    sub.add_argument("--safe", action="store_true", help="check merged weights for NaN/inf before writing (safe_merge)")

    command("export", cmd_export, "Write the merged model as model.safetensors and a torch.export program "
                  "model.pt2 (fxpeft.export_merged).", "MODEL_DIR", "ADAPTER_DIR", "OUT_DIR")

    sub = command("convert", cmd_convert, "Re-save an adapter checkpoint as safetensors (e.g. from .bin), saying what "
                  "fxpeft can and cannot load of it.", "ADAPTER_DIR", "OUT_DIR")
    sub.add_argument("--model", metavar="MODEL_DIR", help="check every tensor against this base model and re-save "
                     "through fxpeft")

    command("info", cmd_info, "Describe an adapter folder: method, config, targets, tensors, sizes.", "ADAPTER_DIR")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quiet:
        os.environ["FXPEFT_PROGRESS"] = "0"
    from . import progress

    if not progress.enabled():  # transformers' own bars (loading, writing shards) keep quiet too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        with progress.task(f"fxpeft {args.command}"):
            args.run(args)
    except Exception as error:  # one line naming the fix; the traceback on request
        if os.environ.get("FXPEFT_DEBUG"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        kind = "" if isinstance(error, UsageError) else f"{type(error).__name__}: "
        print(f"fxpeft {args.command}: error: {kind}{' '.join(str(message).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
