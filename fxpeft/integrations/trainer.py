"""``transformers.Trainer`` for fxpeft modules: resuming and ``load_best_model_at_end``.

The plain ``transformers.Trainer`` already trains, evaluates and saves an fxpeft module: the
module's class is the model's class behind fxpeft's (Trainer reads labels and columns from its
forward signature), and it is a ``PreTrainedModel``, so Trainer saves through its
``save_pretrained``, which writes the adapter in PEFT's format.

Loading a checkpoint back is where the plain Trainer cannot follow (transformers 5.24,
``Trainer._load_from_checkpoint`` / ``_load_best_model``): it loads an adapter-only folder only
when ``isinstance(model, peft.PeftModel)`` (``trainer_utils._is_peft_model``); for any other
model it reads ``model.safetensors`` or, missing that, a sharded index, and fails on a folder that
holds only ``adapter_model.safetensors``. This subclass overrides just those two methods to load
the adapters with ``model.load_adapter``, which replaces an existing adapter's weights in place,
so the optimizer Trainer already built keeps the same parameters and then gets its state from
the checkpoint's ``optimizer.pt``.

Tested single-process (CPU); DeepSpeed and FSDP keep their own checkpoint formats and are not.
"""
from __future__ import annotations

from typing import Optional

import transformers
from torch import nn

from .. import checkpoint
from ..module import PeftGraphModule


def _require_adapters(model) -> PeftGraphModule:
    if not isinstance(model, PeftGraphModule) or not model.peft_config:
        what = "an fxpeft module without adapters" if isinstance(model, PeftGraphModule) else type(model).__name__
        raise ValueError(
            f"fxpeft.integrations.Trainer trains fxpeft modules with adapters, but got {what}. Pass "
            "model=fxpeft.transform(model, fxpeft.LoraConfig(...)) (or fxpeft.from_pretrained(model, adapter_dir, "
            "is_trainable=True)); to train a model without adapters use transformers.Trainer.")
    return model


def _load_adapters(model: PeftGraphModule, directory: str) -> None:
    """Every adapter of ``model`` from a folder its ``save_pretrained`` wrote (Trainer saves them
    all: "default" at the top, others in subfolders), in place."""
    for name in model.peft_config:
        model.load_adapter(checkpoint.adapter_dir(directory, name), name, is_trainable=True)


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` that can also resume an fxpeft module from its checkpoints
    (``train(resume_from_checkpoint=...)``) and load the best one (``load_best_model_at_end``)."""

    def __init__(self, model: Optional[nn.Module] = None, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        _require_adapters(self.model)  # also a model built by model_init=

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[nn.Module] = None) -> None:
        _load_adapters(_require_adapters(self.model if model is None else model), resume_from_checkpoint)

    def _load_best_model(self) -> None:
        _load_adapters(_require_adapters(self.model), self.state.best_model_checkpoint)
