"""Silent wrong outputs (hardening issue, points 5-9), each checked against the real PEFT package:
merged state, adapter names, unsupported targets, tensors made in forward, the caller's RNG."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models
from fxpeft import merging
from fxpeft.state import merged_adapters
from peft_oracle import copy_adapter_weights, lora_pair

LORA = dict(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False)
X = torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


def _pair(configs):
    """An MLP with the same adapters in PEFT and fxpeft."""
    model = models.MLP().eval()
    return (model, *lora_pair(model, configs))


def _base_weights(module):
    return {k: v.clone() for k, v in module.state_dict().items() if "lora_" not in k}


def _assert_same_base(module, expected):
    ours = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in module.state_dict().items()}
    for key, value in expected.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- 5. merged state


def test_deleting_a_merged_adapter_raises_like_peft():
    model, reference, gm = _pair({"default": LORA})
    before = _base_weights(model)
    reference.merge_adapter()
    fxpeft.merge_adapter(gm)
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        reference.delete_adapter("default")
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        fxpeft.delete_adapter(gm, "default")
    assert list(gm.peft_config) == ["default"] and merged_adapters(gm) == ["default"]
    fxpeft.unmerge_adapter(gm)
    fxpeft.delete_adapter(gm, "default")
    _assert_same_base(model, before)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), model(X))


def test_disabling_a_merged_model_unmerges_and_stays_unmerged_like_peft():
    model, reference, gm = _pair({"default": LORA})
    base_weights = _base_weights(model)
    with torch.no_grad():
        base, adapted = model(X), gm(X)
        reference.merge_adapter()
        fxpeft.merge_adapter(gm)
        with reference.disable_adapter():
            torch.testing.assert_close(reference(X), base)
        with fxpeft.disable_adapters(gm):
            torch.testing.assert_close(gm(X), base)
        # PEFT unmerged inside the block and does not merge again on exit: adapted output, base weights
        assert not any(m.merged for m in reference.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
        assert merged_adapters(gm) == []
        _assert_same_base(reference, base_weights)
        _assert_same_base(gm, base_weights)
        torch.testing.assert_close(reference(X), adapted, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gm(X), adapted, rtol=1e-5, atol=1e-6)


def test_setting_an_adapter_on_a_merged_model_unmerges_first_like_peft():
    model, reference, gm = _pair({"default": LORA, "b": dict(LORA, r=3)})
    base_weights = _base_weights(model)
    reference.merge_adapter()
    fxpeft.merge_adapter(gm)
    with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged. Unmerging the model first."):
        reference.set_adapter("b")
    with pytest.warns(UserWarning, match="Adapter cannot be set when the model is merged. Unmerging the model first."):
        fxpeft.set_adapter(gm, "b")
    assert merged_adapters(gm) == []
    _assert_same_base(gm, base_weights)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), reference(X), rtol=1e-5, atol=1e-6)


def _merge_state(gm):
    gates = {n: b.clone() for n, b in gm.named_buffers() if "lora_scaling" in n}
    return {k: v.clone() for k, v in gm.state_dict().items()}, gates, merged_adapters(gm)


@pytest.mark.parametrize("where", ["storing the second weight", "building the base module"])
def test_merge_and_unload_failure_rolls_back(monkeypatch, where):
    model, _, gm = _pair({"default": dict(LORA, target_modules=["fc1", "fc2"])})
    with torch.no_grad():
        adapted = gm(X)
    weights, gates, merged = _merge_state(gm)
    calls = []

    def failing(real):
        def call(*args, **kwargs):
            calls.append(1)
            if where == "building the base module" or len(calls) == 2:
                raise RuntimeError("simulated failure")
            return real(*args, **kwargs)
        return call

    target = "_store_weight" if where == "storing the second weight" else "_base_module"
    monkeypatch.setattr(merging, target, failing(getattr(merging, target)))
    with pytest.raises(RuntimeError, match="simulated failure"):
        fxpeft.merge_and_unload(gm)
    monkeypatch.undo()
    after_weights, after_gates, after_merged = _merge_state(gm)
    assert after_merged == merged == []
    assert all(torch.equal(after_weights[k], v) for k, v in weights.items())
    assert all(torch.equal(after_gates[k], v) for k, v in gates.items())
    with torch.no_grad():
        torch.testing.assert_close(gm(X), adapted)
        merged_model = fxpeft.merge_and_unload(gm)  # and it still works afterwards
        torch.testing.assert_close(merged_model(X), adapted, rtol=1e-5, atol=1e-6)


def test_merge_and_unload_failure_restores_quantized_layers_exactly(monkeypatch):
    """requantize=True merges into the packed 4-bit weights in place; a failure after that puts the
    packed weights and statistics back bit for bit."""
    gm = fxpeft.transform(models.llama().eval(), [fxpeft.BnbConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
                                                 fxpeft.LoraConfig(**dict(LORA, target_modules=["q_proj", "v_proj"]))])
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        adapted = gm(**inputs).logits
    before = {k: v.clone() for k, v in gm.state_dict().items()}

    def failing(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(merging, "_base_module", failing)
    with pytest.raises(RuntimeError, match="simulated failure"), pytest.warns(UserWarning, match="rounds"):
        fxpeft.merge_and_unload(gm, requantize=True)
    after = gm.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert merged_adapters(gm) == []
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, adapted, rtol=0, atol=0)


# --------------------------------------------------------------------------- 6. names


def test_an_adapter_named_slots_reads_its_own_gate_like_peft():
    """The dense graph caches the slot-index node apart from the per-adapter gates: an adapter
    named "slots" once read the index tensor as its gate."""
    model = models.TinyDecoder().eval()
    configs = {"slots": dict(r=2, target_modules=["embed", "qkv"], init_lora_weights=False),
               "other": dict(r=2, target_modules=["embed"], init_lora_weights=False)}
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**configs["slots"]), adapter_name="slots")
    reference.add_adapter("other", peft.LoraConfig(**configs["other"]))
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**configs["slots"]), adapter_name="slots")
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(**configs["other"]), "other")
    reference.base_model.set_adapter(["slots", "other"])
    with torch.no_grad():
        for key, param in reference.named_parameters():
            if "lora_embedding" in key:
                param.normal_()
    copy_adapter_weights(reference, gm)
    fxpeft.set_adapter(gm, ["slots", "other"])
    ids = torch.randint(0, models.VOCAB, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(ids), reference.eval()(ids), rtol=1e-5, atol=1e-5)
        fxpeft.set_adapter(gm, ["other"])
        reference.base_model.set_adapter(["other"])
        torch.testing.assert_close(gm(ids), reference(ids), rtol=1e-5, atol=1e-5)


BAD_NAMES = {
    "": "non-empty string",
    3: "non-empty string",
    "__base__": "reserved",
    "a/b": "path separator",
    "a\\b": "path separator",
    "/abs": "path separator",
    "..": "path separator",
    ".": "path separator",
    "a.b": "contains '.'",
    "training": "attribute of torch's ModuleDict",
    "keys": "attribute of torch's ModuleDict",
}


def test_peft_and_torch_reject_a_dotted_adapter_name():
    """What the "." rule stands for: torch refuses it as a ModuleDict key, so PEFT fails too."""
    with pytest.raises(KeyError, match="contain \"\.\""):
        peft.get_peft_model(models.MLP(), peft.LoraConfig(**LORA), adapter_name="a.b")


@pytest.mark.parametrize("name", list(BAD_NAMES), ids=repr)
def test_bad_adapter_names_are_rejected_everywhere(tmp_path, name):
    rule = BAD_NAMES[name]
    config = fxpeft.LoraConfig(**LORA)
    model = models.MLP()
    with pytest.raises(ValueError, match=rule):
        fxpeft.transform(model, config, adapter_name=name)
    assert not any("lora" in n for n, _ in model.named_modules())
    gm = fxpeft.transform(model, config, adapter_name="good")
    fxpeft.save_pretrained(gm, str(tmp_path), adapter_names=["good"])
    saved = tmp_path / "good"
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    for add in (lambda: fxpeft.add_adapter(gm, config, name),
                lambda: fxpeft.load_adapter(gm, str(saved), name),
                lambda: fxpeft.add_weighted_adapter(gm, ["good"], [1.0], name, combination_type="linear")):
        with pytest.raises(ValueError, match=rule):
            add()
    with pytest.raises(ValueError, match=rule):
        fxpeft.from_pretrained(models.MLP(), str(saved), adapter_name=name)
    assert list(gm.peft_config) == ["good"] and set(gm.state_dict()) == set(state)


# --------------------------------------------------------------------------- 7. unsupported targets


class Mixed(nn.Module):
    """A linear, a transposed convolution, an attention module and a norm."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.qkv = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x):
        h = self.qkv(self.norm(x))
        h, _ = self.mha(h, h, h, need_weights=False)
        b, s, d = h.shape
        return self.up(h.transpose(1, 2).reshape(b, d, s, 1))


def _unchanged_after_error(error, match, target_modules):
    model = Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        fxpeft.transform(model, fxpeft.LoraConfig(target_modules=target_modules))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


def test_unsupported_layer_in_a_target_list_raises_like_peft():
    with pytest.raises(ValueError, match="Target module ConvTranspose2d.* is not supported"):
        peft.get_peft_model(Mixed(), peft.LoraConfig(target_modules=["qkv", "up"]))
    _unchanged_after_error(ValueError, r"'up' \(ConvTranspose2d\) is not supported", ["qkv", "up"])


def test_multihead_attention_errors_leave_the_model_alone():
    """LoRA adapts a targeted nn.MultiheadAttention (tests/test_lora_options.py) where its weights are in
    the graph; a symbolic trace keeps it opaque, and a layer inside it cannot be adapted on its own."""
    peft.get_peft_model(Mixed(), peft.LoraConfig(target_modules=["qkv", "mha"]))  # PEFT adapts it
    _unchanged_after_error(NotImplementedError, r"'mha'.*example_inputs", ["qkv", "mha"])
    _unchanged_after_error(NotImplementedError, r"'mha.out_proj'.*inside the nn.MultiheadAttention 'mha'",
                           r".*(qkv|proj)")


def test_a_regex_matching_a_layernorm_and_a_linear_raises_like_peft():
    with pytest.raises(ValueError, match="Target module LayerNorm.* is not supported"):
        peft.get_peft_model(Mixed(), peft.LoraConfig(target_modules=r"(norm|qkv)"))
    _unchanged_after_error(ValueError, r"'norm' \(LayerNorm\) is not supported", r"(norm|qkv)")


# --------------------------------------------------------------------------- 8. tensors made in forward


class Conv2dGroups2(nn.Module):
    """Like PEFT's "Conv2d Groups2" test model: forward builds its input with torch.arange."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(32 * 5 * 5, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = torch.arange(9 * 16 * 5 * 5).view([9, 16, 5, 5]).to(self.conv2d.weight.device)
        X = X.to(torch.float32) / 100  # the real input is ignored, as in PEFT's model
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(X)))))


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_tensor_built_in_forward_survives_capture_like_peft(capture):
    model = Conv2dGroups2().eval()
    kwargs = dict(r=4, lora_alpha=8, target_modules=["conv2d", "lin0"], init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs)).eval()
    x = torch.zeros(9, 1)
    example = {"example_inputs": (x,)} if capture == "export" else {}
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**kwargs), **example).eval()
    copy_adapter_weights(reference, gm)
    with torch.no_grad():
        expected = reference(x)
        assert not torch.allclose(expected, model(x))
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(gm)(x), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 9. the caller's RNG


def test_same_seed_gives_peft_initial_weights_and_rng_state():
    model = models.llama()
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(1234)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    peft_state = torch.get_rng_state()
    torch.manual_seed(1234)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**config))
    assert torch.equal(torch.get_rng_state(), peft_state)
    theirs = {k.removeprefix("base_model.model."): v for k, v in reference.named_parameters() if "lora_A" in k}
    ours = {k: v for k, v in gm.named_parameters() if "lora_A" in k}
    assert set(ours) == set(theirs) and len(ours) == 14
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


class CalledOutOfOrder(nn.Module):
    """forward calls its layers in another order than they are defined (and so listed)."""

    def __init__(self):
        super().__init__()
        self.last = nn.Linear(16, 4)
        self.first = nn.Linear(8, 16)

    def forward(self, x):
        return self.last(torch.relu(self.first(x)))


def test_adapters_are_initialised_in_module_order_like_peft():
    model = CalledOutOfOrder()
    config = dict(r=2, target_modules=["first", "last"])
    torch.manual_seed(7)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    torch.manual_seed(7)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**config))
    for path in ("first", "last"):
        theirs = reference.base_model.model.get_submodule(path).lora_A.default.weight
        assert torch.equal(gm.get_submodule(path).lora_A.default.weight, theirs), path


def test_out_of_range_layers_to_transform_blames_the_layer_filter():
    model = models.llama()
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\] selects none of them: their layer indices are "
                                         r"\[0, 1\]"):
        fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]))
    with pytest.raises(ValueError, match="matched no adaptable module"):  # a wrong name still says so
        fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["qproj"], layers_to_transform=[0]))


def test_copies_and_merged_results_keep_their_own_dropout_mode():
    """A deepcopy and the module merge_and_unload returns hold their own dropout and mode-switch
    modules: ``.train()`` on the original leaves their eval-mode outputs (deterministic) as they were.
    (They shared the blocks' copies, so one's train() made the other's outputs random.)"""
    gm = fxpeft.transform(models.gpt2().eval(), fxpeft.LoraConfig(r=2, target_modules=["c_attn"],
                                                                  init_lora_weights=False)).eval()
    inputs = models.hf_inputs("gpt2")
    twin = copy.deepcopy(gm)
    with torch.no_grad():
        expected = twin(**inputs).logits
        gm.train()
        assert torch.equal(twin(**inputs).logits, expected)
        gm.eval()
        merged = gm.merge_and_unload().eval()
        expected = merged(**inputs).logits
        gm.train()
        twin.train()
        assert torch.equal(merged(**inputs).logits, expected)
