"""Graph code calls common aten ops through torch's Python bindings (fxpeft.module.FAST_CALLS): the
same aten overloads must run, in the same order, with bit-equal results, as the OpOverload calls
they replace; with autograd too."""
from __future__ import annotations

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
