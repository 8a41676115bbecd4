"""add_weighted_adapter against PEFT's LoraModel.add_weighted_adapter (the oracle).

Both sides get the same adapters (PEFT's random tensors are copied into fxpeft), then both combine
them with the same arguments; we compare, per adapted module, the delta ``scale * B @ A`` of the new
adapter and its config. The dare types draw random masks: both calls run right after the same
seed, and fxpeft draws in PEFT's order, so the masks (and the generator state afterwards) match.
"""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch

import fxpeft
import models
from fxpeft.passes import weighted

EXACT = dict(rtol=0, atol=1e-6)
SVD = dict(rtol=0, atol=1e-3)

# three adapters on a tiny Llama: different ranks, scalings and (overlapping) targets, embeddings included
LLAMA_ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]),
    "b": dict(r=6, lora_alpha=3, target_modules=["q_proj", "v_proj", "o_proj", "embed_tokens"]),
    "c": dict(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "embed_tokens"]),
}
CONV_ADAPTERS = {  # Conv2d (3x3 kernels) and a linear head
    "a": dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"]),
    "b": dict(r=3, lora_alpha=3, target_modules=["conv2", "head"]),
}
GPT2_ADAPTERS = {  # GPT-2's Conv1D layers: weights stored (in, out), fan_in_fan_out
    "a": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
    "b": dict(r=2, lora_alpha=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True),
}


def _build(factory, adapters: dict):
    """(PEFT model, fxpeft module) with the same adapters, PEFT's random tensors copied to fxpeft."""
    model = factory().eval()
    names = list(adapters)
    common = dict(init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**adapters[names[0]], **common),
                                  adapter_name=names[0])
        for name in names[1:]:
            ref.add_adapter(name, peft.LoraConfig(**adapters[name], **common))
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**adapters[names[0]], **common), adapter_name=names[0])
    for name in names[1:]:
        fxpeft.add_adapter(gm, fxpeft.LoraConfig(**adapters[name], **common), name)
    ours = dict(gm.named_parameters())
    copied = 0
    with torch.no_grad():
        for key, value in ref.named_parameters():
            if "lora_" in key:
                ours[key.removeprefix("base_model.model.")].copy_(value)
                copied += 1
    assert copied == sum(1 for k in ours if "lora_" in k) > 0
    return ref, gm


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits (SVDs took seconds on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def llama_pair():
    return _build(models.llama, LLAMA_ADAPTERS)


@pytest.fixture(scope="module")
def gpt2_pair():
    return _build(models.gpt2, GPT2_ADAPTERS)


_counter = iter(range(10**6))


def _fresh_name(prefix: str) -> str:
    return f"{prefix}_{next(_counter)}"


def _delta(a, b, scale) -> torch.Tensor:
    """scale * B @ A; for conv factors the composed kernel (B is 1x1)."""
    if a.dim() == 2:
        return (scale * (b @ a)).detach()
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d}[a.dim()]
    return (conv(a.transpose(0, 1), b).transpose(0, 1) * scale).detach()


def _peft_deltas(ref, name) -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer
    out = {}
    for path, module in ref.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        if name in module.lora_A:
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
        elif name in module.lora_embedding_A:
            a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
        else:
            continue
        out[path] = _delta(a, b, module.scaling[name])
    return out


def _our_deltas(gm, name) -> dict[str, torch.Tensor]:
    out = {}
    for path, module in gm.named_modules():
        if "lora_A" in module._modules and name in module.lora_A:
            a, b = module.lora_A[name].weight, module.lora_B[name].weight
        elif "lora_embedding_A" in module._modules and name in module.lora_embedding_A:
            a, b = module.lora_embedding_A[name], module.lora_embedding_B[name]
        else:
            continue
        out[path] = _delta(a, b, module.lora_scaling[name].scale)
    return out


def _combine_both(ref, gm, adapters, weights, seed=0, **kwargs):
    """Run PEFT's and our add_weighted_adapter with the same arguments after the same seed; returns
    the new adapter's name and, per side, the generator's next draw (consumption parity)."""
    name = _fresh_name(kwargs.get("combination_type", "svd"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        ref.add_weighted_adapter(adapters, weights, name, **kwargs)
        after_ref = torch.rand(4)
        torch.manual_seed(seed)
        weighted.add_weighted_adapter(gm, adapters, weights, name, **kwargs)
        after_ours = torch.rand(4)
    return name, after_ref, after_ours


def _assert_same(ref, gm, name, tol):
    expected, got = _peft_deltas(ref, name), _our_deltas(gm, name)
    assert set(got) == set(expected) and expected
    for path in expected:
        assert got[path].abs().max() > 0, path
        torch.testing.assert_close(got[path], expected[path], **tol, msg=lambda m: f"{path}: {m}")
    ref_config, our_config = ref.peft_config[name], gm.peft_config[name]
    assert our_config.r == ref_config.r
    assert our_config.lora_alpha == ref_config.lora_alpha
    targets = ref_config.target_modules
    if isinstance(targets, str):
        assert our_config.target_modules == targets
    else:
        assert set(our_config.target_modules) == set(targets)
    assert name not in fxpeft.active_adapters(gm)  # as PEFT: added, not activated
    assert not any(p.requires_grad for n, p in gm.named_parameters() if f".{name}" in n)


CASES = [  # combination_type, adapters, weights, extra kwargs, tolerance
    ("cat", ["a", "b", "c"], [1.0, -0.7, 0.4], {}, EXACT),
    ("linear", ["a", "c"], [0.6, -1.3], {}, EXACT),
    ("svd", ["a", "b", "c"], [1.0, -0.7, 0.4], {}, SVD),
    ("svd", ["a", "b"], [0.5, 2.0], dict(svd_rank=3, svd_clamp=0.9, svd_full_matrices=False), SVD),
    ("ties", ["a", "c"], [0.6, -1.3], dict(density=0.5), EXACT),
    ("ties", ["a", "c"], [0.6, 1.3], dict(density=0.3, majority_sign_method="frequency"), EXACT),
    ("ties_svd", ["a", "b", "c"], [1.0, 0.5, -0.4], dict(density=0.4), SVD),
    ("dare_linear", ["a", "c"], [0.6, -1.3], dict(density=0.5), EXACT),
    ("dare_ties", ["a", "c"], [0.6, 1.3], dict(density=0.7, majority_sign_method="frequency"), EXACT),
    ("dare_linear_svd", ["a", "b", "c"], [1.0, 0.5, -0.4], dict(density=0.5), SVD),
    ("dare_ties_svd", ["a", "b"], [1.0, 0.5], dict(density=0.6, svd_rank=5), SVD),
    ("magnitude_prune", ["a", "c"], [0.6, -1.3], dict(density=0.25), EXACT),
    ("magnitude_prune_svd", ["a", "b", "c"], [1.0, 0.5, -0.4], dict(density=0.5), SVD),
]


@pytest.mark.parametrize("combination_type,adapters,weights,kwargs,tol", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_matches_peft_llama(llama_pair, combination_type, adapters, weights, kwargs, tol):
    ref, gm = llama_pair
    name, after_ref, after_ours = _combine_both(ref, gm, adapters, weights, combination_type=combination_type,
                                                **kwargs)
    _assert_same(ref, gm, name, tol)
    torch.testing.assert_close(after_ours, after_ref, rtol=0, atol=0)  # same random draws consumed


@pytest.mark.parametrize("combination_type,kwargs,tol", [
    ("svd", {}, SVD), ("cat", {}, EXACT), ("dare_ties_svd", dict(density=0.5), SVD), ("ties_svd", dict(density=0.5), SVD),
])
def test_matches_peft_gpt2_fan_in_fan_out(gpt2_pair, combination_type, kwargs, tol):
    ref, gm = gpt2_pair
    name, after_ref, after_ours = _combine_both(ref, gm, ["a", "b"], [0.8, -1.5], combination_type=combination_type,
                                                **kwargs)
    _assert_same(ref, gm, name, tol)
    torch.testing.assert_close(after_ours, after_ref, rtol=0, atol=0)


@pytest.mark.parametrize("combination_type,kwargs,tol", [
    ("svd", {}, SVD), ("cat", {}, EXACT), ("dare_ties_svd", dict(density=0.5), SVD),
    ("magnitude_prune_svd", dict(density=0.5, svd_rank=2), SVD),
])
def test_matches_peft_conv2d(combination_type, kwargs, tol):
    ref, gm = _build(models.ConvNet, CONV_ADAPTERS)
    name, after_ref, after_ours = _combine_both(ref, gm, ["a", "b"], [0.8, -1.5], combination_type=combination_type,
                                                **kwargs)
    _assert_same(ref, gm, name, tol)
    torch.testing.assert_close(after_ours, after_ref, rtol=0, atol=0)


def test_dare_masks_follow_the_seed(llama_pair):
    """Another seed draws other masks: the dare comparison above does depend on the seed."""
    ref, gm = llama_pair
    name_1, _, _ = _combine_both(ref, gm, ["a", "c"], [0.6, -1.3], seed=1, combination_type="dare_linear",
                                 density=0.5)
    name_2, _, _ = _combine_both(ref, gm, ["a", "c"], [0.6, -1.3], seed=2, combination_type="dare_linear",
                                 density=0.5)
    first, second = _our_deltas(gm, name_1), _our_deltas(gm, name_2)
    assert any(not torch.allclose(first[p], second[p]) for p in first)
    _assert_same(ref, gm, name_2, EXACT)


def test_single_adapter_is_linear(llama_pair):
    ref, gm = llama_pair
    name, _, _ = _combine_both(ref, gm, ["b"], [0.5], combination_type="svd", svd_rank=2)
    _assert_same(ref, gm, name, EXACT)
    assert gm.peft_config[name].r == 6  # linear keeps the rank; svd_rank does not apply


def test_new_adapter_acts_like_peft(llama_pair):
    """End to end: with only the combined adapter active, fxpeft's forward equals PEFT's."""
    ref, gm = llama_pair
    name, _, _ = _combine_both(ref, gm, ["a", "b", "c"], [1.0, -0.7, 0.4], combination_type="cat")
    inputs = models.hf_inputs("llama")
    active, ref_active = fxpeft.active_adapters(gm), ref.active_adapter
    assert active == [ref_active]  # the combined adapter was not activated
    try:
        ref.set_adapter(name)
        fxpeft.set_adapter(gm, name)
        with torch.no_grad():
            expected = ref(**inputs).logits
            got = gm(**inputs).logits
            with ref.disable_adapter():
                plain = ref(**inputs).logits
        assert not torch.allclose(expected, plain, atol=1e-4)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    finally:
        ref.set_adapter(ref_active)
        fxpeft.set_adapter(gm, active)


# ----------------------------------------------------------------------------- errors


def _state(gm):
    return ({k: v.clone() for k, v in gm.state_dict().items()}, dict(gm.peft_config), fxpeft.active_adapters(gm),
            {n: p.requires_grad for n, p in gm.named_parameters()}, str(gm.graph))


def _assert_unchanged(gm, before):
    tensors, configs, active, flags, graph = _state(gm)
    assert tensors.keys() == before[0].keys()
    for key, value in tensors.items():
        assert torch.equal(value, before[0][key]), key
    assert configs == before[1] and active == before[2] and flags == before[3] and graph == before[4]


@pytest.mark.parametrize("adapters,weights,kwargs,error,message", [
    (["a", "nope"], [1.0, 1.0], {}, KeyError, "existing adapters"),
    (["a", "c"], [1.0, 1.0], dict(combination_type="average"), ValueError, "combination_type"),
    (["a", "c"], [1.0], dict(combination_type="linear"), ValueError, "weights"),
    ([], [], {}, ValueError, "empty"),
    (["a", "b"], [1.0, 1.0], dict(combination_type="linear"), ValueError, "same r"),
    (["a", "c"], [1.0, 1.0], dict(combination_type="ties"), ValueError, "density"),
    (["a", "c"], [1.0, 1.0], dict(combination_type="dare_ties_svd", density=-0.1), ValueError, "density"),
    (["a", "c"], [1.0, 1.0], dict(combination_type="dare_linear", density=0.0), ValueError, "density"),
    (["a", "c"], [1.0, 1.0], dict(combination_type="ties", density=0.5, majority_sign_method="max"), ValueError,
     "majority_sign_method"),
    (["a", "c"], [1.0, 1.0], dict(svd_rank=0), ValueError, "svd_rank"),
    (["a", "c"], [1.0, 1.0], dict(svd_clamp=1.5), ValueError, "svd_clamp"),
    (["a", "c"], [1.0, 1.0], dict(svd_driver="gesvd"), ValueError, "CUDA"),
    (["a", "c"], [1.0, float("nan")], {}, ValueError, "finite"),
])
def test_errors_leave_module_unchanged(llama_pair, adapters, weights, kwargs, error, message):
    _, gm = llama_pair
    before = _state(gm)
    with pytest.raises(error, match=message):
        weighted.add_weighted_adapter(gm, adapters, weights, _fresh_name("bad"), **kwargs)
    _assert_unchanged(gm, before)


def test_peft_also_rejects_mixed_ranks_for_linear(llama_pair):
    ref, _ = llama_pair
    with pytest.raises(ValueError, match="same r"):
        ref.add_weighted_adapter(["a", "b"], [1.0, 1.0], _fresh_name("bad"), combination_type="linear")


def test_existing_name_is_an_error(llama_pair):
    _, gm = llama_pair
    before = _state(gm)
    with pytest.raises(ValueError, match="already exists"):
        weighted.add_weighted_adapter(gm, ["a", "c"], [1.0, 1.0], "b", combination_type="linear")
    _assert_unchanged(gm, before)


def test_incompatible_configs_are_errors():
    model = models.llama()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]),
                          adapter_name="a")
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=2, target_modules=r".*\.v_proj"), "b")
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]), "c")
    before = _state(gm)
    with pytest.raises(ValueError, match="target modules type"):
        weighted.add_weighted_adapter(gm, ["a", "b"], [1.0, 1.0], "ab", combination_type="cat")
    with pytest.raises(ValueError, match="modules_to_save"):
        weighted.add_weighted_adapter(gm, ["a", "c"], [1.0, 1.0], "ac", combination_type="cat")
    _assert_unchanged(gm, before)


def test_failure_after_creation_rolls_back(llama_pair, monkeypatch):
    """A failure once the new adapter exists (here: in the combination step) removes it again,
    embedding ParameterDict entries included."""
    _, gm = llama_pair
    before = _state(gm)
    seen = []

    def broken(gm_, path, *args, **kwargs):
        seen.append(path)
        if len(seen) == 3:
            raise RuntimeError("boom")
        return real(gm_, path, *args, **kwargs)

    real = weighted._combine
    monkeypatch.setattr(weighted, "_combine", broken)
    with pytest.raises(RuntimeError, match="boom"):
        weighted.add_weighted_adapter(gm, ["a", "b"], [1.0, 1.0], _fresh_name("bad"), combination_type="cat")
    assert seen[0] == "model.embed_tokens"
    _assert_unchanged(gm, before)


def test_string_targets_are_joined_like_peft():
    model = models.llama().eval()
    specs = {"a": dict(r=2, lora_alpha=4, target_modules=r".*\.q_proj"),
             "b": dict(r=3, lora_alpha=3, target_modules=r".*layers\.1\..*v_proj")}
    ref, gm = _build(lambda: model, specs)
    name, _, _ = _combine_both(ref, gm, ["a", "b"], [1.0, 0.5], combination_type="cat")
    _assert_same(ref, gm, name, EXACT)
    assert gm.peft_config[name].target_modules == r"(.*\.q_proj)|(.*layers\.1\..*v_proj)"


def test_resolved_targets_rank_pattern_and_rslora_like_peft():
    """all-linear (PEFT stores the resolved layer paths), rank_pattern (PEFT sizes the new adapter
    by the largest rank) and use_rslora, which PEFT copies into the new config: the new adapter's
    scaling is then sqrt(r) rather than 1, and we keep that for parity."""
    specs = {"a": dict(r=4, lora_alpha=8, target_modules="all-linear", rank_pattern={"v_proj": 2}, use_rslora=True),
             "b": dict(r=3, lora_alpha=3, target_modules=["q_proj", "down_proj", "embed_tokens"])}
    ref, gm = _build(models.llama, specs)
    for combination_type, kwargs, tol in [("cat", {}, EXACT), ("svd", {}, SVD),
                                          ("dare_linear_svd", dict(density=0.5), SVD)]:
        name, after_ref, after_ours = _combine_both(ref, gm, ["a", "b"], [0.8, -1.5],
                                                    combination_type=combination_type, **kwargs)
        _assert_same(ref, gm, name, tol)
        torch.testing.assert_close(after_ours, after_ref, rtol=0, atol=0)
        q_proj = gm.get_submodule("model.layers.0.self_attn.q_proj")
        assert q_proj.lora_scaling[name].scale == pytest.approx(gm.peft_config[name].r ** 0.5)


def test_layer_filtered_adapters_combine_where_they_are():
    """Adapters on different layers (layers_to_transform). PEFT's new config unites the target
    names but keeps adapters[0]'s layer filter, so it puts the adapter on layers no adapter has and
    fails ("No matching LoRAs found"); fxpeft puts it exactly where the adapters are. cat is exact,
    so the new delta must be sum_i w_i * delta_i (fxpeft's own adapters, computed independently)."""
    model = models.llama()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                   layers_to_transform=[0], init_lora_weights=False),
                          adapter_name="a")
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=3, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                             layers_to_transform=[1], init_lora_weights=False), "b")
    with pytest.warns(UserWarning, match="would not target exactly"):
        weighted.add_weighted_adapter(gm, ["a", "b"], [0.7, -2.0], "ab", combination_type="cat")
    parts = [_our_deltas(gm, "a"), _our_deltas(gm, "b")]
    got = _our_deltas(gm, "ab")
    assert set(got) == set(parts[0]) | set(parts[1]) == {
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    for path, delta in got.items():
        expected = sum(w * part[path] for w, part in zip([0.7, -2.0], parts) if path in part)
        torch.testing.assert_close(delta, expected, **EXACT)
    # the stored config names exactly those layers, so a save / load round trip adapts the same ones
    from fxpeft.targets import is_targeted
    config = gm.peft_config["ab"]
    assert {p for p, _ in gm.named_modules() if p and is_targeted(config, p)} == set(got)
    assert config.r == 5 and config.lora_alpha == 5
