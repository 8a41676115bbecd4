"""X-LoRA against PEFT: eval outputs and scalings for the config's options, checkpoints both ways (PEFT's
lossy classifier file included), classifier training steps, config warnings and errors."""
from __future__ import annotations

import warnings

import peft
import pytest
import torch

import fxpeft
import models

# PEFT's X-LoRA loads an expert's keys as "model.<...>" (it strips prefixes up to the first "model."): it works
# for models whose body sits under .model (Llama, Qwen2), not GPT-2 (transformer.h...); OPT fails in PEFT too
# (its fc1 sees (batch·seq, features) inputs, the scalings (batch, seq, ...))
TASK = {"llama": "CAUSAL_LM", "qwen2": "CAUSAL_LM"}
EXPERT_TARGETS = {"llama": (["q_proj", "v_proj"], ["v_proj", "down_proj"]), "qwen2": (["q_proj", "v_proj"], ["v_proj", "up_proj"])}


def _base(name):
    torch.manual_seed(0)
    model = {"llama": models.llama, "qwen2": models.qwen2}[name]()
    model.config.use_cache = False  # PEFT's X-LoRA refuses a model that caches
    return model.eval()


def _save_experts(name, root, **lora):
    """Two PEFT LoRA experts (drawn B: they act) on different sites, saved by PEFT; named "0", "1" (PEFT's
    X-LoRA runs only with experts named so: it loads expert i as adapter str(i) but activates the names given)."""
    paths = {}
    for i, targets in enumerate(EXPERT_TARGETS[name]):
        torch.manual_seed(10 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expert = peft.get_peft_model(_base(name), peft.LoraConfig(
                r=4, lora_alpha=8 + 4 * i, target_modules=targets, init_lora_weights=False, **lora))
        expert.save_pretrained(root / str(i))
        paths[str(i)] = str(root / str(i))
    return paths


@pytest.fixture(scope="module", params=list(TASK))
def experts(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("xlora")
    return request.param, _save_experts(request.param, root), root


def _pair(name, paths, **options):
    """(PEFT's X-LoRA model, fxpeft's) over the same experts, fxpeft's classifier set to PEFT's."""
    config = dict(task_type=TASK[name], hidden_size=32, adapters=paths, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(_base(name), peft.XLoraConfig(**config))
        gm = fxpeft.transform(_base(name), fxpeft.XLoraConfig(**config))
    with torch.no_grad():
        for p in reference.base_model.internal_xlora_classifier.parameters():
            p.normal_(0, 0.5)  # scalings far from uniform, so that the experts' mix matters
    gm.internal_xlora_classifier["default"].load_state_dict(reference.base_model.internal_xlora_classifier.state_dict())
    return reference.eval(), gm.eval()


def _ids(seed=1):
    return torch.randint(0, models.VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


OPTIONS = [dict(), dict(scaling_pass_value=0.5, layerwise_scalings=True, xlora_depth=2, xlora_size=16),
           dict(top_k_lora=1, enable_softmax_topk=True, enable_softmax=False, scaling_pass_value=0.3),
           dict(softmax_temperature=0.5, global_scaling_weight=2.0, xlora_depth=3, xlora_size=8)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_outputs_equal_peft(experts, options):
    name, paths, _ = experts
    reference, gm = _pair(name, paths, **options)
    ids = _ids()
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        plain = _base(name)(input_ids=ids).logits
        got = gm(input_ids=ids).logits
    assert (expected - plain).abs().max() > 1e-2  # the experts act
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_checkpoint_fxpeft_to_peft(experts, tmp_path):
    name, paths, _ = experts
    reference, gm = _pair(name, paths, xlora_depth=2, xlora_size=16)
    gm.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_base(name), str(tmp_path), adapters=paths).eval()
    for ours, theirs in zip(gm.internal_xlora_classifier["default"].parameters(),
                            loaded.base_model.internal_xlora_classifier.parameters()):
        torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    ids = _ids(2)
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids).logits, loaded(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_checkpoint_peft_to_fxpeft(experts, tmp_path):
    """PEFT's file lacks the classifier's layers.0 (its save filter drops keys holding ".0."): fxpeft loads what
    is there, warns, and keeps the rest as initialised, as PEFT's loader does."""
    name, paths, _ = experts
    reference, _ = _pair(name, paths, xlora_depth=2, xlora_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="lacks classifier tensors"):
        gm = fxpeft.from_pretrained(_base(name), str(tmp_path)).eval()
    ours, theirs = gm.internal_xlora_classifier["default"], reference.base_model.internal_xlora_classifier
    torch.testing.assert_close(ours.layers[3].weight, theirs.layers[3].weight, atol=0, rtol=0)
    ours.layers[0].load_state_dict(theirs.layers[0].state_dict())  # what PEFT's file could not hold
    ids = _ids(3)
    with torch.no_grad():
        torch.testing.assert_close(gm(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_training_steps_equal_peft(experts):
    """The classifier trains (experts frozen), through the scalings; the scaling pass gives no gradient."""
    name, paths, _ = experts
    reference, gm = _pair(name, paths, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.0)
    assert [n for n, p in gm.named_parameters() if p.requires_grad] == [
        f"internal_xlora_classifier.default.{n}" for n, _ in reference.base_model.internal_xlora_classifier.named_parameters()]
    reference.train(), gm.train()
    ours = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    theirs = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        ids = _ids(10 + step)
        loss_ours, loss_theirs = gm(input_ids=ids, labels=ids).loss, reference(input_ids=ids, labels=ids).loss
        torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-5, rtol=1e-5)
        for optimizer, loss in ((ours, loss_ours), (theirs, loss_theirs)):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for mine, peft_param in zip(gm.internal_xlora_classifier["default"].parameters(),
                                reference.base_model.internal_xlora_classifier.parameters()):
        torch.testing.assert_close(mine, peft_param, atol=1e-5, rtol=1e-5)


def test_dropouts_in_training_equal_peft(experts, tmp_path):
    """The experts' lora_dropout and the classifier's dropout draw as PEFT's do: same seed, same loss."""
    name = experts[0]
    paths = _save_experts(name, tmp_path, lora_dropout=0.3)
    reference, gm = _pair(name, paths, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.25)
    reference.train(), gm.train()
    ids = _ids(7)
    torch.manual_seed(5)
    expected = reference(input_ids=ids, labels=ids).loss
    torch.manual_seed(5)
    got = gm(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(6)
    assert not torch.allclose(gm(input_ids=ids, labels=ids).loss, got)  # the dropouts act


def test_config_as_peft():
    with pytest.warns(UserWarning, match="hidden_size"):
        config = fxpeft.XLoraConfig(adapters={})
    assert config.hidden_size == 4096
    for kwargs, message in ((dict(enable_softmax_topk=True), "top_k_lora` is not set"),
                            (dict(top_k_lora=0), "must be at least 1")):
        with pytest.warns(UserWarning, match=message):
            fxpeft.XLoraConfig(hidden_size=32, adapters={}, **kwargs)
    with pytest.raises(ValueError, match="X-LoRA depth must be strictly positive"):
        fxpeft.XLoraConfig(hidden_size=32, adapters={}, xlora_depth=0)
    ours = {f for f in fxpeft.XLoraConfig.__dataclass_fields__}
    theirs = {f for f in peft.XLoraConfig.__dataclass_fields__}
    assert {f for f in theirs - ours if f not in ("peft_type", "auto_mapping", "peft_version")} == set()


def test_bad_input_is_refused(experts):
    name, paths, _ = experts
    model = _base(name)
    model.config.use_cache = True
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="use_cache` must be False"):
        fxpeft.transform(model, fxpeft.XLoraConfig(task_type=TASK[name], hidden_size=32, adapters=paths))
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert not any("xlora" in n for n, _ in model.named_modules())
    model.config.use_cache = False
    gm = fxpeft.transform(model, fxpeft.XLoraConfig(task_type=TASK[name], hidden_size=32, adapters=paths))
    with pytest.raises(ValueError, match="X-LoRA takes one adapter per model"):
        gm.add_adapter("other", fxpeft.XLoraConfig(task_type=TASK[name], hidden_size=32, adapters=paths))
    assert list(gm.peft_config) == ["default"] and not any(".other" in n for n, _ in gm.named_modules())
    with pytest.raises(ValueError, match="set hidden_size=32"):
        fxpeft.transform(model, fxpeft.XLoraConfig(task_type=TASK[name], hidden_size=48, adapters=paths))
    with pytest.raises(FileNotFoundError, match="no saved LoRA adapter folder"):
        fxpeft.transform(model, fxpeft.XLoraConfig(task_type=TASK[name], hidden_size=32,
                                                   adapters={"0": str(experts[2] / "missing")}))
    assert not any("xlora" in n for n, _ in model.named_modules())


def test_scalings_pass_is_an_input(experts):
    """Given scalings skip the scaling pass: one-hot scalings on expert i equal expert i alone (PEFT's LoRA)."""
    name, paths, _ = experts
    _, gm = _pair(name, paths)
    ids = _ids(4)
    layers = gm.internal_xlora_classifier["default"].n_layers
    for i, path in paths.items():
        scalings = torch.zeros(2, 7, layers, 2)
        scalings[..., int(i)] = 1.0
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = peft.PeftModel.from_pretrained(_base(name), path).eval()
            torch.testing.assert_close(gm(input_ids=ids, xlora_scalings=scalings).logits, lora(input_ids=ids).logits,
                                       atol=1e-5, rtol=1e-5)


def test_disabled_and_generate(experts):
    """disable_adapter gives the base model; generate without a cache gives PEFT's tokens (PEFT's X-LoRA always
    generates so); with a cache it is refused, naming the fix."""
    name, paths, _ = experts
    reference, gm = _pair(name, paths)
    ids = _ids(5)
    with torch.no_grad():
        with gm.disable_adapter():
            torch.testing.assert_close(gm(input_ids=ids).logits, _base(name)(input_ids=ids).logits)
        expected = reference.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
        got = gm.generate(input_ids=ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="use_cache=False"):
        gm.generate(input_ids=ids, max_new_tokens=2, do_sample=False)


def test_compiles_whole(experts):
    """torch.compile(fullgraph=True): the scaling pass runs before the compiled call (Method.fill_call_inputs),
    whose graph takes the scalings as an input."""
    name, paths, _ = experts
    reference, gm = _pair(name, paths)
    ids = _ids(6)
    with torch.no_grad():
        got = torch.compile(gm, fullgraph=True)(input_ids=ids).logits
        torch.testing.assert_close(got, reference(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
