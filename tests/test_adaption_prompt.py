"""Adaption prompts (LLaMA-Adapter) against the real PEFT package, on tiny Llama and GPT-2 (PEFT's two
attention layouts: k/v/o projections, and GPT-2's fused c_attn with the output added after c_proj).
The gates start at zero (the adapter is the identity), so the parity checks set them first."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors, seeded_pair

LAYERS = {"llama": 1, "gpt2": 2}  # adapted layers, from the top


def configs(name: str, **kwargs):
    values = {"adapter_len": 3, "adapter_layers": LAYERS[name], "task_type": "CAUSAL_LM", **kwargs}
    return fxpeft.AdaptionPromptConfig(**values), peft.AdaptionPromptConfig(**values)


def open_gates(*modules, adapter: str = "default", start: float = 0.5) -> None:
    """The same non-zero gate in both models, one value per layer (PEFT holds only the active adapter's)."""
    for module in modules:
        gates = [p for n, p in module.named_parameters() if n.endswith("adaption_gate") or
                 n.endswith(f"adaption_gate.{adapter}")]
        assert gates
        with torch.no_grad():
            for i, gate in enumerate(gates):
                gate.fill_(start + 0.25 * i)


def ours(key: str) -> str:
    """fxpeft's parameter name for PEFT's (the active adapter's tensors sit beside the attention)."""
    return key.removeprefix("base_model.model.") + ".default"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return request.param, getattr(models, request.param)().eval()


@pytest.fixture(scope="module")
def pair(model):
    """PEFT's and fxpeft's models drawn from the same seed, gates opened; the base logits."""
    name, base_model = model
    inputs = models.hf_inputs(name)
    with torch.no_grad():
        base = base_model(**inputs).logits
    reference, gm = seeded_pair(base_model, *configs(name))
    return name, base_model, reference, gm, inputs, base


def test_init_and_outputs_equal_peft(pair):
    name, _, reference, gm, inputs, base = pair
    theirs = {k: p for k, p in reference.named_parameters() if p.requires_grad}
    mine = {k: p for k, p in gm.named_parameters() if p.requires_grad}
    assert set(mine) == {ours(k) for k in theirs} and len(mine) == 2 * LAYERS[name]
    for key, value in theirs.items():  # PEFT's init, drawn in the same order from the same seed
        assert torch.equal(mine[ours(key)], value), key
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    assert gm.peft_config["default"].target_modules == reference.peft_config["default"].target_modules
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, base, rtol=0, atol=1e-6)  # zero gates: the base model
        open_gates(reference, gm)
        expected = reference(**inputs).logits
        assert (expected - base).abs().max() > 1e-2
        torch.testing.assert_close(gm(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_checkpoints_both_ways(pair, tmp_path):
    name, base_model, reference, gm, inputs, _ = pair
    open_gates(reference, gm)
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    saved = [json.loads((tmp_path / kind / "adapter_config.json").read_text()) for kind in ("peft", "fx")]
    for field in ("peft_type", "target_modules", "adapter_len", "adapter_layers", "task_type"):
        assert saved[0][field] == saved[1][field], field
    with torch.no_grad():
        expected = reference(**inputs).logits
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base_model), str(tmp_path / "fx")).eval()
        torch.testing.assert_close(back(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        loaded = fxpeft.from_pretrained(base_model, str(tmp_path / "peft")).eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, as PEFT's default
        fxpeft.load_adapter(loaded, str(tmp_path / "peft"), "again")
        loaded.set_adapter("again")
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_generate_equals_peft(pair):
    _, _, reference, gm, inputs, _ = pair
    open_gates(reference, gm)
    ids = inputs["input_ids"][:, 2:]  # no padding: PEFT's forward without a cache takes no mask below
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        tokens = gm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        theirs = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        greedy = ids  # greedy decoding over PEFT's forward without a cache, with generate's stopping
        done = torch.zeros(len(ids), dtype=torch.bool)
        eos = gm.generation_config.eos_token_id
        for _ in range(5):
            step = reference(input_ids=greedy).logits[:, -1].argmax(-1)
            step = torch.where(done, 0, step)
            done |= step == eos
            greedy = torch.cat([greedy, step[:, None]], 1)
            if done.all():
                break
    assert torch.equal(tokens, greedy) and torch.equal(tokens, theirs)


def test_training_equals_peft():
    model = models.llama()  # no dropout: train mode is deterministic
    reference, gm = seeded_pair(model, *configs("llama", adapter_layers=2))
    open_gates(reference, gm)
    reference.train()
    gm.train()
    inputs = models.hf_inputs("llama")
    labels = models.hf_labels("llama", inputs)
    optimizers = [torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (reference, gm)]
    frozen = {k: v.detach().clone() for k, v in gm.named_parameters() if not v.requires_grad}
    for _ in range(3):
        losses = []
        for module, optimizer in zip((reference, gm), optimizers):
            loss = module(**inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    theirs = {ours(k): p for k, p in reference.named_parameters() if p.requires_grad}
    mine = {k: p for k, p in gm.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs)
    for key, value in mine.items():
        assert not torch.equal(value, frozen.get(key, torch.zeros(()))), key
        torch.testing.assert_close(value, theirs[key], rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, frozen[k]) for k, v in gm.named_parameters() if k in frozen)


def test_several_adapters_switch_as_peft(tmp_path):
    model = models.llama().eval()
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        base = model(**inputs).logits
    reference, gm = seeded_pair(model, *configs("llama"))
    fx_other, peft_other = configs("llama", adapter_len=2, adapter_layers=2)
    torch.manual_seed(5)
    reference.add_adapter("other", peft_other)
    torch.manual_seed(5)
    gm.add_adapter("other", fx_other)
    assert gm.active_adapters == reference.active_adapters == ["default"]
    open_gates(reference, gm)
    reference.set_adapter("other")  # PEFT holds only the active adapter's modules in the model
    open_gates(reference, gm, adapter="other", start=-0.75)
    outputs = {}
    with torch.no_grad():
        for adapter in ("other", "default", "other"):
            reference.set_adapter(adapter)
            gm.set_adapter(adapter)
            outputs[adapter] = reference(**inputs).logits
            torch.testing.assert_close(gm(**inputs).logits, outputs[adapter], rtol=1e-5, atol=1e-5)
        assert (outputs["default"] - outputs["other"]).abs().max() > 1e-2
        with fxpeft.disable_adapters(gm):
            torch.testing.assert_close(gm(**inputs).logits, base, rtol=0, atol=1e-6)
        with pytest.raises(TypeError):  # PEFT: one adapter name (a list is no key of its configs)
            reference.set_adapter(["default", "other"])
        with pytest.raises(ValueError, match="one at a time"):
            gm.set_adapter(["default", "other"])
        assert gm.active_adapters == ["other"]
        with pytest.raises(NotImplementedError, match="Mixed batches"):  # PEFT has no per-sample adapters for it
            gm(**inputs, adapter_names=["default", "other"])

        fxpeft.save_pretrained(gm, str(tmp_path / "fx"))  # both adapters; "other" in its own folder, as PEFT
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
        back.load_adapter(str(tmp_path / "fx" / "other"), "other")
        back.set_adapter("other")
        torch.testing.assert_close(back(**inputs).logits, outputs["other"], rtol=1e-5, atol=1e-5)

        fxpeft.delete_adapter(gm, "other")
        reference.delete_adapter("other")
        assert gm.active_adapters == reference.active_adapters == ["default"]
        assert not any("other" in k for k in gm.state_dict())
        torch.testing.assert_close(gm(**inputs).logits, outputs["default"], rtol=1e-5, atol=1e-5)


def test_configs_peft_refuses():
    for package in (fxpeft, peft):
        with pytest.raises(ValueError, match="Unsupported model type for adaption prompt: 'opt'"):
            config = package.AdaptionPromptConfig(adapter_len=2, adapter_layers=1)
            (fxpeft.transform if package is fxpeft else peft.get_peft_model)(models.opt(), config)
        with pytest.raises(ValueError, match="more adapter layers '3' than the model has '2'"):
            config = package.AdaptionPromptConfig(adapter_len=2, adapter_layers=3)
            (fxpeft.transform if package is fxpeft else peft.get_peft_model)(models.llama(), config)
    # PEFT accepts these at construction and fails later (a TypeError on None; 0 adapts every layer)
    for bad in (dict(adapter_len=None, adapter_layers=1), dict(adapter_len=2, adapter_layers=0)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            fxpeft.AdaptionPromptConfig(**bad)
    with pytest.raises(ValueError, match="one module name"):
        fxpeft.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules=["self_attn"])


def test_bad_input_leaves_model_alone():
    eager = models.llama()
    eager.config._attn_implementation = "eager"  # attention as matmul + softmax: no SDPA to find
    before = {k: (v.clone(), v.requires_grad) for k, v in eager.named_parameters()}
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        fxpeft.transform(eager, configs("llama")[0])
    assert all(torch.equal(v, before[k][0]) and v.requires_grad == before[k][1] for k, v in eager.named_parameters())
    assert not any("adaption" in k for k in eager.state_dict())


def test_mistral_bfloat16_and_compiled_switching():
    """Mistral (PEFT's third layout entry, Llama's code path) in bfloat16: PEFT keeps the prompt and gate
    in the base dtype (no adapter autocast for this type), so do we, and outputs are PEFT's exactly;
    compiled, switching adapters is data (no recompile)."""
    from transformers import MistralConfig, MistralForCausalLM
    model = MistralForCausalLM(MistralConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64)).eval().to(torch.bfloat16)
    inputs = models.hf_inputs("llama")
    reference, gm = seeded_pair(model, *configs("llama", adapter_layers=2))
    assert {p.dtype for p in gm.parameters() if p.requires_grad} == {torch.bfloat16}
    open_gates(reference, gm)
    torch.manual_seed(3)
    gm.add_adapter("other", configs("llama")[0])
    open_gates(gm, adapter="other", start=-1.0)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=0, atol=0)
        expected = {}
        for adapter in ("other", "default"):
            gm.set_adapter(adapter)
            expected[adapter] = gm(**inputs).logits
        torch._dynamo.reset()
        compiled = torch.compile(gm, fullgraph=True, backend=models.COMPILE_BACKEND)
        compiled(**inputs)
        try:
            torch._dynamo.config.error_on_recompile = True
            for adapter in ("other", "default", "other"):
                gm.set_adapter(adapter)
                torch.testing.assert_close(compiled(**inputs).logits, expected[adapter], rtol=0, atol=0)
        finally:
            torch._dynamo.config.error_on_recompile = False
            torch._dynamo.reset()
