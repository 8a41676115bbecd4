"""One base model, several task adapters, one compiled graph serving a mixed batch.

Each request in the batch names its adapter (or "__base__"); the compiled module serves them
all at once and switching the default adapter never recompiles. Runs offline on a CPU."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxpeft

torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()

# three task adapters of different ranks (random weights stand in for trained ones)
tasks = {"summarize": 4, "translate": 8, "classify": 2}
first, *others = tasks
gm = fxpeft.transform(base, fxpeft.LoraConfig(r=tasks[first], target_modules="all-linear", init_lora_weights=False),
                      adapter_name=first)
for name in others:
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=tasks[name], target_modules="all-linear", init_lora_weights=False), name)
gm.eval()

compiled = torch.compile(gm, fullgraph=True)
requests = ["summarize", "__base__", "translate", "classify", "translate", "summarize"]
batch = {"input_ids": torch.randint(0, 256, (len(requests), 16)),
         "attention_mask": torch.ones(len(requests), 16, dtype=torch.long)}
index = fxpeft.adapter_indices(gm, requests)  # a tensor: the compiled graph never specialises on names

with torch.no_grad():
    served = compiled(**batch, adapter_names=index).logits
    for row, name in enumerate(requests):  # each answer equals running that request alone
        single = {k: v[row:row + 1] for k, v in batch.items()}
        if name == "__base__":
            with fxpeft.disable_adapters(gm):
                alone = gm(**single).logits
        else:
            fxpeft.set_adapter(gm, name)
            alone = gm(**single).logits
        print(f"request {row} ({name:>9}): max |mixed - alone| = {(served[row] - alone[0]).abs().max().item():.2e}")

    compiled(**batch)  # the single-adapter graph, compiled once
    torch._dynamo.config.error_on_recompile = True  # from here on, switching adapters must not recompile
    for name in tasks:
        fxpeft.set_adapter(gm, name)
        compiled(**batch)
    compiled(**batch, adapter_names=fxpeft.adapter_indices(gm, list(reversed(requests))))
    print("switched between", list(tasks), "and served another mixed batch: no recompiles")
