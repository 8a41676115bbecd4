"""QLoRA with fxpeft: quantize the frozen base to 4 bits (nf4, double-quantized statistics),
train LoRA adapters on top, compile the whole graph without graph breaks, save the adapter
in PEFT's format and fold it into float weights for deployment. Offline, CPU, under a minute.
Needs the bnb extra: pip install -e ".[bnb]".
"""
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import fxpeft

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
float_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

# 1. one pipeline: quantize every linear layer but the LM head, then LoRA on top
bnb = fxpeft.BnbConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
gm = fxpeft.transform(model, [bnb, fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")])
del model  # fxpeft keeps only the quantized weights: dropping the float model frees its memory
base_bytes = sum(t.numel() * t.element_size() for k, t in gm.state_dict().items() if ".lora_" not in k)
print(f"base state dict: {base_bytes / float_bytes:.2f}x the float32 bytes")
fxpeft.print_trainable_parameters(gm)
print(gm.model.layers[0].self_attn.q_proj)

# 2. train the adapters (gradients reach only them), compiled without graph breaks from the first call
batch = torch.randint(0, 256, (4, 32))
compiled = torch.compile(gm, fullgraph=True)
optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=5e-3)
for step in range(6):
    loss = compiled(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {loss.item():.3f}")

with tempfile.TemporaryDirectory() as directory:
    # 3. the adapter alone, in PEFT's format (PeftModel.from_pretrained loads it on a 4-bit model)
    fxpeft.save_pretrained(gm, directory)

    # 4. deployment: dequantized weights + the merged adapter, float, under the base keys
    gm.eval()
    with torch.no_grad():
        expected = gm(input_ids=batch).logits
        merged = fxpeft.merge_and_unload(gm)
        print(f"merged float model: {type(merged.model.layers[0].self_attn.q_proj).__name__} layers, "
              f"max |difference| to the quantized adapted model {(merged(input_ids=batch).logits - expected).abs().max():.1e}")
