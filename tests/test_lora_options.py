"""LoRA's remaining PEFT options, each against the real PEFT package: trainable tokens (LoRA's
``trainable_token_indices`` and the standalone ``TrainableTokensConfig``), ``ensure_weight_tying``,
``layer_replication``, ``target_parameters``."""
from __future__ import annotations

import copy
import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import fxpeft
import models


def tiny_llama(tie: bool, layers: int = 1):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, tie_word_embeddings=tie)).eval()


IDS = torch.tensor([[1, 5, 7, 9, 2, 5, 11], [3, 1, 8, 7, 7, 40, 95]])


def logits(module, ids=IDS, grad: bool = False):
    """The call signature fxpeft captures at transform (input_ids, attention_mask): no second capture."""
    with torch.set_grad_enabled(grad):
        return module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def peft_key(name: str) -> str:
    return name.removeprefix("base_model.model.").replace("token_adapter.", "")


def pair(build, fx_config, peft_config):
    """PEFT's model and fxpeft's on copies of one model; PEFT's trainable tensors randomised and copied
    into fxpeft's (so the adapters act). Returns (model, reference, gm, the model's original state)."""
    model = build()
    original = copy.deepcopy(model.state_dict())
    reference = peft.get_peft_model(copy.deepcopy(model), peft_config).eval()
    gm = fxpeft.transform(model, fx_config).eval()
    ours = dict(gm.named_parameters())
    theirs = {peft_key(n): p for n, p in reference.named_parameters() if p.requires_grad}
    assert set(theirs) == {n for n, p in ours.items() if p.requires_grad}
    with torch.no_grad():
        for name, param in theirs.items():
            param.add_(torch.randn_like(param))
            ours[name].copy_(param)
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    return model, reference, gm, original


def saved_files(reference, gm, tmp_path):
    """(PEFT's saved tensors, fxpeft's) for the same adapter."""
    reference.save_pretrained(tmp_path / "peft")
    gm.save_pretrained(str(tmp_path / "fx"))
    return tuple(load_file(os.path.join(tmp_path / name, "adapter_model.safetensors")) for name in ("peft", "fx"))


def assert_same_files(reference, gm, tmp_path) -> None:
    theirs, ours = saved_files(reference, gm, tmp_path)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def check_checkpoints_and_merge(build, model, reference, gm, original, tmp_path):
    """The same saved tensors; each package loads the other's file; merge / unmerge / merge_and_unload
    keep PEFT's outputs and give the weights back."""
    expected = logits(reference)
    assert (expected - logits(model)).abs().max() > 1e-3
    torch.testing.assert_close(logits(gm), expected, rtol=1e-5, atol=1e-5)
    assert_same_files(reference, gm, tmp_path)
    reference.merge_adapter()  # PEFT's merged outputs (rows of layers sharing a weight all land in it)
    merged_expected = logits(reference)
    gm.merge_adapter()
    torch.testing.assert_close(logits(gm), merged_expected, rtol=1e-5, atol=1e-5)
    gm.unmerge_adapter()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=1e-5, atol=1e-5)
    merged, peft_merged = gm.merge_and_unload(), copy.deepcopy(reference).merge_and_unload()
    fresh, peft_fresh = build(), build()  # the original class: a tied model ties what it loads, as with PEFT's
    fresh.load_state_dict(merged.state_dict())
    peft_fresh.load_state_dict(peft_merged.state_dict())
    torch.testing.assert_close(logits(fresh), logits(peft_fresh), rtol=1e-5, atol=1e-5)
    clean = build()
    clean.load_state_dict(original)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(clean), str(tmp_path / "fx")).eval()
    torch.testing.assert_close(logits(back), expected, rtol=1e-5, atol=1e-5)
    loaded = fxpeft.from_pretrained(clean, str(tmp_path / "peft"), is_trainable=True).eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)
    return loaded


# ----------------------------------------------------------------------------- trainable tokens

TOKEN_CASES = {
    "lora_list": lambda: dict(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7]),
    "lora_dict_tied_same": lambda: dict(target_modules=["q_proj"],
                                        trainable_token_indices={"embed_tokens": [1, 5], "lm_head": [1, 5]}),
    "lora_dict_tied_other": lambda: dict(target_modules=["q_proj"],
                                         trainable_token_indices={"embed_tokens": [1, 5], "lm_head": [7, 9]}),
    "standalone": lambda: dict(token_indices=[1, 5, 7], init_weights=False),
}


@pytest.mark.parametrize("case, tie", [(c, True) for c in TOKEN_CASES] + [("standalone", False)])
def test_trainable_tokens_equal_peft(case, tie, tmp_path):
    kwargs = TOKEN_CASES[case]()
    fx_type, peft_type = ((fxpeft.TrainableTokensConfig, peft.TrainableTokensConfig) if case == "standalone"
                          else (fxpeft.LoraConfig, peft.LoraConfig))
    build = lambda: tiny_llama(tie)  # noqa: E731
    model, reference, gm, original = pair(build, fx_type(**kwargs), peft_type(**kwargs))
    loaded = check_checkpoints_and_merge(build, model, reference, gm, original, tmp_path).train()
    # training moves only the rows (and LoRA's A/B), the embedding stays bit-identical
    frozen = {n: p.detach().clone() for n, p in loaded.named_parameters() if not p.requires_grad}
    logits(loaded, grad=True).pow(2).mean().backward()
    rows = loaded.model.embed_tokens.trainable_tokens_delta["default"]
    assert rows.grad is not None and rows.grad.abs().sum() > 0
    assert all(torch.equal(p, frozen[n]) for n, p in loaded.named_parameters() if n in frozen)



@pytest.mark.parametrize("options", [{}, dict(padding_idx=5), dict(scale_grad_by_freq=True)],
                         ids=["plain", "padding", "by-frequency"])
@pytest.mark.parametrize("tie", [True, False])
def test_trainable_tokens_gradients_equal_peft(options, tie):
    """The rows act from the op's output (no copy of the weight); their gradients are those of the op on the
    weight with the rows replaced, as PEFT computes it: none for a padding token, divided by each token's
    count with scale_grad_by_freq (IDS holds 5 twice and 7 three times), through a tied head too."""
    def build():
        model = tiny_llama(tie)
        for name, value in options.items():
            setattr(model.model.embed_tokens, name, value)
        return model

    config = dict(token_indices=[1, 5, 7], init_weights=False)
    _, reference, gm, _ = pair(build, fxpeft.TrainableTokensConfig(**config), peft.TrainableTokensConfig(**config))
    expected, got = logits(reference.train(), grad=True), logits(gm.train(), grad=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    theirs = {peft_key(n): p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in gm.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
            torch.testing.assert_close(param.grad, theirs[name], rtol=1e-5, atol=1e-5, msg=lambda text: f"{name}: {text}")

def test_trainable_tokens_switching_and_mixed_batches():
    """Activity is data: disabled / other adapters read the base rows; a mixed batch equals
    per-sample calls; several token adapters apply in order."""
    model = tiny_llama(True)
    base = logits(model)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7],
                                                   init_lora_weights=False)).eval()
    gm.add_adapter("other", fxpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[8, 11]))
    with torch.no_grad():
        gm.model.embed_tokens.trainable_tokens_delta["default"].normal_()
        gm.model.embed_tokens.trainable_tokens_delta["other"].normal_()
    first = logits(gm)
    with fxpeft.disable_adapters(gm):
        torch.testing.assert_close(logits(gm), base)
    gm.set_adapter("other")
    second = logits(gm)
    assert (second - first).abs().max() > 1e-3
    with torch.no_grad():
        mixed = gm(input_ids=IDS, attention_mask=torch.ones_like(IDS), adapter_names=["default", "other"]).logits
    torch.testing.assert_close(mixed[0], first[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], second[1], rtol=1e-5, atol=1e-5)


def test_trainable_tokens_bad_input():
    with pytest.raises(ValueError, match="trainable_token_indices"):
        fxpeft.LoraConfig(trainable_token_indices="abc")
    with pytest.raises(ValueError, match="trainable_token_indices\\['embed_tokens'\\]"):
        fxpeft.LoraConfig(trainable_token_indices={"embed_tokens": [1, -2]})
    with pytest.raises(ValueError, match="token_indices"):
        fxpeft.TrainableTokensConfig(token_indices=[])
    model = tiny_llama(True)
    state = copy.deepcopy(model.state_dict())
    gm = fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["q_proj"]))  # bad adapters added to it fail
    bad = [("out of range", dict(trainable_token_indices=[1, 500])),
           ("matches no module", dict(trainable_token_indices={"embedz": [1]})),
           ("not both", dict(modules_to_save=["embed_tokens"], trainable_token_indices={"embed_tokens": [1]})),  # PEFT's
           ("not both", dict(modules_to_save=["model.embed_tokens"], trainable_token_indices=[1])),
           ("Cannot ensure weight tying", dict(ensure_weight_tying=True,  # PEFT's error
                                               trainable_token_indices={"embed_tokens": [1], "lm_head": [2]}))]
    for message, kwargs in bad:
        with pytest.raises(ValueError, match=message):
            gm.add_adapter("bad", fxpeft.LoraConfig(target_modules=["q_proj"], **kwargs))
    assert list(gm.peft_config) == ["default"] and not any("trainable_tokens" in n for n, _ in gm.named_modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


# ----------------------------------------------------------------------------- ensure_weight_tying

SAVED_CASES = {  # modules_to_save naming a tied layer, with and without ensure_weight_tying
    "embed_untied_adapter": dict(modules_to_save=["embed_tokens"]),
    "head_untied_adapter": dict(modules_to_save=["lm_head"]),
    "embed_ensure": dict(modules_to_save=["embed_tokens"], ensure_weight_tying=True),
    "head_ensure": dict(modules_to_save=["lm_head"], ensure_weight_tying=True),
}


@pytest.mark.parametrize("case", list(SAVED_CASES))
def test_saved_tied_layers_equal_peft(case, tmp_path):
    """A tied model's embedding or head in modules_to_save: without ensure_weight_tying only that
    layer reads its copy (the other side of the tie the original), with it both read the embedding's
    copy, saved under both names; PEFT's warnings, config, outputs, files and merges."""
    kwargs = lambda: dict(target_modules=["q_proj"], **copy.deepcopy(SAVED_CASES[case]))  # noqa: E731 PEFT edits lists
    build = lambda: tiny_llama(True)  # noqa: E731
    with pytest.warns(UserWarning, match="tie_word_embeddings") if "untied" in case else _no_warning():
        model, reference, gm, original = pair(build, fxpeft.LoraConfig(**kwargs()), peft.LoraConfig(**kwargs()))
    assert gm.peft_config["default"].modules_to_save == reference.peft_config["default"].modules_to_save
    check_checkpoints_and_merge(build, model, reference, gm, original, tmp_path)


class _no_warning:
    def __enter__(self):
        import warnings
        self._catch = warnings.catch_warnings()
        self._catch.__enter__()
        warnings.simplefilter("error", UserWarning)

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        return False


def test_ensure_weight_tying_of_targeted_embedding_equals_peft(tmp_path):
    """The tied head gets LoRA with the embedding's B and A transposed (sharing storage, as PEFT): the
    same outputs, trainable counts and LoRA tensors; fxpeft's own checkpoint loads back."""
    kwargs = lambda: dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True,  # noqa: E731
                          init_lora_weights=False)
    model, reference, gm, _ = pair(lambda: tiny_llama(True), fxpeft.LoraConfig(**kwargs()), peft.LoraConfig(**kwargs()))
    expected = logits(reference)
    torch.testing.assert_close(logits(gm), expected, rtol=1e-5, atol=1e-5)
    head, embedding = gm.lm_head, gm.model.embed_tokens
    assert head.lora_A["default"].weight.data_ptr() == embedding.lora_embedding_B["default"].data_ptr()
    with pytest.warns(UserWarning, match="save_embedding_layers"):  # PEFT's "auto": the embeddings' base weights too
        theirs, ours = saved_files(reference, gm, tmp_path)
    assert {"base_model.model.model.embed_tokens.base_layer.weight", "base_model.model.lm_head.base_layer.weight"} <= set(ours)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    for folder in ("fx", "peft"):  # a checkpoint's embedding weights replace the base's, as PEFT loads them
        base = tiny_llama(True)
        with torch.no_grad():
            base.model.embed_tokens.weight.mul_(0.5)
        back = fxpeft.from_pretrained(base, str(tmp_path / folder))
        torch.testing.assert_close(logits(back), expected, rtol=1e-5, atol=1e-5)
    gm.save_pretrained(str(tmp_path / "lean"), save_embedding_layers=False)
    assert set(load_file(str(tmp_path / "lean" / "adapter_model.safetensors"))) == {
        k for k in ours if not k.endswith("base_layer.weight")}


def test_ensure_weight_tying_warnings_as_peft():
    model = tiny_llama(False)  # nothing tied
    gm = fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match="no tied modules were found"):
        gm.add_adapter("a", fxpeft.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                              ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="does not have tied weights"):
        gm.add_adapter("b", fxpeft.LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1],
                                              ensure_weight_tying=True))


# ----------------------------------------------------------------------------- layer_replication


def test_layer_replication_equals_peft(tmp_path):
    """Layers 0..2 become 0, 1, 1, 2 sharing base weights, each copy with its own LoRA: PEFT's outputs,
    counts, files both ways; merging refused as PEFT; the caller's model keeps its 3 layers."""
    build = lambda: tiny_llama(False, layers=3)  # noqa: E731
    kwargs = lambda: dict(target_modules=["q_proj", "v_proj"], layer_replication=[[0, 2], [1, 3]])  # noqa: E731
    model, reference, gm, _ = pair(build, fxpeft.LoraConfig(**kwargs()), peft.LoraConfig(**kwargs()))
    assert len(model.model.layers) == 3 and model.config.num_hidden_layers == 3 and len(gm.model.layers) == 4
    first, second = gm.model.layers[1].self_attn.q_proj, gm.model.layers[2].self_attn.q_proj
    assert first.weight is second.weight and first.lora_A["default"].weight is not second.lora_A["default"].weight
    expected = logits(reference)
    assert (expected - logits(model)).abs().max() > 1e-3
    torch.testing.assert_close(logits(gm), expected, rtol=1e-5, atol=1e-5)
    assert_same_files(reference, gm, tmp_path)
    back = peft.PeftModel.from_pretrained(build(), str(tmp_path / "fx")).eval()
    torch.testing.assert_close(logits(back), expected, rtol=1e-5, atol=1e-5)
    loaded = fxpeft.from_pretrained(build(), str(tmp_path / "peft")).eval()
    torch.testing.assert_close(logits(loaded), expected, rtol=1e-5, atol=1e-5)
    # PEFT means to refuse merging here (LoraModel._check_merge_allowed, its message), but its check reads
    # peft_config["layer_replication"] from the dict of adapters and never fires; fxpeft refuses: a merged
    # copy's delta would land in the weight every copy of that layer shares
    weights = {k: v.clone() for k, v in gm.state_dict().items()}
    with pytest.raises(ValueError, match="replicated"):
        gm.merge_adapter()
    assert all(torch.equal(v, weights[k]) for k, v in gm.state_dict().items())
    with pytest.raises(ValueError, match="rebuilds the base model's layers"):
        gm.add_adapter("other", fxpeft.LoraConfig(target_modules=["q_proj"], layer_replication=[[0, 3]]))
    with pytest.raises(ValueError, match="layer ranges"):
        fxpeft.transform(build(), fxpeft.LoraConfig(target_modules=["q_proj"], layer_replication=[[2, 5]]))


# ----------------------------------------------------------------------------- target_parameters


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=48,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            num_local_experts=4, num_experts_per_tok=2,
                                            max_position_embeddings=64)).eval()


class Mix(torch.nn.Module):
    """A layer computing with a raw 2-D parameter (no nn.Linear): PEFT's 2-D ParamWrapper case."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(10, 6))

    def forward(self, x):
        return torch.tanh(x @ self.weight.t())


class RawWeights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = Mix()
        self.head = torch.nn.Linear(10, 3)

    def forward(self, x):
        return self.head(self.mix(x))


def test_target_parameters_on_moe_experts_equal_peft(tmp_path):
    """3-D expert stacks (two parameters of one module: PEFT's nested keys) plus a linear target: PEFT's
    outputs, counts, files both ways, merge / unmerge / merge_and_unload."""
    kwargs = lambda: dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"],  # noqa: E731
                          r=2)
    model, reference, gm, original = pair(tiny_mixtral, fxpeft.LoraConfig(**kwargs()), peft.LoraConfig(**kwargs()))
    assert "model.layers.0.mlp.experts.base_layer.lora_A.default.weight" in dict(gm.named_parameters())
    check_checkpoints_and_merge(tiny_mixtral, model, reference, gm, original, tmp_path)


def test_target_parameters_2d_equal_peft_and_bad_input():
    torch.manual_seed(0)
    model = RawWeights().eval()
    x = torch.randn(4, 6)
    kwargs = lambda: dict(target_modules=[], target_parameters=["mix.weight"], r=2, init_lora_weights=False)  # noqa: E731
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs())).eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**kwargs())).eval()
    ours = dict(gm.named_parameters())
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.requires_grad:
                ours[peft_key(name)].copy_(param)
        expected = reference(x)
        assert (expected - model(x)).abs().max() > 1e-3
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        gm.merge_adapter()
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        gm.unmerge_adapter()
    gm.add_adapter("other", fxpeft.LoraConfig(**kwargs()))
    with pytest.raises(NotImplementedError, match="target_parameters"):  # a weight cannot differ per sample
        gm(x, adapter_names=["default", "other", "default", "other"])
    with pytest.raises(TypeError, match="list of strings"):  # PEFT's error
        fxpeft.LoraConfig(target_parameters="mix.weight")
    for message, extra in {"lora_dropout": dict(lora_dropout=0.1), "matched no parameter": dict(
            target_parameters=["nothing.weight"]), "also targeted": dict(target_modules=["head"],
                                                                         target_parameters=["head.weight"])}.items():
        with pytest.raises(ValueError, match=message):
            gm.add_adapter("bad", fxpeft.LoraConfig(**{**kwargs(), **extra}))
    assert list(gm.peft_config) == ["default", "other"]


# ----------------------------------------------------------------------------- nn.MultiheadAttention


class AttentionNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_equals_peft(tmp_path):
    """PEFT's lora.MultiheadAttention: LoRA on in_proj_weight and out_proj (PEFT's keys, and its forward,
    which adds out_proj's delta twice), outputs, counts, files both ways, merging."""
    torch.manual_seed(0)
    model = AttentionNet().eval()
    x = torch.randn(2, 5, 16)
    kwargs = lambda: dict(target_modules=["attn", "head"], r=2, init_lora_weights=False)  # noqa: E731
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**kwargs())).eval()
    with pytest.raises(NotImplementedError, match="example_inputs"):  # symbolic_trace keeps the attention opaque
        fxpeft.transform(model, fxpeft.LoraConfig(**kwargs()))
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**kwargs()), example_inputs=(x,)).eval()
    ours = dict(gm.named_parameters())
    theirs = {peft_key(n): p for n, p in reference.named_parameters() if p.requires_grad}
    assert set(theirs) == {n for n, p in ours.items() if p.requires_grad}
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    weights = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        for name, param in theirs.items():
            ours[name].copy_(param)
        expected = reference(x)
        assert (expected - model(x)).abs().max() > 1e-3
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
    assert_same_files(reference, gm, tmp_path)
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"), example_inputs=(x,)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
        gm.merge_adapter()
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        gm.unmerge_adapter()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, weights[key], rtol=1e-5, atol=1e-6)
        fresh = AttentionNet().eval()
        fresh.load_state_dict(gm.merge_and_unload().state_dict())
        torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="dora does not adapt nn.MultiheadAttention"):  # PEFT: ValueError
        fxpeft.transform(AttentionNet(), fxpeft.LoraConfig(target_modules=["attn"], use_dora=True), example_inputs=(x,))


def test_trainable_tokens_switching_never_recompiles():
    """Which adapter's rows act is data: switching adapters under torch.compile(fullgraph=True)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models.TinyDecoder().eval()
    x = torch.randint(0, models.VOCAB, (2, 9))
    gm = fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["up"], init_lora_weights=False,
                                                   trainable_token_indices={"embed": list(range(0, models.VOCAB, 3))}))
    gm.add_adapter("other", fxpeft.LoraConfig(target_modules=["up"], trainable_token_indices={"embed": [1, 2, 4]}))
    gm.eval()
    expected = {}
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "trainable_tokens" in name:
                param.normal_()
        for name in ("default", "other"):
            gm.set_adapter(name)
            expected[name] = gm(x)
        compiled = torch.compile(gm, fullgraph=True, backend=models.COMPILE_BACKEND)
        compiled(x)
        try:
            torch._dynamo.config.error_on_recompile = True
            for name in ("default", "other"):
                gm.set_adapter(name)
                torch.testing.assert_close(compiled(x), expected[name])
            with fxpeft.disable_adapters(gm):
                torch.testing.assert_close(compiled(x), model(x))
        finally:
            torch._dynamo.config.error_on_recompile = False
            torch._dynamo.reset()
