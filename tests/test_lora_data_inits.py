"""The data-driven LoRA inits through fxpeft's API, against PEFT 0.21.2 doing the same on a copy:
EVA (``fxpeft.initialize_lora_eva_weights`` after ``transform`` with init "eva") and CorDA
(``fxpeft.preprocess_corda`` before ``transform`` with init "corda"); and ``fxpeft.site_hooks``,
through which both read the layers' inputs on a transformed module."""
from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.config import CordaConfig as PeftCordaConfig
from peft.tuners.lora.config import EvaConfig as PeftEvaConfig
from peft.tuners.lora.corda import preprocess_corda as peft_preprocess_corda
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

import fxpeft
import models

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _peft_name(key: str) -> str:
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _lm_batches(n=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, models.VOCAB, (2, 12), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 9:] = 0
        labels = ids.clone()
        labels[:, :3] = -100
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return batches


# ---------------------------------------------------------------------------------------------- EVA


@pytest.fixture(scope="module")
def eva_llama():
    """The same tiny Llama initialised by PEFT and by fxpeft with EVA (language-model masks)."""
    torch.manual_seed(0)
    model = models.llama()
    base = copy.deepcopy(model)
    data = _lm_batches()
    options = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights="eva")
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(
        **options, eva_config=PeftEvaConfig(tau=0.95)))
    _quiet(peft.initialize_lora_eva_weights, theirs, data, show_progress_bar=False)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**options, eva_config=fxpeft.EvaConfig(tau=0.95)))
    fxpeft.initialize_lora_eva_weights(gm, data, show_progress_bar=False, max_batches=200)
    return base, data, theirs, gm


def test_eva_equals_peft_on_tiny_llama(eva_llama):
    _, _, theirs, gm = eva_llama
    expected, got = theirs.peft_config["default"], gm.peft_config["default"]
    assert got.rank_pattern == expected.rank_pattern and len(got.rank_pattern) > 0  # ranks were redistributed
    assert got.alpha_pattern == expected.alpha_pattern
    assert list(got.target_modules) == list(expected.target_modules)
    ours = dict(gm.named_parameters())
    assert {_peft_name(k) for k, p in theirs.named_parameters() if p.requires_grad} == {
        k for k, p in ours.items() if p.requires_grad}
    for key, value in theirs.named_parameters():
        assert torch.equal(ours[_peft_name(key)], value), key  # A: PEFT's components, signs included; B zero
    for name, module in theirs.base_model.model.named_modules():
        if isinstance(module, LoraLayer):
            assert gm.get_submodule(name).lora_scaling["default"].scale == module.scaling["default"], name


def _random_b(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def test_eva_outputs_and_checkpoints_both_ways(eva_llama, tmp_path):
    base, data, theirs, gm = eva_llama
    theirs, gm = copy.deepcopy(theirs), copy.deepcopy(gm)
    _random_b(theirs, 1)  # "trained": B no longer zero, so A and the scales show in the outputs
    _random_b(gm, 1)
    batch = {k: v for k, v in data[0].items() if k != "labels"}
    theirs.eval(), gm.eval()
    with torch.no_grad():
        expected = theirs(**batch).logits
        torch.testing.assert_close(gm(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)
    gm.save_pretrained(str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    written = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("init_lora_weights", "eva_config", "rank_pattern", "alpha_pattern", "target_modules", "r"):
        assert saved[key] == written[key], key
    loaded = _quiet(peft.PeftModel.from_pretrained, copy.deepcopy(base), str(tmp_path / "ours")).eval()
    back = fxpeft.from_pretrained(copy.deepcopy(base), str(tmp_path / "theirs")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(back(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_eva_state_dict_from_the_plain_model_and_under_peft_names(eva_llama):
    base, data, theirs, gm = eva_llama
    config = fxpeft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights="eva",
                               eva_config=fxpeft.EvaConfig(tau=0.95))
    plain = fxpeft.get_eva_state_dict(base, data, peft_config=config, show_progress_bar=False, max_batches=200)
    expected = _quiet(peft.get_eva_state_dict, copy.deepcopy(base), data, peft_config=peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights="eva", eva_config=PeftEvaConfig(tau=0.95)),
        show_progress_bar=False)
    assert plain.keys() == expected.keys()
    for name in expected:
        assert torch.equal(plain[name], expected[name]), name
    # a state computed elsewhere, under PEFT's module names, initialises a fresh adapter the same way
    fresh = fxpeft.transform(copy.deepcopy(base), config)
    fxpeft.initialize_lora_eva_weights(fresh, eva_state_dict={"base_model.model." + k: v for k, v in plain.items()})
    assert fresh.peft_config["default"].rank_pattern == gm.peft_config["default"].rank_pattern
    ours = dict(gm.named_parameters())
    for name, param in fresh.named_parameters():
        assert torch.equal(param, ours[name]), name


class Streams(nn.Module):
    """a and d read the same input (one SVD), c a low-rank one, b isotropic noise (rank 0: its layer
    loses its adapter), e a Conv1D, emb an embedding (not EVA's: default init, PEFT's warning)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        self.a, self.d, self.c, self.b = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(64, 8)
        self.e = Conv1D(8, 16)

    def forward(self, x, y, z, ids):
        return self.a(x) + self.d(x) + self.c(z) + self.b(y) + self.e(z + self.emb(ids))


def _low_rank_rows(n, generator):
    basis = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0][:4]
    scales = torch.tensor([4.0, 3.0, 2.0, 1.5])
    return (torch.randn(n, 4, generator=generator) * scales) @ basis + 0.01 * torch.randn(n, 16, generator=generator)


def _streams_data():
    generator = torch.Generator().manual_seed(0)
    return [{"x": _low_rank_rows(40, generator), "z": _low_rank_rows(40, generator),
             "y": torch.randn(40, 64, generator=generator), "ids": torch.randint(0, 10, (40,), generator=generator)}
            for _ in range(5)]


def _call(model, batch):
    return model(**batch)


@pytest.mark.parametrize("use_dora", [False, True])
def test_eva_on_a_custom_module_drops_rank_zero_layers_as_peft(use_dora):
    torch.manual_seed(0)
    model = Streams()
    data = _streams_data()
    options = dict(r=2, lora_alpha=4, target_modules=["a", "b", "c", "d", "e", "emb"], init_lora_weights="eva",
                   use_dora=use_dora)
    first_rows = {"c": lambda layer_input, model_input, name: layer_input[0][:30]}  # PEFT's per-layer mapping
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**options))
    _quiet(peft.initialize_lora_eva_weights, theirs, data, show_progress_bar=False, forward_fn=_call,
           prepare_model_inputs_fn=None, prepare_layer_inputs_fn={"base_model.model.c": first_rows["c"]})
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**options, eva_config=fxpeft.EvaConfig()))
    with pytest.warns(UserWarning, match=r"not found in the eva state_dict: \['emb'\]"):
        fxpeft.initialize_lora_eva_weights(gm, data, show_progress_bar=False, max_batches=100, forward_fn=_call,
                                           prepare_model_inputs_fn=None, prepare_layer_inputs_fn=first_rows)
    expected, got = theirs.peft_config["default"], gm.peft_config["default"]
    assert got.rank_pattern == expected.rank_pattern == {"a": 3, "d": 3}
    assert got.alpha_pattern == expected.alpha_pattern and list(got.target_modules) == list(expected.target_modules)
    assert type(theirs.base_model.model.b) is nn.Linear and "lora_A" not in gm.b._modules
    ours = dict(gm.named_parameters())
    for key, value in theirs.named_parameters():
        if "lora_embedding" not in key and "emb.lora_magnitude" not in key:  # embeddings: other random draws
            assert torch.equal(ours[_peft_name(key)], value), key  # DoRA: magnitudes too
    inputs = data[0]
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs), model(**inputs))  # B zero: the base model's output


def test_eva_errors_leave_the_module_as_it_was():
    torch.manual_seed(0)
    model = Streams()
    data = _streams_data()
    run = dict(forward_fn=_call, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)
    config = fxpeft.LoraConfig(r=2, target_modules=["a", "c"], init_lora_weights="eva", eva_config={"tau": 0.9})
    assert config.eva_config == fxpeft.EvaConfig(tau=0.9)
    gm = fxpeft.transform(model, config)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(ValueError, match="dataloader is empty"):
        fxpeft.initialize_lora_eva_weights(gm, [], **run)
    with pytest.raises(TypeError, match="sized iterable"):
        fxpeft.initialize_lora_eva_weights(gm, (batch for batch in data), **run)
    with pytest.raises(ValueError, match="dataloader is required"):
        fxpeft.initialize_lora_eva_weights(gm)
    with pytest.raises(ValueError, match="no linear layer holding adapter 'default'"):
        fxpeft.initialize_lora_eva_weights(gm, eva_state_dict={"b": torch.zeros(2, 64)})
    with pytest.raises(ValueError, match="has shape"):
        fxpeft.initialize_lora_eva_weights(gm, eva_state_dict={"a": torch.zeros(2, 5)})
    with pytest.raises(ValueError, match="did not converge within 1 batches"):
        fxpeft.initialize_lora_eva_weights(gm, data, max_batches=1, **run)
    with pytest.raises(ValueError, match="must be a PeftModel"):
        fxpeft.initialize_lora_eva_weights(model, data, **run)
    with pytest.raises(ValueError, match="No adapter named 'other'"):
        fxpeft.initialize_lora_eva_weights(gm, data, adapter_name="other", **run)
    assert gm.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())
    assert gm.peft_config["default"].rank_pattern == {} and not model.a._forward_hooks
    assert gm.training and all(m.training for m in gm.modules())  # back in its mode after the failed runs
    gm.add_adapter("plain", fxpeft.LoraConfig(r=2, target_modules=["d"]))
    with pytest.raises(ValueError, match="can only be used with `init_lora_weights='eva'`"):
        fxpeft.initialize_lora_eva_weights(gm, data, adapter_name="plain", **run)
    gm.set_adapter(["default", "plain"])
    with pytest.raises(ValueError, match="single active adapter"):
        fxpeft.initialize_lora_eva_weights(gm, data, **run)
    # with another adapter loaded: only "default"'s layers, and the other adapter, order and activity kept
    gm.set_adapter("default")
    plain = {k: v.clone() for k, v in gm.state_dict().items() if ".plain." in k}
    fxpeft.initialize_lora_eva_weights(gm, data, max_batches=100, **run)
    assert list(gm.peft_config) == ["default", "plain"] and gm.active_adapters == ["default"]
    assert sorted(gm.peft_config["default"].target_modules) == ["a", "c"]
    assert all(torch.equal(gm.state_dict()[k], v) for k, v in plain.items()) and plain
    with pytest.raises(ValueError, match="peft_config is required"):
        fxpeft.get_eva_state_dict(model, data, **run)
    with pytest.raises(ValueError, match="cannot be resolved on a model fxpeft has not transformed"):
        fxpeft.get_eva_state_dict(model, data, peft_config=fxpeft.LoraConfig(
            target_modules="all-linear", init_lora_weights="eva"), **run)
    with pytest.raises(ValueError, match="following module names were not found in the model: \\['f'\\]"):
        fxpeft.get_eva_state_dict(gm, data, forward_fn=_call, prepare_model_inputs_fn=None,
                                  prepare_layer_inputs_fn={"f": None}, show_progress_bar=False)
    with pytest.raises(ValueError, match="reads peft_config.eva_config"):
        fxpeft.get_eva_state_dict(model, data, peft_config=fxpeft.LoraConfig(target_modules=["a"]), **run)


def test_eva_and_corda_sub_configs_as_peft():
    with pytest.warns(UserWarning, match="Using default EVA config"):
        assert fxpeft.LoraConfig(init_lora_weights="eva").eva_config == fxpeft.EvaConfig()
    with pytest.warns(UserWarning, match="Using default CorDA config"):
        assert fxpeft.LoraConfig(init_lora_weights="corda").corda_config == fxpeft.CordaConfig()
    with pytest.warns(UserWarning, match="`eva_config` specified but will be ignored"):
        fxpeft.LoraConfig(eva_config=fxpeft.EvaConfig())
    converted = fxpeft.LoraConfig(init_lora_weights="corda", corda_config=PeftCordaConfig(corda_method="kpm"))
    assert converted.corda_config == fxpeft.CordaConfig(corda_method="kpm")
    assert converted.to_dict()["corda_config"] == dict(vars(PeftCordaConfig(corda_method="kpm")))
    with pytest.raises(ValueError, match="rho"):
        fxpeft.LoraConfig(init_lora_weights="eva", eva_config={"rho": 0.5})
    with pytest.raises(ValueError, match="Invalid corda_method"):
        fxpeft.CordaConfig(corda_method="xpm")


# -------------------------------------------------------------------------------------------- CorDA


def _corda_model():
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=48,
                                        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))


CORDA_BATCHES = [torch.randint(0, models.VOCAB, (1, 40), generator=torch.Generator().manual_seed(i)) for i in range(4)]
CORDA = dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights="corda", rank_pattern={"down_proj": 2})


def _run(model):
    return lambda: [model(input_ids=ids) for ids in CORDA_BATCHES]


def _peft_corda(model, method, **files):
    config = peft.LoraConfig(**CORDA, corda_config=PeftCordaConfig(corda_method=method, **files))
    _quiet(peft_preprocess_corda, model, config, run_model=_run(model))
    return _quiet(peft.get_peft_model, model, config)


def _same_as_peft(gm, caller, theirs, adapter="default"):
    ours = {name.replace(f".{adapter}.", ".default."): p for name, p in gm.named_parameters()}
    base = dict(caller.named_parameters())
    for key, value in theirs.named_parameters():
        name = _peft_name(key)
        assert torch.equal(ours[name], value), name
        if ".lora_" not in name:
            assert torch.equal(base[name], value), name  # the caller's weights are PEFT's residuals
    ids = torch.randint(0, models.VOCAB, (2, 9), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_equals_peft(method, tmp_path):
    model = _corda_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    files = dict(cache_file=str(tmp_path / "peft" / "cache.pt"), covariance_file=str(tmp_path / "peft" / "cov.pt"))
    ours = {"cache_file": str(tmp_path / "ours" / "cache.pt"), "covariance_file": str(tmp_path / "ours" / "cov.pt")}
    with_files = method == "ipm"
    theirs = _peft_corda(copy.deepcopy(model), method, **(files if with_files else {}))
    config = fxpeft.LoraConfig(**CORDA, corda_config=fxpeft.CordaConfig(corda_method=method,
                                                                         **(ours if with_files else {})))
    fresh = copy.deepcopy(model)
    fxpeft.preprocess_corda(model, config, run_model=_run(model))
    gm = fxpeft.transform(model, config)
    _same_as_peft(gm, model, theirs)
    assert not any(hasattr(m, "eigens") for m in gm.modules())  # used once, as PEFT
    if not with_files:
        return
    for kind in ("cache_file", "covariance_file"):  # the files hold what PEFT's hold
        expected, got = torch.load(files[kind]), torch.load(ours[kind])
        assert expected.keys() == got.keys() and all(torch.equal(got[k], expected[k]) for k in expected), kind
    # PEFT's cache, read instead of computing (no run_model), gives the same adapter
    cached = fxpeft.LoraConfig(**CORDA, corda_config=fxpeft.CordaConfig(cache_file=files["cache_file"]))
    fxpeft.preprocess_corda(fresh, cached)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in original.items())  # nothing changed yet
    _same_as_peft(fxpeft.transform(fresh, cached), fresh, theirs)


def test_corda_on_a_transformed_module_and_from_a_covariance_file(tmp_path):
    """run_model calls a transformed module (its layers' inputs come through fxpeft.site_hooks), and the
    adapter is added to it; PEFT's covariance file gives a plain model the same decompositions."""
    model = _corda_model()
    plain = copy.deepcopy(model)
    covariances = str(tmp_path / "cov.pt")
    theirs = _peft_corda(copy.deepcopy(model), "kpm", covariance_file=covariances)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    config = fxpeft.LoraConfig(**CORDA, corda_config=fxpeft.CordaConfig(corda_method="kpm"))
    fxpeft.preprocess_corda(gm, config, run_model=_run(gm))  # "default" has B = 0: the base model's inputs
    from_file = dataclasses.replace(config, corda_config=fxpeft.CordaConfig(corda_method="kpm",
                                                                            covariance_file=covariances))
    fxpeft.preprocess_corda(plain, from_file)  # no run_model
    hooked, other = copy.deepcopy(plain), _corda_model()
    fxpeft.preprocess_corda(other, config, run_model=_run(hooked), hooked_model=hooked)  # PEFT's hooked_model
    decomposed = {name: m.eigens for name, m in gm.named_modules() if hasattr(m, "eigens")}
    assert len(decomposed) == 7
    for name, eigens in decomposed.items():
        assert all(torch.equal(a, b) for a, b in zip(plain.get_submodule(name).eigens, eigens)), name
        assert all(torch.equal(a, b) for a, b in zip(other.get_submodule(name).eigens, eigens)), name
    gm.add_adapter("corda", config)
    gm.delete_adapter("default")
    _same_as_peft(gm, model, theirs, adapter="corda")


def test_corda_errors(tmp_path):
    model = _corda_model()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    config = fxpeft.LoraConfig(**CORDA, corda_config=fxpeft.CordaConfig())
    with pytest.raises(ValueError, match="please run `preprocess_corda` first"):
        fxpeft.transform(model, config)
    with pytest.raises(ValueError, match="prepares LoraConfig\\(init_lora_weights='corda'"):
        fxpeft.preprocess_corda(model, fxpeft.LoraConfig(target_modules=["q_proj"]), run_model=_run(model))
    with pytest.raises(ValueError, match="run_model must be specified"):
        fxpeft.preprocess_corda(model, config)
    with pytest.raises(ValueError, match="received no input while run_model ran"):
        fxpeft.preprocess_corda(model, config, run_model=lambda: None)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        fxpeft.preprocess_corda(model, dataclasses.replace(config, target_modules=["nothing"]), run_model=_run(model))
    torch.save({}, tmp_path / "cache.pt")
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="has no decomposition for 'model.layers.0.self_attn.q_proj'"):
        fxpeft.preprocess_corda(model, dataclasses.replace(config, corda_config=fxpeft.CordaConfig(
            cache_file=str(tmp_path / "other.pt"))))
    assert not any(hasattr(m, "eigens") or m._forward_hooks for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())


# ---------------------------------------------------------------------------------------- site hooks


def test_site_hooks_fire_with_the_layers_inputs(eva_llama):
    """A Llama (layers as fxpeft blocks) and a GPT-2 (Conv1D: a matmul on the flattened input)."""
    base, data, _, gm = eva_llama
    gpt2 = models.gpt2().eval()
    inputs = {k: v for k, v in data[0].items() if k != "labels"}  # keywords both were called with: no capture
    streams = Streams()  # symbolic trace; Conv1D on a 3-d input
    streams_inputs = {"x": torch.randn(2, 5, 16), "y": torch.randn(2, 5, 64), "z": torch.randn(2, 5, 16),
                      "ids": torch.randint(0, 10, (2, 5))}
    cases = [(base, gm, ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"], inputs),
             (gpt2, fxpeft.transform(copy.deepcopy(gpt2), fxpeft.LoraConfig(r=2, target_modules=["c_attn"])),
              ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"], inputs),
             (streams, fxpeft.transform(copy.deepcopy(streams), fxpeft.LoraConfig(r=2, target_modules=["a"])),
              ["e", "emb", "b"], streams_inputs)]
    for reference, transformed, names, inputs in cases:
        expected, got = {}, {}

        def keep(store, name):
            def hook(module, args, *rest):  # rest: (output,) or (kwargs, output)
                store.setdefault(name, []).append((args[0].clone(), rest[-1].clone()))
            return hook
        handles = [reference.get_submodule(n).register_forward_hook(keep(expected, n)) for n in names]
        with torch.no_grad():
            reference(**inputs)
        for handle in handles:
            handle.remove()
        for i, name in enumerate(names):
            transformed.get_submodule(name).register_forward_hook(keep(got, name), with_kwargs=i == 0)
        with torch.no_grad(), fxpeft.disable_adapters(transformed):
            transformed(**inputs)
            assert not got  # outside the block the graph reads the weights: no hook runs
            with fxpeft.site_hooks(transformed):
                transformed(**inputs)
            transformed(**inputs)
        for name in names:
            assert len(got[name]) == 1, name
            (x, y), ((x_ref, y_ref),) = got[name][0], expected[name]
            assert x.shape == x_ref.shape and y.shape == y_ref.shape, name
            torch.testing.assert_close(x, x_ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        for name in names:
            transformed.get_submodule(name)._forward_hooks.clear()


class Many(nn.Module):
    """24 linear layers (PEFT shortens a target list of 20 or more), in pairs reading one input."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(8, 8), "gate": nn.Linear(8, 8)}) for _ in range(12))
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block["up"](x)) * block["gate"](x)
        return self.head(x)


def test_eva_saves_a_long_target_list_as_peft_shortens_it():
    torch.manual_seed(0)
    model = Many()
    generator = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(64, 8, generator=generator) @ torch.diag(torch.linspace(3, 0.1, 8))} for _ in range(4)]
    options = dict(r=2, lora_alpha=2, target_modules=["up", "gate"], init_lora_weights="eva")
    run = dict(forward_fn=_call, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)
    theirs = _quiet(peft.get_peft_model, copy.deepcopy(model), peft.LoraConfig(**options))
    _quiet(peft.initialize_lora_eva_weights, theirs, data, **run)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**options, eva_config=fxpeft.EvaConfig()))
    fxpeft.initialize_lora_eva_weights(gm, data, max_batches=100, **run)
    expected, got = theirs.peft_config["default"], gm.peft_config["default"]
    assert sorted(got.target_modules) == sorted(expected.target_modules) == ["gate", "up"]
    assert got.rank_pattern == expected.rank_pattern and got.alpha_pattern == expected.alpha_pattern
    ours = dict(gm.named_parameters())
    for key, value in theirs.named_parameters():
        assert torch.equal(ours[_peft_name(key)], value), key



EVA_STREAMS = dict(r=2, lora_alpha=4, target_modules=["a", "b", "c", "d", "e"], init_lora_weights="eva")
EVA_PLAIN = dict(forward_fn=_call, prepare_model_inputs_fn=None, prepare_layer_inputs_fn=None, show_progress_bar=False)


def _eva_rank(rank: int, world: int, store: str, out: str) -> None:
    """One of two forked processes: its half of every batch, layer inputs gathered from both."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        mine = [{k: v.chunk(world)[rank] for k, v in batch.items()} for batch in _streams_data()]
        config = fxpeft.LoraConfig(**EVA_STREAMS, eva_config=fxpeft.EvaConfig())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT's warning that inputs are gathered
            state = fxpeft.get_eva_state_dict(Streams(), mine, peft_config=config, max_batches=100, **EVA_PLAIN)
        if rank == 0:
            torch.save(state, out)
    finally:
        dist.destroy_process_group()


def test_eva_gathers_layer_inputs_across_processes(tmp_path):
    """Two processes holding half of every batch each, gather_distributed_inputs=True (PEFT's default):
    the SVDs see the whole batches, so the result is one process's on the whole data."""
    import torch.multiprocessing as mp
    out = str(tmp_path / "state.pt")
    mp.start_processes(_eva_rank, args=(2, str(tmp_path / "store"), out), nprocs=2, start_method="fork")
    gathered = torch.load(out)
    torch.manual_seed(0)
    config = fxpeft.LoraConfig(**EVA_STREAMS, eva_config=fxpeft.EvaConfig())
    whole = fxpeft.get_eva_state_dict(Streams(), _streams_data(), peft_config=config, **EVA_PLAIN)
    assert gathered.keys() == whole.keys() and {k: a.shape[0] for k, a in whole.items()}["b"] == 0
    for name in whole:
        assert torch.equal(gathered[name], whole[name]), name
    half = [{k: v.chunk(2)[0] for k, v in batch.items()} for batch in _streams_data()]
    alone = fxpeft.get_eva_state_dict(Streams(), half, peft_config=config, max_batches=100, **EVA_PLAIN)
    assert not torch.equal(alone["c"][:1], whole["c"][:1])  # one half alone gives other components
