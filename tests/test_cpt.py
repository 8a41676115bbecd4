"""CPT (context-aware prompt tuning): against PEFT's CPT and the method's written formula."""
from __future__ import annotations

import copy
import dataclasses
import json

import peft
import pytest
import torch

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors, switched_outputs

# two in-context examples (format 1/5, input 2/6, output template 3/7, label 4/8), as CPT's paper lays them out
CONTEXT = dict(cpt_token_ids=[11, 12, 13, 14, 15, 16, 17, 18, 19, 20],
               cpt_tokens_type_mask=[1, 2, 2, 3, 4, 5, 6, 7, 8, 8])
KWARGS = dict(task_type="CAUSAL_LM", opt_weighted_loss_type="decay", opt_loss_decay_factor=0.8,
              opt_projection_epsilon=0.2, opt_projection_format_epsilon=0.05, **CONTEXT)
QUERY_TYPES = torch.tensor([[0, 0, 1, 2, 2, 3, 4], [1, 2, 3, 4, 1, 2, 4]])  # the call's own examples; 0: padding


def _pair(name, **extra):
    """PEFT's CPT model and fxpeft's on the same base, both fresh (their init is deterministic)."""
    model = models.HF_MODELS[name]().eval()
    kwargs = dict(KWARGS, **extra)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.CPTConfig(**kwargs)).eval()
    return model, reference, fxpeft.transform(model, fxpeft.CPTConfig(**kwargs)).eval()


def _perturb(reference, gm, seed=0):
    """The same random change in both (large rows: the projection clips them)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        delta = torch.randn_like(gm.prompt_encoder.default.delta_embedding.weight) * 0.3
        gm.prompt_encoder.default.delta_embedding.weight.copy_(delta)
        reference.prompt_encoder.default.delta_embedding.weight.copy_(delta)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request):
    return (request.param, *_pair(request.param))


def test_config_fields_defaults_and_peft_errors():
    ours, theirs = fxpeft.CPTConfig(task_type="CAUSAL_LM"), peft.CPTConfig(task_type="CAUSAL_LM")
    for field in dataclasses.fields(ours):
        if field.name not in ("token_dim", "num_layers", "num_attention_heads", "base_model_name_or_path",
                              "modules_to_save", "revision"):
            assert getattr(ours, field.name) == getattr(theirs, field.name), field.name
    config = fxpeft.CPTConfig(task_type="CAUSAL_LM", num_virtual_tokens=9, cpt_token_ids=[3, 4, 5])
    assert (config.num_virtual_tokens, config.cpt_mask, config.cpt_tokens_type_mask) == (3, [1, 1, 1], [1, 1, 1])
    for kwargs, rule in [(dict(task_type="SEQ_CLS"), "only supports task_type = CAUSAL_LM"),
                         (dict(), "only supports task_type = CAUSAL_LM"),
                         (dict(task_type="CAUSAL_LM", cpt_token_ids=[1, 2], cpt_mask=[1]), "must have the same length"),
                         (dict(task_type="CAUSAL_LM", cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1, 2, 3]),
                          "must have the same length")]:
        for config_type in (fxpeft.CPTConfig, peft.CPTConfig):
            with pytest.raises(ValueError, match=rule):
                config_type(**kwargs)


def test_outputs_and_weighted_loss_equal_peft(pair):
    name, model, reference, gm = pair
    _perturb(reference, gm)
    inputs = models.hf_inputs(name, batch=2, seq=7)
    labels = models.hf_labels(name, inputs)
    types = QUERY_TYPES.clone()
    with torch.no_grad():
        base = model(**inputs).logits
        for call in ({}, {"labels": labels}, {"labels": labels, "input_type_mask": types}):
            expected = reference(**inputs, **{k: v.clone() for k, v in call.items()})  # PEFT edits the mask in place
            got = gm(**inputs, **call)
            assert got.logits.shape == (2, 10 + 7, base.shape[-1])  # the context's positions are in the output
            torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
            if call:
                assert torch.isfinite(got.loss)
                torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
            else:
                assert got.loss is None
    assert torch.equal(types, QUERY_TYPES)  # the caller's mask is left alone
    assert (got.logits[:, -7:] - base).abs().max() > 1e-3  # the context acts
    with torch.no_grad(), fxpeft.disable_adapters(gm):  # disabled: the base model, its own loss
        plain = gm(**inputs, labels=labels)
        torch.testing.assert_close(plain.loss, model(**inputs, labels=labels).loss)


def test_loss_is_the_written_formula():
    """Labels only where the type is a positive multiple of 4; later examples weigh more (decay)."""
    _, _, gm = _pair("llama", cpt_token_ids=[11, 12], cpt_tokens_type_mask=[1, 4], opt_loss_decay_factor=0.5)
    ids = torch.tensor([[21, 22, 23, 24, 25]])
    labels = torch.tensor([[31, 32, 33, 34, 35]])
    types = torch.tensor([[1, 4, 1, 4, 4]])  # shifted past the context's types: 5, 8, 5, 8, 8
    with torch.no_grad():
        got = gm(input_ids=ids, labels=labels, input_type_mask=types)
    logp = got.logits.log_softmax(-1)[0]
    # positions (in the 7-long sequence) holding labels: 1 (type 4, context label 12), 3 and 5, 6 (type 8)
    terms = [(-logp[0, 12], 0.5), (-logp[2, 32], 1.0), (-logp[4, 34], 1.0), (-logp[5, 35], 1.0)]
    torch.testing.assert_close(got.loss, torch.stack([t * w for t, w in terms]).mean())
    gm.peft_config["default"].opt_weighted_loss_type = "none"
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids, labels=labels, input_type_mask=types).loss,
                                   torch.stack([t for t, _ in terms]).mean())


def test_training_steps_equal_peft_with_projection_and_frozen_label_rows():
    _, reference, gm = _pair("llama")
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {
        n.removeprefix("base_model.") for n, p in reference.named_parameters() if p.requires_grad}
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    _perturb(reference, gm, seed=1)
    start = gm.prompt_encoder.default.delta_embedding.weight.detach().clone()
    inputs = models.hf_inputs("llama", batch=2, seq=7)
    labels = models.hf_labels("llama", inputs)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05)
                  for m in (reference, gm)]
    gm.train(), reference.train()
    for _ in range(3):
        losses = []
        for model, optimizer in zip((reference, gm), optimizers):
            loss = model(**inputs, labels=labels, input_type_mask=QUERY_TYPES.clone()).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    theirs = reference.prompt_encoder.default.delta_embedding.weight
    ours = gm.prompt_encoder.default.delta_embedding.weight
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    types = torch.tensor(CONTEXT["cpt_tokens_type_mask"])
    labels_rows = types % 4 == 0
    # label rows get no gradient: only projected (to norm 1e-10) and decayed, their direction kept
    unit = lambda rows: rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)  # noqa: E731
    direction = (unit(ours.detach()) * unit(start)).sum(1)
    assert bool((direction[labels_rows] > 1 - 1e-5).all()) and bool((direction[~labels_rows] < 0.999).all())
    from fxpeft.passes.prompt import prompt_embeddings
    saved = prompt_embeddings(gm, "default")["prompt_embeddings"]
    torch.testing.assert_close(saved, reference.get_prompt_embedding_to_save("default"), rtol=1e-5, atol=1e-5)
    norms = torch.linalg.vector_norm(ours, dim=1)  # projected on the forward above: within ε
    eps = torch.where(types % 4 == 2, 0.2, 0.05) * (gm.peft_config["default"].token_dim / 2048) ** 0.5
    assert bool((norms[~labels_rows] <= eps[~labels_rows] * (1 + 1e-5)).all())
    assert bool((norms[~labels_rows] >= eps[~labels_rows] * (1 - 1e-4)).all())  # clipped, not below


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_checkpoints_both_ways_and_generation(name, tmp_path):
    model, reference, gm = _pair(name)
    _perturb(reference, gm)
    inputs = models.hf_inputs(name, batch=2, seq=7)
    labels = models.hf_labels(name, inputs)
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    saved = json.loads((tmp_path / "fx" / "adapter_config.json").read_text())
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("peft_type", "cpt_token_ids", "cpt_tokens_type_mask", "cpt_mask", "num_virtual_tokens", "token_dim",
                "opt_weighted_loss_type", "opt_loss_decay_factor", "opt_projection_epsilon"):
        assert saved[key] == theirs[key], key

    loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    call = dict(inputs, labels=labels)
    with torch.no_grad():
        expected = reference(**{k: v.clone() for k, v in call.items()}, input_type_mask=QUERY_TYPES.clone())
        for got in (loaded(**call, input_type_mask=QUERY_TYPES), back(**call, input_type_mask=QUERY_TYPES.clone())):
            torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())

    with pytest.raises(ValueError, match="trainable"):  # PEFT's rule for every prompt-learning checkpoint
        peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"), is_trainable=True)
    fresh = models.HF_MODELS[name]()
    with pytest.raises(ValueError, match="inference only"):
        fxpeft.from_pretrained(fresh, str(tmp_path / "peft"), is_trainable=True)
    assert all(p.requires_grad for p in fresh.parameters())

    # generation: PEFT 0.21.2's generate drifts after the first step for prompt methods on transformers 5.24
    # (tests/test_generate.py): greedy decoding over PEFT's forward without a cache is the oracle
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(4):
            step = reference(input_ids=ids, attention_mask=mask).logits[:, -1]
            ids, mask = torch.cat([ids, step.argmax(-1, keepdim=True)], 1), torch.cat([mask, mask[:, -1:]], 1)
    for generator in (gm, loaded):
        got = generator.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(got, ids)


def test_several_cpt_adapters_switch_like_peft_and_bad_input_leaves_the_model_alone():
    """Several CPT adapters (other contexts), one acting, as PEFT's add_adapter / set_adapter."""
    model, reference, gm = _pair("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = dict(KWARGS, cpt_token_ids=[21, 22, 23, 24], cpt_tokens_type_mask=[1, 2, 3, 4])
    reference.add_adapter("other", peft.CPTConfig(**other))
    gm.add_adapter("other", fxpeft.CPTConfig(**other))
    _perturb(reference, gm)
    inputs = models.hf_inputs("llama", batch=2, seq=7)
    outputs = switched_outputs(reference, gm, inputs, ("default", "other", "default"))
    assert outputs["default"].shape != outputs["other"].shape
    with pytest.raises(ValueError, match="one at a time"):
        gm.set_adapter(["default", "other"])
    gm.add_adapter("embedding", fxpeft.CPTConfig(**other))  # named like its frozen container: it still trains
    assert [n for n, p in gm.named_parameters() if p.requires_grad and ".embedding." in n] == [
        "prompt_encoder.embedding.delta_embedding.weight"]
    with pytest.raises(ValueError, match="different peft types"):
        fxpeft.add_adapter(fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["q_proj"])),
                           fxpeft.CPTConfig(**KWARGS), "cpt")
    with pytest.raises(ValueError, match="cpt_token_ids.*must have the same length"):
        fxpeft.transform(models.llama(), fxpeft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[1], cpt_mask=[1, 1]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_training_step_matches_eager(_fresh_dynamo):
    """The projection, the gradient mask and the weighted loss compile whole (fullgraph)."""
    _, _, gm = _pair("llama")
    compiled = torch.compile(gm, fullgraph=True, dynamic=False, backend=models.COMPILE_BACKEND)
    inputs = models.hf_inputs("llama", batch=2, seq=7)
    call = dict(inputs, labels=models.hf_labels("llama", inputs), input_type_mask=QUERY_TYPES)
    delta = gm.prompt_encoder.default.delta_embedding.weight
    results = []
    for module in (gm, compiled):
        with torch.no_grad():
            delta.copy_(torch.randn(delta.shape, generator=torch.Generator().manual_seed(0)))
        loss = module(**call).loss
        loss.backward()
        results.append((loss.detach(), delta.detach().clone(), delta.grad.clone()))
        delta.grad = None
    for eager, compiled_result in zip(*results):
        torch.testing.assert_close(compiled_result, eager, rtol=1e-5, atol=1e-6)
    assert results[0][2].abs().sum() > 0
