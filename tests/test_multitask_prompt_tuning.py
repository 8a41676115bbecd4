"""Multitask prompt tuning: against PEFT (outputs, checkpoints both ways, training, inits) and its formula,
and the per-call ``task_ids`` input it reads (fxpeft/registry.py ``Method.call_inputs``)."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors

TASK_IDS = torch.tensor([0, 2])
# T5: PEFT's default num_transformer_submodules=2 puts the prompt's second half in front of the decoder's inputs
# (its forward; its generate uses the encoder's half only); 1: the encoder's inputs only
CASES = {"llama": dict(task_type="CAUSAL_LM"), "t5": dict(task_type="SEQ_2_SEQ_LM"),
         "t5-encoder": dict(task_type="SEQ_2_SEQ_LM", num_transformer_submodules=1),
         "bart": dict(task_type="SEQ_2_SEQ_LM")}  # BART: decoder start (2) is not pad (1)
SIZES = dict(num_virtual_tokens=3, num_tasks=3, num_ranks=2)


def _inputs(name):
    inputs = models.hf_inputs(name, batch=2, seq=6)
    labels = models.hf_labels(name, inputs)
    inputs.pop("decoder_input_ids", None)  # PEFT's seq2seq MPT builds the decoder inputs from the labels
    return inputs, labels


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(name, base model, PEFT model, fxpeft module from PEFT's checkpoint, PEFT's folder)."""
    case = request.param
    name = case.split("-")[0]
    model = getattr(models, name)().eval()
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.MultitaskPromptTuningConfig(
        **CASES[case], **SIZES)).eval()
    with torch.no_grad():  # tasks that differ clearly
        reference.prompt_encoder.default.prefix_task_cols.normal_()
        reference.prompt_encoder.default.prefix_task_rows.normal_()
    folder = tmp_path_factory.mktemp(f"mpt-{case}")
    reference.save_pretrained(folder / "peft")
    gm = fxpeft.from_pretrained(model, str(folder / "peft"))
    return name, model, reference, gm, folder


def test_peft_checkpoint_loads_with_equal_outputs_and_losses(pair):
    name, model, reference, gm, _ = pair
    assert isinstance(gm.peft_config["default"], fxpeft.MultitaskPromptTuningConfig)
    inputs, labels = _inputs(name)
    with torch.no_grad():
        expected = reference(**inputs, labels=labels, task_ids=TASK_IDS)
        got = gm(**inputs, labels=labels, task_ids=TASK_IDS)
        other = gm(**inputs, labels=labels, task_ids=torch.tensor([1, 1]))
    assert got.logits.shape == expected.logits.shape
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    assert (got.logits[1] - other.logits[1]).abs().max() > 1e-3  # the task picks the prompt


def test_saved_checkpoint_is_peft_s_and_peft_loads_it(pair, tmp_path):
    name, model, reference, gm, folder = pair
    fxpeft.save_pretrained(gm, str(tmp_path))
    assert_same_saved_tensors(folder / "peft", tmp_path)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    inputs, labels = _inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs, labels=labels, task_ids=TASK_IDS).logits,
                                   gm(**inputs, labels=labels, task_ids=TASK_IDS).logits, rtol=1e-5, atol=1e-5)


def test_prompt_is_the_shared_prompt_times_the_task_s_low_rank_matrix(pair):
    """Each sample's virtual tokens: P ⊙ (cols[t] @ rows[t]); a sample's output does not depend on the others'
    tasks."""
    name, _, _, gm, _ = pair
    encoder = gm.prompt_encoder.default
    with torch.no_grad():
        prompt = encoder(TASK_IDS)
        for row, task in enumerate(TASK_IDS.tolist()):
            expected = encoder.embedding.weight * (encoder.prefix_task_cols[task] @ encoder.prefix_task_rows[task])
            torch.testing.assert_close(prompt[row], expected)
        inputs, labels = _inputs(name)
        both = gm(**inputs, labels=labels, task_ids=TASK_IDS).logits
        alone = gm(**{k: v[1:] for k, v in inputs.items()}, labels=labels[1:], task_ids=TASK_IDS[1:]).logits
        torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)


def test_same_seed_gives_peft_s_init_and_training_matches_peft():
    model = models.llama().eval()
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", **SIZES))
    torch.manual_seed(0)
    gm = fxpeft.transform(model, fxpeft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **SIZES))
    theirs = reference.prompt_encoder.default.state_dict()
    for key, value in gm.prompt_encoder.default.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=0, atol=0)
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    inputs, labels = _inputs("llama")
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.05) for m in (reference, gm)]
    for step in range(3):
        task_ids = torch.tensor([step % 3, 2 - step % 3])
        losses = []
        for module, optimizer in zip((reference, gm), optimizers):
            loss = module(**inputs, labels=labels, task_ids=task_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    theirs = reference.prompt_encoder.default.state_dict()
    for key, value in gm.prompt_encoder.default.state_dict().items():
        torch.testing.assert_close(value, theirs[key], rtol=1e-5, atol=1e-6)
    assert (gm.prompt_encoder.default.prefix_task_rows - _fresh_rows()).abs().max() > 1e-3  # it trained


def _fresh_rows():
    torch.manual_seed(0)
    return fxpeft.transform(models.llama(), fxpeft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", **SIZES)).prompt_encoder.default.prefix_task_rows.detach()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A source MPT checkpoint (PEFT's, three tasks, factors far from their init)."""
    model = models.llama().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", **SIZES))
    with torch.no_grad():
        for param in reference.prompt_encoder.parameters():
            param.normal_()
    folder = tmp_path_factory.mktemp("mpt-source")
    reference.save_pretrained(folder)
    return model, reference, str(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_source_task_inits_read_a_source_checkpoint_as_peft_does(source, init):
    model, reference, path = source
    tasks = 3 if init == "ONLY_SOURCE_SHARED" else 1  # the averaged / picked factors hold one task
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=3, num_ranks=2, num_tasks=tasks, prompt_tuning_init=init,
                  prompt_tuning_init_state_dict_path=path, prompt_tuning_init_task=2)
    torch.manual_seed(1)
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.MultitaskPromptTuningConfig(**kwargs))
    torch.manual_seed(1)
    gm = fxpeft.transform(model, fxpeft.MultitaskPromptTuningConfig(**kwargs))
    for key, value in theirs.prompt_encoder.default.state_dict().items():
        torch.testing.assert_close(gm.prompt_encoder.default.state_dict()[key], value, rtol=0, atol=0)
    torch.testing.assert_close(gm.prompt_encoder.default.embedding.weight,
                               reference.prompt_encoder.default.embedding.weight)


def test_generate_equals_greedy_over_peft_s_forward():
    """PEFT 0.21.2's generate drifts after the first step for prompt methods on transformers 5.24: greedy
    decoding over PEFT's forward on the whole sequence is the oracle (as for prompt tuning)."""
    torch.manual_seed(0)
    model = models.llama().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", **SIZES)).eval()
    with torch.no_grad():
        for param in reference.prompt_encoder.parameters():
            param.normal_()
    gm = fxpeft.transform(model, fxpeft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **SIZES)).eval()
    gm.prompt_encoder.load_state_dict(reference.prompt_encoder.state_dict())
    inputs = models.hf_inputs("llama", batch=2)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        for _ in range(5):
            step = reference(input_ids=ids, attention_mask=mask, task_ids=TASK_IDS).logits[:, -1]
            ids = torch.cat([ids, step.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, mask[:, -1:]], dim=1)
    got = gm.generate(**inputs, task_ids=TASK_IDS, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, ids)
    other = gm.generate(**inputs, task_ids=torch.tensor([1, 1]), max_new_tokens=5, do_sample=False)
    assert not torch.equal(other, got)  # the tasks pick the prompt in generation too
    with pytest.raises(ValueError, match="task_ids cannot be None"):
        gm.generate(**inputs, max_new_tokens=2)


def test_seq2seq_decoder_half_where_peft_fails():
    """With decoder ids given (PEFT's seq2seq MPT forward then fails: it builds the decoder's inputs from the
    labels only) they get the prompt's second half in front as the labels-only call does: equal outputs."""
    model = models.t5().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.MultitaskPromptTuningConfig(
        **CASES["t5"], **SIZES)).eval()
    gm = fxpeft.transform(model, fxpeft.MultitaskPromptTuningConfig(**CASES["t5"], **SIZES)).eval()
    gm.prompt_encoder.load_state_dict(reference.prompt_encoder.state_dict())
    inputs, labels = _inputs("t5")
    with torch.no_grad():
        expected = reference(**inputs, labels=labels, task_ids=TASK_IDS)
        decoder_ids = model._shift_right(labels)
        got = gm(**inputs, labels=labels, decoder_input_ids=decoder_ids, task_ids=TASK_IDS)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
        masked = gm(**inputs, decoder_input_ids=decoder_ids, decoder_attention_mask=torch.ones_like(decoder_ids),
                    task_ids=TASK_IDS)
        torch.testing.assert_close(masked.logits, expected.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["t5", "t5-encoder"])
def test_seq2seq_generate_equals_peft_s(case):
    """The encoder runs once with task_ids, its outputs carry each row's prompt (PEFT's generate puts the
    encoder's half alone in front, whatever num_transformer_submodules says)."""
    model = models.t5().eval()
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.MultitaskPromptTuningConfig(
        **CASES[case], **SIZES)).eval()
    with torch.no_grad():
        for param in reference.prompt_encoder.parameters():
            param.normal_()
    gm = fxpeft.transform(model, fxpeft.MultitaskPromptTuningConfig(**CASES[case], **SIZES)).eval()
    gm.prompt_encoder.load_state_dict(reference.prompt_encoder.state_dict())
    inputs, _ = _inputs("t5")
    kw = dict(max_new_tokens=5, do_sample=False, suppress_tokens=[0, 1])  # the tiny T5 otherwise emits pad / eos
    expected = reference.generate(**inputs, task_ids=TASK_IDS, **kw)
    assert torch.equal(gm.generate(**inputs, task_ids=TASK_IDS, **kw), expected)
    assert not torch.equal(expected, model.generate(**inputs, **kw))  # the prompt changes the tokens


def test_task_ids_errors_and_disabled_adapter():
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **SIZES))
    inputs, _ = _inputs("llama")
    with pytest.raises(ValueError, match="task_ids cannot be None.*pass task_ids="):
        gm(**inputs)
    gm.add_adapter("other", fxpeft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **SIZES))
    with pytest.raises(ValueError, match="one at a time"):  # PEFT's set_adapter takes one (only the first acted)
        gm.set_adapter(["default", "other"])
    with torch.no_grad(), fxpeft.disable_adapters(gm):  # the base model: task_ids not needed, accepted (as PEFT)
        torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits)
        torch.testing.assert_close(gm(**inputs, task_ids=TASK_IDS).logits, model(**inputs).logits)
    lora = fxpeft.transform(model, fxpeft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no adapter of this model reads it.*without task_ids"):
        lora(**inputs, task_ids=TASK_IDS)


def test_config_validation_as_peft():
    with pytest.raises(ValueError, match="prompt_tuning_init_state_dict_path needs to be specified"):
        fxpeft.MultitaskPromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="AVERAGE_SOURCE_TASKS")
    with pytest.raises(ValueError, match="prompt_tuning_init must be one of"):
        fxpeft.MultitaskPromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="SOMETHING")
    with pytest.raises(ValueError, match="num_tasks must be a positive integer"):
        fxpeft.MultitaskPromptTuningConfig(num_virtual_tokens=2, num_tasks=0)
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        fxpeft.MultitaskPromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="TEXT", prompt_tuning_init_text="x")
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        fxpeft.MultitaskPromptTuningConfig()
    config = fxpeft.MultitaskPromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init=fxpeft.MultitaskPromptTuningInit.RANDOM)
    assert config.prompt_tuning_init == "RANDOM" and config.num_tasks == 1 and config.num_ranks == 1


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_module_reads_task_ids_as_data(_fresh_dynamo):
    """task_ids is a graph input: other tasks do not recompile the compiled module."""
    from torch._dynamo.testing import CompileCounterWithBackend

    gm = fxpeft.transform(models.llama().eval(), fxpeft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", **SIZES)).eval()
    counter = CompileCounterWithBackend(models.COMPILE_BACKEND)
    compiled = torch.compile(gm, fullgraph=True, dynamic=True, backend=counter)
    inputs, _ = _inputs("llama")
    with torch.no_grad():
        for task_ids in ([0, 2], [1, 1], [2, 0]):
            task_ids = torch.tensor(task_ids)
            torch.testing.assert_close(compiled(**inputs, task_ids=task_ids).logits,
                                       gm(**inputs, task_ids=task_ids).logits, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_compiled_generate_reads_task_ids_as_data(_fresh_dynamo):
    """generate with compile_config: other task vectors run the same compiled step (no recompile), with the
    eager tokens."""
    torch.manual_seed(0)
    gm = fxpeft.transform(models.llama().eval(), fxpeft.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", **SIZES)).eval()
    with torch.no_grad():
        for param in gm.prompt_encoder.parameters():
            param.normal_()
    models.assert_compiled_generate_reads_task_ids(gm)
