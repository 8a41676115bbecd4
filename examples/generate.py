"""Fine-tune a LoRA adapter for a few steps, generate with it, then serve a mixed batch in which
every prompt names its own adapter. Runs offline on a CPU (a tiny random Llama stands in for a
pretrained one).

gm.generate is transformers' generate (greedy, sampling, beam search, generation_config …); each
step runs fxpeft's graph over a static KV cache, so a new token costs one token's forward."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxpeft

torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
gm = fxpeft.transform(base, fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), adapter_name="count")

# teach the "count" adapter to continue 1 2 3 … (token i is followed by i + 1)
optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=1e-2)
gm.train()
for step in range(60):
    starts = torch.randint(1, 40, (16, 1))
    batch = starts + torch.arange(12)
    loss = gm(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
gm.eval()
print(f"loss after training: {loss.item():.3f}")

prompt = torch.tensor([[10, 11, 12, 13]])
with torch.no_grad():
    counted = gm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    with gm.disable_adapter():
        untrained = gm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
print("with the adapter:", counted[0].tolist())
print("base model:      ", untrained[0].tolist())

# a second adapter, and a batch in which each prompt names its adapter: one decode graph for all
fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False), "other")
gm.eval()
prompts = torch.tensor([[0, 0, 20, 21], [5, 6, 7, 8], [30, 31, 32, 33]])  # the first left-padded
mask = (prompts != 0).long()
requests = ["count", "other", "__base__"]
with torch.no_grad():
    served = gm.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                         adapter_names=requests)
    for row, name in enumerate(requests):  # the same as generating each prompt alone with its adapter
        alone = dict(input_ids=prompts[row:row + 1], attention_mask=mask[row:row + 1], max_new_tokens=4,
                     do_sample=False, pad_token_id=0)
        if name == "__base__":
            with gm.disable_adapter():
                single = gm.generate(**alone)
        else:
            gm.set_adapter(name)
            single = gm.generate(**alone)
        assert torch.equal(single[0], served[row]), name
        print(f"{name:>9}: {served[row].tolist()}")
