"""LN tuning against the real PEFT package. Its adapters are copies of whole modules, not sites, so
the conformance suite's site checks do not apply: these are its own parity checks (outputs,
trainable counts, files both ways, switching, merging, merge_and_unload, mixed batches, training,
compile without recompiles) and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors


class Normed(nn.Module):
    """A plain module with a LayerNorm (symbolic trace: one flat graph)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.ln = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(self.ln(torch.relu(self.fc1(x))))


def x():
    return torch.randn(6, 12, generator=torch.Generator().manual_seed(2))


def randomized(*modules, seed: int = 0) -> None:
    """The same random values in every module's LN copies (by name without PEFT's prefix)."""
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if "ln_tuning_layers" in name:
                    key = name.removeprefix("base_model.model.")
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + len(key))))


@pytest.fixture(scope="module")
def llama():
    return models.llama().eval()


def test_llama_equals_peft_both_ways(llama, tmp_path):
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        base = llama(**inputs).logits
    reference = peft.get_peft_model(copy.deepcopy(llama), peft.LNTuningConfig()).eval()
    gm = fxpeft.transform(llama, fxpeft.LNTuningConfig()).eval()
    assert sorted(gm.peft_config["default"].target_modules) == sorted(reference.peft_config["default"].target_modules)
    ours = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert ours == {n.removeprefix("base_model.model.") for n, p in reference.named_parameters() if p.requires_grad}
    assert len(ours) == 5  # two norms in each of two layers and the final norm
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, base, rtol=0, atol=0)  # identity start: exact copies
        randomized(reference, gm)
        expected = reference(**inputs).logits
        assert (expected - base).abs().max() > 1e-3
        torch.testing.assert_close(gm(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        # a mixed batch (PEFT ignores adapter_names for LN tuning): each sample its adapter's copies, in the block graphs
        mixed = gm(**inputs, adapter_names=["__base__", "default"]).logits
        torch.testing.assert_close(mixed[0], base[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[1], expected[1], rtol=1e-5, atol=1e-5)
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(llama), str(tmp_path / "fx")).eval()
    loaded = fxpeft.from_pretrained(llama, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_gpt2_layernorms_with_bias_equal_peft():
    model = models.gpt2().eval()
    inputs = models.hf_inputs("gpt2")
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig()).eval()
    gm = fxpeft.transform(model, fxpeft.LNTuningConfig()).eval()
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    with torch.no_grad():
        randomized(reference, gm)
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


def pair():
    model = Normed().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LNTuningConfig(target_modules=["ln"])).eval()
    reference.add_adapter("other", peft.LNTuningConfig(target_modules=["ln"]))
    gm = fxpeft.transform(model, fxpeft.LNTuningConfig(target_modules=["ln"])).eval()
    gm.add_adapter("other", fxpeft.LNTuningConfig(target_modules=["ln"], inference_mode=True))
    randomized(reference, gm)
    randomized(reference.base_model.model.ln.ln_tuning_layers["other"], gm.ln.ln_tuning_layers["other"], seed=7)
    return reference, gm, model


def test_switching_merging_and_unloading_as_peft():
    reference, gm, model = pair()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(x())
        outputs = {}
        for name in ("default", "other", "default"):
            reference.set_adapter(name)
            gm.set_adapter(name)
            outputs[name] = reference(x())
            torch.testing.assert_close(gm(x()), outputs[name], rtol=1e-5, atol=1e-6)
        assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3
        with fxpeft.disable_adapters(gm):
            torch.testing.assert_close(gm(x()), base, rtol=0, atol=0)
        gm.set_adapter(["default", "other"])  # PEFT raises in forward; fxpeft reads the copy added last
        torch.testing.assert_close(gm(x()), outputs["other"], rtol=1e-5, atol=1e-6)
        gm.set_adapter("default")

        gm.merge_adapter()
        reference.merge_adapter()
        torch.testing.assert_close(gm(x()), outputs["default"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gm.ln.weight, reference.base_model.model.ln.base_layer.weight, rtol=0, atol=0)
        with pytest.raises(ValueError, match="does not allow merging more than one adapter"):
            gm.merge_adapter(["other"])  # PEFT's rule: one LN adapter merged at a time
        torch.testing.assert_close(gm(x()), outputs["default"], rtol=1e-5, atol=1e-6)
        gm.unmerge_adapter()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, original[key], rtol=0, atol=0)
        torch.testing.assert_close(gm(x()), outputs["default"], rtol=1e-5, atol=1e-6)

        merged = gm.merge_and_unload()
        fresh = Normed().eval()
        fresh.load_state_dict(merged.state_dict(), strict=True)
        torch.testing.assert_close(fresh(x()), reference.merge_and_unload()(x()), rtol=1e-5, atol=1e-6)


def test_mixed_batch_training_and_compile_without_recompiles():
    reference, gm, _ = pair()
    names = ["default", "other", "__base__", "other", "default", "__base__"]
    with torch.no_grad():
        mixed = gm(x(), adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with fxpeft.disable_adapters(gm):
                    single = gm(x()[i:i + 1])
            else:
                gm.set_adapter(name)
                single = gm(x()[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], single, rtol=1e-5, atol=1e-6)
        gm.set_adapter("default")
        expected = {name: (gm.set_adapter(name), gm(x()))[1] for name in ("default", "other")}

        torch._dynamo.reset()
        compiled = torch.compile(gm, fullgraph=True, backend=models.COMPILE_BACKEND)
        compiled(x())
        compiled(x(), adapter_names=fxpeft.adapter_indices(gm, names))
        try:
            torch._dynamo.config.error_on_recompile = True
            for name in ("default", "other"):
                gm.set_adapter(name)
                torch.testing.assert_close(compiled(x()), expected[name], rtol=1e-5, atol=1e-6)
            gm.merge_adapter()
            torch.testing.assert_close(compiled(x()), expected["other"], rtol=1e-5, atol=1e-6)
            gm.unmerge_adapter()
        finally:
            torch._dynamo.config.error_on_recompile = False
            torch._dynamo.reset()

    gm.set_adapter("default")
    gm.train()
    frozen = {k: v.detach().clone() for k, v in gm.named_parameters() if not v.requires_grad}
    optimizer = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = gm(x()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {"ln.ln_tuning_layers.default.weight",
                                                                         "ln.ln_tuning_layers.default.bias"}
    assert all(torch.equal(v, frozen[k]) for k, v in gm.named_parameters() if k in frozen)


def test_bad_targets_raise():
    with pytest.raises(ValueError, match="matched no adaptable module"):
        fxpeft.transform(Normed(), fxpeft.LNTuningConfig(target_modules=["norm"]))
    with pytest.raises(ValueError, match="no default targets"):  # no model type: PEFT raises too
        fxpeft.transform(Normed(), fxpeft.LNTuningConfig())
