"""A PEFT user's script with get_peft_model swapped for fxpeft.transform runs unchanged."""
from __future__ import annotations

import copy
import inspect

import peft
import torch
import transformers

import fxpeft
import models


def test_a_peft_script_runs_unchanged_on_the_result(tmp_path, capsys):
    model = models.llama()
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**config))  # was: get_peft_model(model, LoraConfig(...))

    # shaped like the model: class, signature, the attributes HF tooling reads
    assert isinstance(gm, transformers.LlamaForCausalLM) and isinstance(gm, transformers.PreTrainedModel)
    assert inspect.signature(gm.forward) == inspect.signature(model.forward)
    assert transformers.utils.generic.find_labels(type(gm)) == ["labels"]
    assert gm.config is model.config and gm.generation_config is model.generation_config
    assert (gm.name_or_path, gm.device, gm.dtype) == (model.name_or_path, model.device, model.dtype)

    gm.print_trainable_parameters()
    reference.print_trainable_parameters()
    ours, theirs = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs
    assert gm.get_nb_trainable_parameters() == reference.get_nb_trainable_parameters()

    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
    inputs = models.hf_inputs("llama")
    for _ in range(2):
        gm(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    gm.eval()
    with torch.no_grad():
        trained = gm(**inputs).logits
        with gm.disable_adapter():
            torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits)

    gm.save_pretrained(str(tmp_path / "adapter"))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, trained, rtol=1e-5, atol=1e-5)

    gm.add_adapter("other", fxpeft.LoraConfig(r=2, target_modules=["k_proj"]))  # PEFT's order: name, config
    gm.set_adapter("other")
    assert gm.active_adapters == ["other"] and gm.active_adapter == "other"
    gm.delete_adapter("other")
    assert gm.active_adapters == ["default"]
    gm.load_adapter(str(tmp_path / "adapter"), "again")
    assert sorted(gm.peft_config) == ["again", "default"]
    gm.delete_adapter("again")

    merged = gm.merge_and_unload()
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, trained, rtol=1e-4, atol=1e-5)
