"""Prompt tuning and p-tuning: against PEFT's checkpoints and the method's formula."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors, switched_outputs

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM"}
CASES = [  # (model, PEFT config class, fxpeft config class, extra config)
    ("llama", peft.PromptTuningConfig, fxpeft.PromptTuningConfig, {}),
    ("gpt2", peft.PromptTuningConfig, fxpeft.PromptTuningConfig, {}),
    ("bert", peft.PromptTuningConfig, fxpeft.PromptTuningConfig, {}),
    ("t5", peft.PromptTuningConfig, fxpeft.PromptTuningConfig, {}),
    ("llama", peft.PromptEncoderConfig, fxpeft.PromptEncoderConfig, {"encoder_hidden_size": 16}),
    ("gpt2", peft.PromptEncoderConfig, fxpeft.PromptEncoderConfig,
     {"encoder_hidden_size": 8, "encoder_reparameterization_type": "LSTM"}),
]
IDS = [f"{name}-{fx.__name__}-{extra.get('encoder_reparameterization_type', '')}" for name, _, fx, extra in CASES]


def _reference(name, peft_config_type, extra):
    model = models.HF_MODELS[name]().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft_config_type(
        task_type=TASKS[name], num_virtual_tokens=3, **extra)).eval()
    return model, reference


@pytest.mark.parametrize("name,peft_type,fx_type,extra", CASES, ids=IDS)
def test_peft_checkpoint_loads_with_equal_outputs_and_losses(name, peft_type, fx_type, extra, tmp_path):
    model, reference = _reference(name, peft_type, extra)
    reference.save_pretrained(tmp_path / "peft")
    gm = fxpeft.from_pretrained(model, str(tmp_path / "peft"))
    assert isinstance(gm.peft_config["default"], fx_type)
    inputs = models.hf_inputs(name, batch=2, seq=7)
    if name == "bert":  # PEFT prepends zeros to token_type_ids for SEQ_CLS
        inputs["token_type_ids"] = torch.randint(0, 2, inputs["input_ids"].shape)
    if name == "llama":  # PEFT ignores position ids under prompt methods
        inputs["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    labels = models.hf_labels(name, inputs)
    with torch.no_grad():
        expected, got = reference(**inputs, labels=labels), gm(**inputs, labels=labels)
        base = model(**inputs).logits
    assert got.logits.shape == expected.logits.shape  # causal LMs: logits include the virtual positions
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    real = got.logits[:, -base.shape[1]:] if name in ("llama", "gpt2") else got.logits
    assert (real - base).abs().max() > 1e-3  # the prompt acts

    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    saved = json.loads((tmp_path / "fx" / "adapter_config.json").read_text())
    assert saved["peft_type"] == fx_type.peft_type and saved["num_virtual_tokens"] == 3
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, got.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,peft_type,fx_type,extra", [CASES[2], CASES[4], CASES[5]], ids=[IDS[2], IDS[4], IDS[5]])
def test_training_form_matches_peft_with_the_same_weights(name, peft_type, fx_type, extra):
    model, reference = _reference(name, peft_type, extra)
    gm = fxpeft.transform(model, fx_type(task_type=TASKS[name], num_virtual_tokens=3, **extra)).eval()
    assert {n for n, p in gm.named_parameters() if p.requires_grad} == {
        n.removeprefix("base_model.") for n, p in reference.named_parameters() if p.requires_grad}
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    gm.prompt_encoder.load_state_dict(reference.prompt_encoder.state_dict())
    if name == "bert":
        gm.classifier.modules_to_save.load_state_dict(reference.base_model.classifier.modules_to_save.state_dict())
    inputs = models.hf_inputs(name, batch=3, seq=6)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
    saved_by_peft = reference.get_prompt_embedding_to_save("default")
    from fxpeft.passes.prompt import prompt_embeddings
    torch.testing.assert_close(prompt_embeddings(gm, "default")["prompt_embeddings"], saved_by_peft)


@pytest.mark.parametrize("name,peft_type,dropped", [
    ("gpt2", peft.PromptTuningConfig, "token_type_ids"),
    ("gpt2", peft.PrefixTuningConfig, "token_type_ids"),
    ("opt", peft.PromptTuningConfig, "position_ids"),  # OPT's own positions count from the mask
], ids=["gpt2-prompt", "gpt2-prefix", "opt-prompt"])
def test_inputs_peft_drops_are_dropped_while_the_prompt_acts(name, peft_type, dropped, tmp_path):
    """PEFT calls causal LMs without token_type_ids under every prompt method, and without position_ids
    under prompt tuning; a disabled adapter gets them back, as the base model does."""
    model = models.HF_MODELS[name]().eval()
    peft.get_peft_model(copy.deepcopy(model), peft_type(task_type="CAUSAL_LM", num_virtual_tokens=3)
                        ).save_pretrained(tmp_path)
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    gm = fxpeft.from_pretrained(model, str(tmp_path))
    inputs = models.hf_inputs(name)  # left padding on the first row
    values = {"token_type_ids": torch.randint(0, 2, inputs["input_ids"].shape),
              "position_ids": torch.arange(inputs["input_ids"].shape[1]).expand(2, -1)}
    call = dict(inputs, **{dropped: values[dropped]})
    with torch.no_grad():
        assert (model(**call).logits - model(**inputs).logits).abs().max() > 1e-3  # the input matters
        torch.testing.assert_close(gm(**call).logits, reference(**call).logits, rtol=1e-5, atol=1e-5)
        with fxpeft.disable_adapters(gm):
            torch.testing.assert_close(gm(**call).logits, model(**call).logits)


def _decoder_with_prompt(model, prompt, ids):
    """TinyDecoder's forward written out, with the prompt in front of the token embeddings."""
    x = torch.cat([prompt.unsqueeze(0).expand(ids.shape[0], -1, -1), model.embed(ids)], dim=1)
    for block in model.blocks:
        x = block(x)
    return model.lm_head(model.norm(x))


@pytest.mark.parametrize("config", [fxpeft.PromptTuningConfig(num_virtual_tokens=4),
                                    fxpeft.PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=8)],
                         ids=["prompt", "p-tuning"])
def test_custom_decoder_formula_causality_and_training(config):
    model = models.TinyDecoder().eval()
    gm = fxpeft.transform(model, config)  # symbolic trace: no example inputs
    ids = torch.randint(0, models.VOCAB, (2, 9))
    out = gm(ids)
    assert out.shape == (2, 13, models.VOCAB)
    torch.testing.assert_close(out, _decoder_with_prompt(model, gm.prompt_encoder.default(), ids))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % models.VOCAB
    later = gm(changed)
    torch.testing.assert_close(later[:, :-1], out[:, :-1], rtol=0, atol=0)  # no earlier position sees the last token
    assert (later[:, -1] - out[:, -1]).abs().max() > 1e-4
    assert gm(torch.randint(0, models.VOCAB, (3, 5))).shape == (3, 9, models.VOCAB)

    gm.train()
    gm(ids).logsumexp(-1).mean().backward()
    trained = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("prompt_encoder.default.") for n in trained)
    assert all(not p.requires_grad for n, p in gm.named_parameters() if not n.startswith("prompt_encoder."))


class _PositionsAsInput(torch.nn.Module):
    """A custom model that cannot be called without position ids."""

    def __init__(self):
        super().__init__()
        self.embed, self.pos, self.out = torch.nn.Embedding(20, 8), torch.nn.Embedding(32, 8), torch.nn.Linear(8, 20)

    def forward(self, input_ids, position_ids):
        return self.out(self.embed(input_ids) + self.pos(position_ids))


def test_custom_model_with_position_ids_input_gets_positions_over_the_virtual_tokens():
    model = _PositionsAsInput()
    gm = fxpeft.transform(model, fxpeft.PromptTuningConfig(num_virtual_tokens=3))
    ids = torch.randint(0, 20, (2, 5))
    embeds = torch.cat([gm.prompt_encoder.default().unsqueeze(0).expand(2, -1, -1), model.embed(ids)], dim=1)
    expected = model.out(embeds + model.pos(torch.arange(8)))
    torch.testing.assert_close(gm(ids, torch.arange(5).expand(2, -1)), expected)


def test_initialisation_from_vocabulary_and_text():
    model = models.TinyDecoder().eval()
    table = model.embed.weight
    sampled = fxpeft.transform(model, fxpeft.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"))
    rows = sampled.prompt_encoder.default.embedding.weight
    assert all(((table - row).abs().sum(-1) == 0).any() for row in rows)

    class Tokenizer:  # any tokenizer object: called on the text, returns input_ids
        name_or_path = "my-tokenizer"

        def __call__(self, text):
            return {"input_ids": [ord(c) % models.VOCAB for c in text]}

    config = fxpeft.PromptTuningConfig(num_virtual_tokens=5, prompt_tuning_init="TEXT", prompt_tuning_init_text="abc",
                                       tokenizer_name_or_path=Tokenizer())
    gm = fxpeft.transform(model, config)
    expected = table[torch.tensor([ord(c) % models.VOCAB for c in "abcab"])]
    torch.testing.assert_close(gm.prompt_encoder.default.embedding.weight, expected)
    assert gm.peft_config["default"].to_dict()["tokenizer_name_or_path"] == "my-tokenizer"


def test_disabling_runs_the_base_model_and_merging_is_refused():
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        prompted = gm(**inputs).logits
        with fxpeft.disable_adapters(gm):
            torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits)
        torch.testing.assert_close(gm(**inputs).logits, prompted)
    with pytest.raises(NotImplementedError, match="Mixed batches"):
        gm(**inputs, adapter_names=["default", "__base__"])
    with pytest.raises(ValueError, match="nothing to merge"):
        fxpeft.merge_adapter(gm)
    with pytest.raises(ValueError, match="only adapter"):
        fxpeft.add_adapter(gm, fxpeft.LoraConfig(target_modules=["q_proj"]), "lora")
    assert list(gm.peft_config) == ["default"]
    base = fxpeft.unload(gm)
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).logits, model(**inputs).logits)


def test_bad_input_gets_clear_errors(tmp_path):
    for count in (0, -2, None):
        with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
            fxpeft.PromptTuningConfig(num_virtual_tokens=count)
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        fxpeft.PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="hi")
    mlp = models.MLP()
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ValueError, match=r"no token embedding|none was found.*model inputs: \['x'\]"):
        fxpeft.transform(mlp, fxpeft.PromptTuningConfig(num_virtual_tokens=2))
    assert all(torch.equal(before[k], v) for k, v in mlp.state_dict().items())
    assert all(p.requires_grad for p in mlp.parameters())

    model = models.llama().eval()
    peft.get_peft_model(copy.deepcopy(model), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
                        ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="inference only"):
        fxpeft.from_pretrained(model, str(tmp_path), is_trainable=True)
    assert all(p.requires_grad for p in model.parameters())


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_prompt_tuned_llama_matches_eager_and_trains(_fresh_dynamo):
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"))
    compiled = torch.compile(gm, fullgraph=True, dynamic=True, backend=models.COMPILE_BACKEND)
    with torch.no_grad():
        for batch, seq in [(2, 7), (3, 11)]:
            inputs = models.hf_inputs("llama", batch=batch, seq=seq)
            torch.testing.assert_close(compiled(**inputs).logits, gm(**inputs).logits, rtol=1e-5, atol=1e-5)
    inputs = models.hf_inputs("llama", batch=2, seq=8)
    eager = gm(**inputs, labels=inputs["input_ids"]).loss  # captures the labels signature
    eager.backward()
    eager_grad = gm.prompt_encoder.default.embedding.weight.grad.clone()
    gm.zero_grad()
    loss = compiled(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(gm.prompt_encoder.default.embedding.weight.grad, eager_grad)


def test_compiled_lstm_p_tuning_matches_eager_and_trains(_fresh_dynamo):
    """torch.compile cannot trace nn.LSTM: p-tuning's LSTM encoder must still compile with fullgraph."""
    model = models.TinyDecoder().eval()
    gm = fxpeft.transform(model, fxpeft.PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=8,
                                                            encoder_reparameterization_type="LSTM"))
    compiled = torch.compile(gm, fullgraph=True, dynamic=True, backend=models.COMPILE_BACKEND)
    for batch, seq in [(2, 7), (3, 11)]:
        ids = torch.randint(0, models.VOCAB, (batch, seq))
        torch.testing.assert_close(compiled(ids), gm(ids), rtol=1e-5, atol=1e-5)
    gm(ids).logsumexp(-1).mean().backward()
    eager_grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.grad is not None}
    gm.zero_grad()
    compiled(ids).logsumexp(-1).mean().backward()
    assert any("lstm_head" in n for n in eager_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(gm.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-6)


def test_written_out_lstm_equals_nn_lstm_over_layers_with_gradients():
    from fxpeft.passes.prompt import BidirectionalLSTM

    torch.manual_seed(0)
    ours = BidirectionalLSTM(6, 5, layers=3, dropout=0.0)
    reference = torch.nn.LSTM(6, 5, num_layers=3, bidirectional=True, batch_first=True)
    reference.load_state_dict(ours.state_dict())  # nn.LSTM's own parameter names
    steps = torch.randn(7, 6, requires_grad=True)
    got, expected = ours(steps), reference(steps.unsqueeze(0))[0][0]
    torch.testing.assert_close(got, expected)
    got.square().sum().backward()
    ours_grads = {n: p.grad.clone() for n, p in ours.named_parameters()} | {"input": steps.grad.clone()}
    steps.grad = None
    expected.square().sum().backward()
    expected_grads = {n: p.grad for n, p in reference.named_parameters()} | {"input": steps.grad}
    for name, grad in expected_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, msg=name)


@pytest.mark.parametrize("config_type", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_several_prompt_adapters_switch_like_peft(config_type):
    """PEFT's add_adapter / set_adapter with prompt-learning adapters of one type: several loaded, one acting
    (Cartridge's own test covers saving and loading several)."""
    model = models.llama().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), getattr(peft, config_type)(
        task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    reference.add_adapter("other", getattr(peft, config_type)(task_type="CAUSAL_LM", num_virtual_tokens=2))
    gm = fxpeft.transform(model, getattr(fxpeft, config_type)(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    gm.add_adapter("other", getattr(fxpeft, config_type)(task_type="CAUSAL_LM", num_virtual_tokens=2))
    gm.prompt_encoder.load_state_dict(reference.prompt_encoder.state_dict())
    inputs = models.hf_inputs("llama", batch=2, seq=6)
    outputs = switched_outputs(reference, gm, inputs, ("default", "other", "default"))
    assert outputs["default"].shape != outputs["other"].shape or (outputs["default"] - outputs["other"]).abs().max() > 1e-3
