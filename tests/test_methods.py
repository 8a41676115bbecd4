"""Conformance: every site method (a :func:`fxpeft.forms` method) passes the same checks, against
the real PEFT package as the oracle, on every site kind PEFT supports it on.

A method is one ``METHODS`` row (its fxpeft and PEFT configs, the options that give a random or
an identity start, the site kinds it supports); a site kind is one ``SITES`` row (a tiny model
whose targets are sites of that kind). A new method adds a row.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Callable

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv1d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(-1))


@dataclasses.dataclass
class SiteModel:
    build: Callable
    inputs: Callable  # a tuple of positional inputs, or a dict of keyword inputs
    targets: list
    feedforward: list  # for methods that tell feed-forward sites apart (IA3)


SITES = {
    "linear": SiteModel(models.MLP, lambda: (torch.randn(4, 12),), ["fc1", "fc2"], ["fc2"]),
    "conv1d_gpt2": SiteModel(models.gpt2, lambda: models.hf_inputs("gpt2"), ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "conv1d": SiteModel(Conv1dNet, lambda: (torch.randn(3, 4, 10),), ["conv1", "conv2"], ["conv2"]),
    "conv2d": SiteModel(models.ConvNet, lambda: (torch.randn(3, 3, 8, 8),), ["conv1", "conv2"], ["conv2"]),
    "embedding": SiteModel(models.TinyDecoder, lambda: (torch.randint(0, models.VOCAB, (3, 9)),),
                           ["embed", "up"], ["up"]),
}


@dataclasses.dataclass
class MethodSpec:
    fx: type
    peft: type
    options: Callable  # (site model) -> config kwargs shared by both packages
    random: dict  # what makes the initial adapter change the outputs
    sites: tuple  # SITES rows PEFT supports the method on
    # SITES rows where PEFT's unmerged forward is not the method but its merge is (OFT's Conv2d unfolds
    # patches, rotates and folds them back, summing overlaps): the oracle there is PEFT merged
    peft_merged_oracle: tuple = ()
    # PEFT wraps a bitsandbytes 4-bit layer but computes with its packed weight's shape and fails
    # (LoHa, LoKr, HRA): the oracle is then PEFT on the float model holding the dequantized weights
    peft_4bit: bool = True
    peft_4bit_error: str = "shape"  # what PEFT's error on the 4-bit layer says (when it creates or runs the adapter)


METHODS = {
    "lora": MethodSpec(fxpeft.LoraConfig, peft.LoraConfig, lambda s: dict(r=4, lora_alpha=8, target_modules=s.targets),
                       dict(init_lora_weights=False), tuple(SITES)),
    "lora_bias": MethodSpec(fxpeft.LoraConfig, peft.LoraConfig,
                            lambda s: dict(r=4, lora_alpha=8, target_modules=s.targets, lora_bias=True),
                            dict(init_lora_weights=False), ("linear", "conv1d_gpt2", "conv1d", "conv2d")),
    "dora": MethodSpec(fxpeft.LoraConfig, peft.LoraConfig,
                       lambda s: dict(r=4, lora_alpha=8, target_modules=s.targets, use_dora=True),
                       dict(init_lora_weights=False), tuple(SITES)),
    "adalora": MethodSpec(fxpeft.AdaLoraConfig, peft.AdaLoraConfig,
                          lambda s: dict(init_r=4, target_r=2, lora_alpha=8, total_step=10, target_modules=s.targets),
                          dict(init_lora_weights=False), ("linear", "conv1d_gpt2", "conv2d")),
    "ia3": MethodSpec(fxpeft.IA3Config, peft.IA3Config,
                      lambda s: dict(target_modules=s.targets, feedforward_modules=s.feedforward),
                      dict(init_ia3_weights=False), ("linear", "conv1d_gpt2", "conv2d")),
    # PEFT's LyCORIS layers: nn.Linear, nn.Conv1d, nn.Conv2d (transformers' Conv1D raises, tests/test_lycoris.py)
    "loha": MethodSpec(fxpeft.LoHaConfig, peft.LoHaConfig, lambda s: dict(r=4, alpha=8, target_modules=s.targets),
                       dict(init_weights=False), ("linear", "conv1d", "conv2d"), peft_4bit=False),
    # r=2: the linear sites' W2 is factored (W2a W2b), the conv sites' is a full kernel
    "lokr": MethodSpec(fxpeft.LoKrConfig, peft.LoKrConfig, lambda s: dict(r=2, alpha=4, target_modules=s.targets),
                       dict(init_weights=False), ("linear", "conv1d", "conv2d"), peft_4bit=False),
    # PEFT's OFT: nn.Linear, nn.Conv2d, nn.Embedding (Conv1D and Conv1d raise, tests/test_orthogonal.py); r=4
    # divides every site's features (12, 24, 27 = 3·3·3, 72, 32)
    "oft": MethodSpec(fxpeft.OFTConfig, peft.OFTConfig,
                      lambda s: dict(r=3 if s.build is models.ConvNet else 4, oft_block_size=0, target_modules=s.targets),
                      dict(init_weights=False), ("linear", "conv2d", "embedding"), peft_merged_oracle=("conv2d",)),
    # PEFT's BOFT: nn.Linear, nn.Conv2d; 3 blocks divide every site's features (12, 24, 27, 72)
    "boft": MethodSpec(fxpeft.BOFTConfig, peft.BOFTConfig,
                       lambda s: dict(boft_block_size=0, boft_block_num=3, target_modules=s.targets),
                       dict(init_weights=False), ("linear", "conv2d")),
    # PEFT's HRA: nn.Linear, nn.Conv2d
    "hra": MethodSpec(fxpeft.HRAConfig, peft.HRAConfig, lambda s: dict(r=4, target_modules=s.targets),
                      dict(init_weights=False), ("linear", "conv2d"), peft_4bit=False),
    "trainable_tokens": MethodSpec(fxpeft.TrainableTokensConfig, peft.TrainableTokensConfig,
                                   lambda s: dict(token_indices=list(range(0, models.VOCAB, 2)), target_modules=["embed"]),
                                   dict(init_weights=False), ("embedding",)),
    # PEFT's VeRA: linear sites only (nn.Linear, Conv1D); projections shared by every site (tests/test_vera.py)
    "vera": MethodSpec(fxpeft.VeraConfig, peft.VeraConfig, lambda s: dict(r=4, target_modules=s.targets),
                       dict(init_weights=False), ("linear", "conv1d_gpt2")),
    # PEFT's FourierFT: linear sites only (nn.Linear, Conv1D); init_weights=True is the identity start
    "fourierft": MethodSpec(fxpeft.FourierFTConfig, peft.FourierFTConfig,
                            lambda s: dict(n_frequency=50, scaling=20.0, init_weights=True, target_modules=s.targets),
                            dict(init_weights=False), ("linear", "conv1d_gpt2")),
    # PEFT's BEFT: torch.nn.Linear only (Conv1D raises, tests/test_beft.py); a bias added to the output
    "beft": MethodSpec(fxpeft.BeftConfig, peft.BeftConfig, lambda s: dict(target_modules=s.targets),
                       dict(init_weights=False), ("linear",)),
    # PEFT's HiRA: nn.Linear, Conv1D, nn.Conv1d/2d/3d, nn.Embedding (and bitsandbytes linears); ΔW = W ⊙ (B A)
    "hira": MethodSpec(fxpeft.HiraConfig, peft.HiraConfig, lambda s: dict(r=4, target_modules=s.targets),
                       dict(init_weights=False), tuple(SITES)),
    # PEFT's SHiRA: torch.nn.Linear only (Conv1D raises, tests/test_shira.py); r=2 keeps fc2's support
    # (2·(24 + 5) entries) within its 24·5 weights (also in `random`, which the 4-bit test reads)
    "shira": MethodSpec(fxpeft.ShiraConfig, peft.ShiraConfig,
                        lambda s: dict(r=2, random_seed=3, target_modules=s.targets),
                        dict(init_weights=False, r=2), ("linear",)),
    # PEFT's Super-Tuning: torch.nn.Linear only (Conv1D raises, tests/test_supertuning.py); Supra mode (r set) runs
    # both terms, the sparse support and the LoRA pair
    "supertuning": MethodSpec(fxpeft.SupertuningConfig, peft.SupertuningConfig,
                              lambda s: dict(sparsity=0.9, r=2, lora_alpha=4, target_modules=s.targets),
                              dict(init_weights=False), ("linear",), peft_4bit=False),
    # PEFT's MiSS: nn.Linear only (Conv1D raises, tests/test_miss.py); r=5 leaves a remainder of fc1's 12 inputs
    # (the zero-padded chunk); init_weights=False is the random balance block (bat and mini: tests/test_miss.py)
    "miss": MethodSpec(fxpeft.MissConfig, peft.MissConfig, lambda s: dict(r=5, target_modules=s.targets),
                       dict(init_weights=False, r=5), ("linear",)),
    # PEFT's DeLoRA: nn.Linear only (Conv1D raises, tests/test_delora.py); on a 4-bit layer PEFT takes the norm of
    # the packed bytes and fails when it creates the adapter: the oracle there is PEFT on the dequantized weights
    "delora": MethodSpec(fxpeft.DeloraConfig, peft.DeloraConfig, lambda s: dict(r=4, target_modules=s.targets),
                         dict(init_weights=False, r=4), ("linear",), peft_4bit=False,
                         peft_4bit_error="vector_norm: Expected a floating point"),
    # PEFT's GraLoRA: nn.Linear and Conv1D. gralora_k must divide every site's features: the MLP's 5 outputs leave
    # k=1 there (the hybrid LoRA part runs beside it); GPT-2 takes a 2 × 2 grid (and the 4-bit check PEFT's defaults)
    "gralora": MethodSpec(fxpeft.GraloraConfig, peft.GraloraConfig,
                          lambda s: dict(r=4, alpha=8, target_modules=s.targets,
                                         **(dict(gralora_k=1, hybrid_r=2) if s.build is models.MLP else {})),
                          dict(init_weights=False), ("linear", "conv1d_gpt2")),
    # PEFT's C3A: nn.Linear only (Conv1D raises, tests/test_linear_site_methods.py); block_size divides every
    # site's features (the MLP's 5 outputs: 1 there); init_weights=True is the identity start, False a random one
    "c3a": MethodSpec(fxpeft.C3AConfig, peft.C3AConfig,
                      lambda s: dict(block_size=4, init_weights=True, target_modules=s.targets,
                                     block_size_pattern={"fc2": 1} if s.build is models.MLP else {}),
                      dict(init_weights=False, block_size=4), ("linear",)),
    # PEFT's PVeRA: linear sites only (nn.Linear, Conv1D); it samples in training, so the random adapters get a
    # generator_seed: both packages then draw the same noise (the 4-bit check compares them in training mode)
    "pvera": MethodSpec(fxpeft.PveraConfig, peft.PveraConfig, lambda s: dict(r=4, target_modules=s.targets),
                        dict(init_weights=False, generator_seed=0), ("linear", "conv1d_gpt2")),
    # PEFT's GLoRA: plain nn.Linear only (Conv1D and a 4-bit layer raise ValueError at construction,
    # tests/test_glora.py): the 4-bit oracle is PEFT on the dequantized weights
    "glora": MethodSpec(fxpeft.GloraConfig, peft.GloraConfig, lambda s: dict(r=2, target_modules=s.targets),
                        dict(init_weights=False), ("linear",), peft_4bit=False,
                        peft_4bit_error="not a plain torch.nn.Linear"),
    # PEFT's PEANuT: nn.Linear only (Conv1D raises); on a 4-bit layer it computes with the packed weight and fails
    "peanut": MethodSpec(fxpeft.PeanutConfig, peft.PeanutConfig,
                         lambda s: dict(r=4, depth=1, act_fn="gelu", scaling=0.5, target_modules=s.targets),
                         dict(init_weights=False), ("linear",), peft_4bit=False),
    # PEFT's DeFT: nn.Linear and Conv1D; init_weights=True is the identity start (R from the base weight)
    "deft": MethodSpec(fxpeft.DeftConfig, peft.DeftConfig, lambda s: dict(r=3, alpha=6, target_modules=s.targets),
                       dict(init_weights=False), ("linear", "conv1d_gpt2")),
    # PEFT's FRoD: nn.Linear and Conv1D; sparse_rate=0.1 gives S a few entries on every site (12², 24², 32², 128²).
    # On a 4-bit base PEFT builds its basis from the packed uint8 weight and fails making the adapter
    "frod": MethodSpec(fxpeft.FrodConfig, peft.FrodConfig,
                       lambda s: dict(sparse_rate=0.1, progressbar=False, target_modules=s.targets),
                       dict(init_weights=False), ("linear", "conv1d_gpt2"), peft_4bit=False,
                       peft_4bit_error="floating point"),
    # PEFT's WaveFT: nn.Linear and Conv1D; n_frequency=50 fits every site (also in `random`, which the 4-bit test reads)
    "waveft": MethodSpec(fxpeft.WaveFTConfig, peft.WaveFTConfig,
                         lambda s: dict(n_frequency=50, target_modules=s.targets),
                         dict(init_weights=False, n_frequency=50), ("linear", "conv1d_gpt2")),
    # PEFT's AdaMSS: torch.nn.Linear only (Conv1D raises, tests/test_adamss.py); init_weights=None draws B.
    # On a 4-bit base PEFT decomposes the packed uint8 weight and fails making the adapter
    "adamss": MethodSpec(fxpeft.AdamssConfig, peft.AdamssConfig,
                         lambda s: dict(r=8, num_subspaces=3, subspace_rank=2, target_modules=s.targets),
                         dict(init_weights=None), ("linear",), peft_4bit=False, peft_4bit_error="Byte"),
}
CASES = [(m, s) for m, spec in METHODS.items() for s in spec.sites]
ON_LINEAR = [m for m, spec in METHODS.items() if "linear" in spec.sites]  # the checks below use linear layers


def run(module, inputs):
    out = module(**inputs) if isinstance(inputs, dict) else module(*inputs)
    return out.logits if hasattr(out, "logits") else out


def configs(method: str, site: str, **extra):
    spec = METHODS[method]
    kwargs = {**spec.options(SITES[site]), **extra}
    return spec.fx(**kwargs), spec.peft(**kwargs)


def trainable_state(module, prefix: str = "") -> dict:
    return {name.removeprefix(prefix): p for name, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method, site", CASES)
def test_method_equals_peft(method, site, tmp_path):
    """Identity start; PEFT's outputs, trainable counts and saved tensors; checkpoints both ways;
    save/load and merge/unmerge round trips; merge_and_unload into the original class."""
    spec, row = METHODS[method], SITES[site]
    model = row.build().eval()
    inputs = row.inputs()
    with torch.no_grad():
        base = run(model, inputs)

    fx_config, peft_config = configs(method, site, **spec.random)
    reference = peft.get_peft_model(copy.deepcopy(model), peft_config).eval()
    gm = fxpeft.transform(model, fx_config).eval()
    ours, theirs = trainable_state(gm), trainable_state(reference, "base_model.model.")
    assert set(ours) == set(theirs)
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(theirs[name])
        expected = run(reference, inputs)
        if site in spec.peft_merged_oracle:  # checked, so a PEFT that fixes it switches this back
            reference.merge_adapter()
            assert (run(reference, inputs) - expected).abs().max() > 1e-3
            expected = run(reference, inputs)
        assert (expected - base).abs().max() > 1e-4  # the adapter acts: the comparisons below can fail
        torch.testing.assert_close(run(gm, inputs), expected, rtol=1e-5, atol=1e-5)
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()

    # checkpoints: the same files, and each package loads the other's
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    from peft_oracle import assert_same_saved_tensors
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    if site in spec.peft_merged_oracle:
        back.merge_adapter()
    gm.load_adapter(str(tmp_path / "peft"), "loaded")
    # the identity start: a new adapter with the method's default init leaves the outputs alone
    gm.add_adapter("identity", configs(method, site, inference_mode=True)[0])
    with torch.no_grad():
        torch.testing.assert_close(run(back, inputs), expected, rtol=1e-5, atol=1e-5)
        gm.set_adapter("loaded")
        torch.testing.assert_close(run(gm, inputs), expected, rtol=1e-5, atol=1e-5)
        gm.set_adapter("identity")
        torch.testing.assert_close(run(gm, inputs), base, rtol=0, atol=1e-6)
    gm.set_adapter("default")

    # merging: outputs kept, unmerging restores the weights, merge_and_unload is the original class's state
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        gm.merge_adapter()
        torch.testing.assert_close(run(gm, inputs), expected, rtol=1e-5, atol=1e-5)
        gm.unmerge_adapter()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, weights[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(run(gm, inputs), expected, rtol=1e-5, atol=1e-5)
        merged = gm.merge_and_unload()
        fresh = row.build().eval()
        fresh.load_state_dict(merged.state_dict(), strict=True)
        torch.testing.assert_close(run(fresh, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, site", CASES)
def test_mixed_batch_and_training(method, site):
    """A mixed batch equals per-sample calls; training lowers the loss and leaves the base bit-identical."""
    spec, row = METHODS[method], SITES[site]
    model = row.build().eval()
    inputs = row.inputs()
    gm = fxpeft.transform(model, configs(method, site, **spec.random)[0]).eval()
    gm.add_adapter("other", configs(method, site, inference_mode=True, **spec.random)[0])  # AdaLoRA trains one
    batch = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
    names = (["default", "other", "__base__"] * batch.shape[0])[: batch.shape[0]]

    def sample(i):
        return {k: v[i:i + 1] for k, v in inputs.items()} if isinstance(inputs, dict) else (inputs[0][i:i + 1],)

    with torch.no_grad():
        mixed = gm(**inputs, adapter_names=names) if isinstance(inputs, dict) else gm(*inputs, adapter_names=names)
        mixed = mixed.logits if hasattr(mixed, "logits") else mixed
        for i, name in enumerate(names):
            if name == "__base__":
                with fxpeft.disable_adapters(gm):
                    single = run(gm, sample(i))
            else:
                gm.set_adapter(name)
                single = run(gm, sample(i))
            torch.testing.assert_close(mixed[i:i + 1], single, rtol=1e-5, atol=1e-5)

    gm.set_adapter("default")
    gm.train()
    frozen = {k: v.detach().clone() for k, v in gm.named_parameters() if not v.requires_grad}
    optimizer = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = run(gm, inputs).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, value in gm.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), name


@pytest.mark.parametrize("method", ON_LINEAR)
def test_switching_adapters_never_recompiles(method):
    torch._dynamo.reset()
    spec, row = METHODS[method], SITES["linear"]
    gm = fxpeft.transform(row.build().eval(), configs(method, "linear", **spec.random)[0]).eval()
    gm.add_adapter("other", configs(method, "linear", inference_mode=True, **spec.random)[0])
    x = row.inputs()[0]
    expected = {}
    with torch.no_grad():
        for name in ("default", "other"):
            gm.set_adapter(name)
            expected[name] = gm(x)
        compiled = torch.compile(gm, fullgraph=True, backend=models.COMPILE_BACKEND)
        compiled(x)
        compiled(x, adapter_names=fxpeft.adapter_indices(gm, ["other", "default", "__base__", "other"]))
        try:
            torch._dynamo.config.error_on_recompile = True
            for name in ("default", "other"):
                gm.set_adapter(name)
                torch.testing.assert_close(compiled(x), expected[name], rtol=1e-5, atol=1e-5)
            with fxpeft.disable_adapters(gm):
                compiled(x)
            got = compiled(x, adapter_names=fxpeft.adapter_indices(gm, ["default", "other", "other", "default"]))
            torch.testing.assert_close(got[1], expected["other"][1], rtol=1e-5, atol=1e-5)
        finally:
            torch._dynamo.config.error_on_recompile = False
            torch._dynamo.reset()


@pytest.mark.parametrize("method", ON_LINEAR)
def test_method_on_a_4bit_base_equals_peft(method, tmp_path):
    from test_quantize import CONFIGS, _quantized_by_transformers

    spec = METHODS[method]
    model = models.llama()
    targets = dict(target_modules=["q_proj", "v_proj", "down_proj"], **(
        dict(feedforward_modules=["down_proj"]) if method == "ia3" else {}))
    kwargs = {**targets, **spec.random, **(dict(r=4, lora_alpha=8) if method in ("lora", "dora", "lora_bias") else {}),
              **(dict(use_dora=True) if method == "dora" else {}), **(dict(lora_bias=True) if method == "lora_bias" else {}),
              **(dict(init_r=4, target_r=2, total_step=10) if method == "adalora" else {}),
              **(dict(n_frequency=64) if method == "fourierft" else {})}
    quantized = _quantized_by_transformers(model, tmp_path, CONFIGS["nf4"])
    inputs = models.hf_inputs("llama")
    if not spec.peft_4bit:  # PEFT fails here (checked, so a PEFT that learns it switches this test back)
        with pytest.raises((RuntimeError, ValueError), match=spec.peft_4bit_error):  # packed weight, or refused
            failing = peft.get_peft_model(copy.deepcopy(quantized), spec.peft(**kwargs))
            failing.train()(**inputs)
        quantized = _dequantized(model, quantized)
    reference = peft.get_peft_model(peft.prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False),
                                    spec.peft(**kwargs))
    gm = fxpeft.transform(model, [fxpeft.BnbConfig(**CONFIGS["nf4"]), spec.fx(**kwargs)])
    ours, theirs = trainable_state(gm), trainable_state(reference, "base_model.model.")
    assert set(ours) == set(theirs)
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(theirs[name])
    gm.train()
    reference.train()  # bitsandbytes' CPU eval path repacks 4-bit weights; both modes compute the same
    expected = reference(**inputs, labels=inputs["input_ids"])
    got = gm(**inputs, labels=inputs["input_ids"])
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=0)
    got.loss.backward()
    assert {n for n, p in gm.named_parameters() if p.grad is not None} == set(ours)


def _dequantized(model, quantized):
    """A float copy of ``model`` whose layers hold what ``quantized``'s 4-bit layers compute with."""
    import bitsandbytes as bnb

    float_model = copy.deepcopy(model)
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
                float_model.get_submodule(name).weight.copy_(weight)
    return float_model
