"""LoRA+ optimizer: the same parameter groups and the same optimizer step as PEFT's
``peft.optimizers.create_loraplus_optimizer``."""
import copy

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_loraplus

import fxpeft
import models

# Llama: a LoRA'd embedding, lora_B, RMSNorm copies (1-d, decayed: not nn.LayerNorm) and a 2-d head.
# GPT-2: a LoRA'd embedding, Conv1D sites with trainable biases (never decayed) and an nn.LayerNorm copy
# (its weight is not decayed either), so every one of the four groups holds parameters.
CASES = {
    "llama": (models.llama, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                                 modules_to_save=["lm_head", "norm"], init_lora_weights=False)),
    "gpt2": (models.gpt2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "wte"], modules_to_save=["ln_f"],
                               bias="lora_only", init_lora_weights=False)),
}
NONEMPTY = {"llama": (0, 1, 2), "gpt2": (0, 1, 2, 3)}  # groupA, embedding, groupB, groupB_no_decay
OPTIONS = dict(lr=1e-3, loraplus_lr_ratio=16.0, loraplus_lr_embedding=1e-4, loraplus_weight_decay=0.1,
               betas=(0.8, 0.95), weight_decay=0.5)


def _fx_name(peft_name: str) -> str:
    # fxpeft keeps a site's base keys where they were: PEFT's <site>.base_layer.bias is <site>.bias
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@pytest.fixture(scope="module")
def pairs():
    built = {}
    for name, (build, kwargs) in CASES.items():
        torch.manual_seed(0)
        model = build()
        reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
        gm = fxpeft.transform(model, fxpeft.LoraConfig(**kwargs))
        ours = dict(gm.named_parameters())
        with torch.no_grad():
            for key, value in reference.named_parameters():
                if value.requires_grad:
                    ours[_fx_name(key)].copy_(value)
        built[name] = (reference.eval(), gm.eval())
    return built


def _pair(pairs, name):
    reference, gm = pairs[name]
    return copy.deepcopy(reference), copy.deepcopy(gm)


def _named_groups(optimizer, module, rename=lambda n: n):
    names = {id(p): rename(n) for n, p in module.named_parameters()}
    return [{"lr": g["lr"], "weight_decay": g["weight_decay"],
             "params": {names[id(p)]: p for p in g["params"]}} for g in optimizer.param_groups]


@pytest.mark.parametrize("name", CASES)
def test_groups_match_peft_one_to_one(pairs, name):
    reference, gm = _pair(pairs, name)
    theirs = _named_groups(peft_loraplus(reference, torch.optim.AdamW, **OPTIONS), reference, _fx_name)
    optimizer = fxpeft.create_loraplus_optimizer(gm, torch.optim.AdamW, **OPTIONS)
    ours = _named_groups(optimizer, gm)
    assert len(ours) == len(theirs) == 4
    assert [i for i, g in enumerate(ours) if g["params"]] == list(NONEMPTY[name])
    for mine, peft_group in zip(ours, theirs):
        assert (mine["lr"], mine["weight_decay"]) == (peft_group["lr"], peft_group["weight_decay"])
        assert sorted(mine["params"]) == sorted(peft_group["params"])
        for key, param in mine["params"].items():
            torch.testing.assert_close(param, peft_group["params"][key], rtol=0, atol=0)
    assert [g["lr"] for g in ours] == [1e-3, 1e-4, 1e-3 * 16, 1e-3 * 16]
    assert [g["weight_decay"] for g in ours] == [0.1, 0.1, 0.1, 0.0]
    assert optimizer.defaults["betas"] == (0.8, 0.95) and optimizer.defaults["weight_decay"] == 0.5
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert set().union(*(g["params"] for g in ours)) == trainable


def _step(module, optimizer, inputs):
    optimizer.zero_grad()
    module(**inputs, labels=inputs["input_ids"]).loss.backward()
    optimizer.step()


def _trained(module, rename=lambda n: n):
    return {rename(n): p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", CASES)
def test_one_step_gives_peft_adapter_weights(pairs, name):
    reference, gm = _pair(pairs, name)
    inputs = models.hf_inputs(name)
    _step(reference, peft_loraplus(reference, torch.optim.AdamW, **OPTIONS), inputs)
    _step(gm, fxpeft.create_loraplus_optimizer(gm, torch.optim.AdamW, **OPTIONS), inputs)
    theirs, ours = _trained(reference, _fx_name), _trained(gm)
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=1e-6, msg=key)


def test_the_ratio_reaches_the_b_matrices(pairs):
    """The comparison above can fail: without the ratio, lora_B takes a different step than PEFT's."""
    reference, gm = _pair(pairs, "llama")
    inputs = models.hf_inputs("llama")
    before = _trained(gm)
    _step(reference, peft_loraplus(reference, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=4.0), inputs)
    _step(gm, fxpeft.create_loraplus_optimizer(gm, torch.optim.SGD, lr=0.1, loraplus_lr_ratio=1.0), inputs)
    theirs, ours = _trained(reference, _fx_name), _trained(gm)
    key = "model.layers.0.self_attn.q_proj.lora_B.default.weight"
    torch.testing.assert_close(before[key] - theirs[key], 4 * (before[key] - ours[key]))
    assert not torch.allclose(ours[key], theirs[key], atol=1e-6)
    key_a = key.replace("lora_B", "lora_A")
    torch.testing.assert_close(ours[key_a], theirs[key_a], rtol=0, atol=1e-6)


def test_bad_input_raises(pairs):
    reference, gm = _pair(pairs, "llama")
    # missing ratio: a TypeError from the signature, in PEFT as here
    with pytest.raises(TypeError, match="loraplus_lr_ratio"):
        peft_loraplus(reference, torch.optim.AdamW, lr=1e-3)
    with pytest.raises(TypeError, match="loraplus_lr_ratio"):
        fxpeft.create_loraplus_optimizer(gm, torch.optim.AdamW, lr=1e-3)
    # PEFT accepts a ratio <= 0 (lora_B then learns at lr 0 or backwards); we refuse it
    assert peft_loraplus(reference, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=0.0).param_groups[2]["lr"] == 0
    for ratio in (0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="loraplus_lr_ratio must be positive"):
            fxpeft.create_loraplus_optimizer(gm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio)
    for ratio in ("16", None, True):
        with pytest.raises(TypeError, match="loraplus_lr_ratio must be a number"):
            fxpeft.create_loraplus_optimizer(gm, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=ratio)
    # PEFT groups any module's parameters; ours needs fxpeft.transform's result
    with pytest.raises(TypeError, match="fxpeft.transform"):
        fxpeft.create_loraplus_optimizer(models.llama(), torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16)


def test_eight_bit_optimizers_keep_embeddings_32_bit_like_peft(pairs):
    bnb = pytest.importorskip("bitsandbytes")
    manager = bnb.optim.GlobalOptimManager.get_instance()

    def registered(build, module, rename=lambda n: n):
        names = {id(m): rename(n) for n, m in module.named_modules()}
        start = len(manager.module_weight_config_triple)
        build(module, bnb.optim.AdamW8bit, lr=1e-3, loraplus_lr_ratio=16.0)
        return [(names[id(m)], w, c) for m, w, c in manager.module_weight_config_triple[start:]]

    reference, gm = _pair(pairs, "llama")
    theirs = registered(peft_loraplus, reference, lambda n: _fx_name(n + ".").rstrip("."))
    ours = registered(fxpeft.create_loraplus_optimizer, gm)
    assert ours == theirs == [("model.embed_tokens", "weight", {"optim_bits": 32})]
