"""Many adapters loaded, few in use: a call reads only the adapters it uses, matches PEFT, and sees
in-place parameter updates (eager and under torch.compile). Speed lives in
benchmarks/bench_adapters.py (``--loaded``); these tests check what a call touches."""
from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fxpeft
import models
from peft_oracle import lora_pair

LOADED = 30
TARGETS = ["embed", "qkv", "down"]  # embedding and linear sites


def _configs(count=LOADED):
    return {f"t{i}": dict(r=2 + i % 3, lora_alpha=4 + i % 5, target_modules=TARGETS, init_lora_weights=False)
            for i in range(count)}


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    model = models.TinyDecoder().eval()
    reference, gm = lora_pair(model, _configs())
    return model, reference, gm


class _Reads(TorchDispatchMode):
    """The storages every aten op of a call reads (allocation-like ops excluded)."""

    SKIP = {torch.ops.aten.new_zeros.default, torch.ops.aten.new_empty.default, torch.ops.aten.zeros_like.default}

    def __init__(self):
        super().__init__()
        self.pointers = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func not in self.SKIP:
            for arg in torch.utils._pytree.tree_leaves((args, kwargs or {})):
                if isinstance(arg, torch.Tensor):
                    self.pointers.add(arg.untyped_storage().data_ptr())
        return func(*args, **(kwargs or {}))


def _adapters_read(gm, call) -> set[str]:
    owner = {}
    for name, param in gm.named_parameters():
        if ".lora_" in name:
            owner[param.untyped_storage().data_ptr()] = name.rsplit(".", 2)[-2] if name.endswith(".weight") \
                else name.rsplit(".", 1)[-1]
    with torch.no_grad(), _Reads() as reads:
        call()
    return {owner[p] for p in reads.pointers if p in owner}


def test_a_call_reads_only_the_adapters_it_uses(loaded):
    """Failed before: every call stacked all 30 adapters at every site."""
    _model, _reference, gm = loaded
    x = torch.randint(0, models.VOCAB, (2, 5))
    try:
        for active in (["t7"], ["t3", "t20"]):
            fxpeft.set_adapter(gm, active if len(active) > 1 else active[0])
            assert _adapters_read(gm, lambda: gm(x)) == set(active)
        fxpeft.set_adapter(gm, "t7")
        with fxpeft.disable_adapters(gm):
            assert _adapters_read(gm, lambda: gm(x)) == set()
        names = ["t7", "__base__", "t12", "t7"]
        assert _adapters_read(gm, lambda: gm(torch.cat([x, x]), adapter_names=names)) == {"t7", "t12"}
    finally:
        fxpeft.set_adapter(gm, "t0")


def test_a_call_without_autograd_checks_only_the_active_adapters(loaded, monkeypatch):
    """Before a call without autograd the kept stacks are checked against the tensors they copy: those of
    the adapters in the slots, not of every adapter loaded. (Failed before: every loaded adapter's tensors
    were read before each call, which made one active among 30 loaded take 1.96x the time of one loaded
    on the bench model, eager, and 2.08x compiled.)"""
    from fxpeft.passes import lora

    _model, _reference, gm = loaded
    x = torch.randint(0, models.VOCAB, (2, 5))
    read = lora._adapter_tensors
    looked_at = []
    monkeypatch.setattr(lora, "_adapter_tensors", lambda site, name, embedding: looked_at.append(name) or read(
        site, name, embedding))
    try:
        for active in (["t7"], ["t3", "t20"]):
            fxpeft.set_adapter(gm, active if len(active) > 1 else active[0])
            with torch.no_grad():
                gm(x)  # the stacks are built
                looked_at.clear()
                gm(x)  # and checked
            assert set(looked_at) == set(active)
    finally:
        fxpeft.set_adapter(gm, "t0")


def test_thirty_adapters_loaded_match_peft(loaded):
    _model, reference, gm = loaded
    x = torch.randint(0, models.VOCAB, (6, 5))
    try:
        with torch.no_grad():
            for active in (["t0"], ["t29"], ["t4", "t17"], ["t1", "t2", "t28"]):
                reference.base_model.set_adapter(active)
                fxpeft.set_adapter(gm, active if len(active) > 1 else active[0])
                torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
            names = ["t29", "__base__", "t3", "t4", "t29", "t11"]
            torch.testing.assert_close(gm(x, adapter_names=names), reference(x, adapter_names=names),
                                       rtol=1e-5, atol=1e-5)
    finally:
        reference.base_model.set_adapter("t0")
        fxpeft.set_adapter(gm, "t0")


def test_kept_stacks_follow_in_place_updates_and_moves(loaded):
    """Calls without autograd keep a site's stacked adapters between calls (a decode step does not copy
    them again); an in-place write to one of them (a load, an optimizer step) or a dtype change
    rebuilds them: outputs keep matching PEFT's."""
    _model, reference, gm = loaded
    x = torch.randint(0, models.VOCAB, (4, 1))
    names = ["t3", "t7", "__base__", "t3"]
    ours, theirs = dict(gm.named_parameters()), dict(reference.named_parameters())
    key = "blocks.0.qkv.lora_B.t7.weight"
    try:
        with torch.no_grad():
            for scale in (1.0, 3.0):
                theirs["base_model.model." + key].mul_(scale)
                ours[key].mul_(scale)
                torch.testing.assert_close(gm(x, adapter_names=names), reference(x, adapter_names=names),
                                           rtol=1e-5, atol=1e-5)
            gm.double()
            reference.double()
            torch.testing.assert_close(gm(x, adapter_names=names), reference(x, adapter_names=names),
                                       rtol=1e-10, atol=1e-10)
    finally:
        with torch.no_grad():
            theirs["base_model.model." + key].div_(3.0)
            ours[key].div_(3.0)
        gm.float()
        reference.float()


def test_a_fused_optimizer_step_shows_in_the_next_call_without_autograd():
    """Failed before: torch's fused AdamW (Trainer's default) updates parameters in place without
    bumping their version counters, so the stacks kept for calls without autograd stayed as they were
    before the step (an evaluation after training returned the untrained adapters' outputs)."""
    torch.manual_seed(0)
    reference, gm = lora_pair(models.TinyDecoder().eval(), _configs(3))
    x = torch.randint(0, models.VOCAB, (2, 5))
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1, fused=True)
                  for m in (reference, gm)]
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
        for module, optimizer in zip((reference, gm), optimizers):
            module(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)


def test_training_step_matches_peft_and_the_next_call_sees_it():
    """Gradients reach only the active adapter's own parameters (PEFT's names, no stacked copy);
    an optimizer's in-place step shows in the very next call."""
    torch.manual_seed(0)
    model = models.TinyDecoder().eval()
    reference, gm = lora_pair(model, _configs(6))
    reference.base_model.set_adapter("t4")  # PEFT: the active adapter trainable, the others frozen
    fxpeft.set_adapter(gm, "t4")  # fxpeft: trainability unchanged (no recompile): others get no gradient
    x = torch.randint(0, models.VOCAB, (2, 5))
    ours = dict(gm.named_parameters())
    trainable = {k: p for k, p in reference.named_parameters() if p.requires_grad}
    theirs = torch.optim.SGD(trainable.values(), lr=0.5)
    mine = torch.optim.SGD([p for p in gm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        reference(x).square().mean().backward()
        gm(x).square().mean().backward()
        for key, param in trainable.items():
            torch.testing.assert_close(ours[key.removeprefix("base_model.model.")].grad, param.grad,
                                       rtol=1e-5, atol=1e-6)
        others = {n for n, p in gm.named_parameters() if p.grad is not None and ".t4" not in n}
        assert not others
        theirs.step()
        mine.step()
        theirs.zero_grad(set_to_none=True)
        mine.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)


def test_compiled_reads_parameters_as_they_are_and_trains():
    """Under torch.compile the pick is tensor ops on the device: in-place updates show without a recompile,
    mixed batches and switching too; its backward gives the active adapter eager's gradient (eval
    mode: the MLP's own dropout would draw differently)."""
    torch.manual_seed(0)
    model = models.MLP().eval()
    configs = {n: dict(r=r, lora_alpha=4, target_modules=["fc1", "fc2"], init_lora_weights=False)
               for n, r in (("a", 2), ("b", 3), ("c", 4))}
    _reference, gm = lora_pair(model, configs)
    eager = copy.deepcopy(gm)
    x = torch.randn(4, 12)
    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, backend="eager")  # recompiles are dynamo's own (no gradients)
    index = fxpeft.adapter_indices(gm, ["c", "a", "__base__", "c"])
    with torch.no_grad():
        compiled(x)
        compiled(x, adapter_names=index)
    try:
        torch._dynamo.config.error_on_recompile = True
        with torch.no_grad():
            for name in ("b", "c"):
                fxpeft.set_adapter(gm, name)
                fxpeft.set_adapter(eager, name)
                torch.testing.assert_close(compiled(x), eager(x))
            before = compiled(x)
            for module in (gm, eager):  # an optimizer-like in-place step on the active adapter
                module.get_submodule("fc1.lora_B.c").weight.add_(0.5)
            after = compiled(x)
            assert not torch.allclose(before, after)
            torch.testing.assert_close(after, eager(x))
            torch.testing.assert_close(compiled(x, adapter_names=index), eager(x, adapter_names=index))
    finally:
        torch._dynamo.config.error_on_recompile = False
    compiled(x).square().sum().backward()
    eager(x).square().sum().backward()
    grads = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert grads and all(".c." in n for n in grads)
    for name, param in gm.named_parameters():
        if name in grads:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6)
        elif param.grad is not None:  # compiled: the site's other trainable adapters get zeros
            assert not param.grad.any()
    torch._dynamo.reset()


def test_compiled_calls_without_autograd_read_only_the_active_adapters(loaded):
    """Failed before: a compiled call stacked all 30 adapters at every site on every call (its graph took
    every adapter's tensors as inputs). Now the active adapters' stacks are prepared before the call
    (outside the compiled code, kept until an adapter's tensor is written, rebound or replaced) and the
    graph reads only those; switching never recompiles; a module inlined into a caller's compiled code
    (no prepare step) recomputes them and stays right."""
    _model, reference, gm = loaded
    x = torch.randint(0, models.VOCAB, (2, 5))
    inputs = []

    def recording(graph_module, example_inputs):
        inputs.extend(n.name for n in graph_module.graph.nodes if n.op == "placeholder")
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(gm, fullgraph=True, backend=recording)
    outer = torch.compile(lambda ids: gm(ids) * 1.0, fullgraph=True, backend="eager")
    key = "blocks.0.qkv.lora_B.t7.weight"
    original = gm.get_parameter(key)

    def check(active):
        reference.base_model.set_adapter(active)
        expected = reference(x)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(outer(x), expected, rtol=1e-5, atol=1e-5)

    try:
        fxpeft.set_adapter(gm, ["t3", "t20"])  # two slots from here on
        names = ["t29", "__base__", "t3", "t29"]
        index = fxpeft.adapter_indices(gm, names)
        with torch.no_grad():
            check(["t3", "t20"])
            torch.testing.assert_close(compiled(torch.cat([x, x]), adapter_names=index),
                                       reference(torch.cat([x, x]), adapter_names=names), rtol=1e-5, atol=1e-5)
            read = {name for name in inputs if "lora" in name and "_kept_" not in name}  # _fxpeft_lora_kept: the stacks
            assert inputs and not read, sorted(read)[:5]  # the dense and the mixed graph
            torch._dynamo.config.error_on_recompile = True
            for active in (["t7"], ["t1", "t7"], ["t7"]):
                fxpeft.set_adapter(gm, active if len(active) > 1 else active[0])
                check(active)
            ours, theirs = gm.get_parameter(key), reference.get_parameter("base_model.model." + key)
            theirs.mul_(2.0)
            ours.mul_(2.0)  # in place (an optimizer step)
            check(["t7"])
            theirs.mul_(2.0)
            ours.data = ours.data * 2.0  # rebound storage
            check(["t7"])
            theirs.mul_(2.0)
            gm.load_state_dict({key: ours * 2.0}, strict=False, assign=True)  # a new parameter object
            assert gm.get_parameter(key) is not ours
            check(["t7"])
            names = ["t7", "t29", "__base__", "t7"]
            torch.testing.assert_close(compiled(torch.cat([x, x]), adapter_names=fxpeft.adapter_indices(gm, names)),
                                       reference(torch.cat([x, x]), adapter_names=names), rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.config.error_on_recompile = False
        with torch.no_grad():
            reference.get_parameter("base_model.model." + key).div_(8.0)
            gm.load_state_dict({key: gm.get_parameter(key) / 8.0}, strict=False, assign=True)
            gm.get_parameter(key).requires_grad_(original.requires_grad)
        reference.base_model.set_adapter("t0")
        fxpeft.set_adapter(gm, "t0")
        torch._dynamo.reset()


def test_regionally_compiled_blocks_read_the_prepared_stacks():
    """compile_blocks: the eager call prepares the stacks its compiled blocks read (calls without
    autograd), so the blocks' graphs take no adapter tensors either; outputs follow switching; the
    blocks share one compiled graph (each reads its stacks from its own KeptStacks: reached through
    the site's nn.Linear instead, they were specialised per block, one compile each)."""
    torch.manual_seed(0)
    model = models.TinyDecoder().eval()
    _reference, gm = lora_pair(model, _configs(4))
    eager = copy.deepcopy(gm)
    inputs, graphs = [], []

    def recording(graph_module, example_inputs):
        graphs.append(graph_module)
        inputs.extend(n.name for n in graph_module.graph.nodes if n.op == "placeholder")
        return graph_module.forward

    torch._dynamo.reset()
    fxpeft.compile_blocks(gm, backend=recording, fullgraph=True)
    x = torch.randint(0, models.VOCAB, (2, 5))
    with torch.no_grad():
        for active in ("t1", "t3", "t0"):
            fxpeft.set_adapter(gm, active)
            fxpeft.set_adapter(eager, active)
            torch.testing.assert_close(gm(x), eager(x), rtol=1e-5, atol=1e-5)
    read = {name for name in inputs if "lora" in name and "_kept_" not in name}  # _fxpeft_lora_kept: the stacks
    assert inputs and not read, sorted(read)[:5]
    assert len(gm.blocks) > 1 and len(graphs) == 1
    torch._dynamo.reset()


def test_slot_lists_off_the_cpu_are_copied_once():
    """Off the CPU, eager mixed calls put each site's slot lists on the device; the same lists at
    every site and step are copied from the host once (the meta device stands in for a GPU here)."""
    from fxpeft.passes.lora import _device_list

    meta = torch.device("meta")
    first = _device_list([0, 2, 1], meta)
    assert first.device == meta and first.shape == (3,) and first.dtype == torch.long
    assert _device_list([0, 2, 1], meta) is first
    assert _device_list([0, 2, 2], meta) is not first
    assert _device_list([0, 2, 1], torch.device("cpu")).tolist() == [0, 2, 1]


def test_inference_mode_calls_and_index_tensors(loaded):
    """Under torch.inference_mode tensors keep no version counter: the kept stacks, the host copy of
    an index and its range check must not need one (eager dense and mixed calls, an index built there)."""
    _model, reference, gm = loaded
    x = torch.randint(0, models.VOCAB, (4, 3))
    names = ["t2", "__base__", "t9", "t2"]
    try:
        fxpeft.set_adapter(gm, ["t1", "t5"])
        reference.base_model.set_adapter(["t1", "t5"])
        with torch.inference_mode():
            index = fxpeft.adapter_indices(gm, names)
            for _ in range(2):
                torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(gm(x, adapter_names=index), reference(x, adapter_names=names),
                                           rtol=1e-5, atol=1e-5)
            index[1] = 99
            with pytest.raises(ValueError, match="indices outside"):
                gm(x, adapter_names=index)
    finally:
        reference.base_model.set_adapter("t0")
        fxpeft.set_adapter(gm, "t0")


def _python_calls(fn) -> int:
    """Python and builtin calls made by ``fn()``: work counted the same on any machine."""
    count = 0

    def counter(frame, event, arg):
        nonlocal count
        count += event in ("call", "c_call")

    sys.setprofile(counter)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_add_adapter_work_does_not_grow_with_the_adapters_loaded():
    """Each add_adapter re-lowers the model; re-reading every loaded adapter's modules to decide which
    blocks share code made the k-th add cost grow with k (quadratic in all)."""
    torch.manual_seed(0)
    config = dict(r=4, target_modules=["q_proj", "v_proj"])
    gm = fxpeft.transform(models.llama(), fxpeft.LoraConfig(**config))
    gm(**models.hf_inputs("llama"))  # captured once: every add below re-lowers, none captures
    calls = [_python_calls(lambda: fxpeft.add_adapter(gm, fxpeft.LoraConfig(**config), f"a{i}")) for i in range(25)]
    assert calls[-1] <= 1.1 * calls[1], calls  # a handful of calls per loaded adapter remain (lists of names)
