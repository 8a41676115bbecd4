"""LoHa and LoKr beyond the conformance suite (tests/test_methods.py), against the real PEFT package:
training-mode rank and module dropout, use_effective_conv2d, LoKr's decompositions and inits,
rank/alpha patterns, add_weighted_adapter, and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors

PAIRS = {"loha": (fxpeft.LoHaConfig, peft.LoHaConfig), "lokr": (fxpeft.LoKrConfig, peft.LoKrConfig)}


class Convs(nn.Module):
    """Every conv shape PEFT's LyCORIS layers take: 3x3, grouped 3x3, 1x1 (no effective form), Conv1d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.point = nn.Conv2d(16, 12, 1)
        self.seq = nn.Conv1d(12, 36, 3, padding=1)  # LoKr r=2: out 6·6, in 3·4, so W2 is factored (T2 at r=2)

    def forward(self, x):
        x = self.point(torch.relu(self.grouped(torch.relu(self.conv(x)))))
        return self.seq(x.flatten(2))


def pair(method: str, build, seed: int = 0, **kwargs):
    """PEFT's and fxpeft's adapted models, each created after ``torch.manual_seed(seed)``: their
    factors must be the same draws."""
    fx_type, peft_type = PAIRS[method]
    model = build().eval()
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), peft_type(**kwargs))
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, fx_type(**kwargs))
    ours = {n: p for n, p in gm.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if p.requires_grad}
    assert {n: p.shape for n, p in ours.items()} == {n: p.shape for n, p in theirs.items()}
    for name, param in theirs.items():
        assert torch.equal(ours[name], param), name
    return reference, gm, model


# ----------------------------------------------------------------------------- dropout in training


def training_calls_equal(reference, gm, x, seeds) -> list:
    """Training-mode calls of both, each after ``torch.manual_seed(seed)``, are equal; PEFT's outputs."""
    gm.train(), reference.train()
    outputs = []
    for seed in seeds:
        torch.manual_seed(seed)
        outputs.append(reference(x))
        torch.manual_seed(seed)
        torch.testing.assert_close(gm(x), outputs[-1], rtol=1e-5, atol=1e-6)
    return outputs


DROPOUTS = [  # (method, options): one dropout at a time, where fxpeft draws exactly PEFT's numbers
    ("loha", dict(module_dropout=0.5)),
    ("loha", dict(rank_dropout=0.5)),
    ("lokr", dict(rank_dropout=0.5)),
    ("lokr", dict(rank_dropout=0.5, rank_dropout_scale=True, module_dropout=0.0)),
    ("lokr", dict(module_dropout=0.5)),
]


@pytest.mark.parametrize("method, options", DROPOUTS)
def test_training_dropout_equals_peft_for_the_same_seed(method, options):
    """On the MLP (two sites and a model dropout between them), training calls equal PEFT's under the
    same seed; eval ignores the adapter dropouts; .train()/.eval() switch it back and forth."""
    reference, gm, model = pair(method, models.MLP, r=2, alpha=4, target_modules=["fc1", "fc2"], init_weights=False,
                                **options)
    x = torch.randn(6, 12)
    with torch.no_grad():
        plain = reference.eval()(x)
        torch.testing.assert_close(gm.eval()(x), plain, rtol=1e-5, atol=1e-6)
        outputs = training_calls_equal(reference, gm, x, seeds=range(4))
        gm.eval()
        torch.testing.assert_close(gm(x), plain, rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(a, outputs[0]) for a in outputs[1:])  # the draws matter


@pytest.mark.parametrize("method", list(PAIRS))
def test_both_dropouts_one_site_equal_peft_and_the_formula(method):
    """Both dropouts on. PEFT skips the rank draw of an adapter its module draw dropped; fxpeft's graph
    always makes it (passes/lycoris.py), so the two agree while one site draws per call, and beyond
    that fxpeft follows the formula: per site in model order, keep = rand(1) > module_dropout, then
    rows = rand(out) > rank_dropout (LoHa: divided by their mean, unless all are dropped, where PEFT
    gives NaN), Δy = keep · x (rows ⊙ ΔW)ᵀ."""
    options = dict(r=2, alpha=4, init_weights=False, rank_dropout=0.5, module_dropout=0.5)
    build = lambda: nn.Sequential(nn.Linear(12, 10))  # noqa: E731
    reference, gm, _ = pair(method, build, target_modules=["0"], **options)
    x = torch.randn(5, 12)
    with torch.no_grad():
        training_calls_equal(reference, gm, x, seeds=range(6))
        kept = {bool(torch.rand(1, generator=torch.Generator().manual_seed(seed)) > 0.5) for seed in range(6)}
        assert kept == {True, False}  # seeds that keep and seeds that drop the adapter

    # two sites, nothing else random: the formula, with PEFT's ΔW (no dropout) of each site
    build = lambda: nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 4))  # noqa: E731
    reference, gm, model = pair(method, build, target_modules=["0", "2"], **options)
    deltas = [reference.base_model.model[i].get_delta_weight("default").detach() for i in (0, 2)]
    with torch.no_grad():
        gm.train()
        for seed in range(6):
            torch.manual_seed(seed)
            masks = []
            for delta in deltas:
                keep = (torch.rand(1) > 0.5).float()
                rows = (torch.rand(delta.shape[0]) > 0.5).float()
                if method == "loha" and rows.any():  # LoKr rescales only with rank_dropout_scale
                    rows = rows / rows.mean()
                masks.append((keep, rows))
            h = x
            for i, (layer, delta, (keep, rows)) in enumerate(zip((model[0], model[2]), deltas, masks)):
                h = layer(h) + keep * (h @ (delta * rows[:, None]).T)
                h = torch.relu(h) if i == 0 else h
            torch.manual_seed(seed)
            torch.testing.assert_close(gm(x), h, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- conv, decompositions, inits


@pytest.mark.parametrize("method, options", [
    ("loha", dict(r=2, use_effective_conv2d=True)),
    ("lokr", dict(r=2, use_effective_conv2d=True)),
    ("lokr", dict(r=1, use_effective_conv2d=True, decompose_both=True, decompose_factor=2)),
])
def test_effective_conv_equals_peft(method, options, tmp_path):
    """use_effective_conv2d on 3x3, grouped, 1x1 (PEFT keeps the flat form there) and Conv1d kernels:
    the same factors for the same seed, outputs, saved tensors, loading PEFT's file, merging."""
    targets = ["conv", "grouped", "point", "seq"]
    if options["r"] == 1:  # PEFT's torch.kron fails on a rank-1 effective W2 of a Conv1d (see below)
        targets = targets[:3]
    reference, gm, model = pair(method, Convs, alpha=4, target_modules=targets, init_weights=False, **options)
    names = {n.split(".")[1] for n, _ in gm.named_parameters() if n.startswith("point.")}
    assert not names & {"hada_t1", "lokr_t2"}  # the 1x1 conv keeps the flat form
    assert any(n.endswith(("hada_t1.default", "lokr_t2.default")) for n, _ in gm.named_parameters())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = reference.eval()(x)
        assert (expected - model(x)).abs().max() > 1e-3
        torch.testing.assert_close(gm.eval()(x), expected, rtol=1e-5, atol=1e-5)
        reference.save_pretrained(tmp_path / "peft")
        gm.save_pretrained(str(tmp_path / "fx"))
        assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
        gm.load_adapter(str(tmp_path / "peft"), "loaded")
        gm.set_adapter("loaded")
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        merged = gm.merge_and_unload().state_dict()
        for key, value in reference.merge_and_unload().state_dict().items():
            torch.testing.assert_close(merged[key], value, rtol=1e-5, atol=1e-6)


def test_lokr_rank_one_effective_conv1d_follows_the_formula():
    """Where PEFT's torch.kron raises (a rank-1 effective W2 has size-1 dims with odd strides), fxpeft
    computes the same Kronecker product: ΔW[i·b + p, j·d + q, k] = s · W1[i, j] · W2[p, q, k]."""
    build = lambda: nn.Sequential(nn.Conv1d(4, 8, 3, padding=1))  # noqa: E731
    options = dict(r=1, alpha=3, use_effective_conv2d=True, init_weights=False, target_modules=["0"])
    model = build()
    with pytest.raises(RuntimeError, match="view size"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoKrConfig(**options))(torch.randn(1, 4, 5))
    gm = fxpeft.transform(model, fxpeft.LoKrConfig(**options))
    site = gm.get_submodule("0")
    w1 = site.lokr_w1["default"].detach()
    w2 = torch.einsum("ijkl, ip, jr -> prkl", site.lokr_t2["default"], site.lokr_w2_a["default"],
                      site.lokr_w2_b["default"]).detach()[..., 0]
    (a, c), (b, d, k) = w1.shape, w2.shape
    delta = 3.0 * torch.einsum("ij, pqk -> ipjqk", w1, w2).reshape(a * b, c * d, k)
    x = torch.randn(2, 4, 7)
    with torch.no_grad():
        expected = model(x) + torch.nn.functional.conv1d(x, delta, padding=1)
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(decompose_both=True, init_weights=True),
    dict(decompose_both=True, init_weights=False, decompose_factor=4),
    dict(decompose_both=True, init_weights="lycoris", decompose_factor=3),
    dict(init_weights="lycoris", r=1),
])
def test_lokr_decompositions_and_inits_equal_peft(options):
    """decompose_both / decompose_factor pick PEFT's factors; each init draws PEFT's values for the same
    seed (``pair``); trained factors give PEFT's outputs; an identity init leaves the model alone."""
    reference, gm, model = pair("lokr", models.MLP, **{"r": 2, "alpha": 4, "target_modules": ["fc1", "fc2"], **options})
    x = torch.randn(4, 12)
    with torch.no_grad():
        if options["init_weights"] is not False:
            torch.testing.assert_close(gm.eval()(x), model(x), rtol=0, atol=1e-6)
        for (name, param), (_, theirs) in zip(
                sorted((n, p) for n, p in gm.named_parameters() if p.requires_grad),
                sorted((n, p) for n, p in reference.named_parameters() if p.requires_grad)):
            param.normal_()
            theirs.copy_(param)
        expected = reference.eval()(x)
        assert (expected - model(x)).abs().max() > 1e-3
        torch.testing.assert_close(gm.eval()(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", list(PAIRS))
def test_rank_and_alpha_patterns_equal_peft(method):
    reference, gm, model = pair(method, models.MLP, r=2, alpha=4, target_modules=["fc1", "fc2"], init_weights=False,
                                rank_pattern={"fc1": 3}, alpha_pattern={"fc2": 16})
    gates = "hada_gate" if method == "loha" else "lokr_gate"
    assert (gm.fc1._modules[gates]["default"].scale, gm.fc2._modules[gates]["default"].scale) == (4 / 3, 16 / 2)
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(gm.eval()(x), reference.eval()(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- add_weighted_adapter, bad input


@pytest.mark.parametrize("method", list(PAIRS))
def test_add_weighted_adapter_is_refused_as_peft_has_none(method):
    """PEFT 0.21.2's LoHaModel / LoKrModel have no add_weighted_adapter (a weighted sum of Hadamard or
    Kronecker products is no such product of the same ranks): fxpeft refuses, changing nothing."""
    fx_type, peft_type = PAIRS[method]
    reference, gm, _ = pair(method, models.MLP, target_modules=["fc1"])
    reference.add_adapter("other", peft_type(target_modules=["fc1"]))
    gm.add_adapter("other", fx_type(target_modules=["fc1"]))
    with pytest.raises(AttributeError, match="add_weighted_adapter"):
        reference.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match=f"combines LoRA or IA3 adapters.*{fx_type.__name__}"):
        fxpeft.add_weighted_adapter(gm, ["default", "other"], [0.5, 0.5], "mix")
    assert list(gm.peft_config) == ["default", "other"]


BAD_CONFIGS = [  # (kwargs, what the error names); PEFT raises the first at construction, the others later or never
    (dict(layers_pattern="layers"), "layers_to_transform"),
    (dict(r=0), "positive integer"),
    (dict(rank_pattern={"fc1": -2}), "rank_pattern"),
    (dict(rank_dropout=1.5), "rank_dropout"),
    (dict(module_dropout=-0.1), "module_dropout"),
    (dict(init_weights="gaussian"), "init_weights"),
]


@pytest.mark.parametrize("method", list(PAIRS))
@pytest.mark.parametrize("kwargs, named", BAD_CONFIGS)
def test_bad_configs_raise_at_construction(method, kwargs, named):
    fx_type, peft_type = PAIRS[method]
    with pytest.raises(ValueError, match=named):
        fx_type(target_modules=["fc1"], **kwargs)
    if "layers_pattern" in kwargs:
        with pytest.raises(ValueError, match=named):
            peft_type(target_modules=["fc1"], **kwargs)
    if "r" in kwargs:  # PEFT: when it builds the layer
        with pytest.raises(ValueError, match="positive integer"):
            peft.get_peft_model(models.MLP(), peft_type(target_modules=["fc1"], **kwargs))


def test_lokr_only_options():
    with pytest.raises(ValueError, match="init_weights"):
        fxpeft.LoHaConfig(init_weights="lycoris")  # LoKr's init; PEFT's LoHa takes a bool
    with pytest.raises(ValueError, match="decompose_factor"):
        fxpeft.LoKrConfig(decompose_factor=2.5)
    assert fxpeft.LoKrConfig(init_weights="lycoris").init_weights == "lycoris"


class GPT2Conv1DNet(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.c_attn = Conv1D(12, 8)

    def forward(self, x):
        return self.c_attn(x)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("method", list(PAIRS))
@pytest.mark.parametrize("build, target, named", [
    (GPT2Conv1DNet, "c_attn", "Conv1D"),
    (Conv3dNet, "conv", "Conv3d"),
    (models.TinyDecoder, "embed", "embedding"),
])
def test_layers_peft_refuses_raise_and_leave_the_model_alone(method, build, target, named):
    fx_type, peft_type = PAIRS[method]
    model = build()
    with pytest.raises(TypeError, match="not supported"):
        peft.get_peft_model(copy.deepcopy(model), peft_type(target_modules=[target]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=named):
        fxpeft.transform(model, fx_type(target_modules=[target]))
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())
