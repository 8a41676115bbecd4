"""LoraConfig(init_lora_weights="pissa" | "pissa_niter_<N>" | "olora" | "orthogonal" | "loftq") through
fxpeft.transform, against PEFT 0.21.2's get_peft_model on a deep copy with the same seed: every lora_A /
lora_B, every base weight (PEFT rewrites it in place, fxpeft too: the caller's tensors) and the outputs.
Bad configs leave the caller's model bit for bit as it was."""
from __future__ import annotations

import copy
import dataclasses
import json
import warnings

import peft
import pytest
import torch
from test_lora_init import cpu_loftq  # noqa: F401  (fixture: PEFT's LoftQ on CPU)
from torch import nn
from transformers.pytorch_utils import Conv1D

import fxpeft
import models


def _peft_name(key: str) -> str:
    return key.removeprefix("base_model.model.").replace(".base_layer.", ".").replace(".original_module.", ".")


def _compare(model, inputs, seed: int = 1, **config):
    """PEFT on a deep copy and fxpeft on ``model``, each from ``seed``: every tensor PEFT's model holds
    equals fxpeft's (adapters included), the caller's model holds PEFT's base weights, outputs agree."""
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        theirs = peft.get_peft_model(reference, peft.LoraConfig(**config))
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**config))
    ours = dict(gm.named_parameters())
    caller = dict(model.named_parameters())
    adapters = 0
    for key, value in theirs.named_parameters():
        name = _peft_name(key)
        assert torch.equal(ours[name], value), name
        if ".lora_" in name:
            adapters += 1
        elif ".modules_to_save." not in name:
            assert torch.equal(caller[name], value), name  # the caller's model was changed as PEFT's was
    theirs.eval()
    gm.eval()
    with torch.no_grad():
        expected, got = theirs(**inputs), gm(**inputs)
    expected, got = getattr(expected, "logits", expected), getattr(got, "logits", got)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    return gm, theirs, adapters


def _changed(before: dict, model) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


MLP = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"])


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "OLoRA", "orthogonal"])
def test_mlp_equals_peft(init):
    model = models.MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, _, adapters = _compare(model, {"x": torch.randn(3, 12)}, init_lora_weights=init, **MLP)
    assert adapters == 4
    assert _changed(before, model) == (set() if init == "orthogonal" else {"fc1.weight", "fc2.weight"})


@pytest.mark.parametrize("loftq", [dict(loftq_bits=4, loftq_iter=1), dict(loftq_bits=8, loftq_iter=2)])
def test_loftq_equals_peft(loftq, cpu_loftq):  # noqa: F811
    model = models.MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _compare(model, {"x": torch.randn(3, 12)}, init_lora_weights="loftq", loftq_config=loftq, **MLP)
    assert _changed(before, model) == {"fc1.weight", "fc2.weight"}  # the quantize-dequantize round trip


def test_llama_pissa_with_an_embedding_and_dora():
    """Every linear of a Llama block plus the token embedding (PEFT gives embeddings the default init
    and leaves their weight alone), and DoRA's magnitude taken from the rewritten weight."""
    model = models.llama()
    inputs = models.hf_inputs("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
    _, _, adapters = _compare(model, inputs, r=4, lora_alpha=8, target_modules=targets, init_lora_weights="pissa_niter_1")
    assert adapters == 2 * (7 * 2 + 1)
    changed = _changed(before, model)
    assert len(changed) == 14 and "model.embed_tokens.weight" not in changed
    _compare(models.llama(), inputs, r=4, target_modules=["q_proj", "down_proj"], init_lora_weights="pissa",
             use_dora=True)


def test_gpt2_conv1d():
    """Conv1D sites (fan_in_fan_out): PiSSA factors W as nn.Linear holds it; OLoRA on the square
    attn.c_proj gets PEFT's tensors (PEFT factors the stored, transposed weight: PEFT's quirk, warned)."""
    inputs = models.hf_inputs("gpt2")
    _compare(models.gpt2(), inputs, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
             init_lora_weights="pissa")
    with pytest.warns(UserWarning, match="no longer computes the base's output"):
        _compare(models.gpt2(), inputs, r=4, lora_alpha=8, target_modules=["attn.c_proj"], init_lora_weights="olora")
    with pytest.raises(ValueError, match="shape error"):  # non-square: PEFT's adapted layer cannot run
        fxpeft.transform(models.gpt2(), fxpeft.LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights="olora"))


# ---- bad input never damages the caller's model


class LinearThenOthers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 12)
        self.gpt = Conv1D(24, 12)  # (in 12, out 24): not square
        self.conv = nn.Conv1d(24, 4, 1)

    def forward(self, x):
        return self.conv(self.gpt(self.fc(x)).transpose(1, 2))


@pytest.mark.parametrize("config,error,match,peft_raises", [
    (dict(target_modules=["fc", "gpt"], init_lora_weights="olora"), ValueError, "shape error", False),
    (dict(target_modules=["fc", "conv"], init_lora_weights="pissa"), ValueError, "Unknown initialization", True),
    (dict(target_modules=["fc", "gpt"], init_lora_weights="orthogonal", rank_pattern={"gpt": 3}), ValueError, "even",
     True),
    (dict(target_modules=["fc", "gpt"], init_lora_weights="loftq", loftq_config={"loftq_bits": 2, "loftq_iter": 1}),
     ValueError, "nf4 and int8", False),  # PEFT raises too, from its CUDA-only LoftQ
])
def test_a_failing_site_leaves_every_weight_as_it_was(config, error, match, peft_raises):
    """The first site alone would be fine and would rewrite its weight: every site is checked first.
    (Where PEFT raises at init, it raises the same, having changed the first site's weight.)"""
    model = LinearThenOthers()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error, match=match):
        fxpeft.transform(model, fxpeft.LoraConfig(r=4, **config), example_inputs=(torch.randn(2, 5, 12),))
    assert _changed(before, model) == set()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    if peft_raises:
        with warnings.catch_warnings(), pytest.raises(error, match=match):
            warnings.simplefilter("ignore")
            peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=4, **config))


def test_quantized_base_refuses_inits_that_read_the_weight():
    model = models.MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for init in ("pissa", "orthogonal"):
        with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'.*quantized layer 'fc2'"):
            fxpeft.transform(model, [fxpeft.BnbConfig(load_in_8bit=True, llm_int8_skip_modules=["fc1"]),
                                     fxpeft.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=init)])
    assert _changed(before, model) == set()


def test_add_adapter_failing_leaves_the_weights():
    gm = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(ValueError, match="even"):
        gm.add_adapter("odd", fxpeft.LoraConfig(r=2, target_modules=["fc1", "fc2"], rank_pattern={"fc2": 3},
                                                init_lora_weights="orthogonal"))
    assert set(gm.state_dict()) == set(before) and all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())


# ---- the config, as PEFT's LoraConfig takes it


def test_config_values_as_peft():
    from fxpeft.passes.lora_init import LoftQConfig
    for loftq in (fxpeft.LoftQConfig(8, 2), dataclasses.asdict(LoftQConfig(8, 2)), peft.LoftQConfig(8, 2)):
        ours = fxpeft.LoraConfig(init_lora_weights="loftq", loftq_config=loftq)
        theirs = peft.LoraConfig(init_lora_weights="loftq", loftq_config=copy.copy(loftq))
        assert ours.loftq_config == theirs.loftq_config == {"loftq_bits": 8, "loftq_iter": 2}
    for bad in ({}, None):
        with pytest.raises(ValueError, match="`loftq_config` must be specified"):
            fxpeft.LoraConfig(init_lora_weights="loftq", loftq_config=bad)
        with pytest.raises(ValueError, match="`loftq_config` must be specified"):
            peft.LoraConfig(init_lora_weights="loftq", loftq_config=bad)
    with pytest.raises(ValueError, match="lacks loftq_iter"):
        fxpeft.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    for config in (fxpeft, peft):
        with pytest.warns(UserWarning, match="will be ignored"):
            assert config.LoraConfig(init_lora_weights="pissa", loftq_config={"loftq_bits": 4}).loftq_config == {}
    for init in ("pissa_niter_x", "pissa_foo", "zeros", "PiSSA"):
        with pytest.raises(ValueError):
            fxpeft.LoraConfig(init_lora_weights=init)
    with pytest.raises(ValueError) as ours:
        fxpeft.LoraConfig(init_lora_weights="pissa_foo")
    assert str(ours.value) == ("init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got pissa_foo "
                               "instead.")  # PEFT's message (from its layers)
    for init in ("lora_ga", "MiCA"):
        with pytest.raises(NotImplementedError, match=f"init_lora_weights='{init}' is not implemented"):
            fxpeft.LoraConfig(init_lora_weights=init)
    assert fxpeft.LoraConfig(init_lora_weights="Gaussian").init_lora_weights == "Gaussian"


def test_saved_configs_load_and_refuse_as_documented(tmp_path):
    gm = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights="loftq",
                                                          loftq_config=fxpeft.LoftQConfig(8, 1)))
    gm.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 8, "loftq_iter": 1}
    assert fxpeft.LoraConfig.unsupported(saved) == []
    saved["init_lora_weights"] = "lora_ga"
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(NotImplementedError, match="init_lora_weights='lora_ga' .*preprocess_loraga"):
        fxpeft.from_pretrained(models.MLP(), str(tmp_path))


# ---- save_pretrained(path_initial_model_for_weight_conversion=...): plain LoRA for the original base


class Converted(nn.Module):
    """A linear and a Conv1D to convert, an embedding (left out of the file, as PEFT) and a saved head."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 24)
        self.up = nn.Linear(24, 40)
        self.gpt = Conv1D(16, 40)
        self.head = nn.Linear(16, 6)

    def forward(self, ids):
        return self.head(torch.relu(self.gpt(torch.relu(self.up(self.emb(ids))))))


def _normal(config: dict) -> dict:
    # PEFT holds target_modules as a set; its version is PEFT's, not fxpeft's; PEFT sets the config's
    # fan_in_fan_out when it wraps a Conv1D (fxpeft reads the layout from the graph and saves the field as given)
    return {k: sorted(v) if k == "target_modules" else v for k, v in config.items()
            if k not in ("peft_version", "fan_in_fan_out")}


@pytest.mark.parametrize("init,use_rslora", [("pissa", False), ("olora", True)])
def test_converted_save_is_peft_save_and_loads_on_the_original_base(init, use_rslora, tmp_path):
    from safetensors.torch import load_file
    original = Converted()
    targets = ["up", "emb"] + (["gpt"] if init == "pissa" else [])  # PEFT's OLoRA breaks non-square Conv1D
    # no modules_to_save: PEFT's converted file leaves them out while its config still names them, so
    # PEFT cannot load its own converted adapter (KeyError); fxpeft writes the same file
    config = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, use_rslora=use_rslora,
                  rank_pattern={"up": 3} if not use_rslora else {})
    ids = torch.randint(0, 10, (3, 5))
    gm, theirs, _ = _compare(copy.deepcopy(original), {"ids": ids}, **config)
    gm.save_pretrained(tmp_path / "ours_init")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs_init")
    with torch.no_grad():  # "training", the same on both (not the embedding's: the file leaves it out, as PEFT)
        for key, param in theirs.named_parameters():
            if param.requires_grad and "lora_embedding" not in key:
                param.add_(torch.randn_like(param) * 0.1)
                dict(gm.named_parameters())[_peft_name(key)].copy_(param)
    gm.save_pretrained(tmp_path / "ours", path_initial_model_for_weight_conversion=str(tmp_path / "ours_init"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=str(tmp_path / "theirs_init"))
    for folder in ("", "_init"):
        ours = load_file(tmp_path / f"ours{folder}" / "adapter_model.safetensors")
        expected = load_file(tmp_path / f"theirs{folder}" / "adapter_model.safetensors")
        assert ours.keys() == expected.keys()
        assert all(torch.equal(ours[k], expected[k]) for k in expected)
        ours = json.loads((tmp_path / f"ours{folder}" / "adapter_config.json").read_text())
        expected = json.loads((tmp_path / f"theirs{folder}" / "adapter_config.json").read_text())
        assert ours["init_lora_weights"] is True and ours["r"] == (8 if folder == "" else 4)
        differing = {k for k in _normal(ours) if _normal(ours)[k] != _normal(expected).get(k)}
        assert differing == (set() if folder == "" else {"inference_mode", "auto_mapping"}), differing
    converted = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert not any("emb" in k for k in converted)
    assert converted["base_model.model.up.lora_A.weight"].shape[0] == 2 * (4 if use_rslora else 3)  # rank_pattern
    assert gm.peft_config["default"].r == 4 and gm.peft_config["default"].init_lora_weights == init  # unchanged
    # PEFT loads the converted adapter on the untouched base: the trained model's outputs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / "ours")).eval()
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), gm(ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(original(ids), gm(ids), atol=1e-3)  # training changed something


def test_conversion_refusals_write_nothing(tmp_path):
    def saved(config, name):
        gm = fxpeft.transform(models.MLP(), config)
        gm.save_pretrained(tmp_path / name)
        return gm, (tmp_path / name / "adapter_config.json").read_text()

    gm, initial = saved(fxpeft.LoraConfig(r=4, target_modules=["fc1", "fc2"], init_lora_weights="pissa",
                                          use_rslora=True, rank_pattern={"fc1": 2}), "rslora")
    with pytest.raises(ValueError, match="not supported when using `rank_pattern`"):  # PEFT's error
        gm.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "rslora"))
    _, other = saved(fxpeft.LoraConfig(r=2, target_modules=["fc1"]), "other")
    gm, _ = saved(fxpeft.LoraConfig(r=4, target_modules=["fc1", "fc2"], init_lora_weights="pissa"), "pissa")
    with pytest.raises(ValueError, match="does not hold adapter 'default' as it was created"):
        fxpeft.save_pretrained(gm, str(tmp_path / "out"), path_initial_model_for_weight_conversion=str(tmp_path / "other"))
    for config in (fxpeft.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights="pissa", use_dora=True),
                   fxpeft.IA3Config(target_modules=["fc1"], feedforward_modules=[])):
        gm, _ = saved(config, "unconvertible")
        with pytest.raises(NotImplementedError, match="path_initial_model_for_weight_conversion"):
            gm.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=str(tmp_path / "unconvertible"))
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "rslora" / "adapter_config.json").read_text() == initial
    assert (tmp_path / "other" / "adapter_config.json").read_text() == other


def test_a_failed_load_after_a_base_rewriting_init_leaves_the_weights(tmp_path):
    """The init rewrites the caller's base weights; the checkpoint then fails to fit: the
    weights are put back (Method.changes_base makes the edit keep a copy while it runs)."""
    import json
    from safetensors.torch import load_file, save_file

    from models import MLP
    torch.manual_seed(0)
    model = MLP()
    trained = fxpeft.transform(copy.deepcopy(model), fxpeft.LoraConfig(r=2, target_modules=["fc1"],
                                                                       init_lora_weights="pissa"))
    trained.save_pretrained(str(tmp_path))
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(5, tensors[key].shape[1])  # a tensor that does not fit
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "pissa"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="shape"):
        fxpeft.from_pretrained(model, str(tmp_path))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="shape"):
        gm.load_adapter(str(tmp_path), "pissa")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
