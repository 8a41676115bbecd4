"""Load a PEFT adapter, inspect what it rewrote, merge it, and export a deployable program.

The adapter here is written by PEFT itself (installed with `pip install -e ".[dev]"`), as a
user's trained adapter would be. Runs offline on a CPU."""
import copy
import tempfile

import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

import fxpeft

torch.manual_seed(0)
base = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)).eval()
workdir = tempfile.mkdtemp()

# an adapter trained with PEFT (random B so that it changes the outputs)
import peft  # noqa: E402  (the test-only oracle; fxpeft itself never imports it)
trained = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=8, target_modules=["c_attn", "c_fc"],
                                                                    init_lora_weights=False))
trained.save_pretrained(f"{workdir}/adapter")

# 1. load it: the same outputs as PEFT
gm = fxpeft.from_pretrained(base, f"{workdir}/adapter")
ids = torch.randint(0, 128, (2, 12))
with torch.no_grad():
    print("max |fxpeft - peft| :", (gm(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max().item())
print(fxpeft.inspect(gm))

# 2. export a merged model: weights under the base keys, and a torch.export program
paths = fxpeft.export_merged(gm, f"{workdir}/deploy")
fresh = GPT2LMHeadModel(base.config).eval()
fresh.load_state_dict(load_file(paths["weights"]), strict=True)
program = torch.export.load(paths["program"]).module()
with torch.no_grad():
    adapted = gm(input_ids=ids).logits
    print("original class + merged weights:", (fresh(input_ids=ids).logits - adapted).abs().max().item())
    # the program takes the inputs it was exported with: input_ids and attention_mask by default
    out = program(input_ids=ids, attention_mask=torch.ones_like(ids))
    print("exported program:               ", (out["logits"] - adapted).abs().max().item())

# 3. or merge in place and keep working with a plain base graph
merged = fxpeft.merge_and_unload(gm)
print("merged graph nodes == base graph nodes:",
      len(merged.graph.nodes) == len(fxpeft.unload(gm).graph.nodes), "| files in", workdir)
