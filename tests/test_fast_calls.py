"""Eager per-op cost. Graph code calls common aten ops through torch's Python bindings
(fxpeft.module.FAST_CALLS): the same aten overloads must run, in the same order, with bit-equal
results, as the OpOverload calls they replace, with autograd too; parameters are read through the
module dicts; canonical graphs drop the identity ops export leaves in."""
from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fxpeft
import fxpeft.module
import models


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _run(gm, inputs):
    with _Ops() as record:
        logits = gm(**inputs).logits
        logits.square().sum().backward()
    grads = [p.grad.clone() for p in gm.parameters() if p.grad is not None]
    gm.zero_grad(set_to_none=True)
    return record.ops, logits.detach(), grads


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])  # linear, Conv1D (addmm), embeddings, norms, gelu, sdpa
def test_fast_calls_run_the_same_aten_ops_with_equal_results(name, monkeypatch):
    torch.manual_seed(0)
    model = getattr(models, name)().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    inputs = models.hf_inputs(name)
    gm(**inputs)
    fast_ops, fast_logits, fast_grads = _run(gm, inputs)
    codes = [sig.graph.python_code("self").src for sig in gm._fxpeft_signatures.values()]
    assert any("torch.ops.aten.linear.default(" in code or "torch.ops.aten.addmm.default(" in code
               for code in codes)  # the graphs hold OpOverloads; only the executed code differs
    monkeypatch.setattr(fxpeft.module, "FAST_CALLS", {})
    gm.relower()
    plain_ops, plain_logits, plain_grads = _run(gm, inputs)
    assert fast_ops == plain_ops
    assert torch.equal(fast_logits, plain_logits)
    assert len(fast_grads) == len(plain_grads) and all(map(torch.equal, fast_grads, plain_grads))


def test_graph_code_reads_parameters_replaced_after_lowering():
    """Graph code reads parameters through the module dicts: a parameter replaced after the graphs
    were generated (load_state_dict(assign=True), attribute assignment) is the one read."""
    torch.manual_seed(0)
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        before = gm(**inputs).logits
        key = "model.layers.1.self_attn.q_proj.weight"
        gm.load_state_dict({key: gm.get_parameter(key) * 3.0}, strict=False, assign=True)
        head = gm.get_submodule("lm_head")
        head.weight = torch.nn.Parameter(head.weight * 0.5)
        after = gm(**inputs).logits
    assert not torch.allclose(before, after)
    reference = models.llama().eval()
    reference.load_state_dict({k: v for k, v in gm.state_dict().items() if "lora_" not in k}, strict=False)
    lora = fxpeft.transform(reference, fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.load_state_dict({k: v for k, v in gm.state_dict().items() if "lora_" in k}, strict=False)
    with torch.no_grad():
        torch.testing.assert_close(after, lora(**inputs).logits)


def test_canonical_graphs_drop_identity_ops():
    """Export leaves ``to`` calls to a tensor's own dtype and slices of whole dimensions (a Llama:
    its RMSNorm's casts, its KV cache reads); canonical graphs drop them (each was an eager call per
    step), and generation still equals PEFT's (tests/test_generate.py)."""
    torch.manual_seed(0)
    gm = fxpeft.transform(models.llama().eval(), fxpeft.LoraConfig(r=4, target_modules=["q_proj"]))
    with torch.no_grad():
        gm.generate(**models.hf_inputs("llama", batch=1), max_new_tokens=2, do_sample=False, pad_token_id=0)
    graphs = [sig.canonical for sig in gm._fxpeft_signatures.values()]
    assert len(graphs) >= 2  # the forward and the decode step with a cache
    aten = torch.ops.aten
    left = [node for graph in graphs for node in graph.nodes if node.op == "call_function" and (
        (node.target is aten.to.dtype and node.args[1] == node.args[0].meta["val"].dtype and len(node.args) == 2)
        or (node.target is aten.slice.Tensor and tuple(node.args[2:]) in ((0, sys.maxsize), (0, sys.maxsize, 1))))]
    assert not left, left
