"""passes/lora_eva.py against PEFT 0.21.2's EVA: the same A per layer (bit for bit), the same rank
redistribution, alphas and dropped layers."""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.config import EvaConfig as PeftEvaConfig
from peft.tuners.lora.eva import get_eva_state_dict
from peft.utils.incremental_pca import IncrementalPCA
from torch import nn

from fxpeft import LoraConfig
from fxpeft.passes.lora_eva import EvaConfig, IncrementalSVD, eva_layer_inits, eva_state_dict


def _call(model, batch):
    return model(**batch)


def _config(r=2, **eva):
    """fxpeft's LoraConfig for eva_state_dict (it reads r and eva_config, and hands it to
    prepare_model_inputs_fn as PEFT does)."""
    return LoraConfig(r=r, init_lora_weights="eva", eva_config=EvaConfig(**eva))


class Streams(nn.Module):
    """a and d read the same input (one SVD), c a different low-rank one, b isotropic noise (its
    flat spectrum loses the rank budget: rank 0)."""

    def __init__(self):
        super().__init__()
        self.a, self.d, self.c, self.b = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(64, 8)

    def forward(self, x, y, z):
        return self.a(x) + self.d(x) + self.c(z) + self.b(y)


def _low_rank_rows(n):
    basis = torch.linalg.qr(torch.randn(16, 16))[0][:4]
    return (torch.randn(n, 4) * torch.tensor([4.0, 3.0, 2.0, 1.5])) @ basis + 0.01 * torch.randn(n, 16)


def _streams():
    torch.manual_seed(0)
    model = Streams()
    data = [{"x": _low_rank_rows(40), "z": _low_rank_rows(40), "y": torch.randn(40, 64)} for _ in range(5)]
    return model, data


@pytest.mark.parametrize("whiten", [False, True])
def test_eva_state_dict_matches_peft(whiten):
    model, data = _streams()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b", "c", "d"], init_lora_weights="eva",
                             eva_config=PeftEvaConfig(whiten=whiten))
    theirs = get_eva_state_dict(model, data, peft_config=config, forward_fn=_call, prepare_model_inputs_fn=None,
                                prepare_layer_inputs_fn=None, show_progress_bar=False)
    # in another order than the model's: d before a would make d own the shared SVD
    ours = eva_state_dict(model, data, {"d": 2, "b": 2, "c": 2, "a": 2}, _config(whiten=whiten), forward_fn=_call,
                          prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, max_batches=100)
    assert {k: v.size(0) for k, v in ours.items()} == {"a": 3, "d": 3, "c": 2, "b": 0}
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name
    assert model.training and not model.a._forward_hooks


def test_eva_layer_inits_match_initialize_lora_eva_weights():
    model, data = _streams()
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b", "c", "d"], init_lora_weights="eva")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(model), config)
        peft.initialize_lora_eva_weights(wrapped, data, forward_fn=_call, prepare_model_inputs_fn=None,
                                         prepare_layer_inputs_fn=None, show_progress_bar=False)
    names = ("a", "b", "c", "d")
    eva = eva_state_dict(model, data, dict.fromkeys(names, 2), _config(), forward_fn=_call,
                         prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, max_batches=100)
    inits = eva_layer_inits(eva, dict.fromkeys(names, 2), dict.fromkeys(names, 4))
    adapted = wrapped.base_model.model
    assert type(adapted.b) is nn.Linear and inits["b"][0] == 0  # rank 0: the layer keeps no adapter
    saved = wrapped.peft_config["default"]
    assert saved.rank_pattern == {n: inits[n][0] for n in ("a", "d")}
    assert saved.alpha_pattern == {n: inits[n][1] for n in ("a", "d")} == {"a": 6.0, "d": 6.0}
    for name in ("a", "c", "d"):
        rank, alpha, a = inits[name]
        layer = getattr(adapted, name)
        assert torch.equal(a.to(torch.float32), layer.lora_A["default"].weight)
        assert not layer.lora_B["default"].weight.any()
        assert layer.scaling["default"] == alpha / rank


def test_eva_on_tiny_llama_with_language_model_masks():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    data = []
    for _ in range(6):
        ids = torch.randint(0, 64, (2, 12))
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        data.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="eva",
                             eva_config=PeftEvaConfig(tau=0.95))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(model), config)
        peft.initialize_lora_eva_weights(wrapped, data, show_progress_bar=False)
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in targets]
    eva = eva_state_dict(model, data, dict.fromkeys(names, 4), _config(4, tau=0.95), max_batches=100)
    inits = eva_layer_inits(eva, dict.fromkeys(names, 4), dict.fromkeys(names, 8))
    for name in names:
        rank, alpha, a = inits[name]
        layer = wrapped.base_model.model.get_submodule(name)
        assert torch.equal(a.to(torch.float32), layer.lora_A["default"].weight), name
        assert wrapped.peft_config["default"].rank_pattern.get(name, 4) == rank


def test_incremental_svd_is_peft_incremental_pca():
    torch.manual_seed(0)
    ours, theirs = IncrementalSVD(3, 0.99), IncrementalPCA(n_components=3, copy=True, lowrank=True, lowrank_seed=42)
    for _ in range(4):
        batch = torch.randn(20, 10) @ torch.randn(10, 10)
        ours.update(batch)
        theirs.partial_fit(batch.clone())
        assert torch.equal(ours.components, theirs.components_)
        assert torch.equal(ours.singular_values, theirs.singular_values_)
        assert torch.equal(ours.explained_variance_ratio, theirs.explained_variance_ratio_)
    ours.update(torch.randn(2, 10))  # fewer rows than components: skipped, as PEFT's hook does
    assert torch.equal(ours.components, theirs.components_)


def test_eva_config_validation():
    with pytest.raises(ValueError, match="rho"):
        EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="tau"):
        EvaConfig(tau=1.5)
    with pytest.raises(ValueError, match="empty"):
        eva_state_dict(nn.Linear(2, 2), [], {"": 1}, _config())
    model, data = _streams()
    with pytest.raises(ValueError, match="did not converge within 2 batches"):
        eva_state_dict(model, data, dict.fromkeys("abcd", 2), _config(), forward_fn=_call,
                       prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, max_batches=2)
