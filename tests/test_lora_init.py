"""passes/lora_init.py against PEFT 0.21.2: each init_lora_weights kind on the same base weights
gives PEFT's lora_A, lora_B and modified base weight (bit for bit on this CPU stack)."""
from __future__ import annotations

import copy
import inspect
import textwrap
import warnings

import peft
import pytest
import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from fxpeft.passes.lora_init import (CordaEigens, LoftQConfig, check_init, corda_covariance, corda_covariance_mean,
                                     corda_eigens, init_weights, int8_round_trip, layer_init, modifies_base,
                                     nf4_round_trip)

R, ALPHA = 8, 16
SCALING = ALPHA / R


class Tiny(nn.Module):
    """Wide, narrow and square linears, with and without bias."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 16, bias=False)
        self.square = nn.Linear(16, 16)

    def forward(self, x):
        return self.square(torch.relu(self.down(torch.relu(self.up(x)))))


NAMES = ("up", "down", "square")


@pytest.fixture
def rng_at_init(monkeypatch):
    """The global RNG state as each PEFT layer enters its init (after PEFT built lora_A/lora_B)."""
    states = {}
    for method in ("pissa_init", "orthogonal_init", "olora_init"):
        original = getattr(LoraLayer, method)

        def wrapped(self, *args, _original=original, **kwargs):
            states[id(self)] = torch.get_rng_state()
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(LoraLayer, method, wrapped)
    return states


def _peft(model, names=NAMES, **config):
    base = {n: getattr(model, n).weight.detach().clone() for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=list(names), **config))
    return base, {n: getattr(wrapped.base_model.model, n) for n in names}


def _same(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    # PEFT's model holds half-precision adapters as float32 (autocast_adapter_dtype) after its
    # layer rounded them to the base dtype: ours are that rounded value
    assert ours.shape == theirs.shape
    assert torch.equal(ours.to(theirs.dtype), theirs), (ours.float() - theirs.float()).abs().max().item()


def _check(kind, layers, base, states=None, fan_in_fan_out=False, **options):
    for name, layer in layers.items():
        if states is not None:
            torch.set_rng_state(states[id(layer)])
        weight = base[name].t() if fan_in_fan_out else base[name]
        a, b, new = init_weights(kind, weight, R, SCALING, fan_in_fan_out=fan_in_fan_out, **options)
        _same(a, layer.lora_A["default"].weight)
        _same(b, layer.lora_B["default"].weight)
        stored = layer.base_layer.weight.detach()
        if new is None:
            assert torch.equal(stored, base[name])
        else:
            _same(new.t() if fan_in_fan_out else new, stored)
            assert not torch.equal(stored, base[name])
        yield name, weight, a, b, new


def _invariant(weight, a, b, new, tol):
    rebuilt = new.float() + SCALING * b.float() @ a.float()
    assert (rebuilt - weight.float()).abs().max().item() < tol


DTYPE_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("kind", ["pissa", "pissa_niter_2", "olora"])
def test_residual_inits_match_peft(kind, dtype, rng_at_init):
    torch.manual_seed(0)
    base, layers = _peft(Tiny().to(dtype), init_lora_weights=kind)
    for _, weight, a, b, new in _check(kind, layers, base, rng_at_init):
        _invariant(weight, a, b, new, DTYPE_TOL[dtype])


def test_pissa_niter_depends_on_the_generator(rng_at_init):
    torch.manual_seed(0)
    base, layers = _peft(Tiny(), init_lora_weights="pissa_niter_1")
    layer = layers["up"]
    torch.set_rng_state(rng_at_init[id(layer)])
    torch.randn(1)  # one draw off: svd_lowrank's random projection differs
    a, _, _ = init_weights("pissa_niter_1", base["up"], R, SCALING)
    assert not torch.equal(a, layer.lora_A["default"].weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orthogonal_matches_peft(dtype, rng_at_init):
    torch.manual_seed(0)
    base, layers = _peft(Tiny().to(dtype), init_lora_weights="orthogonal")
    for _, _, a, b, new in _check("orthogonal", layers, base, rng_at_init):
        assert new is None and not torch.equal(b, torch.zeros_like(b))


def test_rank_above_the_weight_rank_gives_the_smaller_rank(rng_at_init):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=20, lora_alpha=20, target_modules=["0"], init_lora_weights="pissa")).base_model.model[0]
    a, b, new = init_weights("pissa", model[0].weight, 20, 1.0)
    assert a.shape == (10, 12) and b.shape == (10, 10)
    _same(a, layer.lora_A["default"].weight)
    _same(new, layer.base_layer.weight)


# ---- GPT-2's Conv1D: fan_in_fan_out ----

class TinyConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = Conv1D(40, 24)  # nf=out, nx=in: weight (24, 40)
        self.square = Conv1D(16, 16)


@pytest.mark.parametrize("kind", ["pissa", "pissa_niter_2"])
def test_pissa_on_conv1d(kind, rng_at_init):
    torch.manual_seed(0)
    base, layers = _peft(TinyConv1D(), names=("wide", "square"), init_lora_weights=kind)
    for _, weight, a, b, new in _check(kind, layers, base, rng_at_init, fan_in_fan_out=True):
        _invariant(weight, a, b, new, 1e-5)


@pytest.mark.parametrize("kind,options", [("olora", {}), ("loftq", {"loftq_bits": 8})])
def test_weight_factoring_inits_on_conv1d_are_peft_quirks(kind, options, cpu_loftq):
    torch.manual_seed(0)
    extra = {"loftq_config": peft.LoftQConfig(loftq_bits=8)} if kind == "loftq" else {}
    base, layers = _peft(TinyConv1D(), names=("square",), init_lora_weights=kind, **extra)
    with pytest.warns(UserWarning, match="no longer computes the base's output"):
        list(_check(kind, layers, base, fan_in_fan_out=True, **options))
    with pytest.raises(ValueError, match="shape error"):
        init_weights(kind, base["square"].new_zeros(40, 24), R, SCALING, fan_in_fan_out=True, **options)
    _, wide = _peft(TinyConv1D(), names=("wide",), init_lora_weights=kind, **extra)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):  # what PEFT's own adapted layer does
        wide["wide"](torch.randn(2, 24))


# ---- LoftQ ----

def _reference_dequantize_4bit(A, quant_state=None, *args, **kwargs):
    """bitsandbytes' reference (default-backend) NF4 dequantizer, uncompiled. Its CPU C++ kernel
    reads every row's absmax from the first block when a row is shorter than a block (checked in
    test_bnb_cpu_nf4_kernel_misreads_short_rows), which the CUDA kernel PEFT uses does not."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    state = quant_state
    code = _get_4bit_code(state.quant_type, A.device)
    return _dequantize_4bit_compute.__wrapped__(A.view(torch.uint8).reshape(-1), state.absmax, code,
                                                state.blocksize, state.shape, state.dtype)


@pytest.fixture
def cpu_loftq(monkeypatch):
    """PEFT's own loftq_init run on CPU: PEFT 0.21.2 computes on "cuda" (or "xpu") unconditionally, so
    its source is re-executed with that one line changed, and bitsandbytes' 4-bit dequantizer is its
    reference implementation."""
    import bitsandbytes.functional
    import peft.tuners.lora.layer as lora_layer
    import peft.utils.loftq_utils as loftq_utils
    source = textwrap.dedent(inspect.getsource(loftq_utils.loftq_init))
    line = 'compute_device = "xpu" if is_xpu_available() else "cuda"'
    assert line in source, "PEFT's loftq_init changed: revisit this oracle"
    namespace = dict(vars(loftq_utils))
    exec(source.replace(line, 'compute_device = "cpu"'), namespace)
    monkeypatch.setattr(lora_layer, "loftq_init", namespace["loftq_init"])
    monkeypatch.setattr(bitsandbytes.functional, "dequantize_4bit", _reference_dequantize_4bit)


class TinyLoftQ(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)     # rows shorter than a 64-block
        self.wide = nn.Linear(128, 16)  # rows of two blocks
        self.odd = nn.Linear(13, 7)     # 91 elements: a short last block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,iters", [(4, 1), (4, 3), (8, 1), (8, 2)])
def test_loftq_matches_peft(bits, iters, dtype, cpu_loftq):
    torch.manual_seed(0)
    names = ("up", "wide", "odd")
    base, layers = _peft(TinyLoftQ().to(dtype), names=names, init_lora_weights="loftq",
                         loftq_config=peft.LoftQConfig(loftq_bits=bits, loftq_iter=iters))
    config = LoftQConfig(loftq_bits=bits, loftq_iter=iters)
    for _, weight, a, b, new in _check("loftq", layers, base, loftq_config=config):
        quantization_error = (weight.float() - new.float()).norm()
        assert 0 < (weight.float() - new.float() - b.float() @ a.float()).norm() < quantization_error


@pytest.mark.parametrize("shape", [(16, 24), (40, 16), (7, 13), (64, 128), (3, 5)])
def test_nf4_round_trip_is_bitsandbytes(shape):
    import bitsandbytes.functional as F
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.05
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert torch.equal(nf4_round_trip(weight), _reference_dequantize_4bit(packed, state))


def test_bnb_cpu_nf4_kernel_misreads_short_rows():
    import bitsandbytes.functional as F
    torch.manual_seed(0)
    weight = torch.randn(32, 16)
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    assert not torch.equal(F.dequantize_4bit(packed, state), _reference_dequantize_4bit(packed, state))


def test_int8_round_trip_is_bitsandbytes():
    import bitsandbytes as bnb
    torch.manual_seed(0)
    weight = torch.randn(24, 40)
    q = bnb.nn.Int8Params(weight.clone(), requires_grad=False).to("cpu")
    assert torch.equal(int8_round_trip(weight), bnb.functional.int8_vectorwise_dequant(q.data, q.SCB))


def test_loftq_validation():
    w = torch.randn(8, 8)
    with pytest.raises(ValueError, match="Only nf4 and int8"):
        init_weights("loftq", w, 2, 1.0, loftq_bits=2)
    with pytest.raises(ValueError, match="greater than 0"):
        init_weights("loftq", w, 2, 1.0, loftq_iter=0)


# ---- CorDA ----

class TinyCorda(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.down = nn.Linear(40, 16)
        self.gpt = Conv1D(12, 16)

    def forward(self, x):
        return self.gpt(torch.relu(self.down(torch.relu(self.up(x)))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ipm", "kpm"])
def test_corda_matches_peft(method, dtype):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    torch.manual_seed(0)
    model = TinyCorda().to(dtype)
    names = ("up", "down", "gpt")
    batches = [torch.randn(1, 30, 24).to(dtype) for _ in range(3)]
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(names), init_lora_weights="corda",
                             corda_config=CordaConfig(corda_method=method))
    theirs = copy.deepcopy(model)
    base = {n: getattr(model, n).weight.detach().clone() for n in names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preprocess_corda(theirs, config, run_model=lambda: [theirs(x) for x in batches])
        wrapped = peft.get_peft_model(theirs, config)
    sums = {}

    def hook(name):
        def collect(module, inputs, output):
            sums[name] = corda_covariance(*sums.get(name, (None, 0)), inputs[0])
        return collect
    handles = [getattr(model, n).register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    for name in names:
        fan = name == "gpt"
        weight = base[name].t() if fan else base[name]
        eigens = corda_eigens(weight, corda_covariance_mean(*sums[name]), R, method, fan_in_fan_out=fan)
        layer = getattr(wrapped.base_model.model, name)
        a, b, new = init_weights("corda", weight, R, SCALING, eigens=eigens)
        _same(a, layer.lora_A["default"].weight)
        _same(b, layer.lora_B["default"].weight)
        stored = layer.base_layer.weight.detach()
        _same(new.t() if fan else new, stored)
        _invariant(weight, a, b, new, DTYPE_TOL[dtype])


def test_corda_validation():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="preprocess_corda"):
        init_weights("corda", w, 2, 1.0)
    with pytest.raises(ValueError, match="Matrix U size mismatch"):
        init_weights("corda", w, 2, 1.0, eigens=CordaEigens(torch.ones(2), torch.ones(5, 2), torch.ones(4, 2)))
    with pytest.raises(ValueError, match="Invalid value found in matrix S"):
        init_weights("corda", w, 2, 1.0, eigens=CordaEigens(torch.tensor([1.0, float("nan")]), torch.ones(6, 2),
                                                            torch.ones(4, 2)))
    with pytest.raises(ValueError, match="Invalid corda_method"):
        corda_eigens(w, torch.eye(4), 2, "xpm")
    with pytest.raises(ValueError, match="rank mismatch"):
        corda_eigens(w, torch.eye(4), 5)
    with pytest.raises(RuntimeError):  # PEFT's hook transposes the input: batches of one only
        corda_covariance(None, 0, torch.randn(2, 3, 4))


# ---- validation: the errors PEFT raises, and what it does on other layers ----

def _peft_error(kind, model, target, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            peft.get_peft_model(model, peft.LoraConfig(r=3 if kind == "orthogonal" else 4, target_modules=[target],
                                                       init_lora_weights=kind, **config))
        except Exception as error:  # noqa: BLE001 - the oracle's exception, whatever it is
            return error
    return None


@pytest.mark.parametrize("kind,dtype", [("pissa", torch.float64), ("olora", torch.float64), ("pissa_foo", None),
                                        ("orthogonal", None), ("pissa_niter_x", None)])
def test_errors_are_peft_errors(kind, dtype):
    model = nn.Sequential(nn.Linear(12, 10))
    if dtype is not None:
        model = model.to(dtype)
    theirs = _peft_error(kind, copy.deepcopy(model), "0")
    assert theirs is not None
    with pytest.raises(type(theirs)) as ours:
        init_weights(kind, model[0].weight, 3 if kind == "orthogonal" else 4, 1.0)
    assert str(ours.value) == str(theirs)


@pytest.mark.parametrize("kind", ["pissa", "pissa_niter_2", "olora", "orthogonal", "corda", "loftq", "eva"])
def test_layer_kinds_follow_peft(kind):
    extra = {"loftq_config": peft.LoftQConfig()} if kind == "loftq" else {}
    conv = _peft_error(kind, nn.Sequential(nn.Conv2d(3, 6, 3)), "0", **extra)
    with pytest.raises(type(conv)):
        layer_init(kind, "conv")
    embedding = nn.Sequential(nn.Embedding(12, 10))
    before = embedding[0].weight.detach().clone()
    error = _peft_error(kind, embedding, "0", **extra)
    if error is None:  # PEFT's embedding init ignores the kind: default init, base untouched
        assert layer_init(kind, "embedding") is False
        assert torch.equal(embedding[0].weight, before)
    else:
        with pytest.raises(type(error)):
            layer_init(kind, "embedding")
    assert layer_init(kind, "linear") is (kind != "eva")  # EVA's A comes from data, later


BAD = [("pissa", torch.float64, 4, {}), ("olora", torch.float64, 4, {}), ("pissa_foo", torch.float32, 4, {}),
       ("pissa_niter_x", torch.float32, 4, {}), ("orthogonal", torch.float32, 3, {}), ("pissa", torch.float32, 0, {}),
       ("loftq", torch.float32, 4, {"loftq_bits": 2}), ("loftq", torch.float32, 4, {"loftq_config": LoftQConfig(4, 0)}),
       ("olora", torch.float32, 4, {"fan_in_fan_out": True}), ("loftq", torch.float32, 4, {"fan_in_fan_out": True}),
       ("corda", torch.float32, 4, {}), ("gaussian", torch.float32, 4, {})]


@pytest.mark.parametrize("kind,dtype,r,options", BAD)
def test_check_init_raises_what_init_weights_raises(kind, dtype, r, options):
    weight = torch.randn(10, 12).to(dtype)  # a Conv1D's (out × in): its stored (12 × 10) is not square
    with pytest.raises(Exception) as expected:
        init_weights(kind, weight, r, 1.0, **options)
    state = torch.get_rng_state()
    with pytest.raises(type(expected.value)) as got:
        check_init(kind, weight.shape, dtype, r, **options)
    assert str(got.value) == str(expected.value)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("kind", ["pissa", "pissa_niter_2", "OLoRA", "orthogonal", "loftq"])
def test_check_init_passes_what_init_weights_takes_without_drawing(kind):
    state = torch.get_rng_state()
    check_init(kind, (16, 16), torch.bfloat16, 4, fan_in_fan_out=True)
    assert torch.equal(torch.get_rng_state(), state)


def test_modifies_base():
    assert [k for k in ("pissa", "pissa_niter_4", "olora", "OLoRA", "corda", "loftq", "orthogonal", "gaussian")
            if modifies_base(k)] == ["pissa", "pissa_niter_4", "olora", "OLoRA", "corda", "loftq"]


# ---- a transformers model: every Llama projection ----

def test_pissa_on_tiny_llama(rng_at_init):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = {n: m.weight.detach().clone() for n, m in model.named_modules() if n.split(".")[-1] in targets}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights="pissa_niter_4"))
    ids = torch.randint(0, 64, (2, 7))
    assert torch.allclose(wrapped(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    layers = {n: wrapped.base_model.model.get_submodule(n) for n in base}
    assert len(list(_check("pissa_niter_4", layers, base, rng_at_init))) == 7


# ---- saving as plain LoRA (path_initial_model_for_weight_conversion) ----

class TinyConverted(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40)
        self.emb = nn.Embedding(10, 24)
        self.head = nn.Linear(40, 6)

    def forward(self, ids):
        return self.head(torch.relu(self.up(self.emb(ids))))


@pytest.mark.parametrize("kind,use_rslora", [("pissa", False), ("olora", True)])
def test_plain_lora_conversion_is_peft_save(kind, use_rslora, tmp_path):
    import json

    from safetensors.torch import load_file

    from fxpeft.passes.lora_init import plain_lora_config, plain_lora_state
    torch.manual_seed(0)
    original = TinyConverted()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "emb"], init_lora_weights=kind,
                             use_rslora=use_rslora, modules_to_save=["head"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(original), config)
        model.peft_config["default"].init_lora_weights = True  # PEFT's documented recipe
        model.save_pretrained(tmp_path / "init")
        model.peft_config["default"].init_lora_weights = kind
        with torch.no_grad():  # "training"
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        model.save_pretrained(tmp_path / "final", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    saved = load_file(tmp_path / "final" / "adapter_model.safetensors")
    initial = load_file(tmp_path / "init" / "adapter_model.safetensors")
    trained = peft.get_peft_model_state_dict(model)
    ours = plain_lora_state(trained, initial)
    assert ours.keys() == saved.keys() == {"base_model.model.up.lora_A.weight", "base_model.model.up.lora_B.weight"}
    for key in ours:
        assert torch.equal(ours[key], saved[key])
    written = json.loads((tmp_path / "final" / "adapter_config.json").read_text())
    for key, value in plain_lora_config(kind, 4, 8, use_rslora).items():
        assert written[key] == value, key
    # what it means: the converted delta on the original weight is the trained delta on the residual
    up = model.base_model.model.up
    trained_weight = up.base_layer.weight + up.scaling["default"] * up.lora_B["default"].weight @ up.lora_A["default"].weight
    a, b = ours["base_model.model.up.lora_A.weight"], ours["base_model.model.up.lora_B.weight"]
    assert torch.allclose(original.up.weight + up.scaling["default"] * b @ a, trained_weight, atol=1e-5)


def test_plain_lora_config_rejects_rslora_patterns():
    from fxpeft.passes.lora_init import plain_lora_config
    with pytest.raises(ValueError, match="not supported"):
        plain_lora_config("pissa", 4, 8, True, rank_pattern={"up": 2})
    with pytest.warns(UserWarning, match="only works for converting"):
        assert plain_lora_config("gaussian", 4, 8, rank_pattern={"up": 2})["rank_pattern"] == {"up": 4}
