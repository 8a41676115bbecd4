"""AdaLoRA's math (passes/adalora.py) against PEFT's own AdaLoRA on a tiny Llama."""
from __future__ import annotations

import warnings

import pytest
import torch

from models import VOCAB, gpt2, llama

peft = pytest.importorskip("peft")

from fxpeft.passes import adalora as ada  # noqa: E402


def peft_adalora(seed=0, model_fn=llama, **kwargs):
    torch.manual_seed(seed)
    model = model_fn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.AdaLoraConfig(**kwargs))


def sites_of(pm, adapter="default"):
    """PEFT's AdaLoRA parameters per adapted module path."""
    inner = pm.base_model.model
    return {path: (m.lora_A[adapter], m.lora_E[adapter], m.lora_B[adapter])
            for path, m in inner.named_modules() if hasattr(m, "lora_E") and adapter in m.lora_E}


def _svd_layer(pm, path):
    return pm.base_model.model.get_submodule(path)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_delta_and_delta_weight_match_svd_linear(dropout):
    pm = peft_adalora(target_modules=["q_proj", "v_proj"], init_r=5, lora_alpha=12, lora_dropout=dropout, total_step=10)
    layer = _svd_layer(pm, "model.layers.1.self_attn.v_proj")
    torch.manual_seed(2)
    with torch.no_grad():
        layer.lora_E["default"].normal_()
        layer.lora_A["default"].normal_()
    A, E, B = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    scaling, ranknum = layer.scaling["default"], layer.ranknum["default"]
    assert scaling == ada.adalora_scaling(12, 5) == 12 and ada.adalora_scaling(0, 5) == 5.0
    layer.train()
    x = torch.randn(2, 3, 32)
    torch.manual_seed(9)
    ref = layer(x)
    torch.manual_seed(9)
    got = layer.base_layer(x)
    got += ada.adalora_delta(x, A, E, B, scaling, ranknum, layer.lora_dropout["default"])
    assert torch.equal(got, ref)
    assert not torch.equal(ref, layer.base_layer(x))
    assert torch.equal(ada.adalora_delta_weight(A, E, B, scaling, ranknum), layer.get_delta_weight("default"))
    # a float ranknum (e.g. a constant folded into the graph) agrees to rounding
    torch.testing.assert_close(ada.adalora_delta_weight(A, E, B, scaling, 5.0), layer.get_delta_weight("default"))


def test_delta_weight_fan_in_fan_out_matches_conv1d():
    pm = peft_adalora(model_fn=gpt2, target_modules=["c_attn"], init_r=4, total_step=10)
    layer = _svd_layer(pm, "transformer.h.0.attn.c_attn")
    assert layer.fan_in_fan_out
    with torch.no_grad():
        layer.lora_E["default"].normal_()
    A, E, B = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    ref = layer.get_delta_weight("default")
    got = ada.adalora_delta_weight(A, E, B, layer.scaling["default"], layer.ranknum["default"], fan_in_fan_out=True)
    assert got.shape == layer.base_layer.weight.shape == (32, 96)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("init", [True, False])
def test_created_parameters_are_peft_s_from_the_same_seed(init):
    """Seeded alike, creating the sites in module order gives PEFT's initial A, E, B, ranknum."""
    pm = peft_adalora(seed=11, target_modules=["q_proj", "v_proj", "down_proj"], init_r=5, total_step=10,
                      init_lora_weights=init)
    torch.manual_seed(11)
    base = llama()
    for path, (A, E, B) in sites_of(pm).items():
        linear = base.get_submodule(path)
        a, e, b, ranknum = ada.create_adalora_parameters(5, linear.in_features, linear.out_features, init,
                                                         device=linear.weight.device, dtype=linear.weight.dtype)
        assert torch.equal(a, A) and torch.equal(e, E) and torch.equal(b, B), path
        assert torch.equal(ranknum, _svd_layer(pm, path).ranknum["default"]) and not ranknum.requires_grad
    if init:
        assert torch.all(E == 0) and abs(A.std().item() - 0.02) < 0.005
    with pytest.raises(ValueError, match="positive integer or 0"):
        ada.create_adalora_parameters(-1, 4, 4)


def test_init_adalora_weights_is_reset_lora_parameters():
    layer = _svd_layer(peft_adalora(target_modules=["q_proj"], init_r=3, total_step=10), "model.layers.0.self_attn.q_proj")
    A, E, B = (torch.randn_like(layer.lora_A["default"]), torch.randn_like(layer.lora_E["default"]),
               torch.randn_like(layer.lora_B["default"]))
    torch.manual_seed(4)
    layer.reset_lora_parameters("default")
    torch.manual_seed(4)
    ada.init_adalora_weights(A, E, B, True)
    assert torch.equal(A, layer.lora_A["default"]) and torch.equal(B, layer.lora_B["default"])
    assert torch.equal(E, layer.lora_E["default"]) and torch.all(E == 0)
    before = A.clone()
    ada.init_adalora_weights(A, E, B, False)
    assert torch.equal(A, before)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_dict_agree_with_peft():
    ref = peft.AdaLoraConfig(total_step=10).to_dict()
    got = ada.AdaLoraConfig(total_step=10).to_dict()
    assert got["peft_type"] == "ADALORA" == ref["peft_type"].value
    assert set(got) <= set(ref)
    for key in got:
        if key != "peft_type":
            assert got[key] == ref[key], key
    for key in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                "total_step", "rank_pattern", "lora_alpha", "lora_dropout", "init_lora_weights"):
        assert key in got
    listed = ada.AdaLoraConfig(total_step=10, target_modules=("q_proj", "v_proj")).to_dict()
    assert listed["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "total_step"),
    (dict(total_step=0), "total_step"),
    (dict(total_step=-3), "total_step"),
    (dict(total_step=10, tinit=5, tfinal=5), "budgeting phase"),
    (dict(total_step=10, tinit=10), "budgeting phase"),
    (dict(total_step=10, orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(total_step=10, use_dora=True), "DoRA"),
    (dict(total_step=10, target_modules="q_proj", layers_to_transform=[0]), "layers_to_transform"),
    (dict(total_step=10, target_modules="q_proj", layers_pattern="layers"), "layers_pattern"),
    (dict(total_step=10, target_modules=["q_proj"], layers_pattern="layers"), "layers_to_transform"),
])
def test_config_rejects_what_peft_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match) as ours:
        ada.AdaLoraConfig(**kwargs)
    with pytest.raises(ValueError) as theirs:
        peft.AdaLoraConfig(**kwargs)
    # same message, up to PEFT's enum repr
    assert str(ours.value).strip() == str(theirs.value).replace("PeftType.", "").strip()


def test_config_accepts_the_edges_peft_accepts_and_warns_on_r():
    ada.AdaLoraConfig(total_step=10, tinit=9)  # one budgeting step
    ada.AdaLoraConfig(total_step=1)
    with pytest.warns(UserWarning, match="init_r"):
        ada.AdaLoraConfig(total_step=10, r=4)
    for bad in (dict(init_r=-1), dict(deltaT=0), dict(lora_dropout=1.0), dict(bias="some"),
                dict(init_lora_weights="pissa"), dict(rank_pattern={"a.lora_E": 3})):
        with pytest.raises(ValueError):
            ada.AdaLoraConfig(total_step=10, **bad)
    config = ada.AdaLoraConfig(total_step=10, rank_pattern={"a.lora_E": torch.tensor([True, False])})
    assert config.rank_pattern == {"a.lora_E": [True, False]}
