"""Multitask prompt tuning (MPT): prompt tuning whose prompt is picked per sample by ``task_ids``.

Each sample's virtual tokens are a shared prompt times (elementwise) a low-rank matrix of its task:
``prompt[b] = P ⊙ (prefix_task_cols[t_b] @ prefix_task_rows[t_b])`` with ``P`` (tokens, dim),
``prefix_task_cols`` (tasks, tokens, ranks), ``prefix_task_rows`` (tasks, ranks, dim), ``t = task_ids``.
Everything else is prompt tuning's (passes/prompt.py: its rule inserts the prompt, calling the encoder
with the per-call ``task_ids`` the graph takes as an input: ``Method.call_inputs``). Seq2seq with
``num_transformer_submodules=2`` (PEFT's default there): PEFT's forward also puts the prompt's second half in
front of the decoder's inputs and -100 in front of the labels (``multitask_prompt_decoder`` below); its
generate uses the encoder's half only, as graphs with a cache do here.

State (PEFT's names): ``prompt_encoder.<adapter>.embedding.weight``, ``.prefix_task_cols``,
``.prefix_task_rows``. Checkpoint: ``prompt_embeddings`` (the shared prompt itself, not a product),
``prefix_task_cols``, ``prefix_task_rows``, as PEFT writes them; a checkpoint loads trainable too.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.configs import PromptLearningConfig, PromptTuningConfig
from fxpeft.registry import DEFAULT, Method, Rule, register_method
from fxpeft.rewrite import Lowering, primary_lowering

from .prompt import (CONTAINERS, active_prompt_adapter, check_alone, dropped_inputs, extend_input, feeding_input,
                     init_ids, prefill_prompt, resolve_prompt_config, token_embedding, with_prompt,
                     with_virtual_positions)


class MultitaskPromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"  # the source checkpoint's task factors, averaged
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"  # the factors of its task ``prompt_tuning_init_task``
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"  # its shared prompt only; task factors drawn


FROM_SOURCE = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
# PEFT's embedding also honours prompt tuning's SAMPLE_VOCAB (its base class reads the value)
INITS = (*MultitaskPromptTuningInit._value2member_map_, "SAMPLE_VOCAB")


@dataclass
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """PEFT's fields and defaults. ``prompt_tuning_init`` also takes the source-task inits, which read
    a source MPT checkpoint (``prompt_tuning_init_state_dict_path``: .safetensors or a torch file)."""

    prompt_tuning_init: Union[str, MultitaskPromptTuningInit] = "RANDOM"
    prompt_tuning_init_state_dict_path: Optional[str] = None
    prompt_tuning_init_task: Optional[int] = 0
    num_ranks: Optional[int] = 1
    num_tasks: Optional[int] = 1

    peft_type = "MULTITASK_PROMPT_TUNING"

    def __post_init__(self):
        if isinstance(self.prompt_tuning_init, enum.Enum):
            self.prompt_tuning_init = self.prompt_tuning_init.value
        PromptLearningConfig.__post_init__(self)  # prompt tuning's own check knows fewer inits
        init = self.prompt_tuning_init
        if init not in INITS:
            raise ValueError(f"MultitaskPromptTuningConfig.prompt_tuning_init must be one of {sorted(INITS)}, "
                             f"got {init!r}.")
        if init == "TEXT" and (not self.tokenizer_name_or_path or self.prompt_tuning_init_text is None):
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                             "(a tokenizer object or the path of one).")
        if self.tokenizer_kwargs and init != "TEXT":
            raise ValueError("tokenizer_kwargs only applies with prompt_tuning_init='TEXT'.")
        # PEFT raises this when the model is built; a config that cannot build is refused at once
        if init in FROM_SOURCE and self.prompt_tuning_init_state_dict_path is None:
            raise ValueError(f"prompt_tuning_init_state_dict_path needs to be specified with {init} init method "
                             "(the path of a source multitask prompt tuning checkpoint).")
        for name in ("num_tasks", "num_ranks"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MultitaskPromptTuningConfig.{name} must be a positive integer, got {value!r}.")


class MultitaskPromptEmbedding(nn.Module):
    """The shared prompt and the per-task factors; called with ``task_ids`` (batch,), it returns each
    sample's prompt (batch, tokens, dim)."""

    def __init__(self, total_tokens: int, dim: int, tasks: int, ranks: int):
        super().__init__()
        self.embedding = nn.Embedding(total_tokens, dim)
        # PEFT's draws, in its order (after the embedding's)
        self.prefix_task_cols = nn.Parameter(torch.normal(mean=0, std=0.02, size=(tasks, total_tokens, ranks)))
        self.prefix_task_rows = nn.Parameter(torch.normal(mean=0, std=0.02, size=(tasks, ranks, dim)))

    def forward(self, task_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        if task_ids is None:
            raise ValueError("task_ids cannot be None: a multitask prompt picks each sample's prompt by its task; "
                             "pass task_ids=<tensor of shape (batch,)>.")
        task_prompts = self.prefix_task_cols[task_ids] @ self.prefix_task_rows[task_ids]
        return self.embedding.weight * task_prompts


def _source_state(config: MultitaskPromptTuningConfig, device) -> dict:
    """The source checkpoint's tensors as the embedding holds them (PEFT's source-task inits)."""
    path = config.prompt_tuning_init_state_dict_path
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        source = load_file(path)
    else:
        source = torch.load(path, map_location=device, weights_only=True)
    state = {"embedding.weight": source["prompt_embeddings"]}
    if config.prompt_tuning_init == "AVERAGE_SOURCE_TASKS":
        state.update({name: source[name].mean(0, keepdim=True) for name in ("prefix_task_cols", "prefix_task_rows")})
    elif config.prompt_tuning_init == "EXACT_SOURCE_TASK":
        task = config.prompt_tuning_init_task
        state.update({name: source[name][task].unsqueeze(0) for name in ("prefix_task_cols", "prefix_task_rows")})
    return state


def attach(gm, sites, config: MultitaskPromptTuningConfig, adapter: str) -> list[str]:
    """``config`` arrives resolved (``resolve_prompt_config``)."""
    check_alone(gm, config, adapter)
    site, _ = token_embedding(primary_lowering(gm))
    word_embeddings = gm.get_parameter(site.weight)
    total = config.num_virtual_tokens * config.num_transformer_submodules
    encoder = MultitaskPromptEmbedding(total, config.token_dim, config.num_tasks, config.num_ranks)
    if not config.inference_mode:  # a loaded adapter's tensors come from its checkpoint
        ids = init_ids(config, total, word_embeddings.shape[0])
        with torch.no_grad():
            if ids is not None:
                encoder.embedding.weight.copy_(word_embeddings.detach()[ids.to(word_embeddings.device)].float())
            if config.prompt_tuning_init in FROM_SOURCE:
                source = _source_state(config, word_embeddings.device)
                # the averaged / picked factors have one task: PEFT's strict load then refuses num_tasks > 1
                encoder.load_state_dict(source, strict=config.prompt_tuning_init != "ONLY_SOURCE_SHARED")
    if "prompt_encoder" not in gm._modules:
        gm.add_module("prompt_encoder", nn.ModuleDict())
    gm.prompt_encoder[adapter] = encoder.to(word_embeddings.device).train(gm.training)
    return []


# ----------------------------------------------------------------------------- the decoder's half (seq2seq)


def match_decoder(lw: Lowering):
    """PEFT's seq2seq MPT forward with ``num_transformer_submodules=2``: the prompt's second half goes in front
    of the decoder's inputs too (its generate uses the encoder's half only: graphs with a cache are left alone)."""
    adapter = active_prompt_adapter(lw, (MultitaskPromptTuningConfig,))
    config = lw.root.peft_config.get(adapter) if adapter is not None else None
    if config is not None and config.num_transformer_submodules == 2 and not lw.cached:
        if _decoder_embedding(lw) is not None:
            yield adapter


def _decoder_embedding(lw: Lowering):
    """The embedding site reading the token table (the same parameter) besides the encoder's token embedding."""
    token, _ = token_embedding(lw)
    table = lw.root.get_parameter(token.weight)
    return next((s for s in lw.sites if s.kind == "embedding" and s is not token
                 and lw.root.get_parameter(s.weight) is table), None)


def second_half(prompt: torch.Tensor, count: int) -> torch.Tensor:
    return prompt[:, count:]


# decoder inputs along its sequence and what their virtual positions hold: PEFT puts -100 in front of the labels;
# where PEFT fails (decoder ids or mask given) the ids get fillers and the mask ones
DECODER_INPUTS = {"labels": -100, "decoder_input_ids": 0, "decoder_attention_mask": 1}


def started_after(ids: torch.Tensor, count: int, start: int) -> torch.Tensor:
    """Decoder ids the model shifted from the extended labels: the first after the virtual positions is the
    decoder start, as in PEFT's shift of the labels themselves (the shift put a -100's pad there)."""
    ids = ids.clone()
    ids[:, count] = start
    return ids


def rewrite_decoder(lw: Lowering, adapter: str) -> None:
    count = lw.root.peft_config[adapter].num_virtual_tokens
    for node in [n for n in lw.graph.nodes if n.op == "placeholder" and n.target in DECODER_INPUTS]:
        extend_input(lw, node, with_virtual_positions, count, DECODER_INPUTS[node.target])
    site = _decoder_embedding(lw)
    lw.tag["fxpeft_site"] = site.path
    start = getattr(getattr(lw.root, "config", None), "decoder_start_token_id", None)
    if feeding_input(site.input) is None and start is not None:  # ids the model made from the labels
        with lw.graph.inserting_before(site.node):
            started = lw.call(started_after, site.input, count, start)
        site.node.replace_input_with(site.input, started)
        site.input = started
    embeds = site.output
    users = list(embeds.users)
    task_ids = lw.call_input("task_ids")
    with lw.graph.inserting_before(embeds.next):  # in order, right after the embedding
        prompt = lw.call_module(f"prompt_encoder.{adapter}", task_ids)
        half = lw.call(second_half, prompt, count)
        replaced = lw.call(with_prompt, embeds, half, count)
    for user in users:
        user.replace_input_with(embeds, replaced)
    site.output = replaced


TENSORS = {"prompt_embeddings": "embedding.weight", "prefix_task_cols": "prefix_task_cols",
           "prefix_task_rows": "prefix_task_rows"}


def saved_tensors(gm, adapter: str) -> dict[str, torch.Tensor]:
    state = gm.prompt_encoder[adapter].state_dict()
    return {key: state[name].detach() for key, name in TENSORS.items()}


def load_saved(gm, adapter: str, weights: dict[str, torch.Tensor]) -> None:
    """Keys and shapes were checked against ``saved_tensors`` (fxpeft/checkpoint.py)."""
    gm.prompt_encoder[adapter].load_state_dict({name: weights[key] for key, name in TENSORS.items()})


DEFAULT.add_rule(Rule(name="multitask_prompt_decoder", match=match_decoder, rewrite=rewrite_decoder, phase=20))
register_method(Method(name="multitask_prompt_tuning", config_type=MultitaskPromptTuningConfig, attach=attach,
                       containers=CONTAINERS, resolve_config=resolve_prompt_config, exclusive=True, one_active=True,
                       activity_in_graph=True, mixed_batches=False, saved_tensors=saved_tensors, load_saved=load_saved,
                       checkpoint_prefix="base_model.", dropped_inputs=dropped_inputs, prefill_cache=prefill_prompt,
                       call_inputs=("task_ids",)))
