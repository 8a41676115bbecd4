"""PEFT's ``PeftModel`` methods on fxpeft's result, so that a script written for
``get_peft_model`` runs unchanged on ``fxpeft.transform``.

Each method is the ``fxpeft`` function of the same name with PEFT's argument order and defaults
(``add_adapter(adapter_name, peft_config)``, ``save_pretrained(save_directory, …)``); they import
lazily because the functions live in modules that import the result class.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Optional, Sequence, Union


class PeftModelMethods:
    """Mixed into :class:`~fxpeft.module.PeftGraphModule` ahead of the model's own class, so these
    win over transformers' ``PeftAdapterMixin`` and ``PreTrainedModel.save_pretrained``."""

    # --------------------------------------------------------------- adapters

    def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False) -> None:
        """Add an adapter (PEFT's order: name, then config); it is trainable and not yet active."""
        from .configs import PeftConfigBase
        from .lifecycle import add_adapter

        if not isinstance(adapter_name, str) or not isinstance(peft_config, PeftConfigBase):
            raise TypeError("add_adapter takes (adapter_name, peft_config), PEFT's order; got "
                            f"({type(adapter_name).__name__}, {type(peft_config).__name__}).")
        add_adapter(self, peft_config, adapter_name)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs) -> None:
        """Load a PEFT-format adapter folder under ``adapter_name``. An existing adapter of that name
        gets the folder's weights in place (what Trainer does to resume from a checkpoint), so an
        optimizer holding its parameters keeps working."""
        from .lifecycle import load_adapter

        if adapter_name in self.peft_config:
            _replace_adapter_weights(self, model_id, adapter_name, is_trainable)
        else:
            load_adapter(self, model_id, adapter_name, is_trainable=is_trainable)

    def set_adapter(self, adapter_name: Union[str, Sequence[str]]) -> None:
        from .lifecycle import set_adapter

        set_adapter(self, adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        from .lifecycle import delete_adapter

        delete_adapter(self, adapter_name)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._fxpeft_active)

    @property
    def active_adapter(self) -> Union[str, list[str]]:
        """PEFT's: the active adapter's name, or the list when several are active."""
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    @contextlib.contextmanager
    def disable_adapter(self):
        """``with model.disable_adapter():`` runs the base model (PEFT's context manager)."""
        from .lifecycle import disable_adapters

        with disable_adapters(self):
            yield

    # --------------------------------------------------------------- folding

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        from .merging import merge_adapter

        merge_adapter(self, adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        from .merging import unmerge_adapter

        unmerge_adapter(self)

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None):
        from .merging import merge_and_unload

        return merge_and_unload(self, adapter_names, safe_merge=safe_merge)

    def unload(self):
        from .merging import unload

        return unload(self)

    # --------------------------------------------------------------- saving, counting

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, is_main_process: bool = True,
                        state_dict: Optional[dict] = None, path_initial_model_for_weight_conversion: Optional[str] = None,
                        save_embedding_layers="auto", **kwargs) -> None:
        """Write the adapters in PEFT's format, never the frozen base: this is also what
        ``transformers.Trainer`` calls for its checkpoints and ``save_model()``. A ``state_dict``
        (the module's keys; Trainer passes the weights it gathered under FSDP or DeepSpeed)
        supplies the adapter values instead of the module. ``path_initial_model_for_weight_conversion``:
        see ``fxpeft.save_pretrained``."""
        from .lifecycle import save_pretrained

        if is_main_process:
            save_pretrained(self, save_directory, selected_adapters, safe_serialization, state_dict=state_dict,
                            path_initial_model_for_weight_conversion=path_initial_model_for_weight_conversion,
                            save_embedding_layers=save_embedding_layers)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        from .lifecycle import trainable_parameters

        return trainable_parameters(self)

    def print_trainable_parameters(self) -> None:
        from .lifecycle import print_trainable_parameters

        print_trainable_parameters(self)

    # --------------------------------------------------------------- training helpers

    def enable_input_require_grads(self) -> None:
        """PEFT users call this before reentrant gradient checkpointing with frozen embeddings. fxpeft
        computes gradients of every adapter without it, so there is nothing to do."""

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None,
                                      every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the model's blocks in backward (``torch.utils.checkpoint``, non-reentrant) instead
        of keeping their activations: every block, or every ``every_n_layers``-th; with ``offload``
        what each block keeps for the recompute lives in host memory (transformers' arguments)."""
        from .blocks import running_blocks

        blocks = list(running_blocks(self).values())
        if not blocks:
            raise NotImplementedError(
                "Gradient checkpointing recomputes the model's repeated blocks in backward, and fxpeft found none in "
                "this model (no ModuleList of same-class blocks), or the method keeps the graph flat (prefix tuning). "
                "Train without gradient checkpointing, or with a smaller batch.")
        options = dict(gradient_checkpointing_kwargs or {})
        if options.pop("use_reentrant", False):
            warnings.warn("fxpeft checkpoints blocks non-reentrantly: the reentrant variant loses the adapters' "
                          "gradients when a block's inputs do not require grad.", stacklevel=2)
        for index, block in enumerate(blocks):
            block.gradient_checkpointing = index % every_n_layers == 0
            block.checkpoint_options = dict(options, offload=offload)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """transformers 5.24's name for gradient_checkpointing_enable (what Trainer calls)."""
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers, offload)

    def gradient_checkpointing_disable(self) -> None:
        from .blocks import blocks_of

        for block in blocks_of(self).values():
            block.gradient_checkpointing = False

    activation_checkpointing_disable = gradient_checkpointing_disable

    def generate(self, *args, **kwargs):
        """transformers' ``generate`` (the model's class's), each step one of fxpeft's graphs over a static
        KV cache; PEFT's ``adapter_names=`` gives each sequence its adapter (``fxpeft.generation``)."""
        from .generation import generate

        return generate(self, getattr(super(), "generate", None), *args, **kwargs)

    def create_masks_for_generate(self, **kwargs):
        """transformers turns the 2-D attention mask into the 4-D causal mask before each step with a
        static cache; after virtual tokens the model gets the 2-D mask instead (``fxpeft.generation``)."""
        from .generation import masks_for_generate

        return masks_for_generate(getattr(super(), "create_masks_for_generate", None), **kwargs)

    def _validate_model_kwargs(self, model_kwargs: dict) -> None:
        """transformers' check of generate's model keywords against the forward signature, which keeps the
        model's own signature: ``adapter_names`` (the per-sequence index generate passes on) and the per-call
        inputs methods read (``Method.call_inputs``: task_ids; the dispatcher checks them) are ours."""
        ours = {"adapter_names", *self._fxpeft_registry.call_inputs()}
        model_kwargs = {k: v for k, v in model_kwargs.items() if k not in ours}
        super()._validate_model_kwargs(model_kwargs)


def _replace_adapter_weights(gm, directory: str, adapter_name: str, is_trainable: bool) -> None:
    """The folder's weights into an existing adapter, in place; its trainability stays as it was
    (fixed when the adapter was added: flipping it would make torch.compile recompile)."""
    from . import checkpoint

    config = checkpoint.load_config(directory)
    ours = gm.peft_config[adapter_name]
    if type(config) is not type(ours):
        raise ValueError(f"{directory} holds a {type(config).__name__} adapter but {adapter_name!r} is a "
                         f"{type(ours).__name__}: load it under another name.")
    weights = checkpoint.load_weights(directory, next(gm.parameters()).device)
    checkpoint.check_and_copy(gm, adapter_name, weights)

