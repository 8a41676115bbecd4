"""Train a LoRA adapter with transformers.Trainer: a small Llama built from a config, a toy
dataset built here, evaluate, save (PEFT's adapter format), resume, and load the adapter back
with fxpeft.from_pretrained. Runs offline on a CPU in well under a minute.

transformers.Trainer itself trains, evaluates and saves an fxpeft module; fxpeft.integrations.Trainer
(used here) also loads its adapter checkpoints back, for resume_from_checkpoint and
load_best_model_at_end, which the plain Trainer does only for peft.PeftModel.
"""
import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

import fxpeft
from fxpeft.integrations import Trainer

torch.manual_seed(0)
VOCAB = 128
model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def toy_rows(count: int, seed: int) -> list[dict]:
    """Counting sequences (each token is the previous + 1): something a model can learn quickly."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        ids = (torch.randint(0, VOCAB, (), generator=g) + torch.arange(16)) % VOCAB
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


train, evaluation = toy_rows(128, seed=0), toy_rows(16, seed=1)

gm = fxpeft.transform(model, fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
gm.print_trainable_parameters()

output_dir = tempfile.mkdtemp(prefix="fxpeft-trainer-")
args = TrainingArguments(output_dir=output_dir, max_steps=20, save_steps=10, logging_steps=5, learning_rate=1e-2,
                         report_to=[], use_cpu=True)
trainer = Trainer(model=gm, args=args, train_dataset=train, eval_dataset=evaluation)
print("eval loss before:", round(trainer.evaluate()["eval_loss"], 3))
trainer.train()
print("eval loss after: ", round(trainer.evaluate()["eval_loss"], 3))
trainer.save_model()  # adapter_config.json + adapter_model.safetensors, never the frozen base
print("saved:", sorted(f for f in os.listdir(output_dir) if not f.startswith("checkpoint")))

# resume: the same run continued from its middle checkpoint ends with the same adapter
gm_resumed = fxpeft.transform(model, fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
resumed = Trainer(model=gm_resumed, args=args, train_dataset=train)
resumed.train(resume_from_checkpoint=os.path.join(output_dir, "checkpoint-10"))
same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gm.parameters(), gm_resumed.parameters()))
print("resumed run ends with the same adapter:", same)
assert same

# load the adapter Trainer saved onto the base model (peft.PeftModel.from_pretrained reads it too)
reloaded = fxpeft.from_pretrained(model, output_dir).eval()
batch = torch.stack([row["input_ids"] for row in evaluation[:2]])
with torch.no_grad():
    equal = torch.allclose(gm.eval()(input_ids=batch).logits, reloaded(input_ids=batch).logits, atol=1e-5)
print("reloaded adapter gives the same logits:", equal)
assert equal
