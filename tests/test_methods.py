"""Conformance: every site method (a :func:`fxpeft.forms` method) passes the same checks, against
the real PEFT package as the oracle, on every site kind PEFT supports it on.

A method is one ``METHODS`` row (its fxpeft and PEFT configs, the options that give a random or
an identity start, the site kinds it supports); a site kind is one ``SITES`` row (a tiny model
whose targets are sites of that kind). A new method adds a row.
"""
from __future__ import annotations

import copy
import dataclasses
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
    # with peft_4bit=False where PEFT runs on the 4-bit base but computes something wrong instead of failing:
    # ``(PEFT's model there) -> bool``, whether that fault shows (checked, as the error is)
    peft_4bit_fault: Callable = None
    # PEFT cannot merge the method (Lily: its ΔW depends on the input): merging raises, as PEFT's does, and
    # leaves the model as it was
    merges: bool = True
    # a sample's output depends on the other samples with its adapter (Lily's router averages over the batch): a
    # mixed batch is compared with each adapter's sub-batch called alone instead of each sample alone
    batch_coupled: bool = False


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
    # PEFT's VB-LoRA: linear sites only (nn.Linear, Conv1D), each a multiple of vector_length (the MLP's fc2 has 5
    # outputs: fc1 only); a zero bank is the identity start (the default bank is random: VB-LoRA has no identity
    # init), the random one is large enough to move the outputs; vector_length in `random` serves the 4-bit test
    "vblora": MethodSpec(fxpeft.VBLoRAConfig, peft.VBLoRAConfig,
                         lambda s: dict(r=4, num_vectors=16, vector_length=4, init_vector_bank_bound=0.0,
                                        target_modules=["fc1"] if s.build is models.MLP else s.targets),
                         dict(init_vector_bank_bound=0.5, vector_length=4), ("linear", "conv1d_gpt2")),
    # PEFT's RandLoRA: linear sites only (nn.Linear, Conv1D, bitsandbytes); bases shared by every site
    # (tests/test_randlora.py); init_weights=True (λ = 0) is the identity start
    "randlora": MethodSpec(fxpeft.RandLoraConfig, peft.RandLoraConfig,
                           lambda s: dict(r=4, randlora_alpha=8, target_modules=s.targets),
                           dict(init_weights=False), ("linear", "conv1d_gpt2")),
    # PEFT's Uni-LoRA: linear sites only (nn.Linear, Conv1D); θ kept once on the module (tests/test_unilora.py).
    # It has no identity start (A and B both read θ): a zero θ, which no config gives (init_theta_d_bound must be
    # positive), cannot be the oracle, so the smallest bound stands in for it (a change below the suite's 1e-6)
    "unilora": MethodSpec(fxpeft.UniLoraConfig, peft.UniLoraConfig,
                          lambda s: dict(r=4, theta_d_length=64, init_theta_d_bound=1e-6, target_modules=s.targets),
                          dict(init_weights=False), ("linear", "conv1d_gpt2"), peft_4bit=False,
                          # PEFT casts the 1/√count scales to the base weight's dtype, on a 4-bit base its uint8
                          # storage: every scale becomes 0 and the adapter does nothing
                          peft_4bit_fault=lambda model: all(
                              not m.unilora_scales_A["default"].is_floating_point() and
                              not m.unilora_scales_A["default"].any()
                              for m in model.modules() if isinstance(m, peft.tuners.unilora.UniLoraLayer))),
    # PEFT's TinyLoRA: nn.Linear, Conv1D, nn.Embedding; v kept once on the module (tests/test_tinylora.py);
    # init_weights=True (v = 0) is the identity start. r=32 is the full rank of these sites (cut to each one's
    # smaller side) and u=256: with PEFT's r=2, u=64 six steps do not beat GPT-2's dropout noise in the loss
    "tinylora": MethodSpec(fxpeft.TinyLoraConfig, peft.TinyLoraConfig,
                           lambda s: dict(r=32, u=256, target_modules=s.targets),
                           dict(init_weights="uniform", init_v_bound=0.05), ("linear", "conv1d_gpt2", "embedding"),
                           # PEFT makes v in the target weight's dtype, on a 4-bit base its uint8 storage
                           peft_4bit=False, peft_4bit_error="Only Tensors of floating point"),
    # PEFT's RoAd: nn.Linear only (and bitsandbytes linears); group_size must divide out_features: the MLP's fc2
    # has 5 outputs, so only fc1 (24) is targeted. group_size sits in ``random`` too because the 4-bit check
    # builds its config from ``random`` alone (llama's 32-wide outputs need less than the default 64).
    "road": MethodSpec(fxpeft.RoadConfig, peft.RoadConfig,
                       lambda s: dict(group_size=4, target_modules=["fc1"]),
                       dict(init_weights=False, group_size=4), ("linear",)),
    # PEFT's PSOFT: nn.Linear only. On a 4-bit base PEFT refuses to take the SVD of the packed weight; fxpeft
    # factors the dequantized one, so the oracle there is PEFT on the dequantized float model. r in ``random``
    # too: the 4-bit check's config is built from it, and llama's v_proj has 16 outputs (PEFT's default r is 32)
    "psoft": MethodSpec(fxpeft.PsoftConfig, peft.PsoftConfig, lambda s: dict(r=4, psoft_alpha=8, target_modules=s.targets),
                        dict(init_weights=False, r=4), ("linear",), peft_4bit=False,
                        peft_4bit_error="PSOFT init requires float32"),
    # PEFT's OSF: nn.Linear only (it skips other layers silently; fxpeft raises). On a 4-bit base PEFT takes the
    # packed weight's shape for the layer's (a preserved rank of 0, refused); fxpeft factors the dequantized weight.
    # Unmerging: PEFT refuses, fxpeft subtracts ΔW (the suite's round trip checks it against the original weights)
    "osf": MethodSpec(fxpeft.OSFConfig, peft.OSFConfig, lambda s: dict(target_modules=s.targets),
                      dict(init_weights=False), ("linear",), peft_4bit=False,
                      peft_4bit_error="`effective_rank` should be a positive integer"),
    # PEFT's Lily: nn.Linear only (and bitsandbytes linears); no merging; its router averages over the batch
    "lily": MethodSpec(fxpeft.LilyConfig, peft.LilyConfig, lambda s: dict(r=4, num_B=3, target_modules=s.targets),
                       dict(init_weights=False), ("linear",), merges=False, batch_coupled=True),
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
    # a trainable tensor PEFT's tuner shares with every layer (VB-LoRA's bank) is named after the first layer
    # holding it (``fc1.vblora_vector_bank.default``); fxpeft keeps it once on the root (``Method.shared``)
    shared = {name for method in fxpeft.registry.DEFAULT.methods for name in method.shared}

    def key(name):
        parts = name.removeprefix(prefix).split(".")
        return ".".join(next((parts[i:] for i, part in enumerate(parts) if part in shared), parts))
    return {key(name): p for name, p in module.named_parameters() if p.requires_grad}


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

    if not spec.merges:  # checked, so a PEFT that learns to merge it switches this back
        with pytest.raises(NotImplementedError):
            reference.merge_adapter()
        with pytest.raises(NotImplementedError):
            gm.merge_adapter()
        with torch.no_grad():
            torch.testing.assert_close(run(gm, inputs), expected, rtol=1e-5, atol=1e-5)
        return
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


@pytest.fixture(scope="module")
def captured():
    """Per SITES row: (the model transformed with no adapter yet and called once, its inputs), made on first
    use. Tests add their adapters to a copy (``transform`` would capture each time: 1 s for GPT-2)."""
    made = {}

    def get(site):
        if site not in made:
            row = SITES[site]
            inputs = row.inputs()
            base = fxpeft.transform(row.build().eval(), []).eval()
            run(base, inputs)  # the test's call signature, captured once
            made[site] = base, inputs
        return made[site]
    return get


@pytest.mark.parametrize("method, site", CASES)
def test_mixed_batch_and_training(method, site, captured):
    """A mixed batch equals per-sample calls; training lowers the loss and leaves the base bit-identical."""
    spec = METHODS[method]
    base, inputs = captured(site)
    gm = copy.deepcopy(base)
    fxpeft.add_adapter(gm, configs(method, site, **spec.random)[0], "default")
    gm.add_adapter("other", configs(method, site, inference_mode=True, **spec.random)[0])  # AdaLoRA trains one
    batch = next(iter(inputs.values())) if isinstance(inputs, dict) else inputs[0]
    names = (["default", "other", "__base__"] * batch.shape[0])[: batch.shape[0]]

    def sample(i):  # sample i alone (batch-coupled methods: with the samples that chose its adapter), its row
        rows = [j for j, n in enumerate(names) if n == names[i]] if spec.batch_coupled else [i]
        return ({k: v[rows] for k, v in inputs.items()} if isinstance(inputs, dict) else (inputs[0][rows],)), rows.index(i)

    with torch.no_grad():
        mixed = gm(**inputs, adapter_names=names) if isinstance(inputs, dict) else gm(*inputs, adapter_names=names)
        mixed = mixed.logits if hasattr(mixed, "logits") else mixed
        for i, name in enumerate(names):
            if name == "__base__":
                with fxpeft.disable_adapters(gm):
                    single = run(gm, sample(i)[0])
            else:
                gm.set_adapter(name)
                single = run(gm, sample(i)[0])
            row = sample(i)[1]
            torch.testing.assert_close(mixed[i:i + 1], single[row:row + 1], rtol=1e-5, atol=1e-5)

    gm.set_adapter("default")
    gm.train()
    frozen = {k: v.detach().clone() for k, v in gm.named_parameters() if not v.requires_grad}
    optimizer = torch.optim.Adam([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        # the same dropout masks every step: the model's own dropout would drown a small adapter's progress
        # (RoAd on the MLP's fc1 alone) in noise
        torch.manual_seed(0)
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
    other_rows = [1, 2] if spec.batch_coupled else list(range(len(x)))  # the rows below that choose "other"
    with torch.no_grad():
        for name in ("default", "other"):
            gm.set_adapter(name)
            expected[name] = gm(x)
        mixed_other = gm(x[other_rows])[other_rows.index(1)]
        # recompiles and graph breaks are dynamo's own: no backend needed (no gradients here)
        compiled = torch.compile(gm, fullgraph=True, backend="eager")
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
            torch.testing.assert_close(got[1], mixed_other, rtol=1e-5, atol=1e-5)
        finally:
            torch._dynamo.config.error_on_recompile = False
            torch._dynamo.reset()


@pytest.fixture(scope="module")
def four_bit_base():
    """A tiny Llama and fxpeft's 4-bit copy of it with no adapter yet: each method's test adds its
    adapter to a copy (``add_adapter`` on a quantized base; a transform each would capture again)."""
    from test_quantize import CONFIGS

    model = models.llama()
    return model, fxpeft.transform(model, fxpeft.BnbConfig(**CONFIGS["nf4"]))


@pytest.mark.parametrize("method", ON_LINEAR)
def test_method_on_a_4bit_base_equals_peft(method, four_bit_base, tmp_path):
    from test_quantize import CONFIGS, _quantized_by_transformers

    spec = METHODS[method]
    model, base = four_bit_base
    targets = dict(target_modules=["q_proj", "v_proj", "down_proj"], **(
        dict(feedforward_modules=["down_proj"]) if method == "ia3" else {}))
    kwargs = {**targets, **spec.random, **(dict(r=4, lora_alpha=8) if method in ("lora", "dora", "lora_bias") else {}),
              **(dict(use_dora=True) if method == "dora" else {}), **(dict(lora_bias=True) if method == "lora_bias" else {}),
              **(dict(init_r=4, target_r=2, total_step=10) if method == "adalora" else {}),
              **(dict(n_frequency=64) if method == "fourierft" else {})}
    quantized = _quantized_by_transformers(model, tmp_path, CONFIGS["nf4"])
    inputs = models.hf_inputs("llama")
    if not spec.peft_4bit:  # PEFT fails here (checked, so a PEFT that learns it switches this test back)
        if spec.peft_4bit_fault is not None:
            assert spec.peft_4bit_fault(peft.get_peft_model(copy.deepcopy(quantized), spec.peft(**kwargs)))
        else:
            # it computes with the packed weight (a RuntimeError), or refuses it when creating the adapter
            # (PSOFT's TypeError, OSF's ValueError on the rank its shape gives)
            with pytest.raises((RuntimeError, TypeError, ValueError), match=spec.peft_4bit_error):
                failing = peft.get_peft_model(copy.deepcopy(quantized), spec.peft(**kwargs))
                failing.train()(**inputs)
        quantized = _dequantized(model, quantized)
    reference = peft.get_peft_model(peft.prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False),
                                    spec.peft(**kwargs))
    gm = copy.deepcopy(base)
    fxpeft.add_adapter(gm, spec.fx(**kwargs), "default")
    ours, theirs = trainable_state(gm), trainable_state(reference, "base_model.model.")
    assert set(ours) == set(theirs)
    with torch.no_grad():
        for name, param in ours.items():
            param.copy_(theirs[name])
    gm.train()
    reference.train()  # bitsandbytes' CPU eval path repacks 4-bit weights; both modes compute the same
    expected = reference(**inputs)
    got = gm(**inputs)  # the signature transform captured (a call with labels would capture another)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=0)
    ids = inputs["input_ids"]
    torch.nn.functional.cross_entropy(got.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
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
