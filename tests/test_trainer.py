"""transformers.Trainer end to end on an fxpeft module, with default training arguments.

The plain Trainer trains, evaluates and saves (PEFT's adapter format, never the base); resuming
and load_best_model_at_end need fxpeft.integrations.Trainer (see its module docstring for why).
One uninterrupted run (module-scoped fixture) serves most tests.
"""
from __future__ import annotations

import copy
import json
import os
from types import SimpleNamespace

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import fxpeft
import models
from fxpeft.integrations import Trainer as FxTrainer
from peft_oracle import copy_adapter_weights

STEPS, SAVE_STEPS = 8, 4  # 48 rows in batches of 8 (the default): checkpoint-4 falls inside the first epoch
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def rows(count: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(count):
        start = int(torch.randint(0, models.VOCAB - 1, (), generator=g))
        ids = (start + 3 * torch.arange(12)) % (models.VOCAB - 1) + 1  # each token is the previous + 3: learnable
        labels = ids.clone()
        labels[: i % 3] = -100  # ignored tokens, so Trainer's num_items_in_batch is not just the token count
        # "row" is not a forward argument: Trainer must drop it, reading the class's forward signature
        data.append({"input_ids": ids, "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels,
                     "row": i})
    return data


TRAIN, EVAL = rows(48, seed=0), rows(8, seed=1)


def arguments(output_dir, **overrides) -> transformers.TrainingArguments:
    """Default TrainingArguments but for what the test needs to say."""
    settings = dict(max_steps=STEPS, save_steps=SAVE_STEPS, report_to=[], use_cpu=True)
    return transformers.TrainingArguments(output_dir=str(output_dir), **{**settings, **overrides})


def adapter_state(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def fresh_module(base):
    return fxpeft.transform(copy.deepcopy(base), fxpeft.LoraConfig(**LORA))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train with the plain transformers.Trainer; PEFT trains its own model from the same start."""
    torch.manual_seed(0)
    base = models.llama()
    oracle = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**LORA))
    gm = fxpeft.transform(base, fxpeft.LoraConfig(**LORA))
    copy_adapter_weights(oracle, gm)
    out = tmp_path_factory.mktemp("trainer")
    trainer = transformers.Trainer(model=gm, args=arguments(out), train_dataset=TRAIN, eval_dataset=EVAL)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    trainer.save_model()
    transformers.Trainer(model=oracle, args=arguments(tmp_path_factory.mktemp("peft")), train_dataset=TRAIN).train()
    return SimpleNamespace(base=base, gm=gm, trainer=trainer, out=out, before=before, after=after, oracle=oracle)


def test_trains_like_peft(run):
    assert run.after["eval_loss"] < run.before["eval_loss"]
    theirs = {k.removeprefix("base_model.model."): v for k, v in adapter_state(run.oracle).items()}
    ours = adapter_state(run.gm)
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-5, atol=1e-7, msg=name)


def test_eval_loss_is_the_models_loss(run):
    batch = {k: torch.stack([torch.as_tensor(r[k]) for r in EVAL]) for k in ("input_ids", "attention_mask", "labels")}
    run.gm.eval()
    with torch.no_grad():
        expected = run.gm(**batch).loss.item()
    assert run.after["eval_loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("folder", [".", "checkpoint-4", "checkpoint-8"])
def test_saved_folders_hold_only_the_adapter(run, folder):
    path = os.path.join(run.out, folder)
    files = set(os.listdir(path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                        "pytorch_model.bin.index.json"}
    saved = load_file(os.path.join(path, "adapter_model.safetensors"))
    expected = {"base_model.model." + name.replace(".default.", ".") for name in adapter_state(run.gm)}
    assert set(saved) == expected
    with open(os.path.join(path, "adapter_config.json")) as handle:
        config = json.load(handle)
    assert (config["peft_type"], config["r"], sorted(config["target_modules"])) == ("LORA", 4, ["q_proj", "v_proj"])


def test_saved_model_is_the_trained_adapter_and_peft_loads_it(run):
    saved = load_file(os.path.join(run.out, "adapter_model.safetensors"))
    for name, value in adapter_state(run.gm).items():
        torch.testing.assert_close(saved["base_model.model." + name.replace(".default.", ".")], value, rtol=0, atol=0)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(run.base), str(run.out)).eval()
    inputs = models.hf_inputs("llama")
    run.gm.eval()
    with torch.no_grad():
        ours, theirs = run.gm(**inputs).logits, loaded(**inputs).logits
        with loaded.disable_adapter():
            untrained = loaded(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, untrained, atol=1e-5)  # the adapter changes the outputs: the check means something


def test_resume_continues_to_the_same_adapter(run, tmp_path):
    gm = fresh_module(run.base)  # its random lora_A differs from the checkpoint's until the resume loads it
    optimizer_before = torch.load(os.path.join(run.out, "checkpoint-4", "optimizer.pt"), weights_only=True)
    trainer = FxTrainer(model=gm, args=arguments(tmp_path), train_dataset=TRAIN)
    trainer.train(resume_from_checkpoint=os.path.join(run.out, "checkpoint-4"))
    assert trainer.state.global_step == STEPS
    assert optimizer_before["state"]  # Adam moments were saved, so restoring them changes the outcome
    expected = adapter_state(run.gm)
    for name, value in adapter_state(gm).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-6, atol=1e-8, msg=name)


def test_plain_trainer_cannot_resume_from_an_adapter_checkpoint(run, tmp_path):
    """Documented limitation: transformers.Trainer loads adapter-only checkpoints only for peft.PeftModel."""
    trainer = transformers.Trainer(model=fresh_module(run.base), args=arguments(tmp_path), train_dataset=TRAIN)
    with pytest.raises(ValueError, match="Can.t find a checkpoint index"):
        trainer.train(resume_from_checkpoint=os.path.join(run.out, "checkpoint-4"))


def test_load_best_model_at_end(run, tmp_path):
    gm = fresh_module(run.base)
    # "best" is the higher eval loss, i.e. the earlier checkpoint, so loading it is visible in the weights
    args = arguments(tmp_path, eval_strategy="steps", eval_steps=SAVE_STEPS, load_best_model_at_end=True,
                     metric_for_best_model="loss", greater_is_better=True)
    trainer = FxTrainer(model=gm, args=args, train_dataset=TRAIN, eval_dataset=EVAL)
    trainer.train()
    assert os.path.basename(trainer.state.best_model_checkpoint) == "checkpoint-4"
    best = load_file(os.path.join(tmp_path, "checkpoint-4", "adapter_model.safetensors"))
    last = load_file(os.path.join(tmp_path, "checkpoint-8", "adapter_model.safetensors"))
    assert any(not torch.equal(best[key], last[key]) for key in best)  # which one was loaded shows
    for name, value in adapter_state(gm).items():
        torch.testing.assert_close(value, best["base_model.model." + name.replace(".default.", ".")], rtol=0, atol=0)


@pytest.mark.parametrize("model", ["plain model", "no adapters"])
def test_integration_refuses_a_model_without_adapters(run, tmp_path, model):
    module = models.llama() if model == "plain model" else fxpeft.transform(models.llama(), [])
    with pytest.raises(ValueError, match=r"fxpeft\.transform\(model, fxpeft\.LoraConfig"):
        FxTrainer(model=module, args=arguments(tmp_path), train_dataset=TRAIN)


def test_gradient_checkpointing_through_trainer_trains_like_without(run, tmp_path):
    """TrainingArguments(gradient_checkpointing=True) reaches fxpeft's blocks (Trainer calls
    activation_checkpointing_enable); the adapter after two steps is the one without it."""
    finals = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        module = fresh_module(run.base)
        trainer = transformers.Trainer(model=module, train_dataset=TRAIN, args=arguments(
            tmp_path / str(checkpointing), max_steps=2, gradient_checkpointing=checkpointing))
        trainer.train()
        assert module.is_gradient_checkpointing == checkpointing
        finals.append(adapter_state(module))
    for name, value in finals[0].items():
        torch.testing.assert_close(finals[1][name], value, rtol=1e-5, atol=1e-6)


def test_save_with_a_gathered_state_dict(run, tmp_path):
    """Under FSDP / DeepSpeed Trainer gathers the full weights and passes them as state_dict=: they are
    what gets written (here they differ from the module's own by one), mapped to PEFT's keys."""
    gathered = {name: value.detach().clone() + ("lora_" in name) for name, value in run.gm.state_dict().items()}
    run.trainer._save(str(tmp_path), state_dict=gathered)
    written = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    own = load_file(os.path.join(run.out, "adapter_model.safetensors"))
    assert set(written) == set(own)
    for key, value in written.items():
        torch.testing.assert_close(value, own[key] + 1, rtol=0, atol=0)
    assert not {"model.safetensors", "pytorch_model.bin"} & set(os.listdir(tmp_path))
    partial = {name: value for name, value in gathered.items() if "q_proj.lora_A" not in name}
    with pytest.raises(ValueError, match="state_dict lacks tensors of adapter 'default'"):
        run.gm.save_pretrained(str(tmp_path / "partial"), state_dict=partial)
