"""OFT, BOFT and HRA beyond the conformance suite (tests/test_methods.py): the options that change
their math (coft, block_share, the exact Cayley transform, butterfly factors, Gram-Schmidt), their
training-only dropouts, and PEFT's invalid configurations. Oracle: the real PEFT package; OFT's
module dropout, which PEFT 0.21.2 builds but never calls, against its written formula."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models
from peft_oracle import copy_adapter_weights


def small():
    """Two linears without dropout in between (random draws are the adapters' alone)."""
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()


X = torch.randn(5, 16)


def pair(fx_config, peft_config, model=None):
    model = small() if model is None else model
    reference = peft.get_peft_model(copy.deepcopy(model), peft_config).eval()
    gm = fxpeft.transform(model, fx_config).eval()
    assert copy_adapter_weights(reference, gm) > 0
    return gm, reference


@pytest.mark.parametrize("options", [
    dict(r=0, oft_block_size=4, coft=True, eps=1e-3),  # the projection bites: eps/√4 below the blocks' norms
    dict(r=2, oft_block_size=0, block_share=True),
    dict(r=0, oft_block_size=8, use_cayley_neumann=False),
    dict(r=4, oft_block_size=0, num_cayley_neumann_terms=3),
])
def test_oft_options_equal_peft(options):
    kwargs = dict(target_modules=["0", "2"], init_weights=False, **options)
    gm, reference = pair(fxpeft.OFTConfig(**kwargs), peft.OFTConfig(**kwargs))
    before = {n: p.detach().clone() for n, p in gm.named_parameters() if p.requires_grad}
    with torch.no_grad():
        expected, got = reference(X), gm(X)
        assert (expected - small_base(gm)).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # coft projects the parameters in place on every use, as PEFT does: the saved tensors agree too
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in gm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param, theirs[name], rtol=1e-6, atol=1e-7)
            assert torch.equal(param, before[name]) != bool(options.get("coft")), name
    if options.get("block_share"):
        assert gm.get_submodule("0").oft_R["default"].weight.shape[0] == 1
    with torch.no_grad():
        gm.merge_adapter()
        torch.testing.assert_close(gm(X), expected, rtol=1e-5, atol=1e-5)


def small_base(gm):
    with fxpeft.disable_adapters(gm):
        return gm(X)


class BlockDiagonal:
    """What PEFT's CUDA extension (fbd_cuda) computes: diag(blocks) for each butterfly factor."""

    @staticmethod
    def forward(blocks):  # (factors, D, b, b) -> [(factors, D·b, D·b)]
        return [torch.stack([torch.block_diag(*factor.unbind(0)) for factor in blocks])]


def with_block_diagonal_kernel(monkeypatch):
    from peft.tuners.boft import layer
    monkeypatch.setattr(layer, "get_fbd_cuda", lambda: BlockDiagonal)


def test_boft_butterfly_factors_equal_peft_with_its_block_diagonal_kernel(monkeypatch):
    """PEFT computes more than one butterfly factor only through its CUDA extension's block-diagonal
    kernel (without it, it uses one factor). That kernel's result, diag(blocks) per factor, supplied
    in PyTorch lets PEFT's own butterfly run here."""
    with_block_diagonal_kernel(monkeypatch)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    x = torch.randn(5, 32)
    for factors, kwargs in [(3, dict(boft_block_size=4)), (2, dict(boft_block_size=0, boft_block_num=4))]:
        options = dict(target_modules=["0", "2"], init_weights=False, boft_n_butterfly_factor=factors, **kwargs)
        gm, reference = pair(fxpeft.BOFTConfig(**options), peft.BOFTConfig(**options), model)
        assert gm.get_submodule("0").boft_R["default"].shape[0] == factors
        with torch.no_grad():
            expected = reference(x)
            torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
            gm.merge_adapter()
            torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
            gm.unmerge_adapter()
            torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


def test_boft_without_the_kernel_is_peft_with_one_factor():
    """PEFT without its CUDA extension warns and computes one factor whatever the config says;
    fxpeft computes the factors asked for, so the two differ (checked, so this is noticed if PEFT
    changes), and a one-factor config is PEFT's fallback exactly (tests/test_methods.py)."""
    options = dict(target_modules=["0"], init_weights=False, boft_block_size=4, boft_n_butterfly_factor=2)
    with pytest.warns(UserWarning, match="boft_n_butterfly_factor to 1"):
        reference = peft.get_peft_model(copy.deepcopy(small()), peft.BOFTConfig(**options))
    assert reference.base_model.model[0].boft_R["default"].shape[0] == 1
    gm = fxpeft.transform(small(), fxpeft.BOFTConfig(**options))
    assert gm.get_submodule("0").boft_R["default"].shape[0] == 2


def test_boft_dropout_in_training_equals_peft_under_the_same_seed():
    options = dict(target_modules=["0", "2"], init_weights=False, boft_block_size=2, boft_dropout=0.5)
    gm, reference = pair(fxpeft.BOFTConfig(**options), peft.BOFTConfig(**options))
    with torch.no_grad():
        evaluated = gm(X)
        torch.testing.assert_close(evaluated, reference(X), rtol=1e-5, atol=1e-5)
        gm.train()
        reference.train()
        for seed in range(3):
            torch.manual_seed(seed)
            expected = reference(X)
            torch.manual_seed(seed)
            got = gm(X)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (got - evaluated).abs().max() > 1e-4  # the dropout acted
        gm.eval()
        torch.testing.assert_close(gm(X), evaluated)


def test_oft_module_dropout_in_training_follows_its_formula():
    """PEFT 0.21.2 builds OFT's MultiplicativeDropoutLayer but its forward never calls it; fxpeft
    applies it in training: a random int(p·r) of the r blocks replaced by I (torch.randperm)."""
    config = fxpeft.OFTConfig(r=4, oft_block_size=0, target_modules=["0"], init_weights=False, module_dropout=0.5)
    gm = fxpeft.transform(small(), config).eval()
    layer = gm.get_submodule("0")
    rotation = layer.oft_R["default"]
    with torch.no_grad():
        blocks = fxpeft.passes.oft.cayley(rotation.skew(rotation.weight), True, 5)
        evaluated = gm(X)
        gm.train()
        for seed in range(3):
            torch.manual_seed(seed)
            keep = torch.cat([torch.ones(2), torch.zeros(2)])[torch.randperm(4)].view(4, 1, 1)
            dropped = (1 - keep) * blocks + keep * torch.eye(4)
            rotated = (X.reshape(5, 4, 4).unsqueeze(-2) @ dropped).reshape(5, 16)
            expected = torch.relu(layer(rotated)) @ gm.get_submodule("2").weight.t() + gm.get_submodule("2").bias
            torch.manual_seed(seed)
            torch.testing.assert_close(gm(X), expected, rtol=1e-5, atol=1e-5)
        gm.eval()
        torch.testing.assert_close(gm(X), evaluated)


def test_hra_gram_schmidt_and_odd_rank_equal_peft():
    for options in (dict(r=3, apply_GS=True, init_weights=False), dict(r=4, apply_GS=True, init_weights=False)):
        gm, reference = pair(fxpeft.HRAConfig(target_modules=["0", "2"], **options),
                             peft.HRAConfig(target_modules=["0", "2"], **options))
        with torch.no_grad():
            expected = reference(X)
            torch.testing.assert_close(gm(X), expected, rtol=1e-5, atol=1e-5)
            gm.merge_adapter()
            torch.testing.assert_close(gm(X), expected, rtol=1e-5, atol=1e-5)
    # an odd r cannot start at the identity: both warn and start from the same random reflections
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="r is odd"):
        reference = peft.get_peft_model(small(), peft.HRAConfig(r=3, target_modules=["0"]))
    torch.manual_seed(3)
    with pytest.warns(UserWarning, match="r is odd"):
        gm = fxpeft.transform(small(), fxpeft.HRAConfig(r=3, target_modules=["0"]))
    torch.testing.assert_close(gm.get_submodule("0").hra_u["default"], reference.base_model.model[0].hra_u["default"])


def test_oft_block_size_is_adjusted_as_peft_does():
    config = dict(r=0, oft_block_size=5, target_modules=["0", "2"])
    with pytest.warns(UserWarning, match="Adjusted `oft_block_size`"):
        reference = peft.get_peft_model(small(), peft.OFTConfig(**config))
    with pytest.warns(UserWarning, match="Adjusted `oft_block_size`"):
        gm = fxpeft.transform(small(), fxpeft.OFTConfig(**config))
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("fx_type, peft_type, kwargs, rule", [
    ("OFTConfig", "OFTConfig", dict(r=4, oft_block_size=8), "not both simultaneously"),
    ("OFTConfig", "OFTConfig", dict(r=0, oft_block_size=0), "must be non-zero"),
    ("BOFTConfig", "BOFTConfig", dict(boft_block_size=4, boft_block_num=2), "not both simultaneously"),
    ("BOFTConfig", "BOFTConfig", dict(boft_block_size=0, boft_block_num=0), "must be non-zero"),
    ("OFTConfig", "OFTConfig", dict(layers_pattern="layers"), "layers_to_transform"),
    ("HRAConfig", "HRAConfig", dict(target_modules=".*proj", layers_to_transform=[0]), "layers_to_transform"),
])
def test_invalid_configs_raise_at_construction_as_peft(fx_type, peft_type, kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        getattr(fxpeft, fx_type)(**kwargs)
    with pytest.raises(ValueError):
        getattr(peft, peft_type)(**kwargs)


def test_values_peft_rejects_per_layer_raise_at_construction():
    with pytest.raises(ValueError, match="boft_n_butterfly_factor 0 to be a positive integer"):
        fxpeft.BOFTConfig(boft_n_butterfly_factor=0)
    with pytest.raises(ValueError, match="`r` should be a positive integer"):
        fxpeft.HRAConfig(r=0)
    with pytest.raises(ValueError, match="module_dropout"):
        fxpeft.OFTConfig(module_dropout=1.0)


def test_an_oft_checkpoint_from_before_peft_0_14_is_refused(tmp_path):
    import json

    gm = fxpeft.transform(small(), fxpeft.OFTConfig(r=4, oft_block_size=0, target_modules=["0"]))
    gm.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_version"] == "0.21.2"  # PEFT reads it to tell the Cayley-Neumann series' versions apart
    del config["oft_block_size"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(NotImplementedError, match="PEFT < 0.14"):
        fxpeft.from_pretrained(small(), str(tmp_path))
    with pytest.raises(ValueError, match="0.14.0"):
        peft.PeftModel.from_pretrained(small(), str(tmp_path))


@pytest.mark.parametrize("kwargs, rule", [
    (dict(boft_block_size=5), "must be divisible by boft_block_size"),
    (dict(boft_block_size=0, boft_block_num=3), "must be divisible by boft_block_num"),
    (dict(boft_block_size=4, boft_n_butterfly_factor=4), "Invalid combination"),
    (dict(boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=3), "Invalid combination"),
])
def test_boft_sizes_that_do_not_fit_a_layer_raise_and_leave_the_model_alone(kwargs, rule, monkeypatch):
    with_block_diagonal_kernel(monkeypatch)  # PEFT checks butterfly factors only where it computes them
    model = small()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rule):
        fxpeft.transform(model, fxpeft.BOFTConfig(target_modules=["0", "2"], **kwargs))
    with pytest.raises(ValueError):
        peft.get_peft_model(copy.deepcopy(model), peft.BOFTConfig(target_modules=["0", "2"], **kwargs))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("config", ["OFTConfig", "BOFTConfig", "HRAConfig"])
def test_layers_peft_does_not_adapt_raise(config):
    """GPT-2's Conv1D and nn.Conv1d: PEFT raises TypeError for the whole family; fxpeft says which layer."""
    options = dict(r=4, oft_block_size=0) if config == "OFTConfig" else dict(r=2) if config == "HRAConfig" else {}
    from transformers.pytorch_utils import Conv1D

    gpt2_style = nn.Sequential(Conv1D(8, 4))
    with pytest.raises(ValueError, match="Conv1D"):
        fxpeft.transform(gpt2_style, getattr(fxpeft, config)(target_modules=["0"], **options),
                         example_inputs=(torch.randn(2, 3, 4),))
    with pytest.raises(TypeError):
        peft.get_peft_model(copy.deepcopy(gpt2_style), getattr(peft, config)(target_modules=["0"], **options))
    conv1d = nn.Sequential(nn.Conv1d(4, 8, 3))
    with pytest.raises(ValueError, match="Conv1d"):
        fxpeft.transform(conv1d, getattr(fxpeft, config)(target_modules=["0"], **options),
                         example_inputs=(torch.randn(2, 4, 10),))
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    with pytest.raises(NotImplementedError, match="groups"):
        fxpeft.transform(grouped, getattr(fxpeft, config)(target_modules=["0"], **options),
                         example_inputs=(torch.randn(2, 4, 6, 6),))


def test_training_only_parts_compile_without_graph_breaks():
    """coft's in-place projection and the block dropouts (random draws) under
    torch.compile(fullgraph=True) in training: the eager result under the same seed."""
    targets = dict(target_modules=["0", "2"], init_weights=False)
    for config in (fxpeft.OFTConfig(r=0, oft_block_size=4, coft=True, eps=1e-3, module_dropout=0.5, **targets),
                   fxpeft.BOFTConfig(boft_block_size=4, boft_dropout=0.5, **targets)):
        gm = fxpeft.transform(small(), config).train()
        compiled = torch.compile(gm, fullgraph=True, backend=models.COMPILE_BACKEND)
        torch.manual_seed(1)
        got = compiled(X)
        torch.manual_seed(1)
        torch.testing.assert_close(got, gm(X), rtol=1e-5, atol=1e-5)
        got.sum().backward()
        assert all(p.grad is not None for p in gm.parameters() if p.requires_grad)
