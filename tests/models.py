"""Tiny models for the tests, built from configs (no downloads) plus custom non-HF modules."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 96


def llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=tie))



class PointwiseConv(nn.Module):
    """A linear layer as a 1 × 1 Conv2d over the sequence (PEFT's orthogonal methods take Conv2d only): a
    conv site that a decode step runs."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(linear.weight[:, :, None, None])

    def forward(self, x):
        return self.conv(x.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


def llama_with_conv():
    """Llama whose MLPs' down_proj is a PointwiseConv (conv sites in its generation graphs)."""
    model = llama()
    for layer in model.model.layers:
        layer.mlp.down_proj = PointwiseConv(layer.mlp.down_proj)
    return model

def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64))


def opt():
    from transformers import OPTConfig, OPTForCausalLM
    return OPTForCausalLM(OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32))


def bert():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=64, num_labels=3))


def t5(layers: int = 2):
    from transformers import T5Config, T5ForConditionalGeneration
    return T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=layers,
                                               num_heads=4, decoder_start_token_id=0))


def bart(layers: int = 2):
    from transformers import BartConfig, BartForConditionalGeneration
    return BartForConditionalGeneration(BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=layers,
                                                   decoder_layers=layers, encoder_attention_heads=4, decoder_attention_heads=4,
                                                   encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64))


def vit():
    from transformers import ViTConfig, ViTForImageClassification
    return ViTForImageClassification(ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                                               num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                               num_labels=3))


HF_MODELS = {"llama": llama, "qwen2": qwen2, "gpt2": gpt2, "opt": opt, "bert": bert, "t5": t5, "vit": vit}


def hf_inputs(name: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
    """Inputs a user would pass, with left padding on the first row for text models."""
    g = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and name not in ("t5",):
        mask[0, : seq // 3] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name == "t5":
        inputs["decoder_input_ids"] = torch.randint(1, VOCAB, (batch, max(seq - 2, 2)), generator=g)
    return inputs


def hf_labels(name: str, inputs: dict, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    batch = next(iter(inputs.values())).shape[0]
    if name in ("bert", "vit"):
        return torch.randint(0, 3, (batch,), generator=g)
    if name == "t5":
        return torch.randint(1, VOCAB, inputs["decoder_input_ids"].shape, generator=g)
    return inputs["input_ids"].clone()


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.act = nn.GELU()
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc2(self.drop(self.act(self.fc1(x))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.head(self.pool(x).flatten(1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyDecoder(nn.Module):
    """A hand-written causal decoder using F.scaled_dot_product_attention."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


CUSTOM_MODELS = {
    "mlp": (MLP, lambda: (torch.randn(4, 12),)),
    "convnet": (ConvNet, lambda: (torch.randn(2, 3, 8, 8),)),
    "decoder": (TinyDecoder, lambda: (torch.randint(0, VOCAB, (2, 9)),)),
}


# torch.compile in tests: dynamo, functionalization and AOT autograd as inductor sees them (graph
# breaks, recompiles, custom ops' fake kernels and gradients) without inductor's C++ codegen, the slow
# part on a CPU; test_compile's custom decoder and the examples run inductor itself.
COMPILE_BACKEND = "aot_eager"


def assert_compiled_generate_reads_task_ids(gm) -> None:
    """generate with compile_config on a tiny-Llama result whose adapter reads ``task_ids``: other task
    vectors run the same compiled step (no recompile) and give the eager tokens, which differ per task."""
    import transformers
    from torch._dynamo.utils import counters

    inputs = hf_inputs("llama", batch=2)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    tasks = [torch.tensor([0, 2]), torch.tensor([1, 0])]
    eager = [gm.generate(**inputs, task_ids=task_ids, **kw) for task_ids in tasks]
    assert not torch.equal(eager[0], eager[1])
    config = transformers.CompileConfig(fullgraph=True, backend=COMPILE_BACKEND, mode=None)
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for task_ids, expected in zip(tasks, eager):
            assert torch.equal(gm.generate(**inputs, task_ids=task_ids, compile_config=config, **kw), expected)
    assert counters["stats"]["unique_graphs"] == 1


class Conv1DNet(nn.Module):
    """One GPT-2-style Conv1D layer (weight stored (in, out)), named as GPT-2's."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.c_attn = Conv1D(6, 4)

    def forward(self, x):
        return self.c_attn(x)
