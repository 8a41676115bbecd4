"""Many adapters in one graph: switching, disabling, deleting, mixed batches — against PEFT."""
from __future__ import annotations

import pytest
import torch

import fxpeft
import models
from peft_oracle import lora_pair

CONFIGS = {
    "default": dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    "wide": dict(r=6, lora_alpha=3, target_modules=["q_proj", "down_proj", "embed_tokens"], init_lora_weights=False),
    "mlp": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"], init_lora_weights=False),
}


def test_set_adapter_disable_and_combinations_match_peft():
    model = models.llama().eval()
    reference, gm = lora_pair(model, CONFIGS)
    inputs = models.hf_inputs("llama")
    flags = {n: p.requires_grad for n, p in gm.named_parameters()}
    with torch.no_grad():
        for active in (["wide"], ["mlp"], ["default", "mlp"], ["default"]):
            reference.base_model.set_adapter(active)
            fxpeft.set_adapter(gm, active if len(active) > 1 else active[0])
            assert fxpeft.active_adapters(gm) == active
            torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
        base = model(**inputs).logits
        with pytest.raises(RuntimeError, match="inside"):
            with fxpeft.disable_adapters(gm):
                torch.testing.assert_close(gm(**inputs).logits, base)
                raise RuntimeError("inside")
        assert fxpeft.active_adapters(gm) == ["default"]
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert {n: p.requires_grad for n, p in gm.named_parameters()} == flags  # switching never flips trainability
    with pytest.raises(KeyError, match="existing adapters.*default"):
        fxpeft.set_adapter(gm, "nope")
    with pytest.raises(ValueError, match="already exists"):
        fxpeft.add_adapter(gm, fxpeft.LoraConfig(target_modules=["q_proj"]), "mlp")


def test_adding_and_loading_keeps_others_trainability(tmp_path):
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    fxpeft.save_pretrained(gm, str(tmp_path))
    fxpeft.load_adapter(gm, str(tmp_path), "frozen")  # is_trainable=False
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=2, target_modules=["v_proj"]), "fresh")
    by_adapter = {}
    for name, param in gm.named_parameters():
        for adapter in ("default", "frozen", "fresh"):
            if f".{adapter}." in name:
                by_adapter.setdefault(adapter, set()).add(param.requires_grad)
    assert by_adapter == {"default": {True}, "frozen": {False}, "fresh": {True}}
    assert fxpeft.active_adapters(gm) == ["default"]



@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_an_added_adapter_follows_the_modules_mode(training, tmp_path):
    """add_adapter and load_adapter make the new adapter's modules (its dropouts) in the module's mode: added to
    an eval-mode module, an adapter with dropout computes the same outputs call after call. (They were made in
    training mode, nn.Module's default, as PEFT's are: an eval module's outputs changed from call to call.) A
    base module set to another mode on purpose (a frozen norm) keeps it."""
    gm = fxpeft.transform(models.llama().train(training), fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    held = gm.model.norm.train(not training)  # set by the user: not the new adapter's to change
    fxpeft.save_pretrained(gm, str(tmp_path))
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=2, lora_dropout=0.5, init_lora_weights=False,
                                             target_modules=["v_proj"]), "drop")
    fxpeft.load_adapter(gm, str(tmp_path), "loaded")
    dropouts = [m for name, m in gm.named_modules() if isinstance(m, torch.nn.Dropout) and name.endswith((".drop",
                                                                                                           ".loaded"))]
    assert dropouts and all(m.training == training for m in dropouts) and held.training != training
    if not training:
        fxpeft.set_adapter(gm, "drop")
        inputs = models.hf_inputs("llama")
        with torch.no_grad():
            assert torch.equal(gm(**inputs).logits, gm(**inputs).logits)

def test_delete_adapter_states():
    model = models.llama().eval()
    reference, gm = lora_pair(model, CONFIGS)
    inputs = models.hf_inputs("llama")
    fxpeft.set_adapter(gm, ["default", "mlp"])
    fxpeft.delete_adapter(gm, "mlp")  # an active one: the other active adapter stays
    assert fxpeft.active_adapters(gm) == ["default"]
    assert not any(n.endswith(".mlp.weight") for n, _ in gm.named_parameters())
    assert any(n.endswith(".default.weight") for n, _ in gm.named_parameters())
    reference.base_model.set_adapter("default")
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
    fxpeft.delete_adapter(gm, "default")  # the only active one: the first remaining takes over
    assert fxpeft.active_adapters(gm) == ["wide"]
    fxpeft.delete_adapter(gm, "wide")  # none left: the base model
    assert fxpeft.active_adapters(gm) == [] and not gm.peft_config
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits)
    with pytest.raises(KeyError):
        fxpeft.delete_adapter(gm, "wide")
    with torch.no_grad():  # a mixed batch of base-only samples still works with no adapter left
        torch.testing.assert_close(gm(**inputs, adapter_names=["__base__"] * 2).logits, model(**inputs).logits)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_mixed_batch_matches_peft(name):
    model = models.HF_MODELS[name]().eval()
    configs = {
        "a": dict(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False),
        "b": dict(r=5, lora_alpha=5, target_modules="all-linear", init_lora_weights=False),
        "c": dict(r=3, lora_alpha=9, target_modules="all-linear", init_lora_weights=False),
    }
    reference, gm = lora_pair(model, configs)
    inputs = models.hf_inputs(name, batch=6, seq=7)
    names = ["a", "__base__", "c", "b", "a", "c"]
    with torch.no_grad():
        expected = reference(**inputs, adapter_names=names).logits
        got = gm(**inputs, adapter_names=names).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        for row, adapter in enumerate(names):  # each row as if run alone with its adapter
            single = {k: v[row:row + 1] for k, v in inputs.items()}
            if adapter == "__base__":
                alone = model(**single).logits
            else:
                fxpeft.set_adapter(gm, adapter)
                alone = gm(**single).logits
            torch.testing.assert_close(got[row:row + 1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["decoder", "convnet"])
def test_mixed_batch_embedding_and_conv_sites_match_peft(name):
    cls, make_inputs = models.CUSTOM_MODELS[name]
    model = cls().eval()
    targets = {"decoder": ["embed", "qkv", "down"], "convnet": ["conv1", "conv2", "head"]}[name]
    configs = {"x": dict(r=2, target_modules=targets, init_lora_weights=False),
               "y": dict(r=3, lora_alpha=6, target_modules=targets, init_lora_weights=False)}
    reference, gm = lora_pair(model, configs)
    (x,) = make_inputs()
    x = torch.cat([x, x])[:4]
    names = ["y", "x", "__base__", "y"]
    with torch.no_grad():
        torch.testing.assert_close(gm(x, adapter_names=names), reference(x, adapter_names=names), rtol=1e-5, atol=1e-5)


def test_mixed_batch_bad_input_fails_before_compute():
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    inputs = models.hf_inputs("llama", batch=2)
    with pytest.raises(ValueError, match="3 entries but the batch has 2"):
        gm(**inputs, adapter_names=["default", "default", "default"])
    with pytest.raises(ValueError, match="unknown adapter.*nope"):
        gm(**inputs, adapter_names=["default", "nope"])
    with pytest.raises(ValueError, match=r"shape \(3,\) but the batch has 2"):
        gm(**inputs, adapter_names=fxpeft.adapter_indices(gm, ["default"] * 3))
    index = fxpeft.adapter_indices(gm, ["default", "__base__"])
    with torch.no_grad():
        gm(**inputs, adapter_names=index)
        gm(**inputs, adapter_names=index)  # checked once, while unchanged
        index[1] = 7  # written in place: checked again
        with pytest.raises(ValueError, match=r"indices outside 0..1"):
            gm(**inputs, adapter_names=index)
    fxpeft.merge_adapter(gm)
    with pytest.raises(ValueError, match="merged"):
        gm(**inputs, adapter_names=["default", "default"])


def test_no_recompiles_when_switching_disabling_and_mixing():
    torch._dynamo.reset()
    model = models.llama().eval()
    reference, gm = lora_pair(model, CONFIGS)
    inputs = models.hf_inputs("llama")
    # two adapters were once active together: the module keeps two slots for active adapters
    # (growing the slot count is the one change that recompiles)
    fxpeft.set_adapter(gm, ["default", "wide"])
    fxpeft.set_adapter(gm, "default")
    # recompiles and graph breaks are dynamo's own: no backend needed (no gradients here)
    compiled = torch.compile(gm, fullgraph=True, backend="eager")
    index = fxpeft.adapter_indices(gm, ["wide", "__base__"])
    with torch.no_grad():
        compiled(**inputs)
        compiled(**inputs, adapter_names=index)
        try:
            torch._dynamo.config.error_on_recompile = True
            for active in (["wide"], ["default", "mlp"], ["mlp"]):
                fxpeft.set_adapter(gm, active)
                reference.base_model.set_adapter(active)
                torch.testing.assert_close(compiled(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
            with fxpeft.disable_adapters(gm):
                torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
            for names in (["mlp", "default"], ["__base__", "wide"]):
                got = compiled(**inputs, adapter_names=fxpeft.adapter_indices(gm, names))
                torch.testing.assert_close(got.logits, reference(**inputs, adapter_names=names).logits,
                                           rtol=1e-5, atol=1e-5)
        finally:
            torch._dynamo.config.error_on_recompile = False
            torch._dynamo.reset()


@pytest.mark.parametrize("name, saved", [("bert", None), ("llama", ["lm_head", "embed_tokens"])])
def test_mixed_batch_with_modules_to_save_matches_peft(name, saved):
    """Each sample runs its own adapter's copy of the saved modules (BERT: the SEQ_CLS head)."""
    model = models.HF_MODELS[name]().eval()
    task = dict(task_type="SEQ_CLS") if name == "bert" else dict(modules_to_save=saved)
    targets = ["query", "value"] if name == "bert" else ["q_proj", "v_proj"]
    configs = {n: dict(r=r, lora_alpha=4, target_modules=targets, init_lora_weights=False, **task)
               for n, r in (("a", 2), ("b", 3))}
    reference, gm = lora_pair(model, configs)
    torch.manual_seed(0)
    copies = dict(gm.named_parameters())
    with torch.no_grad():  # copies that differ from the original and from each other
        for key, param in reference.named_parameters():
            if "modules_to_save" in key:
                param.add_(torch.randn_like(param))
                copies[key.removeprefix("base_model.model.")].copy_(param)
    inputs = models.hf_inputs(name, batch=5, seq=6)
    names = ["b", "__base__", "a", "a", "b"]
    with torch.no_grad():
        expected = reference(**inputs, adapter_names=names).logits
        torch.testing.assert_close(gm(**inputs, adapter_names=names).logits, expected, rtol=1e-5, atol=1e-5)
        reference.set_adapter("b")
        fxpeft.set_adapter(gm, "b")
        single = reference(**inputs).logits  # the dense graph still reads the active copy
        torch.testing.assert_close(gm(**inputs).logits, single, rtol=1e-5, atol=1e-5)


class _SavedThenAdapted(torch.nn.Module):
    """A saved module (``norm``) whose output feeds a LoRA site (``fc``); ``shared`` runs twice,
    with other code between."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.fc, self.out = (torch.nn.Linear(8, 8) for _ in range(4))
        self.shared = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.out(self.fc(self.norm(self.shared(self.inp(self.shared(x))))))


def test_mixed_batch_lora_after_a_saved_module_and_a_module_called_twice():
    model = _SavedThenAdapted().eval()
    configs = {n: dict(r=2, lora_alpha=4, target_modules=["fc"], modules_to_save=["norm"], init_lora_weights=False)
               for n in ("a", "b")}
    reference, gm = lora_pair(model, configs)
    copies = dict(gm.named_parameters())
    with torch.no_grad():
        for key, param in reference.named_parameters():
            if "modules_to_save" in key:
                param.add_(torch.randn_like(param))
                copies[key.removeprefix("base_model.model.")].copy_(param)
        x = torch.randn(4, 8)
        names = ["a", "b", "__base__", "a"]
        torch.testing.assert_close(gm(x, adapter_names=names), reference(x, adapter_names=names))
    # a saved module called twice: no mixed graph, but the model still transforms and runs
    twice = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["fc"], modules_to_save=["shared"]))
    assert twice(x).shape == (4, 8)
    with pytest.raises(NotImplementedError, match="'shared'.*runs more than once"):
        twice(x, adapter_names=["default"] * 4)
