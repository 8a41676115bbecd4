"""MiSS beyond the conformance suite (tests/test_methods.py, the balance variant), against the real
PEFT package: the "bat" and "mini" variants, dropout in training, and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models


def pair(build=models.MLP, **kwargs):
    model = build().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.MissConfig(**kwargs)).eval()
    gm = fxpeft.transform(model, fxpeft.MissConfig(**kwargs)).eval()
    return reference, gm, model


def randomize(reference, gm, adapter="default"):
    """bat and mini start at zeros (PEFT has no random start for them): the same random blocks in both."""
    ours = dict(gm.named_parameters())
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if f"miss_block.{adapter}" in name:
                param.copy_(torch.randn_like(param) * 0.3)
                ours[name.removeprefix("base_model.model.")].copy_(param)


@pytest.mark.parametrize("kwargs", [dict(r=4, init_weights="bat"), dict(r=5, init_weights="mini", mini_r=6),
                                    dict(r=4, init_weights="mini", mini_r=24)])
def test_bat_and_mini_equal_peft(kwargs, tmp_path):
    """Forward, merge / unmerge (bat: W(I + B) + B and PEFT's inverse) and checkpoints both ways."""
    reference, gm, model = pair(target_modules=["fc1"], **kwargs)
    x = torch.randn(4, 12)
    with torch.no_grad():
        base = model(x)
        torch.testing.assert_close(gm(x), base)  # zeros: the identity start
        randomize(reference, gm)
        expected = reference(x)
        assert (expected - base).abs().max() > 1e-3
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        weight = model.fc1.weight.clone()
        gm.merge_adapter()
        torch.testing.assert_close(model.fc1.weight, reference.base_model.model.fc1.get_delta_weight_miss(
            "default", weight.clone()) if kwargs["init_weights"] == "mini" else
            weight + reference.base_model.model.fc1.get_delta_weight("default", weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        gm.unmerge_adapter()
        torch.testing.assert_close(model.fc1.weight, weight, rtol=1e-5, atol=1e-5)
        reference.save_pretrained(tmp_path / "peft")
        gm.load_adapter(str(tmp_path / "peft"), "loaded")
        gm.set_adapter("loaded")
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        gm.save_pretrained(str(tmp_path / "fx"), selected_adapters=["loaded"])
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx" / "loaded")).eval()
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-5)


def test_bat_on_a_4bit_base_equals_peft(tmp_path):
    """bat maps the weight: a 4-bit layer's dequantized one, as PEFT's ``get_base_weight``."""
    from test_quantize import CONFIGS, _quantized_by_transformers

    model = models.llama()
    kwargs = dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights="bat")
    quantized = _quantized_by_transformers(model, tmp_path, CONFIGS["nf4"])
    reference = peft.get_peft_model(peft.prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False),
                                    peft.MissConfig(**kwargs))
    gm = fxpeft.transform(model, [fxpeft.BnbConfig(**CONFIGS["nf4"]), fxpeft.MissConfig(**kwargs)])
    randomize(reference, gm)
    inputs = models.hf_inputs("llama")
    reference.train(), gm.train()  # bitsandbytes' CPU eval path repacks 4-bit weights; both modes compute the same
    with torch.no_grad():
        expected = reference(**inputs).logits
        with fxpeft.disable_adapters(gm):
            assert (expected - gm(**inputs).logits).abs().max() > 1e-3  # the adapter acts: the check can fail
        torch.testing.assert_close(gm(**inputs).logits, expected, atol=1e-4, rtol=0)


def test_bat_mixed_batch_and_training():
    reference, gm, _ = pair(target_modules=["fc1"], r=4, init_weights="bat")
    randomize(reference, gm)
    gm.add_adapter("other", fxpeft.MissConfig(target_modules=["fc1"], r=4, init_weights="bat"))
    with torch.no_grad():
        gm.fc1.miss_block["other"].normal_(0, 0.3)
    x = torch.randn(3, 12)
    with torch.no_grad():
        mixed = gm(x, adapter_names=["default", "other", "__base__"])
        for i, name in enumerate(["default", "other"]):
            gm.set_adapter(name)
            torch.testing.assert_close(mixed[i], gm(x[i:i + 1])[0], rtol=1e-5, atol=1e-5)
        with fxpeft.disable_adapters(gm):
            torch.testing.assert_close(mixed[2], gm(x[2:3])[0], rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        compiled = torch.compile(gm, fullgraph=True, backend=models.COMPILE_BACKEND)
        torch.testing.assert_close(compiled(x, adapter_names=fxpeft.adapter_indices(gm, ["default", "other", "__base__"])),
                                   mixed, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
    gm.set_adapter("default")
    gm.train()
    loss = gm(x).pow(2).mean()
    loss.backward()
    assert gm.fc1.miss_block["default"].grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, named", [(dict(target_modules="fc.*", layers_to_transform=[0]), "layers_to_transform"),
                                           (dict(target_modules="fc.*", layers_pattern="h"), "layers_pattern")])
def test_bad_configs_raise_at_construction_as_peft(kwargs, named):
    for config_type in (peft.MissConfig, fxpeft.MissConfig):
        with pytest.raises(ValueError, match=named):
            config_type(**kwargs)


@pytest.mark.parametrize("kwargs, named", [(dict(r=0), "positive integer"), (dict(mini_r=0), "mini_r"),
                                           (dict(init_weights="batt"), "init_weights"),
                                           (dict(miss_dropout=1.5), "miss_dropout"), (dict(bias="some"), "bias")])
def test_what_peft_refuses_late_or_never_raises_at_construction(kwargs, named):
    with pytest.raises(ValueError, match=named):
        fxpeft.MissConfig(target_modules=["fc1"], **kwargs)
    if "r" in kwargs:  # PEFT: when it builds the layer
        with pytest.raises(ValueError, match="positive integer"):
            peft.get_peft_model(models.MLP(), peft.MissConfig(target_modules=["fc1"], **kwargs))


@pytest.mark.parametrize("kwargs, named", [(dict(r=13), "less than or equal to in_features"),
                                           (dict(r=5, init_weights="bat"), r"divisible into \[r, r\] blocks"),
                                           (dict(r=4, init_weights="mini", mini_r=5), "divided along the out_features")])
def test_sites_peft_refuses_raise_and_leave_the_model_alone(kwargs, named):
    model = models.MLP()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=named):
        peft.get_peft_model(copy.deepcopy(model), peft.MissConfig(target_modules=["fc1"], **kwargs))
    with pytest.raises(ValueError, match=named):
        fxpeft.transform(model, fxpeft.MissConfig(target_modules=["fc1"], **kwargs))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
