"""A diffusers UNet end to end, against the real PEFT package and diffusers' own LoRA loading: a
tiny ``UNet2DConditionModel`` (cross-attention and resnet blocks) with LoRA on its attention
projections and 3x3 convs — outputs, a training step, the saved adapter (PEFT and diffusers'
``load_lora_adapter`` load it), the merged model; LoHa, LoKr and OFT on the same layers."""
from __future__ import annotations

import copy
import json

import diffusers
import peft
import pytest
import torch
from safetensors.torch import load_file

import fxpeft
from peft_oracle import adapted_paths, assert_same_saved_tensors, copy_adapter_weights, fx_adapted_paths

# One down and one up block with cross-attention (no mid block): every layer kind of a Stable
# Diffusion UNet at the smallest size that keeps capture quick.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8,),
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
            cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]  # attention (Linear) and resnet 3x3 convs
LORA = dict(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)


def unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(**UNET).eval()


def inputs(seed: int = 0):
    """(noisy latents, timesteps, text embeddings), the UNet's positional arguments."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), torch.randn(2, 3, 8, generator=g)


def run(module, seed: int = 0):
    latents, timesteps, text = inputs(seed)
    return module(latents, timesteps, encoder_hidden_states=text).sample


def saved_tensors(directory):
    """An adapter file's tensors under diffusers' keys: PEFT's ``base_model.model.`` prefix dropped."""
    return {k.removeprefix("base_model.model."): v for k, v in load_file(directory / "adapter_model.safetensors").items()}


def load_in_diffusers(model, directory):
    """diffusers' own loader on a saved adapter, adapter_config.json as the metadata it reads."""
    loaded = copy.deepcopy(model)
    loaded.load_lora_adapter(saved_tensors(directory), prefix=None,
                             metadata=json.loads((directory / "adapter_config.json").read_text()), adapter_name="fx")
    return loaded


@pytest.fixture(scope="module")
def lora():
    """(base UNet, PEFT's model, fxpeft's module) holding the same non-zero adapters."""
    base = unet()
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA)).eval()
    gm = fxpeft.transform(copy.deepcopy(base), fxpeft.LoraConfig(**LORA), example_inputs=inputs())
    copy_adapter_weights(reference, gm)
    return base, reference, gm.eval()


def test_lora_sites_outputs_and_a_training_step_equal_peft(lora):
    base, reference, gm = lora
    assert fx_adapted_paths(gm) == adapted_paths(reference)
    assert {p.rsplit(".", 1)[-1] for p in fx_adapted_paths(gm)} >= {"to_q", "conv1", "conv2"}
    assert type(gm(*inputs())) is type(base(*inputs()))  # called like the model, its output type
    with torch.no_grad():
        torch.testing.assert_close(run(gm), run(reference), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(run(gm), run(base))
    # a denoising step: MSE against the noise, the same SGD step on both
    reference, gm = copy.deepcopy(reference).train(), copy.deepcopy(gm).train()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    for module in (reference, gm):
        opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        torch.nn.functional.mse_loss(run(module), noise).backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(run(gm, 1), run(reference, 1), rtol=1e-5, atol=1e-6)


def test_saved_adapter_loads_in_peft_and_in_diffusers(lora, tmp_path):
    """The file is PEFT's; diffusers' ``load_lora_adapter`` takes its tensors (keys without PEFT's
    ``base_model.model.`` prefix) with adapter_config.json as the LoRA metadata it reads."""
    base, reference, gm = lora
    fxpeft.save_pretrained(gm, tmp_path / "fx")
    reference.save_pretrained(tmp_path / "peft")
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    expected = run(reference).detach()
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "fx").eval()
        torch.testing.assert_close(run(loaded), expected, rtol=1e-5, atol=1e-6)

        in_diffusers = load_in_diffusers(base, tmp_path / "fx")
        torch.testing.assert_close(run(in_diffusers), expected, rtol=1e-5, atol=1e-6)
        # diffusers' own save writes the same tensors under the same keys
        in_diffusers.save_lora_adapter(tmp_path / "diffusers", adapter_name="fx")
        written = load_file(tmp_path / "diffusers" / "pytorch_lora_weights.safetensors")
        tensors = saved_tensors(tmp_path / "fx")
        assert set(written) == set(tensors)
        for key, value in written.items():
            assert torch.equal(value, tensors[key]), key
        # and fxpeft loads its own file back as a second adapter (the captured graph is reused)
        back = copy.deepcopy(gm)
        back.load_adapter(tmp_path / "fx", "back")
        back.set_adapter("back")
        torch.testing.assert_close(run(back), expected, rtol=1e-5, atol=1e-6)


def test_merge_for_deployment(lora):
    base, reference, gm = lora
    with torch.no_grad():
        expected = run(reference)
        merged = fxpeft.merge_and_unload(copy.deepcopy(gm))
        assert set(merged.state_dict()) == set(base.state_dict())
        deployed = diffusers.UNet2DConditionModel(**UNET).eval()
        deployed.load_state_dict(merged.state_dict(), strict=True)
        torch.testing.assert_close(run(deployed), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(run(copy.deepcopy(reference).merge_and_unload()), expected, rtol=1e-4, atol=1e-5)


METHODS = {  # the LyCORIS and orthogonal methods diffusion users train, on the same attention and conv layers
    "loha": (fxpeft.LoHaConfig, peft.LoHaConfig, dict(r=2, alpha=4, init_weights=False)),
    "lokr": (fxpeft.LoKrConfig, peft.LoKrConfig, dict(r=2, alpha=4, init_weights=False)),
    "oft": (fxpeft.OFTConfig, peft.OFTConfig, dict(r=0, oft_block_size=2, init_weights=False)),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_loha_lokr_oft_on_the_unet_equal_peft(method, tmp_path):
    """Outputs and saved tensors equal PEFT's. OFT's Conv2d is compared with PEFT's merged model:
    fxpeft computes that formula unmerged too (PEFT's unmerged OFT conv differs; README's method
    table). diffusers loads LoKr files (its ``load_lora_adapter`` detects ``lokr_`` keys); it has no
    LoHa or OFT loader."""
    fx_type, peft_type, kwargs = METHODS[method]
    base = unet()
    kwargs = dict(kwargs, target_modules=TARGETS)
    reference = peft.get_peft_model(copy.deepcopy(base), peft_type(**kwargs)).eval()
    gm = fxpeft.transform(copy.deepcopy(base), fx_type(**kwargs), example_inputs=inputs()).eval()
    ours = dict(gm.named_parameters())
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if p.requires_grad}
    assert {n for n, p in ours.items() if p.requires_grad} == set(theirs)
    with torch.no_grad():
        for name, param in theirs.items():
            ours[name].copy_(param)
        expected = run(copy.deepcopy(reference).merge_and_unload()) if method == "oft" else run(reference)
        torch.testing.assert_close(run(gm), expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(run(gm), run(base))
        fxpeft.save_pretrained(gm, tmp_path / "fx")
        reference.save_pretrained(tmp_path / "peft")
        assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
        torch.testing.assert_close(run(fxpeft.merge_and_unload(gm)), expected, rtol=1e-4, atol=1e-5)
        if method == "lokr":
            torch.testing.assert_close(run(load_in_diffusers(base, tmp_path / "fx")), run(reference), rtol=1e-4, atol=1e-5)


def test_dit_lora_equals_peft_once_its_label_dropout_is_off(tmp_path):
    """A DiT (diffusers' DiTTransformer2DModel): LoRA on attention, the feed-forward and the patch
    embedding conv. Its class-label dropout (``class_dropout_prob=0.1``) runs only in training, in a
    Python branch: fxpeft captures in train mode, so the draw would be baked into eval calls too
    (the transform warns, see the next test); with it off, outputs, the saved file and the merged
    model equal PEFT."""
    torch.manual_seed(0)
    dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=4,
                                          num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    for block in dit.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    example = (torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.tensor([1, 2]))
    kwargs = dict(r=2, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj",
                                                     "pos_embed.proj"], init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(dit), peft.LoraConfig(**kwargs)).eval()
    gm = fxpeft.transform(copy.deepcopy(dit), fxpeft.LoraConfig(**kwargs), example_inputs=example).eval()
    copy_adapter_weights(reference, gm)
    assert fx_adapted_paths(gm) == adapted_paths(reference)
    with torch.no_grad():
        expected = reference(*example).sample
        torch.testing.assert_close(gm(*example).sample, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, dit(*example).sample)
        fxpeft.save_pretrained(gm, tmp_path)
        reference.save_pretrained(tmp_path / "peft")
        assert_same_saved_tensors(tmp_path / "peft", tmp_path)
        assert not hasattr(dit, "load_lora_adapter")  # diffusers has no LoRA loader for this class (README)
        merged = fxpeft.merge_and_unload(gm)
        deployed = copy.deepcopy(dit)
        deployed.load_state_dict(merged.state_dict(), strict=True)
        torch.testing.assert_close(deployed(*example).sample, expected, rtol=1e-4, atol=1e-5)


class LabelDropout(torch.nn.Module):
    """A training-only random branch outside dropout, as diffusers' LabelEmbedding has."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(11, 4)

    def forward(self, labels):
        if self.training:
            labels = torch.where(torch.rand(labels.shape) < 0.1, 10, labels)
        return self.table(labels)


class Labelled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = LabelDropout()
        self.head = torch.nn.Linear(4, 2)

    def forward(self, labels):
        return self.head(self.embed(labels))


@pytest.mark.parametrize("example", [None, (torch.tensor([1, 2]),)], ids=["symbolic_trace", "export"])
def test_random_draws_outside_dropout_are_named_in_a_warning(example):
    with pytest.warns(UserWarning, match=r"random numbers outside dropout, in embed\b.*dropout probability to 0"):
        fxpeft.transform(Labelled(), fxpeft.LoraConfig(r=2, target_modules=["head"]), example_inputs=example)
