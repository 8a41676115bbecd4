"""Prompt tuning and prefix tuning as graph rewrites: on a small Llama (saved in PEFT's format)
and on a hand-written decoder that PEFT's prompt methods cannot wrap. Runs offline on a CPU."""
import tempfile

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import fxpeft

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
batch = torch.randint(0, 256, (4, 24))


def train(gm, steps=8, **call):
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=3e-2)
    gm.train()
    for step in range(steps):
        out = gm(batch, **call)
        loss = out.loss if hasattr(out, "loss") else F.cross_entropy(out[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"  loss after {steps} steps: {loss.item():.3f}")
    return gm.eval()


# 1. prompt tuning: 8 virtual tokens in front of the token embeddings; the attention mask, labels
#    (-100) and positions are extended inside the graph, so logits cover 8 + 24 positions, as PEFT's
print("prompt tuning on Llama")
gm = fxpeft.transform(model, fxpeft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
fxpeft.print_trainable_parameters(gm)
train(gm, labels=batch)
with torch.no_grad():
    print("  logits:", tuple(gm(batch[:1]).logits.shape))
    with fxpeft.disable_adapters(gm):
        print("  base logits:", tuple(gm(batch[:1]).logits.shape))
with tempfile.TemporaryDirectory() as folder:
    fxpeft.save_pretrained(gm, folder)  # PEFT's prompt_embeddings format: peft.PeftModel.from_pretrained loads it
    loaded = fxpeft.from_pretrained(model, folder)
    with torch.no_grad():
        print("  reloaded equal:", torch.allclose(loaded(batch).logits, gm(batch).logits, atol=1e-6))

# 2. prefix tuning: learned keys/values at every attention; layers and the 2 key/value heads of
#    this grouped-query model are read from the graph
print("prefix tuning on Llama")
gm = fxpeft.transform(model, fxpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
print("  layout:", {k: getattr(gm.peft_config["default"], k) for k in ("num_layers", "num_attention_heads", "token_dim")})
train(gm, labels=batch)


# 3. a custom decoder (no transformers, no past_key_values): the same passes apply
class Decoder(nn.Module):
    def __init__(self, vocab=256, dim=64, heads=4):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, vocab)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        b, s, d = x.shape
        q, k, v = (t.reshape(b, s, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, d)
        return self.out(x)


print("prefix tuning on a custom decoder")
decoder = Decoder()
gm = fxpeft.transform(decoder, fxpeft.PrefixTuningConfig(num_virtual_tokens=4), example_inputs=(batch,))
train(gm)
attention = next(n for n in gm.graph.nodes if "scaled_dot_product_attention" in str(n.target))
print("  attention after the pass:", attention.format_node())
