"""Image classifiers end to end, against the real PEFT package: a tiny ViT and a tiny ConvNeXt
fine-tuned with LoRA and a trained head (``modules_to_save``) — outputs, training losses, the saved
adapter (PEFT loads it), and the merged model for deployment."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models
from peft_oracle import adapted_paths, assert_same_saved_tensors, copy_adapter_weights, fx_adapted_paths


def convnext():
    from transformers import ConvNextConfig, ConvNextForImageClassification
    return ConvNextForImageClassification(ConvNextConfig(num_channels=3, patch_size=2, hidden_sizes=[8, 16],
                                                         depths=[1, 1], num_stages=2, num_labels=3, image_size=16))


# The configs PEFT's image-classification guide uses: LoRA on the attention (ViT) or the pointwise
# and patch layers (ConvNeXt: Linear and Conv2d sites), the new head trained in full.
CASES = {
    "vit": (models.vit, dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])),
    "convnext": (convnext, dict(r=2, lora_alpha=4, target_modules=["pwconv1", "pwconv2", "patch_embeddings"],
                                modules_to_save=["classifier"])),
}


def pixels(seed: int = 0, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 3, (batch,), generator=g)


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    """(base model, PEFT's model, fxpeft's module, config kwargs): both adapters hold PEFT's draws (B
    made non-zero so that the adapters act) and the same head copy."""
    build, kwargs = CASES[request.param]
    torch.manual_seed(0)
    model = build().eval()
    kwargs = dict(kwargs, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    gm = fxpeft.transform(copy.deepcopy(model), fxpeft.LoraConfig(**kwargs))
    copy_adapter_weights(reference, gm)
    return model, reference.eval(), gm.eval(), kwargs


def test_sites_outputs_and_counts_equal_peft(case):
    model, reference, gm, _ = case
    assert fx_adapted_paths(gm) == adapted_paths(reference)
    assert fxpeft.trainable_parameters(gm) == tuple(reference.get_nb_trainable_parameters())
    x, _ = pixels()
    with torch.no_grad():
        torch.testing.assert_close(gm(pixel_values=x).logits, reference(pixel_values=x).logits, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(gm(pixel_values=x).logits, model(pixel_values=x).logits)


def test_training_saving_and_merging_equal_peft(case, tmp_path):
    """A few AdamW steps with labels (the models' own loss): same losses, the head copy trained and
    the base head untouched; the saved adapter is PEFT's file and PEFT loads it; the merged model
    is the original class with the trained head, loading strict."""
    model, reference, gm, kwargs = case
    reference, gm = copy.deepcopy(reference).train(), copy.deepcopy(gm).train()
    losses = []
    for module in (reference, gm):
        opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
        losses.append([])
        for step in range(3):
            x, labels = pixels(step)
            loss = module(pixel_values=x, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[-1].append(loss.item())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    assert losses[1][-1] != losses[1][0]
    assert torch.equal(gm.classifier.weight, model.classifier.weight)  # the base head stays frozen
    assert not torch.equal(gm.classifier.modules_to_save.default.weight, model.classifier.weight)

    reference.eval(), gm.eval()
    reference.save_pretrained(tmp_path / "peft")
    gm.save_pretrained(tmp_path / "fx")
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "fx").eval()
    x, _ = pixels(9)
    with torch.no_grad():
        expected = reference(pixel_values=x).logits
        torch.testing.assert_close(loaded(pixel_values=x).logits, expected, rtol=1e-5, atol=1e-6)
        merged = fxpeft.merge_and_unload(gm)
        deployed = type(model)(model.config).eval()
        deployed.load_state_dict(merged.state_dict(), strict=True)
        torch.testing.assert_close(deployed(pixel_values=x).logits, expected, rtol=1e-4, atol=1e-5)


def test_grouped_conv_rank_not_divisible_is_refused_as_peft_does():
    """ConvNeXt's depthwise conv (groups = channels): PEFT needs the rank divisible by the groups;
    fxpeft says so, naming the layer, and leaves the model as it was."""
    model = convnext()
    kwargs = dict(r=2, target_modules=["dwconv"])
    with pytest.raises(ValueError, match="divisible by groups"):
        peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"stages\.0\.layers\.0\.dwconv.*groups=8 and rank 2.*divisible by groups"):
        fxpeft.transform(model, fxpeft.LoraConfig(**kwargs))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
