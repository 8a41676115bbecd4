"""Mixed models (PEFT's ``get_peft_model(..., mixed=True)`` / ``PeftMixedModel``): LoRA, LoHa, LoKr, AdaLoRA,
OFT and SHiRA adapters on one model, any of them acting together, against the real PEFT package. Each adapter
is trained-looking (drawn, not zero), saved by PEFT alone and loaded into both mixed models."""
from __future__ import annotations

import copy
import itertools

import peft
import pytest
import torch

import fxpeft
import models

# overlapping targets, so that layers carry adapters of several types (PEFT: SHiRA does not nest)
CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "loha": lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "down_proj"], init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=4, target_modules=["v_proj", "up_proj"], init_weights=False),
    "adalora": lambda: peft.AdaLoraConfig(r=4, target_modules=["up_proj", "o_proj"], init_lora_weights=False,
                                          total_step=10),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "o_proj"], init_weights=False),
    "shira": lambda: peft.ShiraConfig(r=4, target_modules=["k_proj"], init_weights=False),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each adapter saved by PEFT from a model of its own (drawn from its own seed)."""
    root = tmp_path_factory.mktemp("mixed")
    model = models.llama().eval()
    for seed, (name, config) in enumerate(CONFIGS.items()):
        torch.manual_seed(seed)
        peft.get_peft_model(copy.deepcopy(model), config()).save_pretrained(root / name)
    return model, root


@pytest.fixture(scope="module")
def pair(saved):
    """PEFT's mixed model and fxpeft's, each adapter loaded from PEFT's files in the same order."""
    model, root = saved
    names = list(CONFIGS)
    reference = peft.PeftMixedModel.from_pretrained(copy.deepcopy(model), str(root / names[0]), adapter_name=names[0])
    gm = fxpeft.from_pretrained(copy.deepcopy(model), str(root / names[0]), adapter_name=names[0], mixed=True)
    for name in names[1:]:
        reference.load_adapter(str(root / name), adapter_name=name)
        fxpeft.load_adapter(gm, str(root / name), name)
    return model, reference.eval(), gm.eval(), root


def test_every_combination_equals_peft(pair):
    """All 63 sets of active adapters: the same logits as PEFT's mixed model."""
    model, reference, gm, _ = pair
    inputs = models.hf_inputs("llama")
    assert gm.active_adapters == reference.active_adapters == ["lora"]
    with torch.no_grad():
        base = model(**inputs).logits
        seen = []
        for count in range(1, len(CONFIGS) + 1):
            for names in itertools.combinations(CONFIGS, count):
                reference.set_adapter(list(names)), gm.set_adapter(list(names))
                expected = reference(**inputs).logits
                torch.testing.assert_close(gm(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
                seen.append(expected)
        assert min((one - base).abs().max() for one in seen[:len(CONFIGS)]) > 1e-3  # each adapter acts
        with gm.disable_adapter():
            torch.testing.assert_close(gm(**inputs).logits, base, rtol=1e-5, atol=1e-5)


def test_merge_generate_and_save(pair, tmp_path):
    """Merging the active adapters (folded in the order they were added, as PEFT's nesting merges), greedy
    generation, and one adapter saved from the mixed model loading into a plain PEFT model."""
    model, reference, gm, root = pair
    inputs = models.hf_inputs("llama")
    active = ["lora", "loha", "oft"]
    reference.set_adapter(active), gm.set_adapter(active)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = reference(**inputs).logits
        assert torch.equal(gm.generate(**inputs, **kwargs), reference.generate(**inputs, **kwargs))
        gm.save_pretrained(str(tmp_path), selected_adapters=["loha"])
        alone = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(root / "loha")).eval()
        again = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "loha")).eval()
        torch.testing.assert_close(again(**inputs).logits, alone(**inputs).logits)
        merged = fxpeft.merge_and_unload(gm)  # (its own copy of the base: the fixture's last use)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
        theirs = reference.merge_and_unload()
        torch.testing.assert_close(merged(**inputs).logits, theirs(**inputs).logits, rtol=1e-4, atol=1e-4)


def test_training_step_and_deletion(saved):
    """A training step through two types at once changes both; deleting one leaves the other as PEFT's."""
    model, root = saved
    gm = fxpeft.from_pretrained(model, str(root / "lora"), is_trainable=True, mixed=True, adapter_name="lora")
    fxpeft.load_adapter(gm, str(root / "lokr"), "lokr", is_trainable=True)
    reference = peft.PeftMixedModel.from_pretrained(copy.deepcopy(model), str(root / "lora"), adapter_name="lora",
                                                    is_trainable=True)
    reference.load_adapter(str(root / "lokr"), adapter_name="lokr", is_trainable=True)
    gm.set_adapter(["lora", "lokr"]), reference.set_adapter(["lora", "lokr"])
    inputs = models.hf_inputs("llama")
    labels = models.hf_labels("llama", inputs)
    losses = []
    for module in (reference, gm):
        loss = module(**inputs, labels=labels).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = {n: p.grad for n, p in gm.named_parameters() if p.grad is not None}
    assert any(".lora_A.lora." in n for n in grads) and any(".lokr_w1.lokr" in n for n in grads)
    gm.delete_adapter("lokr"), reference.delete_adapter("lokr")
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_what_mixing_refuses(saved):
    model, root = saved
    gm = fxpeft.from_pretrained(model, str(root / "lora"), adapter_name="lora")
    with pytest.raises(ValueError, match="mixed=True"):  # an ordinary result takes one type, as PEFT's
        fxpeft.load_adapter(gm, str(root / "loha"), "loha")
    mixed = fxpeft.from_pretrained(model, str(root / "oft"), adapter_name="oft", mixed=True)
    with pytest.raises(ValueError, match="not supported for mixed models"):
        fxpeft.add_adapter(mixed, fxpeft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]), "ia3")
    with pytest.raises(ValueError, match="not supported for mixed models"):
        fxpeft.add_adapter(mixed, fxpeft.LoraConfig(target_modules=["k_proj"], use_dora=True), "dora")
    # PEFT nests an adapter added after OFT outside the rotation: not built yet, said so, nothing changed
    before = {k: v.clone() for k, v in mixed.state_dict().items()}
    with pytest.raises(NotImplementedError, match="add the oft adapter after the others"):
        fxpeft.load_adapter(mixed, str(root / "lora"), "lora")
    assert list(mixed.peft_config) == ["oft"] and mixed.state_dict().keys() == before.keys()
    fxpeft.load_adapter(mixed, str(root / "shira"), "shira")  # other layers: fine
