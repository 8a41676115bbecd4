"""A method registered from outside fxpeft: a rank-1 additive adapter ``y + s u (v · x)`` written
here, in a registry of its own, with nothing changed in fxpeft. Its oracle is its formula."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import pytest
import torch
import transformers
from torch import nn

import fxpeft
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import AdapterGate, additive, child_dict, weight_map
from fxpeft.kept import SiteParts
from models import MLP, hf_inputs, llama

aten = torch.ops.aten


@dataclasses.dataclass
class OuterConfig(PeftConfigBase):
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    scale: float = 0.5

    peft_type = "TOY_OUTER"


def create(module, site, weight, config, adapter):
    out_f, in_f = weight.shape
    child_dict(module, "outer_u", nn.ParameterDict)[adapter] = nn.Parameter(torch.randn(out_f))
    child_dict(module, "outer_v", nn.ParameterDict)[adapter] = nn.Parameter(torch.randn(in_f))
    child_dict(module, "outer_gate")[adapter] = AdapterGate(config.scale)


def delta(lw, site, module, adapter, x):
    u, v = lw.attr(f"{site.path}.outer_u.{adapter}"), lw.attr(f"{site.path}.outer_v.{adapter}")
    along = lw.call(aten.unsqueeze.default, lw.call(aten.matmul.default, x, v), -1)  # (…, 1)
    return lw.call(aten.mul.Tensor, along, u)


def delta_weight(gm, site, module, adapter):
    return module.outer_gate[adapter].scale * torch.outer(module.outer_u[adapter], module.outer_v[adapter])


def outer_method(name="outer"):
    return additive(name=name, config_type=OuterConfig, create=create, delta=delta, delta_weight=delta_weight,
                    containers=("outer_u", "outer_v"), gates="outer_gate",
                    dtype_of=lambda module, adapter: module.outer_u[adapter].dtype, kinds=("linear",))


@pytest.fixture(scope="module")
def registry():
    mine = fxpeft.registry.DEFAULT.copy()
    mine.add_method(outer_method())
    return mine


def formula(model, gm, x, adapters):
    h = x
    out = None
    for layer, name in ((model.fc1, "fc1"), (model.fc2, "fc2")):
        y = layer(h)
        for adapter in adapters:
            site = gm.get_submodule(name)
            y = y + 0.5 * (h @ site.outer_v[adapter]).unsqueeze(-1) * site.outer_u[adapter]
        out = y
        h = model.act(y) if name == "fc1" else h
    return out


def test_registered_method_computes_its_formula_and_folds(registry, tmp_path):
    model = MLP().eval()
    x = torch.randn(4, 12)
    gm = fxpeft.transform(model, OuterConfig(target_modules=["fc1", "fc2"]), registry=registry).eval()
    with torch.no_grad():
        expected = formula(model, gm, x, ["default"])
        assert (expected - model(x)).abs().max() > 1e-3
        torch.testing.assert_close(gm(x), expected)
        gm.add_adapter("second", OuterConfig(target_modules=["fc2"]))  # later edits use the module's registry
        gm.set_adapter(["default", "second"])
        both = gm(x)
        gm.merge_adapter()
        torch.testing.assert_close(gm(x), both, rtol=1e-5, atol=1e-5)
        gm.unmerge_adapter()
        gm.set_adapter("default")
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
    # mixed batches, trainable state, a checkpoint that loads back through the same registry
    with torch.no_grad():
        mixed = gm(x, adapter_names=["default", "second", "__base__", "default"])
        torch.testing.assert_close(mixed[0], expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[2], model(x)[2], rtol=1e-5, atol=1e-5)
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {
        f"{layer}.outer_{side}.{a}" for layer, adapters in (("fc1", ["default"]), ("fc2", ["default", "second"]))
        for a in adapters for side in "uv"}
    fxpeft.save_pretrained(gm, str(tmp_path), adapter_names=["default"])
    loaded = fxpeft.from_pretrained(MLP().eval(), str(tmp_path), registry=registry).eval()
    loaded.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    assert "outer" in str(fxpeft.inspect(gm))


def test_registering_twice_or_shadowing_is_an_error(registry):
    with pytest.raises(ValueError, match="already registered"):
        registry.add_method(outer_method())
    with pytest.raises(ValueError, match="already has a method"):
        registry.add_method(outer_method(name="outer_again"))


def test_fxpeft_own_registry_is_untouched(registry):
    assert all(m.name != "outer" for m in fxpeft.registry.DEFAULT.methods)
    with pytest.raises(TypeError, match="No fxpeft method handles OuterConfig"):
        fxpeft.transform(MLP(), OuterConfig(target_modules=["fc1"]))


def greedy_without_cache(gm, inputs: dict, steps: int) -> torch.Tensor:
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate counts them past left padding
            logits = gm(input_ids=ids, attention_mask=mask, position_ids=positions).logits
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], 1)
            mask = torch.cat([mask, mask[:, -1:]], 1)
    return ids


def test_registered_method_generates_from_its_delta_weight(registry):
    """A registered additive method's generation graphs read the ΔW its delta_weight gives (kept once per
    generate call): the tokens of greedy decoding without a cache, where its graph computes its formula."""
    torch.manual_seed(0)
    gm = fxpeft.transform(llama().eval(), OuterConfig(target_modules=["q_proj", "v_proj"], scale=2.0),
                          registry=registry).eval()
    inputs = hf_inputs("llama", batch=2)
    got = gm.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, greedy_without_cache(gm, inputs, 4))
    with fxpeft.disable_adapters(gm):
        assert not torch.equal(got, gm.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0))


def test_a_weight_map_running_its_op_on_a_mapped_input_says_so_and_generates():
    """A weight map whose lower_site runs the op on a mapped input (replace_op) and gives site_parts must
    say so (maps): without it, building its generation graph is refused by name, instead of taking
    the op's output for the op; with it, the input is mapped before the op, from the kept rotation
    (generate: the tokens of greedy decoding without a cache) or the lowering's part before the op."""
    def lower_site(lw, site, module, adapters):  # W (2 x): the op on a doubled input
        return lw.replace_op(site, input=lw.call(aten.mul.Tensor, site.input, 2.0))

    def create_doubled(module, site, weight, config, adapter):
        child_dict(module, "doubled_gate")[adapter] = AdapterGate(1.0)

    def doubled(**fields):
        def parts(gm, site, module, adapter, dtype, alone):  # Q = 2 I, as blocks of one feature
            return SiteParts(rotation=torch.full((gm.get_parameter(site.weight).shape[1], 1, 1), 2.0, dtype=dtype))

        mine = fxpeft.registry.DEFAULT.copy()
        mine.add_method(weight_map(
            name="doubled", config_type=DoubledConfig, create=create_doubled, lower_site=lower_site,
            fold=lambda gm, site, module, adapter, weight, bias, sign: (weight * 2.0 ** sign, bias),
            containers=(), gates="doubled_gate", site_parts=parts, **fields))
        torch.manual_seed(0)
        return fxpeft.transform(llama().eval(), DoubledConfig(target_modules=["v_proj", "down_proj"]),
                                registry=mine).eval()

    inputs = hf_inputs("llama", batch=2)
    with pytest.raises(NotImplementedError, match=r"doubled.s lower_site runs the op .*maps=\{'linear': 'input'\}"):
        doubled().generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    gm = doubled(maps={"linear": "input"})
    got = gm.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got, greedy_without_cache(gm, inputs, 4))
    with fxpeft.disable_adapters(gm):
        assert not torch.equal(got, gm.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0))
    with torch.enable_grad():  # a cached call with autograd: the lowering's part before the op
        cache = transformers.StaticCache(config=gm.config, max_cache_len=12)
        torch.testing.assert_close(gm(**inputs, cache=cache, use_cache=True).logits, gm(**inputs).logits)


@dataclasses.dataclass
class DoubledConfig(PeftConfigBase):
    target_modules: Optional[Union[list[str], str]] = None

    peft_type = "TOY_DOUBLED"
