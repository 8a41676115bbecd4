"""fxpeft quick start: LoRA on a small Llama built from a config, a few training steps,
and what the compiler pass rewrote. Runs offline on a CPU in well under a minute."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxpeft

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))

# 1. capture -> canonicalize -> LoRA pass -> a plain GraphModule called like the model
gm = fxpeft.transform(model, fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
fxpeft.print_trainable_parameters(gm)

# 2. train the adapter: the base weights stay frozen and untouched
batch = torch.randint(0, 256, (4, 32))
optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=5e-3)
gm.train()
for step in range(10):
    loss = gm(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")

# 3. what was rewritten: every adapted site, then the nodes the LoRA pass inserted at one of them
gm.eval()
print()
report = fxpeft.inspect(gm)
print(report)
site = "model.layers.0.self_attn.q_proj"
print(f"\nwhat the LoRA pass inserted at {site} (the layer runs as its block's graph, gm.model.layers[0]):")
for node in report.graph.nodes:
    if node.meta.get("fxpeft_site") == site:
        print(f"  {node.op:<14}{node.target}")
with torch.no_grad():
    print("\nlogits:", gm(input_ids=batch[:1, :8]).logits.shape)
