"""fxpeft quick start: LoRA on a small Llama built from a config, a few training steps,
and what the compiler pass rewrote. Runs offline on a CPU in well under a minute."""
print("fxpeft quick start: importing torch and transformers (a few seconds) ...", flush=True)

import os  # noqa: E402  (imports after the first line: the user sees something at once)
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import fxpeft  # noqa: E402

torch.manual_seed(0)
print("1. building a tiny Llama from a config (2 layers, hidden size 64, random weights)")
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))

# capture -> canonicalize -> LoRA pass -> a module called like the model (a progress bar on a terminal)
print("2. fxpeft.transform: capturing the model into a graph and inserting LoRA at every linear layer ...", flush=True)
start = time.perf_counter()
gm = fxpeft.transform(model, fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.05))
print(f"   done in {time.perf_counter() - start:.1f} s; ", end="")
fxpeft.print_trainable_parameters(gm)

print("3. training the adapter for 10 steps (the base weights stay frozen and untouched)", flush=True)
batch = torch.randint(0, 256, (4, 32))
optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=5e-3)
gm.train()
for step in range(10):
    loss = gm(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"   step {step}: loss {loss.item():.3f}", flush=True)
gm.eval()

print("4. what the pass rewrote: every adapted layer, its method, adapters and rank\n")
report = fxpeft.inspect(gm)
print(report)
picture = os.path.join(tempfile.gettempdir(), "fxpeft_quickstart.svg")
report.summary().save(picture)
print(f"\nThe whole model in one picture: {picture}")
print("Draw one layer with report.site('model.layers.0.self_attn.q_proj').save('site.svg'), "
      "or from a shell: fxpeft inspect MODEL_DIR ADAPTER_DIR --out pic.svg")
