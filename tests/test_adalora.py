"""AdaLoRA end to end against PEFT: a seeded training run with rank allocation ends with PEFT's rank
pattern and weights; its checkpoint (cut to the allocated ranks) loads in PEFT and back; the
regulariser is PEFT's; re-allocating never recompiles. (The allocator's math alone:
tests/test_adalora_math.py; the shared method checks: tests/test_methods.py.)"""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models

STEPS = 32
CONFIG = dict(init_r=6, target_r=2, tinit=4, tfinal=8, deltaT=2, total_step=STEPS, lora_alpha=8,
              target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")


def _train(model, update_and_allocate, inputs):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for step in range(STEPS):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        update_and_allocate(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = models.llama()
    inputs = models.hf_inputs("llama", batch=4)
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.AdaLoraConfig(**CONFIG))
    torch.manual_seed(0)
    gm = fxpeft.transform(model, fxpeft.AdaLoraConfig(**CONFIG))
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters()}
    for name, param in gm.named_parameters():  # the same seed gives PEFT's initial weights
        if ".lora_" in name:
            assert torch.equal(param, theirs[name]), name
    reference.train()
    gm.train()
    expected = _train(reference, reference.base_model.update_and_allocate, inputs)
    got = _train(gm, gm.update_and_allocate, inputs)
    path = tmp_path_factory.mktemp("adalora")
    reference.save_pretrained(path / "peft")
    gm.save_pretrained(str(path / "fx"))
    return model, reference, gm, expected, got, path, inputs


def test_training_with_rank_allocation_equals_peft(trained):
    model, reference, gm, expected, got, _, inputs = trained
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)  # the loss includes the orthogonal regulariser
    ours, theirs = gm.peft_config["default"].rank_pattern, reference.peft_config["default"].rank_pattern
    assert ours and {k.removesuffix(".default"): v for k, v in ours.items()} == \
        {k.removesuffix(".default"): v for k, v in theirs.items()}
    assert sum(sum(keep) for keep in ours.values()) == CONFIG["target_r"] * len(ours)  # the final budget
    params = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters()}
    for name, param in gm.named_parameters():
        if ".lora_" in name:
            torch.testing.assert_close(param, params[name], rtol=1e-4, atol=1e-6)


def test_checkpoint_at_allocated_ranks_loads_in_peft_and_back(trained):
    model, reference, gm, _, _, path, inputs = trained
    from peft_oracle import assert_same_saved_tensors
    assert_same_saved_tensors(path / "peft", path / "fx")
    gm.eval()
    reference.eval()
    with torch.no_grad():
        expected = reference(**inputs).logits
        torch.testing.assert_close(gm(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
        loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(path / "peft")).eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(path / "fx")).eval()
        torch.testing.assert_close(back(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
    ranks = {n: p.shape[0] for n, p in loaded.named_parameters() if n.endswith("lora_E.default")}
    assert ranks and all(r <= CONFIG["init_r"] for r in ranks.values()) and sum(ranks.values()) == 2 * len(ranks)


def test_reallocation_is_data_no_recompile():
    torch._dynamo.reset()
    gm = fxpeft.transform(models.llama(), fxpeft.AdaLoraConfig(**{**CONFIG, "tinit": 0, "tfinal": 0, "deltaT": 1}))
    inputs = models.hf_inputs("llama")
    compiled = torch.compile(gm, fullgraph=True, backend=models.COMPILE_BACKEND)
    optimizer = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    gm.train()
    try:
        for step in range(3):
            compiled(**inputs, labels=inputs["input_ids"]).loss.backward()
            optimizer.step()
            masked = gm.update_and_allocate(step + 1)
            assert masked  # E entries were zeroed in place
            optimizer.zero_grad()
            torch._dynamo.config.error_on_recompile = True
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def test_bad_input_fails_as_in_peft():
    with pytest.raises(ValueError, match="total_step"):
        fxpeft.AdaLoraConfig(target_modules=["q_proj"])
    gm = fxpeft.transform(models.llama(), fxpeft.AdaLoraConfig(**CONFIG))
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        gm.add_adapter("second", fxpeft.AdaLoraConfig(**CONFIG))
    gm.add_adapter("frozen", fxpeft.AdaLoraConfig(**CONFIG, inference_mode=True))  # as PEFT allows
    with pytest.raises(ValueError, match="different peft types"):
        gm.add_adapter("lora", fxpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="LoRA or IA3"):
        fxpeft.add_weighted_adapter(gm, ["default", "frozen"], [0.5, 0.5], "mix")
    plain = fxpeft.transform(models.llama(), fxpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(AttributeError):
        plain.update_and_allocate(0)
