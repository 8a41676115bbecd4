"""Poly: against PEFT (outputs, checkpoints both ways, init and a training step with the same seed, generate,
several adapters) and its formula; ``task_ids`` reaches the block graphs as data."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors

TASK_IDS = torch.tensor([0, 2])
TASKS = {"llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}
SIZES = dict(r=4, n_tasks=3, n_skills=2, n_splits=2, init_weights=False)  # B drawn: the adapter acts from the start


def _pair(name, seed=0, **extra):
    """(base model, PEFT model, fxpeft module) made with the same seed: PEFT's init draws."""
    model = models.HF_MODELS[name]().eval()
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.PolyConfig(task_type=TASKS[name], **SIZES, **extra))
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, fxpeft.PolyConfig(task_type=TASKS[name], **SIZES, **extra))
    with torch.no_grad():  # routings far from uniform, so that tasks differ
        for module in reference.modules():
            if hasattr(module, "module_logits"):
                module.module_logits.normal_(0, 2)
    return model, reference.eval(), gm.eval()


def _call(name, **extra):
    inputs = models.hf_inputs(name, batch=2, seq=6)
    return dict(inputs, labels=models.hf_labels(name, inputs), **extra)


@pytest.fixture(scope="module", params=list(TASKS))
def pair(request, tmp_path_factory):
    name = request.param
    model, reference, fresh = _pair(name)
    folder = tmp_path_factory.mktemp(f"poly-{name}")
    reference.save_pretrained(folder / "peft")
    return name, model, reference, fresh, fxpeft.from_pretrained(model, str(folder / "peft")), folder


def test_same_seed_gives_peft_s_init(pair):
    name, _, reference, fresh, _, _ = pair
    theirs = {k.removeprefix("base_model.model."): v for k, v in reference.state_dict().items()}
    ours = {k: v for k, v in fresh.state_dict().items() if "poly_" in k}
    assert ours and all(torch.equal(v, theirs[k]) or "module_logits" in k for k, v in ours.items())  # logits: perturbed
    assert fxpeft.trainable_parameters(fresh) == reference.get_nb_trainable_parameters()


def test_peft_checkpoint_loads_with_equal_outputs_and_losses(pair):
    name, model, reference, _, gm, _ = pair
    call = _call(name, task_ids=TASK_IDS)
    with torch.no_grad():
        expected, got = reference(**call), gm(**call)
        other = gm(**dict(call, task_ids=torch.tensor([1, 1])))
        base = model(**{k: v for k, v in call.items() if k != "task_ids"})
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert (got.logits - base.logits).abs().max() > 1e-3  # the adapter acts
    assert (got.logits[1] - other.logits[1]).abs().max() > 1e-4  # the task routes it


def test_saved_checkpoint_is_peft_s_and_peft_loads_it(pair, tmp_path):
    name, model, _, _, gm, folder = pair
    fxpeft.save_pretrained(gm, str(tmp_path))
    assert_same_saved_tensors(folder / "peft", tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    call = _call(name, task_ids=TASK_IDS)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**call).logits, gm(**call).logits, rtol=1e-5, atol=1e-5)


def test_generate_equals_peft_s(pair):
    name, model, reference, _, gm, _ = pair
    inputs = models.hf_inputs(name, batch=2, seq=6)
    inputs.pop("decoder_input_ids", None)
    kw = dict(max_new_tokens=5, do_sample=False)
    expected = reference.generate(**inputs, task_ids=TASK_IDS, **kw)
    assert torch.equal(gm.generate(**inputs, task_ids=TASK_IDS, **kw), expected)
    if name == "llama":
        assert not torch.equal(expected, model.generate(**inputs, **kw))  # the adapter changes the tokens
        # beams: transformers repeats task_ids per beam like any per-sequence input (PEFT's hooks do not)
        beams = gm.generate(**inputs, task_ids=TASK_IDS, num_beams=3, **kw)
        alone = gm.generate(**{k: v[1:] for k, v in inputs.items()}, task_ids=TASK_IDS[1:], num_beams=3, **kw)
        assert torch.equal(beams[1], alone[0])
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        gm.generate(**inputs, **kw)


def test_training_steps_with_the_same_seed_match_peft():
    """Training routes by a relaxed-Bernoulli sample: with the same seed, the same draws in the same order."""
    _, reference, gm = _pair("llama")
    gm.load_state_dict(reference.base_model.model.state_dict(), strict=False)  # the perturbed logits too
    reference.train(), gm.train()
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.02) for m in (reference, gm)]
    for step in range(3):
        call = _call("llama", task_ids=torch.tensor([step % 3, 2]))
        losses = []
        for module, optimizer in zip((reference, gm), optimizers):
            torch.manual_seed(step)
            loss = module(**call).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    theirs = {k.removeprefix("base_model.model."): v for k, v in reference.state_dict().items()}
    for key, value in gm.state_dict().items():
        if "poly_" in key:
            torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    first = gm(**call).loss
    torch.manual_seed(1)
    assert gm(**call).loss != first  # training routes by a sample


def test_formula_on_a_custom_model():
    """Δ(x_b) = x_b A_b B_b / r, A_b / B_b the task's normalised sigmoid-weighted sums of the skills per split."""
    model = models.MLP().eval()
    torch.manual_seed(0)
    gm = fxpeft.transform(model, fxpeft.PolyConfig(target_modules=["fc1"], **SIZES)).eval()
    x = torch.randn(2, 12)
    a, b = gm.fc1.poly_lora_A.default, gm.fc1.poly_lora_B.default  # (2 splits, 2 skills, in/2, r), (.., r, out/2)
    logits = gm.fc1.poly_router.default.module_logits
    with torch.no_grad():
        logits.normal_(0, 2)
        expected = []
        for row, task in enumerate(TASK_IDS.tolist()):
            weights = torch.sigmoid(logits[task]).view(2, 2)
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-12)
            a_task = torch.cat([sum(weights[q, s] * a[q, s] for s in range(2)) for q in range(2)])  # (in, r)
            b_task = torch.cat([sum(weights[q, s] * b[q, s] for s in range(2)) for q in range(2)], dim=1)  # (r, out)
            expected.append(model.fc2(model.act(model.fc1(x[row]) + x[row] @ a_task @ b_task / 4)))
        torch.testing.assert_close(gm(x, task_ids=TASK_IDS), torch.stack(expected))


def test_a_custom_forward_taking_kwargs():
    """task_ids is a keyword input of the graph, placed before a symbolic-traced forward's **kwargs (after
    it, the graph's code did not compile: SyntaxError)."""
    class KeywordMLP(models.MLP):
        def forward(self, x, **kwargs):
            return super().forward(x)

    model = KeywordMLP().eval()
    torch.manual_seed(0)
    gm = fxpeft.transform(copy.deepcopy(model), fxpeft.PolyConfig(target_modules=["fc1"], **SIZES)).eval()
    x = torch.randn(2, 12)
    with torch.no_grad():
        gm.fc1.poly_router.default.module_logits.normal_(0, 2)
        mine = gm(x, task_ids=TASK_IDS)
        plain = models.MLP().eval()
        plain.load_state_dict(model.state_dict())
        alike = fxpeft.transform(plain, fxpeft.PolyConfig(target_modules=["fc1"], **SIZES)).eval()
        alike.load_state_dict(gm.state_dict())
        torch.testing.assert_close(mine, alike(x, task_ids=TASK_IDS))
        assert (mine - model(x)).abs().max() > 1e-4


def test_several_adapters_and_switching_match_peft(tmp_path):
    model = models.llama().eval()
    folders = []
    for seed in (1, 2):
        _, reference, _ = _pair("llama", seed=seed)
        reference.save_pretrained(tmp_path / str(seed))
        folders.append(str(tmp_path / str(seed)))
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), folders[0], adapter_name="one").eval()
    reference.load_adapter(folders[1], adapter_name="two")
    gm = fxpeft.from_pretrained(model, folders[0], adapter_name="one")
    gm.load_adapter(folders[1], adapter_name="two")
    call = _call("llama", task_ids=TASK_IDS)
    outputs = {}
    with torch.no_grad():
        for adapter in ("one", "two", "one"):
            reference.set_adapter(adapter)
            gm.set_adapter(adapter)
            outputs[adapter] = gm(**call).logits
            torch.testing.assert_close(outputs[adapter], reference(**call).logits, rtol=1e-5, atol=1e-5)
        assert (outputs["one"] - outputs["two"]).abs().max() > 1e-3
        mixed = gm(**call, adapter_names=["two", "__base__"]).logits  # per sample, fxpeft's mixed batches
        torch.testing.assert_close(mixed[0], outputs["two"][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[1], model(**{k: v for k, v in call.items() if k != "task_ids"}).logits[1],
                                   rtol=1e-5, atol=1e-5)
        with fxpeft.disable_adapters(gm):  # the base model; task_ids accepted, as PEFT does, and not needed
            plain = {k: v for k, v in call.items() if k != "task_ids"}
            torch.testing.assert_close(gm(**call).logits, model(**plain).logits)
            torch.testing.assert_close(gm(**plain).logits, model(**plain).logits)


def test_bad_input_gets_clear_errors():
    for bad, match in ((dict(r=0), "`r` should be a positive integer"), (dict(poly_type="mhr"), "Unsupported poly_type"),
                       (dict(n_skills=0), "n_skills must be a positive integer")):
        with pytest.raises(ValueError, match=match):
            fxpeft.PolyConfig(**bad)
    model = models.llama().eval()
    with pytest.raises(ValueError, match="n_splits=3 must divide"):
        fxpeft.transform(model, fxpeft.PolyConfig(n_splits=3))
    with pytest.raises(TypeError, match="only the following modules are supported: `torch.nn.Linear`"):
        fxpeft.transform(models.gpt2(), fxpeft.PolyConfig(target_modules=["c_attn"]))
    assert all(p.requires_grad for p in model.parameters())
    gm = fxpeft.transform(model, fxpeft.PolyConfig(n_tasks=3))
    call = _call("llama")
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        gm(**call)
    with pytest.raises(ValueError, match="Only 3 tasks available. Found task id = 3"):
        gm(**call, task_ids=torch.tensor([0, 3]))
    for wrong in (torch.tensor([2]), torch.tensor([2, 0, 1])):  # one per sample (the first task's routing was used)
        with pytest.raises(ValueError, match="task_ids has .* entries for a batch of 2 samples"):
            gm(**call, task_ids=wrong)
    with pytest.raises(ValueError, match="cannot be merged"):
        fxpeft.merge_adapter(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(**call, task_ids=TASK_IDS).logits, model(**call).logits)  # B = 0: unchanged


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_blocks_read_task_ids_as_data_and_train_checkpointed(_fresh_dynamo):
    """task_ids reaches each block's graph as an input: other tasks do not recompile; gradient checkpointing
    (which re-runs a block) gives the same gradients."""
    from torch._dynamo.testing import CompileCounterWithBackend

    _, reference, gm = _pair("llama")
    assert gm._fxpeft_block_paths  # the sites are in block graphs
    counter = CompileCounterWithBackend(models.COMPILE_BACKEND)
    compiled = torch.compile(gm, fullgraph=True, dynamic=True, backend=counter)
    call = _call("llama")
    with torch.no_grad():
        for task_ids in ([0, 2], [1, 1], [2, 0]):
            task_ids = torch.tensor(task_ids)
            torch.testing.assert_close(compiled(**call, task_ids=task_ids).logits,
                                       gm(**call, task_ids=task_ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1
    grads = []
    for checkpointing in (False, True):
        if checkpointing:
            gm.gradient_checkpointing_enable()
        gm.train()
        torch.manual_seed(0)
        gm(**call, task_ids=TASK_IDS).loss.backward()
        grads.append({n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None})
        gm.zero_grad()
    assert grads[0] and grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-5, atol=1e-6)


def test_compiled_generate_reads_task_ids_as_data(_fresh_dynamo):
    """generate with compile_config: other task vectors run the same compiled step (no recompile), with the
    eager tokens."""
    torch.manual_seed(0)
    gm = fxpeft.transform(models.llama().eval(), fxpeft.PolyConfig(**SIZES)).eval()
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "module_logits" in name:
                param.normal_(0, 2)
    models.assert_compiled_generate_reads_task_ids(gm)
