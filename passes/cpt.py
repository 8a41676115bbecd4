"""CPT (context-aware prompt tuning, PEFT's ``CPTConfig``): prompt tuning whose virtual tokens are
given context (``cpt_token_ids``, the embeddings of in-context examples), trained as a bounded change.

State (PEFT's names, at the root): ``prompt_encoder.<adapter>.embedding.weight`` (the context's token
embeddings, frozen) and ``.delta_embedding.weight`` (the learned change, zero at first). The prompt is
``embedding + delta``, where before every use ``delta``'s rows are projected onto the ball of radius
ε(type) (PEFT's ``CPTEmbedding.forward`` rewrites the parameter in place, so the optimizer's next step
starts from the projected values) and only rows of type 1, 2, 3 (mod 4: format, input, output
template) get gradients; label rows (type ≡ 0 mod 4) stay as given.
Rewrite: prompt tuning's (passes/prompt.py) with this encoder.
Loss (``Method.call_loss``, PEFT's ``_cpt_forward`` + ``CPTEmbedding.calculate_loss``): labels are
``cpt_token_ids`` followed by the call's labels; the call's ``input_type_mask`` (default 4 everywhere)
is shifted past the context's types; only positions whose type is a positive multiple of 4 are
labels; the shifted per-token cross entropy over those positions is averaged, each weighted by
``opt_loss_decay_factor ** k`` under ``opt_weighted_loss_type="decay"`` (k: how many label types of
the row come after the position's own, so the last example weighs 1).
Checkpoint: ``prompt_embeddings`` (``embedding + delta``), as PEFT saves it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.configs import PromptLearningConfig
from fxpeft.registry import DEFAULT, Method, Rule, register_method
from fxpeft.rewrite import primary_lowering

from . import prompt


@dataclass
class CPTConfig(PromptLearningConfig):
    """PEFT's ``CPTConfig``: ``num_virtual_tokens`` is ``len(cpt_token_ids)``; masks default to ones."""

    cpt_token_ids: Optional[list[int]] = None
    cpt_mask: Optional[list[int]] = None  # saved and checked like PEFT's; PEFT's computation never reads it
    cpt_tokens_type_mask: Optional[list[int]] = None
    opt_weighted_loss_type: Optional[str] = "none"  # "none" or "decay"
    opt_loss_decay_factor: Optional[float] = 1.0
    opt_projection_epsilon: Optional[float] = 0.1  # input tokens (type 2 mod 4)
    opt_projection_format_epsilon: Optional[float] = 0.1  # format and output-template tokens (1, 3 mod 4)
    tokenizer_name_or_path: Optional[str] = None

    peft_type = "CPT"

    def __post_init__(self):
        if self.cpt_token_ids is None:
            self.cpt_token_ids = [0]
        self.num_virtual_tokens = len(self.cpt_token_ids)
        super().__post_init__()
        self.num_transformer_submodules = 1
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"{type(self).__name__} only supports task_type = CAUSAL_LM.")
        if self.cpt_mask is None:
            self.cpt_mask = [1 for _ in self.cpt_token_ids]
        if self.cpt_tokens_type_mask is None:
            self.cpt_tokens_type_mask = [1 for _ in self.cpt_token_ids]
        if not len(self.cpt_token_ids) == len(self.cpt_mask) == len(self.cpt_tokens_type_mask):
            raise ValueError("cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length.")


class CPTEmbedding(nn.Module):
    """PEFT's encoder: the context's embeddings plus a projected, type-masked change."""

    def __init__(self, config: CPTConfig, word_embeddings: torch.Tensor):
        super().__init__()
        count, dim = config.num_virtual_tokens, config.token_dim
        self.embedding = nn.Embedding(count, dim)
        with torch.no_grad():
            ids = torch.tensor(config.cpt_token_ids, device=word_embeddings.device)
            self.embedding.weight.copy_(word_embeddings.detach()[ids].float())
        self.delta_embedding = nn.Embedding(count, dim)
        nn.init.zeros_(self.delta_embedding.weight)
        types = torch.tensor(config.cpt_tokens_type_mask)
        scale = torch.sqrt(torch.tensor([dim / 2048]))  # PEFT's ε is given for a 2048-wide model
        epsilon = torch.full(types.shape, 1e-10)
        kind = types.remainder(4)
        epsilon[(types > 0) & ((kind == 1) | (kind == 3))] = config.opt_projection_format_epsilon * scale
        epsilon[(types > 0) & (kind == 2)] = config.opt_projection_epsilon * scale
        self.epsilon, self.trained = epsilon.tolist(), ((kind >= 1) & (kind <= 3)).tolist()

    def projected(self) -> torch.Tensor:
        """``delta``'s rows scaled to norm at most ε (PEFT's ``get_projection``)."""
        delta = self.delta_embedding.weight.detach()
        epsilon = torch.tensor(self.epsilon, device=delta.device)
        return delta * (epsilon / torch.linalg.vector_norm(delta, dim=1).clamp(min=epsilon)).unsqueeze(1)

    def forward(self) -> torch.Tensor:
        weight = self.delta_embedding.weight
        with torch.no_grad():
            weight.data.copy_(self.projected())  # as PEFT: the parameter itself holds the projected change
        trained = torch.tensor(self.trained, device=weight.device).unsqueeze(1)
        # PEFT's gradient hook on the parameter: rows of other types get zero gradient
        return self.embedding.weight.detach() + torch.where(trained, weight, weight.detach())


def attach(gm, sites, config: CPTConfig, adapter: str) -> list[str]:
    """``config`` arrives resolved (``prompt.resolve_prompt_config``)."""
    if not config.inference_mode:
        prompt.check_alone(gm, config, adapter)
        site, _ = prompt.token_embedding(primary_lowering(gm))
        word_embeddings = gm.get_parameter(site.weight)
        encoder = CPTEmbedding(config, word_embeddings).to(word_embeddings.device)
        if "prompt_encoder" not in gm._modules:
            gm.add_module("prompt_encoder", nn.ModuleDict())
        gm.prompt_encoder[adapter] = encoder.train(gm.training)
        return []
    return prompt.attach(gm, sites, config, adapter)  # for inference PEFT keeps the saved prompt only


# ----------------------------------------------------------------------------- loss


def decay_weights(types: torch.Tensor, factor: float) -> torch.Tensor:
    """Per position: ``factor ** k``, k the number of distinct label types of its row above its own type
    (1 elsewhere). Counted without ``unique`` (whose size depends on the data), so it compiles whole:
    each label position j above adds 1 / (how often the row holds type_j)."""
    labels = (types > 0) & (types % 4 == 0)
    same = (types.unsqueeze(-1) == types.unsqueeze(-2)).sum(-1)  # how often each position's type occurs
    above = labels.unsqueeze(-2) & (types.unsqueeze(-2) > types.unsqueeze(-1))  # [row, i, j]: j's type above i's
    later = (above.double() / same.unsqueeze(-2)).sum(-1).round()
    return torch.where(labels, torch.full_like(later, factor).pow(later), 1.0).float()


def cpt_loss(gm, adapter: str, output, inputs: dict) -> torch.Tensor:
    labels = inputs.get("labels")
    if labels is None:
        return output.loss
    config = gm.peft_config[adapter]
    logits = output.logits
    labels = labels.to(logits.device)
    batch = labels.shape[0]
    types = inputs.get("input_type_mask")
    types = torch.full_like(labels, 4) if types is None else types.to(labels.device).long()
    context_types = torch.tensor(config.cpt_tokens_type_mask, device=labels.device)
    types = torch.cat([context_types.expand(batch, -1), torch.where(types > 0, types + context_types.max(), types)], 1)
    labels = torch.cat([torch.tensor(config.cpt_token_ids, device=labels.device).expand(batch, -1), labels], 1)
    labels = labels.masked_fill(~((types > 0) & (types % 4 == 0)), -100)
    labels, types = labels[:, 1:], types[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    kept = labels != -100
    weights = kept.float()
    if config.opt_weighted_loss_type == "decay":
        weights = weights * decay_weights(types, config.opt_loss_decay_factor)
    return (losses * weights).sum() / kept.sum()  # the mean over kept positions (others weigh 0)


# ----------------------------------------------------------------------------- registration


def match(lw):
    adapter = prompt.active_prompt_adapter(lw, CPTConfig)
    if adapter is not None and not lw.cached:  # a graph with a KV cache finds the prompt in it
        yield adapter


def dropped_inputs(config) -> frozenset:
    return prompt.dropped_inputs(config) | {"input_type_mask"}  # read by the loss, never by the model


DEFAULT.add_rule(Rule(name="cpt", match=match, rewrite=prompt.rewrite, phase=20))
register_method(Method(name="cpt", config_type=CPTConfig, attach=attach, containers=prompt.CONTAINERS,
                       resolve_config=prompt.resolve_prompt_config, exclusive=True, one_active=True,
                       activity_in_graph=True, mixed_batches=False, saved_tensors=prompt.prompt_embeddings,
                       load_saved=prompt.load_prompt_embeddings, checkpoint_prefix="base_model.",
                       unsaved_containers=("embedding",),  # frozen in PEFT: only delta_embedding trains
                       dropped_inputs=dropped_inputs, prefill_cache=prompt.prefill_prompt, call_loss=cpt_loss))
