"""fxpeft: parameter-efficient fine-tuning as torch.fx graph rewriting.

    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=16, target_modules="all-linear"))

This file is the public API; see docs/ARCHITECTURE.md for how the pieces fit. For
transformers.Trainer with resume_from_checkpoint: ``from fxpeft.integrations import Trainer``
(not imported here: importing transformers.Trainer is slow).
"""
from . import forms, registry
from .blocks import compile_blocks
from .canonical import Site, find_sites
from .capture import CaptureError
from .distributed import full_adapter_state_dict, shard
from .configs import (BnbConfig, CordaConfig, EvaConfig, LoraConfig, PrefixTuningConfig, PromptEncoderConfig,
                      PromptTuningConfig, PromptTuningInit, TaskType)
from .inspection import Report, inspect
from .lifecycle import (active_adapters, adapter_indices, add_adapter, delete_adapter, disable_adapters,
                        from_pretrained, load_adapter, print_trainable_parameters, save_pretrained, set_adapter,
                        trainable_parameters, transform)
from .merging import export_merged, merge_adapter, merge_and_unload, unload, unmerge_adapter
from .module import PeftGraphModule
from .registry import Method, Registry, register_method
from .site_hooks import site_hooks

from . import passes as _passes  # noqa: E402,F401  (the top-level passes/ folder; registers every pass)
from .passes.adalora import AdaLoraConfig, update_and_allocate  # noqa: E402
from .passes.fourierft import FourierFTConfig  # noqa: E402
from .passes.ia3 import IA3Config  # noqa: E402
from .passes.ln_tuning import LNTuningConfig  # noqa: E402
from .passes.loha import LoHaConfig  # noqa: E402
from .passes.lokr import LoKrConfig  # noqa: E402
from .passes.lora_corda import preprocess_corda  # noqa: E402
from .passes.lora_eva import get_eva_state_dict, initialize_lora_eva_weights  # noqa: E402
from .passes.lora_init import LoftQConfig  # noqa: E402
from .passes.oft import OFTConfig  # noqa: E402
from .passes.boft import BOFTConfig  # noqa: E402
from .passes.hra import HRAConfig  # noqa: E402
from .passes.loraplus import create_loraplus_optimizer  # noqa: E402
from .passes.trainable_tokens import TrainableTokensConfig  # noqa: E402
from .passes.vera import VeraConfig  # noqa: E402
from .passes.weighted import add_weighted_adapter  # noqa: E402
from .passes.beft import BeftConfig  # noqa: E402
from .passes.hira import HiraConfig  # noqa: E402
from .passes.shira import ShiraConfig  # noqa: E402
from .passes.supertuning import SupertuningConfig  # noqa: E402
from .passes.miss import MissConfig  # noqa: E402
from .passes.delora import DeloraConfig  # noqa: E402
from .passes.gralora import GraloraConfig  # noqa: E402
from .passes.c3a import C3AConfig  # noqa: E402
from .passes.pvera import PveraConfig  # noqa: E402
from .passes.cpt import CPTConfig  # noqa: E402
from .passes.glora import GloraConfig  # noqa: E402
from .passes.peanut import PeanutConfig  # noqa: E402
from .passes.deft import DeftConfig  # noqa: E402
from .passes.vblora import VBLoRAConfig  # noqa: E402
from .passes.randlora import RandLoraConfig  # noqa: E402
from .passes.unilora import UniLoraConfig  # noqa: E402
from .passes.tinylora import TinyLoraConfig  # noqa: E402
from .passes.road import RoadConfig  # noqa: E402
from .passes.psoft import PsoftConfig  # noqa: E402
from .passes.osf import OSFConfig  # noqa: E402
from .passes.lily import LilyConfig  # noqa: E402
from .passes.frod import FrodConfig  # noqa: E402
from .passes.waveft import WaveFTConfig  # noqa: E402
from .passes.adamss import AdamssConfig  # noqa: E402
from .passes.cartridge import (CartridgeConfig, CartridgeEncoder, compose_cartridge_adapters,  # noqa: E402
                               initialize_kv_prefix_from_past_key_values, initialize_kv_prefix_from_text)
from .passes.adaption_prompt import AdaptionPromptConfig  # noqa: E402
from .passes.multitask_prompt_tuning import MultitaskPromptTuningConfig, MultitaskPromptTuningInit  # noqa: E402
from .passes.poly import PolyConfig  # noqa: E402
from .passes.xlora import XLoraConfig  # noqa: E402
from .passes.shadow import ShadowConfig  # noqa: E402

__all__ = [
    "transform", "add_adapter", "load_adapter", "from_pretrained", "save_pretrained", "delete_adapter",
    "set_adapter", "active_adapters", "disable_adapters", "adapter_indices", "add_weighted_adapter",
    "create_loraplus_optimizer", "update_and_allocate", "initialize_lora_eva_weights", "get_eva_state_dict",
    "preprocess_corda", "site_hooks",
    "compile_blocks", "merge_adapter", "unmerge_adapter", "merge_and_unload", "unload", "export_merged", "inspect", "Report",
    "trainable_parameters", "print_trainable_parameters",
    "shard", "full_adapter_state_dict",
    "LoraConfig", "PromptTuningConfig", "PromptTuningInit", "PromptEncoderConfig", "PrefixTuningConfig",
    "BnbConfig", "IA3Config", "AdaLoraConfig", "LoHaConfig", "LoKrConfig", "LoftQConfig", "OFTConfig", "BOFTConfig",
    "HRAConfig", "TrainableTokensConfig", "VeraConfig", "FourierFTConfig", "LNTuningConfig", "EvaConfig",
    "CordaConfig", "TaskType", "PeftGraphModule", "CaptureError", "find_sites", "Site",
    "registry", "forms", "Registry", "Method", "register_method",
    "BeftConfig",
    "HiraConfig",
    "ShiraConfig",
    "SupertuningConfig",
    "MissConfig",
    "DeloraConfig",
    "GraloraConfig",
    "C3AConfig",
    "CPTConfig",
    "PveraConfig", "GloraConfig", "PeanutConfig", "DeftConfig",
    "VBLoRAConfig",
    "RandLoraConfig",
    "UniLoraConfig",
    "TinyLoraConfig",
    "RoadConfig",
    "PsoftConfig",
    "OSFConfig",
    "LilyConfig",
    "FrodConfig",
    "WaveFTConfig",
    "AdamssConfig",
    "CartridgeConfig", "CartridgeEncoder", "initialize_kv_prefix_from_past_key_values",
    "initialize_kv_prefix_from_text", "compose_cartridge_adapters",
    "AdaptionPromptConfig",
    "MultitaskPromptTuningConfig", "MultitaskPromptTuningInit",
    "PolyConfig",
    "XLoraConfig",
    "ShadowConfig",
]
