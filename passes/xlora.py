"""X-LoRA (mixture of LoRA experts), PEFT's tuners/xlora, on the additive form:

    s = softmax(classifier(h) / T)          h: the last hidden state of a first ("scaling") pass, (b, t, n_sites, n)
    Δ_l(x) = g · Σ_i scale_i · B_i A_i (x ⊙ s'[:, :, l, i])       at the l-th LoRA site, in module order

with ``s'`` the layer's scalings after ``top_k_lora`` masking and ``enable_softmax_topk``, ``g`` the
``global_scaling_weight`` and ``scale_i`` the expert's own LoRA scaling (alpha / r). The scaling pass is the
same model with every site's scalings at ``scaling_pass_value`` (PEFT's "disable_adapter_layers" there does not
reach its X-LoRA layers: the experts act, scaled by that value, top-k included), under no_grad. The experts
are PEFT LoRA checkpoints named by ``adapters`` (frozen unless ``use_trainable_adapters``); the classifier
trains. The scalings reach every site as the per-call input ``xlora_scalings`` (``Method.call_inputs``),
which ``Method.fill_call_inputs`` computes when a call does not give it.
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load_file
from torch import nn

from fxpeft import generation
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import AdapterGate, additive, child_dict
from fxpeft.registry import register_method

NAME = "xlora_scalings"
CLASSIFIER = "internal_xlora_classifier"  # PEFT's attribute: checkpoints hold base_model.internal_xlora_classifier.*


@dataclass
class XLoraConfig(PeftConfigBase):
    """PEFT's XLoraConfig: the same fields, defaults and warnings."""

    hidden_size: int = None  # type: ignore[assignment]
    adapters: dict = None  # type: ignore[assignment]
    enable_softmax: bool = True
    enable_softmax_topk: bool = False
    layerwise_scalings: bool = False
    xlora_depth: int = 1
    xlora_size: int = 2048
    xlora_dropout_p: float = 0.2
    use_trainable_adapters: bool = False
    softmax_temperature: float = 1.0
    top_k_lora: Optional[int] = None
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0

    peft_type = "XLORA"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's own warnings, in its words
        if self.hidden_size is None:
            warnings.warn("No value was provided for `hidden_size`. This will be set to 4096 by default, please "
                          "ensure that this is correct.")
            self.hidden_size = 4096
        if self.adapters is None:
            warnings.warn("No value was provided for `adapters`. This will be set to empty, please ensure that this "
                          "is correct.")
            self.adapters = {}
        if self.enable_softmax_topk and self.top_k_lora is None:
            warnings.warn("`enable_softmax_topk` enabled `top_k_lora` is not set")
        if self.enable_softmax_topk and self.enable_softmax:
            warnings.warn("`enable_softmax_topk` and `enable_softmax` are both enabled. This will result in worse "
                          "performance.")
        if self.top_k_lora is not None and self.top_k_lora < 1:
            warnings.warn("`top_k_lora` value must be at least 1.")
        # PEFT raises this when it builds the classifier; a config that cannot build is refused at once
        if self.xlora_depth <= 0:
            raise ValueError("X-LoRA depth must be strictly positive.")


def read_expert(path: str) -> tuple[dict, tuple[float, float]]:
    """A saved PEFT LoRA adapter: {module path: {"lora_A": (r, in), "lora_B": (out, r)}} and (its scaling, its
    lora_dropout)."""
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise FileNotFoundError(f"X-LoRA expert {path!r} is no saved LoRA adapter folder (no adapter_config.json): "
                                "XLoraConfig.adapters maps names to folders written by save_pretrained.")
    with open(os.path.join(path, "adapter_config.json")) as handle:
        data = json.load(handle)
    if data.get("peft_type") != "LORA":
        raise ValueError(f"X-LoRA experts are LoRA adapters, but {path} holds a {data.get('peft_type')} adapter.")
    if data.get("use_dora") or data.get("rank_pattern") or data.get("alpha_pattern") or data.get("use_rslora"):
        raise NotImplementedError(f"{path}: X-LoRA experts with DoRA, rsLoRA or rank/alpha patterns are not "
                                  "supported by fxpeft yet.")
    factors: dict[str, dict] = {}
    for key, value in load_file(os.path.join(path, "adapter_model.safetensors")).items():
        module, kind, _ = key.removeprefix("base_model.model.").rsplit(".", 2)
        factors.setdefault(module, {})[kind] = value
    return factors, (data["lora_alpha"] / data["r"], data.get("lora_dropout", 0.0))


def resolve_config(gm, sites, config: XLoraConfig):
    """The experts' sites as the targets (PEFT's X-LoRA adapts exactly where its LoRA experts sit)."""
    if config.use_trainable_adapters:
        raise NotImplementedError("XLoraConfig(use_trainable_adapters=True) is not supported by fxpeft yet (PEFT "
                                  "saves trained experts only in its per-expert subfolders); keep the experts frozen.")
    held = [name for name, other in gm.peft_config.items() if isinstance(other, XLoraConfig)]
    if held:  # one scalings input serves the model's sites; PEFT's XLoraModel has one classifier too
        raise ValueError(f"This model already holds the X-LoRA adapter {held[0]!r}; X-LoRA takes one adapter per model "
                         "(its experts are the adapters it mixes): name every expert in that adapter's `adapters`, or "
                         "transform another copy of the model.")
    if not config.adapters:
        raise ValueError("XLoraConfig.adapters is empty: name the LoRA experts, {name: path of a saved LoRA adapter}.")
    experts = [read_expert(path) for path in config.adapters.values()]
    # an attribute, not a field: it is no part of PEFT's config (nor of its JSON); targeting reads it
    resolved = copy.copy(config)
    resolved.target_modules = sorted({path for factors, _ in experts for path in factors})
    resolved._experts = experts  # read by prepare, dropped once the sites hold them
    return resolved


class XLoraClassifier(nn.Module):
    """PEFT's XLoraClassifier: an MLP over the last hidden state, giving (b, t, n_sites, n_experts)."""

    def __init__(self, config: XLoraConfig, n_classes: int, n_layers: int):
        super().__init__()
        self.n_classes, self.n_layers = n_classes, n_layers
        self.temperature, self.softmax = config.softmax_temperature, config.enable_softmax
        self.layerwise = config.layerwise_scalings
        out = n_classes * n_layers if config.layerwise_scalings else n_classes
        layers, width = [], config.hidden_size
        for _ in range(config.xlora_depth - 1):  # PEFT's order of modules (and of draws)
            layers += [nn.Linear(width, config.xlora_size), nn.ReLU()]
            if config.xlora_dropout_p > 0:
                layers.append(nn.Dropout(config.xlora_dropout_p))
            width = config.xlora_size
        self.layers = nn.Sequential(*layers, nn.Linear(width, out))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.layers(hidden)
        b, t = hidden.shape[:2]
        if not self.layerwise:
            logits = logits.unsqueeze(2).expand(-1, -1, self.n_layers, -1)
        scalings = logits.reshape(b, t, self.n_layers, self.n_classes)
        return torch.softmax(scalings / self.temperature, dim=-1) if self.softmax else scalings


class XLoraExperts(nn.Module):
    """One site's LoRA experts and its layer number (its index among the sites, in module order)."""

    def __init__(self, config: XLoraConfig, layer: int, factors: list, dtype, device):
        super().__init__()
        self.top_k, self.softmax_topk = config.top_k_lora, config.enable_softmax_topk
        self.weight = config.global_scaling_weight
        self.lora_A, self.lora_B, self.scales = nn.ParameterDict(), nn.ParameterDict(), {}
        self.dropout = nn.ModuleDict()  # each expert's lora_dropout, on its scaled input (PEFT's order)
        for index, found in factors:  # (expert index, (A, B, (scale, dropout))) for the experts at this site
            a, b, (scale, p) = found
            self.dropout[str(index)] = nn.Dropout(p) if p > 0 else nn.Identity()
            self.lora_A[str(index)] = nn.Parameter(a.to(device, dtype), requires_grad=config.use_trainable_adapters)
            self.lora_B[str(index)] = nn.Parameter(b.to(device, dtype), requires_grad=config.use_trainable_adapters)
            self.scales[str(index)] = scale
        self.experts = list(self.scales)
        self.register_buffer("layer", torch.tensor(layer), persistent=False)

    def forward(self, x: torch.Tensor, scalings: Optional[torch.Tensor]) -> torch.Tensor:
        if scalings is None:  # the adapter is inactive (its gate is 0): a graph computing without its scalings
            return x.new_zeros(*x.shape[:-1], self.lora_B[self.experts[0]].shape[0])
        s = scalings.index_select(2, self.layer.view(1)).squeeze(2)  # (b, t, n): a buffer, so blocks share code
        if self.top_k is not None:
            keep = torch.zeros_like(s, dtype=torch.bool).scatter(-1, s.topk(self.top_k, dim=-1).indices, True)
            s = s * keep.to(s.dtype)
        if self.softmax_topk:
            nonzero = s != 0
            s = torch.softmax(s.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        out = None
        for index in self.experts:  # a list: ParameterDict.items() is a generator, which torch.compile cannot trace
            i = int(index)
            term = self.dropout[index](x * s[..., i:i + 1]) @ self.lora_A[index].T @ self.lora_B[index].T
            term = term * (self.scales[index] * self.weight)
            out = term if out is None else out + term
        return out


def prepare(gm, targets, config: XLoraConfig, adapter: str) -> None:
    if getattr(gm._fxpeft_source, "config", None) is not None and getattr(gm._fxpeft_source.config, "use_cache",
                                                                          False):
        raise ValueError("`use_cache` must be False (PEFT's XLoraModel refuses a model whose config.use_cache is "
                         "True): set model.config.use_cache = False before transforming.")
    width = getattr(getattr(gm._fxpeft_source, "config", None), "hidden_size", None)
    if width is not None and width != config.hidden_size:  # PEFT fails at the first call, in the classifier's matmul
        raise ValueError(f"XLoraConfig.hidden_size is {config.hidden_size} but the model's hidden size is {width}: "
                         f"the classifier reads the last hidden state; set hidden_size={width}.")
    dtype = next(gm.parameters()).dtype  # PEFT: the classifier takes the model's first parameter's dtype
    device = targets[0][2].device
    classifier = XLoraClassifier(config, len(config.adapters), len(targets)).to(device, dtype)
    child_dict(gm, CLASSIFIER)[adapter] = classifier
    # each site's layer number (its index among the sites, PEFT's module order) and its experts' factors
    experts = config.__dict__.pop("_experts")
    config._sites = {site.path: (layer, [(i, (f[site.path]["lora_A"], f[site.path]["lora_B"], scale))
                                         for i, (f, scale) in enumerate(experts) if site.path in f])
                     for layer, (_, site, _) in enumerate(targets)}


def add_xlora(module: nn.Module, site, weight, config, adapter: str) -> None:
    layer, factors = config._sites.pop(site.path)
    if not config._sites:
        del config._sites
    child_dict(module, "xlora_experts")[adapter] = XLoraExperts(config, layer, factors, weight.dtype, weight.device)
    child_dict(module, "xlora_gate")[adapter] = AdapterGate(1.0).to(weight.device)


def delta(lw, site, module, adapter: str, x):
    return lw.call_module(f"{site.path}.xlora_experts.{adapter}", x, lw.call_input(NAME))


def delta_weight(gm, site, module, adapter: str):
    raise ValueError(f"X-LoRA adapter {adapter!r} cannot be merged: its weight change depends on each token's "
                     "scalings. Keep it unmerged.")


def fill_call_inputs(gm, adapter: str, args, kwargs, compiled: bool) -> dict:
    """The scaling pass (PEFT's ``_pre_forward``): the same call with every scaling at ``scaling_pass_value``,
    its last hidden state through the classifier."""
    if generation.cache_name_of(kwargs) is not None:
        # the scaling pass would write the KV cache a second time, and PEFT recomputes the whole sequence per step
        raise ValueError(f"X-LoRA adapter {adapter!r} computes its scalings from a pass over the whole sequence, "
                         "which a KV cache cannot serve: call without a cache, gm.generate(..., use_cache=False) "
                         "(PEFT's X-LoRA always generates with use_cache=False).")
    config = gm.peft_config[adapter]
    classifier = getattr(gm, CLASSIFIER)[adapter]
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs["inputs_embeds"]
    b, t = ids.shape[:2]
    dummy = torch.full((b, t, classifier.n_layers, classifier.n_classes), float(config.scaling_pass_value),
                       dtype=next(classifier.parameters()).dtype, device=ids.device)
    with torch.no_grad():
        out = gm(*args, **{**kwargs, NAME: dummy, "output_hidden_states": True, "return_dict": True})
    return {NAME: classifier(out.hidden_states[-1])}


def loaded_state(gm, adapter: str, weights: dict) -> dict:
    """PEFT 0.21.2 saves its classifier through a filter that drops every key holding ``.<expert name>.``: with
    experts named "0", "1", ... its ``layers.0`` (and ``layers.1`` …) never reach the file, and its loader keeps
    those layers as initialised. So does this one, saying so."""
    own = getattr(gm, CLASSIFIER)[adapter].state_dict()
    prefix = f"base_model.{CLASSIFIER}."
    absent = [key for key in own if prefix + key not in weights]
    if absent and len(absent) < len(own) or absent and not any(k.startswith(prefix) for k in weights):
        warnings.warn(f"The checkpoint of X-LoRA adapter {adapter!r} lacks classifier tensors {absent} (PEFT's save "
                      "drops keys that contain an expert's name, such as layers.0 when an expert is named '0'); "
                      "they keep their initial values, as in PEFT.")
    return {**{prefix + key: value for key, value in own.items() if key in absent}, **weights}


METHOD = register_method(additive(
    name="xlora", config_type=XLoraConfig, create=add_xlora, delta=delta, delta_weight=delta_weight,
    containers=("xlora_experts", CLASSIFIER), shared=(CLASSIFIER,), unsaved_containers=("xlora_experts",),
    loaded_state=loaded_state, gates="xlora_gate", kinds=("linear",),
    dtype_of=lambda module, adapter: module.xlora_experts[adapter].lora_A[next(iter(module.xlora_experts[adapter].lora_A))].dtype,
    lower_site=lambda lw, site, module, adapters: None, prepare=prepare, resolve_config=resolve_config,
    call_inputs=(NAME,), fill_call_inputs=fill_call_inputs,
    describe=lambda module, adapter: f"{len(module.xlora_experts[adapter].lora_A)} experts"))
