"""Fine-tune an image classifier with LoRA: a ViT (built from a config, so it runs offline in
seconds) with LoRA on its attention and a new classification head trained in full
(`modules_to_save`), as in PEFT's image-classification guide; then save the adapter in PEFT's
format and merge it into a plain ViT for deployment. Runs on a CPU."""
import tempfile
import time

import torch
from transformers import ViTConfig, ViTForImageClassification

import fxpeft

start = time.time()
print("building a tiny ViT classifier (3 classes) from its config ...", flush=True)
torch.manual_seed(0)
config = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                   num_attention_heads=4, intermediate_size=128, num_labels=3)
model = ViTForImageClassification(config)

print("transforming: LoRA on q_proj/v_proj, the classifier head trained in full ...", flush=True)
lora = fxpeft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"],
                         modules_to_save=["classifier"])
gm = fxpeft.transform(model, lora)
gm.print_trainable_parameters()
print(fxpeft.inspect(gm))

# a toy dataset: the class is which colour channel is brightest
images = torch.randn(48, 3, 32, 32)
labels = torch.randint(0, 3, (48,))
images[torch.arange(48), labels] += 1.0

print("training 20 steps ...", flush=True)
gm.train()
optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=3e-3)
for step in range(20):
    batch = torch.randint(0, 48, (16,))
    loss = gm(pixel_values=images[batch], labels=labels[batch]).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if step % 5 == 0 or step == 19:
        print(f"  step {step:2d}  loss {loss.item():.4f}", flush=True)

gm.eval()
with torch.no_grad():
    accuracy = (gm(pixel_values=images).logits.argmax(-1) == labels).float().mean().item()
print(f"train accuracy: {accuracy:.2f}")

workdir = tempfile.mkdtemp()
gm.save_pretrained(f"{workdir}/adapter")  # PEFT's files: PeftModel.from_pretrained loads them too
print("saved adapter (PEFT format) to", f"{workdir}/adapter")

print("merging for deployment: a plain ViTForImageClassification with the adapter folded in ...", flush=True)
with torch.no_grad():
    adapted = gm(pixel_values=images[:4]).logits
    merged = fxpeft.merge_and_unload(gm)
    deployed = ViTForImageClassification(config).eval()
    deployed.load_state_dict(merged.state_dict(), strict=True)  # the trained head included
    print("max |deployed - adapted| :", (deployed(pixel_values=images[:4]).logits - adapted).abs().max().item())
print(f"done in {time.time() - start:.1f} s")
