"""Fine-tune a diffusers UNet with LoRA (and LoKr), save the adapter in PEFT's format, load it with
diffusers' own `load_lora_adapter`, and merge it for deployment.

The UNet is a tiny `UNet2DConditionModel` built from a config (offline, seconds on a CPU); a Stable
Diffusion UNet from `from_pretrained` takes the same steps. diffusers comes with the `dev` extra
(`pip install -e ".[dev]"`); fxpeft itself never imports it."""
import copy
import json
import tempfile
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file

import fxpeft

start = time.time()
print("building a tiny UNet2DConditionModel from its config ...", flush=True)
torch.manual_seed(0)
unet_config = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), mid_block_type=None,
                   cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
unet = UNet2DConditionModel(**unet_config).eval()
scheduler = DDPMScheduler(num_train_timesteps=1000)

# toy data: latents and text embeddings (a real run gets them from the VAE and the text encoder)
latents, text = torch.randn(16, 4, 8, 8), torch.randn(16, 5, 16)
example = (latents[:2], torch.tensor([10, 500]), text[:2])  # the UNet is captured with torch.export on these


def train(gm, steps: int, lr: float):
    """The standard denoising objective: predict the noise added at a random timestep."""
    gm.train()
    optimizer = torch.optim.AdamW([p for p in gm.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        batch = torch.randint(0, 16, (4,))
        noise = torch.randn(4, 4, 8, 8)
        timesteps = torch.randint(0, 1000, (4,))
        noisy = scheduler.add_noise(latents[batch], noise, timesteps)
        loss = torch.nn.functional.mse_loss(gm(noisy, timesteps, encoder_hidden_states=text[batch]).sample, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 4 == 0 or step == steps - 1:
            print(f"  step {step:2d}  loss {loss.item():.4f}", flush=True)
    return gm.eval()


def denoise(module):
    with torch.no_grad():
        return module(*example).sample


# 1. LoRA on the attention projections and the resnets' 3x3 convs, as diffusers' LoRA scripts target
print("transforming: LoRA on to_q/to_k/to_v/to_out.0 and conv1/conv2 (capturing the UNet) ...", flush=True)
lora = fxpeft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
gm = fxpeft.transform(copy.deepcopy(unet), lora, example_inputs=example)  # (a copy: `unet` stays plain below)
gm.print_trainable_parameters()
print(fxpeft.inspect(gm))
print("training LoRA 12 steps ...", flush=True)
train(gm, 12, 1e-2)
adapted = denoise(gm)

workdir = tempfile.mkdtemp()
fxpeft.save_pretrained(gm, f"{workdir}/lora")  # PEFT's files
print("saved the LoRA adapter (PEFT format) to", f"{workdir}/lora")

# 2. diffusers loads it: the tensors without PEFT's "base_model.model." prefix, the config as metadata
tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(f"{workdir}/lora/adapter_model.safetensors").items()}
config = json.load(open(f"{workdir}/lora/adapter_config.json"))
in_diffusers = copy.deepcopy(unet)
in_diffusers.load_lora_adapter(tensors, prefix=None, metadata=config, adapter_name="mine")
print("diffusers' load_lora_adapter, max |diffusers - fxpeft| :", (denoise(in_diffusers) - adapted).abs().max().item())

# 3. merge for deployment: a plain UNet2DConditionModel's weights
merged = fxpeft.merge_and_unload(gm)
deployed = UNet2DConditionModel(**unet_config).eval()
deployed.load_state_dict(merged.state_dict(), strict=True)
print("merged UNet, max |merged - adapted| :", (denoise(deployed) - adapted).abs().max().item())

# 4. LoKr (LyCORIS) on the same layers: the same steps; diffusers loads LoKr files too
print("transforming: LoKr on the same layers ...", flush=True)
lokr = fxpeft.LoKrConfig(r=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
gm = fxpeft.transform(copy.deepcopy(unet), lokr, example_inputs=example)
print("training LoKr 8 steps ...", flush=True)
train(gm, 8, 1e-2)
fxpeft.save_pretrained(gm, f"{workdir}/lokr")
tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(f"{workdir}/lokr/adapter_model.safetensors").items()}
config = json.load(open(f"{workdir}/lokr/adapter_config.json"))
in_diffusers = copy.deepcopy(unet)
in_diffusers.load_lora_adapter(tensors, prefix=None, metadata=config, adapter_name="lokr")
print("LoKr in diffusers, max |diffusers - fxpeft| :", (denoise(in_diffusers) - denoise(gm)).abs().max().item())
print(f"done in {time.time() - start:.1f} s")
