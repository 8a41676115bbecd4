"""Core compiler + LoRA pass, against PEFT and the LoRA formula."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpeft
import models
from peft_oracle import adapted_paths, copy_adapter_weights, fx_adapted_paths, peft_model

HF = list(models.HF_MODELS)


def _task(name):
    return {"bert": "SEQ_CLS", "vit": None, "t5": "SEQ_2_SEQ_LM"}.get(name, "CAUSAL_LM")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module", params=HF)
def hf_case(request):
    name = request.param
    torch.manual_seed(0)
    model = models.HF_MODELS[name]().eval()
    config = fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type=_task(name),
                               init_lora_weights=False)
    return name, model, fxpeft.transform(model, config)


def test_zero_init_lora_leaves_outputs_unchanged_on_hf_models(hf_case):
    name, model, gm = hf_case
    gm.add_adapter("zero", fxpeft.LoraConfig(r=4, target_modules="all-linear", task_type=_task(name)))
    gm.set_adapter("zero")  # the module's default adapter is random: this one is PEFT's zero init
    try:
        for batch, seq in [(2, 7), (1, 3), (4, 12)]:
            inputs = models.hf_inputs(name, batch=batch, seq=seq)
            with torch.no_grad():
                expected, got = model(**inputs), gm(**inputs)
            assert type(got) is type(expected)
            torch.testing.assert_close(_logits(got), _logits(expected), rtol=0, atol=1e-6)
    finally:
        gm.set_adapter("default")
        gm.delete_adapter("zero")


BLOCKS = {"llama": "model.layers", "qwen2": "model.layers", "gpt2": "transformer.h", "opt": "model.decoder.layers",
          "bert": "bert.encoder.layer", "t5": ("encoder.block", "decoder.block"), "vit": "vit.layers"}


def test_blocks_are_modules_under_their_paths_with_the_models_keys_and_hooks(hf_case):
    """The repeated layers are Block modules the top graph calls (fxpeft/blocks.py): the model's
    state_dict keys plus the adapters', and each block's forward hooks fire once per call."""
    from fxpeft.blocks import Block, blocks_of

    name, model, gm = hf_case
    lists = BLOCKS[name] if isinstance(BLOCKS[name], tuple) else (BLOCKS[name],)
    expected = sorted(f"{path}.{i}" for path in lists for i in range(2))
    assert sorted(blocks_of(gm)) == expected
    assert all(isinstance(gm.get_submodule(path), Block) for path in expected)
    assert sorted(n.target for n in gm.graph.nodes if n.meta.get("fxpeft_block")) == expected
    adapter_keys = {k for k in gm.state_dict() if ".lora_" in k or ".modules_to_save." in k}
    assert adapter_keys and set(gm.state_dict()) == set(model.state_dict()) | adapter_keys
    calls = []
    handles = [gm.get_submodule(path).register_forward_hook(lambda *_, path=path: calls.append(path))
               for path in expected]
    with torch.no_grad():
        gm(**models.hf_inputs(name))
    for handle in handles:
        handle.remove()
    assert sorted(calls) == expected


def test_outputs_and_counts_match_peft(hf_case):
    name, model, gm = hf_case
    reference = peft_model(model, r=4, lora_alpha=8, target_modules="all-linear", task_type=_task(name),
                           init_lora_weights=False)
    assert fx_adapted_paths(gm) == adapted_paths(reference)
    assert copy_adapter_weights(reference, gm) > 0
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    inputs = models.hf_inputs(name, batch=3, seq=9)
    with torch.no_grad():
        expected, got = reference(**inputs), gm(**inputs)
    assert (_logits(got) - _logits(model(**inputs))).abs().max() > 1e-3  # the adapter acts
    torch.testing.assert_close(_logits(got), _logits(expected), rtol=1e-5, atol=1e-5)
    labels = models.hf_labels(name, inputs)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs, labels=labels).loss, reference(**inputs, labels=labels).loss)


def test_called_like_the_original(hf_case):
    name, model, gm = hf_case
    inputs = models.hf_inputs(name, batch=2, seq=6)
    first = next(iter(inputs))
    positional = gm(inputs[first], **{k: v for k, v in inputs.items() if k != first})
    torch.testing.assert_close(_logits(positional), _logits(gm(**inputs)))
    if "attention_mask" in inputs:  # optional inputs may be omitted
        without_mask = {k: v for k, v in inputs.items() if k != "attention_mask"}
        with torch.no_grad():
            torch.testing.assert_close(_logits(gm(**without_mask)), _logits(gm(**without_mask, use_cache=True)))
        assert gm(**without_mask).logits.shape == gm(**inputs).logits.shape


@pytest.mark.parametrize("name", list(models.CUSTOM_MODELS))
def test_custom_models_zero_init_and_peft_parity(name):
    cls, make_inputs = models.CUSTOM_MODELS[name]
    model = cls().eval()
    targets = {"mlp": ["fc1", "fc2"], "convnet": ["conv1", "conv2", "head"], "decoder": ["embed", "qkv", "proj", "up", "down"]}[name]
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=targets))
    inputs = make_inputs()
    torch.testing.assert_close(gm(*inputs), model(*inputs), rtol=0, atol=0)

    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False))
    reference = peft_model(model, r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False)
    if name == "decoder":  # PEFT zero-initialises embedding A even with init False: make it non-zero
        with torch.no_grad():
            for n, p in reference.named_parameters():
                if "lora_embedding" in n:
                    p.normal_()
    copy_adapter_weights(reference, gm)
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    torch.testing.assert_close(gm(*inputs), reference(*inputs), rtol=1e-5, atol=1e-5)
    assert (gm(*inputs) - model(*inputs)).abs().max() > 1e-4


def test_forward_matches_the_written_formula():
    model = models.MLP().eval()
    config = fxpeft.LoraConfig(r=3, lora_alpha=5, target_modules=["fc1"], init_lora_weights=False)
    gm = fxpeft.transform(model, config)
    x = torch.randn(6, 12)
    a = gm.fc1.lora_A.default.weight
    b = gm.fc1.lora_B.default.weight
    hidden = x @ model.fc1.weight.T + model.fc1.bias + (5 / 3) * (x @ a.T @ b.T)
    expected = model.fc2(F.gelu(hidden))
    torch.testing.assert_close(gm(x), expected)

    rs = fxpeft.transform(model, fxpeft.LoraConfig(r=4, lora_alpha=5, target_modules=["fc1"], use_rslora=True,
                                                   init_lora_weights=False))
    assert rs.fc1.lora_scaling.default.value.item() == pytest.approx(5 / math.sqrt(4))


class WithConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.proj = Conv1D(10, 6)  # weight stored (in=6, out=10)

    def forward(self, x):
        return self.proj(x)


def test_conv1d_fan_in_fan_out_formula():
    model = WithConv1D()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], fan_in_fan_out=True,
                                                   init_lora_weights=False))
    a, b = gm.proj.lora_A.default.weight, gm.proj.lora_B.default.weight
    assert a.shape == (2, 6) and b.shape == (10, 2)
    x = torch.randn(4, 5, 6)
    expected = x @ model.proj.weight + model.proj.bias + 1.5 * (x @ a.T @ b.T)
    torch.testing.assert_close(gm(x), expected)


def test_targeting_rules_match_peft():
    model = models.llama().eval()
    cases = [
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=r".*\.layers\.1\..*(q_proj|down_proj)"),
        dict(target_modules=["q_proj", "k_proj"], layers_to_transform=[1]),
        dict(target_modules=["q_proj", "k_proj"], layers_to_transform=0, layers_pattern="layers"),
        # a full name is taken as it is, the layer filter applying to suffix matches only (PEFT's rule)
        dict(target_modules=["model.layers.0.self_attn.q_proj", "k_proj"], layers_to_transform=[1]),
        dict(target_modules="all-linear", exclude_modules=["o_proj", "gate_proj"]),
        dict(target_modules=["self_attn.q_proj", "mlp.up_proj"]),
        dict(target_modules=None),
    ]
    gm = fxpeft.transform(model, [])  # one capture; each case is an adapter of its own
    for index, kwargs in enumerate(cases):
        name = f"case{index}"
        fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=2, **kwargs), name)
        reference = peft_model(model, r=2, **kwargs)
        ours = {path for path, m in gm.named_modules()
                if any(name in m._modules.get(c, {}) for c in ("lora_A", "lora_embedding_A"))}
        assert ours == adapted_paths(reference), kwargs
        count = sum(p.numel() for n, p in gm.named_parameters() if f".{name}." in n or n.endswith(f".{name}"))
        assert count == reference.get_nb_trainable_parameters()[0], kwargs


def test_rank_and_alpha_patterns_match_peft():
    model = models.llama().eval()
    kwargs = dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False,
                  rank_pattern={"down_proj": 6, r"layers\.1\.self_attn\.q_proj": 3}, alpha_pattern={"v_proj": 16})
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**kwargs))
    reference = peft_model(model, **kwargs)
    assert gm.model.layers[0].mlp.down_proj.lora_A.default.weight.shape[0] == 6
    assert gm.model.layers[1].self_attn.q_proj.lora_A.default.weight.shape[0] == 3
    assert gm.model.layers[0].self_attn.v_proj.lora_scaling.default.value.item() == 8.0
    copy_adapter_weights(reference, gm)
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_and_modules_to_save_counts_match_peft(bias):
    model = models.bert().eval()
    kwargs = dict(r=2, target_modules=["query", "value"], bias=bias, modules_to_save=["pooler.dense"])
    gm = fxpeft.transform(model, fxpeft.LoraConfig(task_type="SEQ_CLS", **kwargs))
    reference = peft_model(model, task_type="SEQ_CLS", **kwargs)
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    ours = {n for n, p in gm.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix("base_model.model.").replace(".base_layer.", ".")
              for n, p in reference.named_parameters() if p.requires_grad}
    assert ours == theirs


def _train(model, inputs, steps=25, lr=1e-2):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_training_lowers_loss_like_peft_and_keeps_base_weights():
    model = models.llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    kwargs = dict(r=4, lora_alpha=16, target_modules="all-linear")
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**kwargs))
    reference = peft_model(model, **kwargs)
    copy_adapter_weights(reference, gm)
    inputs = models.hf_inputs("llama", batch=4, seq=10)
    ours, theirs = _train(gm, inputs), _train(reference, inputs)
    assert ours[-1] < ours[0] - 0.3
    assert ours == pytest.approx(theirs, abs=1e-4)
    for key, value in gm.state_dict().items():
        if key in base:
            assert torch.equal(value, base[key]), key
    assert all(p.grad is None for n, p in gm.named_parameters() if "lora_" not in n)


def test_train_eval_switch_dropout():
    model = models.bert().eval()  # hidden and attention dropout 0.1
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["query"]))
    inputs = models.hf_inputs("bert")
    assert not gm.training
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits)
        gm.train()
        first, second = gm(**inputs).logits, gm(**inputs).logits
        assert not torch.allclose(first, second)
        gm.eval()
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits)
    assert not model.training and not any(m.training for m in model.modules())  # caller's modes untouched


def test_graph_module_behaviour_state_dict_deepcopy_to():
    model = models.llama().eval()
    base_keys = set(model.state_dict())
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    assert isinstance(gm, torch.fx.GraphModule)
    keys = set(gm.state_dict())
    assert base_keys <= keys
    assert keys - base_keys == {f"model.layers.{i}.self_attn.q_proj.lora_{ab}.default.weight"
                                for i in range(2) for ab in "AB"}
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        expected = gm(**inputs).logits
        clone = copy.deepcopy(gm)
        torch.testing.assert_close(clone(**inputs).logits, expected)
        clone.model.layers[0].self_attn.q_proj.lora_B.default.weight.add_(1.0)
        torch.testing.assert_close(gm(**inputs).logits, expected)  # the copy is independent
        state = gm.state_dict()
        fresh = fxpeft.transform(models.llama().eval(), fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
        fresh.load_state_dict(state)
        torch.testing.assert_close(fresh(**inputs).logits, expected)
        double = copy.deepcopy(gm).to(torch.float64)
        torch.testing.assert_close(double(**inputs).logits.float(), expected, rtol=1e-4, atol=1e-4)


def test_deepcopy_after_generating():
    """A module that generated (what its methods kept for it holds traced programs) copies, and the copy
    generates the same tokens."""
    gm = fxpeft.transform(models.llama().eval(), fxpeft.LoHaConfig(r=4, target_modules=["q_proj"], init_weights=False))
    inputs = models.hf_inputs("llama")
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        tokens = gm.eval().generate(**inputs, **kwargs)
        assert torch.equal(copy.deepcopy(gm).generate(**inputs, **kwargs), tokens)


def test_bad_targets_and_configs_raise_clear_errors():
    model = models.llama().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"q_prj.*closest: .*q_proj"):
        fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["q_prj"]))
    with pytest.raises(ValueError, match="not supported"):
        fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["self_attn"]))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any("lora" in n for n, _ in model.named_modules())
    for bad in (dict(r=0), dict(r=-2), dict(lora_dropout=1.0), dict(lora_dropout=-0.1), dict(bias="some"),
                dict(init_lora_weights="zeros")):
        with pytest.raises(ValueError):
            fxpeft.LoraConfig(**bad)
    with pytest.raises(TypeError, match="supported configs"):
        fxpeft.transform(model, object())
    gm = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(target_modules=["fc1"]))
    with pytest.raises(TypeError, match=r"takes \(gm, config, adapter_name\)"):  # PEFT's order given to the function
        fxpeft.add_adapter(gm, "other", fxpeft.LoraConfig(target_modules=["fc1"]))
    assert list(gm.peft_config) == ["default"]


class ShapeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.dim() == 3:  # symbolic_trace cannot branch on a Proxy; export can
            x = x.flatten(0, 1)
        return self.fc(x)


def test_untraceable_model_needs_example_inputs():
    model = ShapeDependent()
    with pytest.raises(fxpeft.CaptureError, match="example_inputs"):
        fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["fc"]))
    gm = fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["fc"]), example_inputs=(torch.ones(3, 4),))
    x = torch.ones(5, 4)
    torch.testing.assert_close(gm(x), model(x))


def test_add_second_adapter_keeps_first():
    model = models.MLP()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    first = gm.fc1.lora_A.default.weight.clone()
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=3, target_modules=["fc2"]), "other")
    assert torch.equal(gm.fc1.lora_A.default.weight, first)
    assert gm.fc2.lora_A.other.weight.shape == (3, 24)
    with pytest.raises(ValueError, match="already exists"):
        fxpeft.add_adapter(gm, fxpeft.LoraConfig(target_modules=["fc2"]), "other")
    with pytest.raises(ValueError):
        fxpeft.add_adapter(gm, fxpeft.LoraConfig(target_modules=["nope"]), "third")
    assert "third" not in gm.peft_config and not any("third" in n for n, _ in gm.named_parameters())


def test_other_keyword_sets_are_captured_on_first_use():
    bert = models.bert().eval()
    gm = fxpeft.transform(bert, fxpeft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS",
                                                  init_lora_weights=False))
    inputs = models.hf_inputs("bert")
    token_types = torch.zeros_like(inputs["input_ids"])
    token_types[:, 3:] = 1
    with torch.no_grad():
        with_types = gm(**inputs, token_type_ids=token_types).logits
        assert not torch.allclose(with_types, gm(**inputs).logits)  # token types reach the graph
        as_tuple = gm(**inputs, token_type_ids=token_types, return_dict=False)  # through BERT's **kwargs
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], with_types)

    t5 = models.t5(layers=1).eval()
    gm = fxpeft.transform(t5, fxpeft.LoraConfig(r=2, target_modules=["q", "v"]))
    inputs = models.hf_inputs("t5")
    labels = torch.randint(1, models.VOCAB, (2, 5))  # no decoder_input_ids: T5 derives them from labels
    with torch.no_grad():
        ours = gm(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels)
        theirs = t5(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels)
    torch.testing.assert_close(ours.loss, theirs.loss)
    torch.testing.assert_close(ours.logits, theirs.logits)
