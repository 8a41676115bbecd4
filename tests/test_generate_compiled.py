"""gm.generate with compile_config: the decode step compiles once and does not recompile across steps, adapter
switches, per-sequence adapters, or adapters loaded between calls (each method's generation graphs read the
adapters when they run); split from test_generate.py so that the suite's workers share the load."""
import contextlib
import copy
import functools

import peft
import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import fxpeft
import models
from peft_oracle import ALL_LINEAR as LORA
from peft_oracle import copy_adapter_weights, two_adapters_pair
from test_generate import IA3, NEW, PROMPT_METHODS


EXTRA = [f"extra{i}" for i in range(15)]


def test_compiled_decoding_compiles_once_and_matches_eager(llama_pair):
    """compile_config (as transformers takes it, also on the CPU): the decode step compiles once and
    runs on through new prompts, an adapter switch, other per-sequence adapters, and an adapter of a
    larger rank loaded (and deleted) between calls, without a recompile, also past 16 adapter slots
    (a load there recompiled the mixed step once); the tokens are the eager run's. (Loads failed
    before: the graph code named each layer's adapters, so re-lowering changed it; it now reads them
    when it runs, with the sizes a load changes dynamic.)"""
    from torch._dynamo.utils import counters

    _, gm = llama_pair
    prompts = [models.hf_inputs("llama", batch=3, seed=seed) for seed in (0, 1)]
    names = [["a", "__base__", "b"], ["b", "a", "a"]]
    loaded = ["c", "b", "__base__"]
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    eager = [gm.generate(**prompt, **kw) for prompt in prompts]
    mixed = [gm.generate(**prompts[0], **kw, adapter_names=n) for n in names]
    gm.set_adapter("b")
    eager_b = gm.generate(**prompts[0], **kw)
    gm.set_adapter("a")
    config = transformers.CompileConfig(fullgraph=True, backend=models.COMPILE_BACKEND, mode=None)
    larger = fxpeft.LoraConfig(r=8, lora_alpha=16, **LORA)
    try:
        for run in ("dense", "mixed"):  # the mixed graph is another path through the dispatcher: its own frame cache
            torch._dynamo.reset()
            counters.clear()
            with torch._dynamo.config.patch(error_on_recompile=True):
                if run == "dense":
                    for prompt, expected in zip(prompts, eager):
                        assert torch.equal(gm.generate(**prompt, **kw, compile_config=config), expected)
                    gm.set_adapter("b")
                    assert torch.equal(gm.generate(**prompts[0], **kw, compile_config=config), eager_b)
                    gm.add_adapter("c", larger)
                    gm.set_adapter("c")
                    expected = gm.generate(**prompts[0], **kw)
                    assert torch.equal(gm.generate(**prompts[0], **kw, compile_config=config), expected)
                else:  # the way transformers also reads it: the model's generation_config
                    gm.generation_config.compile_config = config
                    for adapter_names, expected in zip(names, mixed):
                        assert torch.equal(gm.generate(**prompts[0], **kw, adapter_names=adapter_names), expected)
                    gm.add_adapter("c", larger)
                    for extra in EXTRA:  # past 16 slots, where eager decoding changes its computation
                        gm.add_adapter(extra, fxpeft.LoraConfig(r=2, **LORA))
                    expected = gm.generate(**prompts[0], **kw, adapter_names=loaded, disable_compile=True)
                    assert torch.equal(gm.generate(**prompts[0], **kw, adapter_names=loaded), expected)
                    for extra in EXTRA:
                        gm.delete_adapter(extra)
                gm.delete_adapter("c")
                gm.set_adapter("a")
                assert torch.equal(gm.generate(**prompts[0], **kw, compile_config=config,
                                               adapter_names=names[0] if run == "mixed" else None),
                                   mixed[0] if run == "mixed" else eager[0])
            assert counters["stats"]["unique_graphs"] == 1, run
    finally:
        for name in ("c", *EXTRA):
            if name in gm.peft_config:
                gm.delete_adapter(name)
        gm.set_adapter("a")
        gm.generation_config.compile_config = None
        torch._dynamo.reset()


def test_compiled_decoding_of_a_lone_adapter_survives_loading_another():
    """A model with one adapter: its generation graphs pick that adapter by the slots too, so a second
    adapter (of a larger rank) loaded between compiled generate calls does not recompile the decode step.
    (It did: a lone adapter was a plain delta in the graph code, which a second one changed.)"""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    base = models.llama().eval()
    gm = fxpeft.transform(base, fxpeft.LoraConfig(r=4, lora_alpha=8, **LORA))
    prompt = models.hf_inputs("llama", batch=2)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    config = transformers.CompileConfig(fullgraph=True, backend="eager", mode=None)  # recompiles are dynamo's
    with gm.disable_adapter():  # eager, the lone adapter is read as it is, or not at all
        assert torch.equal(gm.generate(**prompt, **kw), base.generate(**prompt, **kw))
    expected = gm.generate(**prompt, **kw)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(gm.generate(**prompt, **kw, compile_config=config), expected)
            gm.add_adapter("other", fxpeft.LoraConfig(r=8, lora_alpha=8, **LORA))
            gm.set_adapter("other")
            expected = gm.generate(**prompt, **kw)
            assert torch.equal(gm.generate(**prompt, **kw, compile_config=config), expected)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


SITES = dict(target_modules=["k_proj", "v_proj", "down_proj"])
CONV_CONFIGS = {  # methods at conv sites (models.llama_with_conv's down_proj.conv): config class, fields
    "lora": ("LoraConfig", dict(r=2, init_lora_weights=False, target_modules=["conv", "v_proj"])),
    "loha": ("LoHaConfig", dict(r=2, alpha=256, init_weights=False, target_modules=["conv"])),  # a ΔW that shows
    "dora": ("LoraConfig", dict(r=2, use_dora=True, init_lora_weights=False, target_modules=["conv"])),
    # the orthogonal family: dense steps run the op on the mapped weight, mixed ones each adapter's op
    "oft": ("OFTConfig", dict(r=4, oft_block_size=0, init_weights=False, target_modules=["conv"])),
    # (one butterfly factor: PEFT without its CUDA kernel computes one whatever the config says)
    "boft": ("BOFTConfig", dict(boft_block_size=0, boft_block_num=4, init_weights=False, target_modules=["conv"])),
    "hra": ("HRAConfig", dict(r=8, init_weights=False, target_modules=["conv"])),
}
READ_WHEN_RUN = {  # methods whose generation graphs read each site's adapters when they run
    "ia3": lambda: fxpeft.IA3Config(**IA3),  # the scaling form: per-feature factors
    # LoRA's own stacks do not take lora_bias: those sites read the additive form's kept factors and bias
    "lora_bias": lambda: fxpeft.LoraConfig(r=2, lora_bias=True, init_lora_weights=False, **SITES),
    "vera": lambda: fxpeft.VeraConfig(r=4, init_weights=False, **SITES),  # additive, low rank: factors kept
    # the same, and its loss hook is not read by a call without a loss (it recompiled: the hook list's length)
    # (one trainable AdaLoRA adapter at a time, as PEFT: these are for inference)
    "adalora": lambda: fxpeft.AdaLoraConfig(init_r=2, total_step=10, init_lora_weights=False, task_type="CAUSAL_LM",
                                            inference_mode=True, **SITES),
    # additive, a dense ΔW: kept summed for the dense graph; the mixed graph runs each site's plain lowering
    # as an opaque op (stacks would hold a weight-sized tensor per adapter)
    "loha": lambda: fxpeft.LoHaConfig(r=2, alpha=4, init_weights=False, **SITES),
    # weight maps with SiteParts: per-feature factors and low-rank factors kept
    "dora": lambda: fxpeft.LoraConfig(r=2, use_dora=True, init_lora_weights=False, **SITES),
    "miss": lambda: fxpeft.MissConfig(r=2, init_weights=False, **SITES),
    # the orthogonal family: the op runs on x Q (OFT's blocks, BOFT's butterfly with its scale); HRA low rank
    "oft": lambda: fxpeft.OFTConfig(r=4, oft_block_size=0, init_weights=False, **SITES),
    "boft": lambda: fxpeft.BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2,
                                      init_weights=False, **SITES),
    "hra": lambda: fxpeft.HRAConfig(r=3, init_weights=False, **SITES),
    # RoAd: its pair rotations kept; Lily: its delta traced on kept tensors (its mixed step: the opaque op)
    "road": lambda: fxpeft.RoadConfig(variant="road_2", group_size=4, init_weights=False, **SITES),
    "lily": lambda: fxpeft.LilyConfig(r=2, num_B=2, init_weights=False, **SITES),
    # trainable tokens (the embedding and the head tied to it): the rows from the op's output, as a program
    # OFT at the embedding (its output rows rotated), as a program
    "oft_embedding": lambda: fxpeft.OFTConfig(r=4, oft_block_size=0, init_weights=False,
                                              target_modules=["embed_tokens", "k_proj"]),
    "tokens": lambda: fxpeft.TrainableTokensConfig(token_indices=list(range(0, models.VOCAB, 2)), init_weights=False),
    "lora_tokens": lambda: fxpeft.LoraConfig(r=2, init_lora_weights=False, trainable_token_indices=[1, 4, 9], **SITES),
    # conv sites (models.llama_with_conv): the plain lowering as a program (LoRA's stacks take linear sites only)
    **{f"{name}_conv": functools.partial(getattr(fxpeft, kind), **fields)
       for name, (kind, fields) in CONV_CONFIGS.items()},
}
MODELS = {"tokens": lambda: models.llama(tie=True),  # the head computes with the rows too
          **{f"{name}_conv": models.llama_with_conv for name in CONV_CONFIGS}}  # the others: models.llama
BATCH_DEPENDENT = {"lily"}  # routes by the mean over its batch's tokens: a sequence alone routes otherwise


@pytest.mark.parametrize("name", list(READ_WHEN_RUN))
def test_compiled_decoding_survives_loading_another_adapter(name, bare):
    """IA3 (the scaling form), the additive form's methods (LoRA's lora_bias sites too), the weight maps
    (DoRA, MiSS, the orthogonal family, RoAd), Lily, trainable tokens and conv sites: a generation graph reads
    each site's factors, ΔW or Q (prepared once per generate call) when it runs, or runs its plain lowering as
    an opaque op, so a second adapter loaded between compiled generate calls, and a switch to it, do not
    recompile the decode step, nor, with adapter_names, the mixed one; the tokens are the eager run's, each
    sequence's those of its adapter alone. (It recompiled: the graph code named each site's adapters.)"""
    base, gm = bare(MODELS.get(name, models.llama))
    torch.manual_seed(0)
    with adapters(gm, default=READ_WHEN_RUN[name]()):
        check_survives(name, base, gm)


def check_survives(name, base, gm):
    from torch._dynamo.utils import counters

    prompt = models.hf_inputs("llama", batch=2)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)  # rows of one length
    config = transformers.CompileConfig(fullgraph=True, backend="eager", mode=None)  # recompiles are dynamo's
    expected, plain = gm.generate(**prompt, **kw), base.generate(**prompt, **kw)
    assert not torch.equal(expected, plain)  # the adapter changes the tokens
    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(gm.generate(**prompt, **kw, compile_config=config), expected)
    names = ["default", "__base__"]
    mixed = gm.generate(**prompt, **kw, adapter_names=names, compile_config=config)  # a second graph
    assert torch.equal(mixed, gm.generate(**prompt, **kw, adapter_names=names))
    assert name in BATCH_DEPENDENT or torch.equal(mixed, torch.stack([expected[0], plain[1]]))
    with torch._dynamo.config.patch(error_on_recompile=True):
        gm.add_adapter("other", READ_WHEN_RUN[name]())
        gm.set_adapter("other")
        other = gm.generate(**prompt, **kw)
        assert not torch.equal(other, expected)
        assert torch.equal(gm.generate(**prompt, **kw, compile_config=config), other)
        gm.set_adapter("default")
        assert torch.equal(gm.generate(**prompt, **kw, compile_config=config), expected)
        names = ["other", "default"]
        mixed = gm.generate(**prompt, **kw, adapter_names=names, compile_config=config)
        assert torch.equal(mixed, gm.generate(**prompt, **kw, adapter_names=names))
    assert name in BATCH_DEPENDENT or torch.equal(mixed, torch.stack([other[0], expected[1]]))
    assert counters["stats"]["unique_graphs"] == 2  # the dense and mixed steps
    # what was kept for a generation (LoHa: a weight-sized ΔW per layer) does not outlive it
    kept = [module for module in gm.modules() if isinstance(module, fxpeft.generation.KeptTensors)]
    assert kept and not any(module.tensors for module in kept)


class _Ops(TorchDispatchMode):
    """How many aten ops run."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["road", "ia3", "vera"])
def test_an_eager_mixed_decode_step_does_not_grow_with_the_adapters_loaded(name, bare):
    """An eager generate with adapter_names reads each site's adapters stacked, kept once per generate call
    (RoAd's pairs, IA3's factors, VeRA's low-rank factors): a decode step runs as many ops with five adapters
    loaded as with two. (It ran each site's plain mixed lowering, one branch per adapter loaded: RoAd decoded
    at 0.78x PEFT's adapter_names speed in bench_generate.py --tenants 4 --method road, 1.45x now.)"""
    _, gm = bare(models.llama)
    prompt = models.hf_inputs("llama", batch=2)

    def per_step():
        counts = []
        for new in (2, 5):
            with torch.no_grad(), _Ops() as ops:
                gm.generate(**prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                            adapter_names=["default", "other"])
            counts.append(ops.count)
        return (counts[1] - counts[0]) / 3

    torch.manual_seed(0)
    with adapters(gm, default=READ_WHEN_RUN[name](), other=READ_WHEN_RUN[name]()):
        gm.generate(**prompt, max_new_tokens=2, do_sample=False, pad_token_id=0, adapter_names=["default", "other"])
        two = per_step()
        for extra in ("c", "d", "e"):
            gm.add_adapter(extra, READ_WHEN_RUN[name]())
        assert per_step() == two


@pytest.fixture(scope="module")
def bare():
    """``bare(model factory)``: (the model, a module transformed from it and captured, without adapters), one
    per factory: each case adds its adapters and deletes them (captures are most of a case's cost)."""
    made = {}

    def get(factory):
        if factory not in made:
            torch.manual_seed(0)
            base = factory().eval()
            gm = fxpeft.transform(base, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
            gm.delete_adapter("default")
            made[factory] = base, gm
        return made[factory]

    return get


@contextlib.contextmanager
def adapters(gm, **configs):
    """``gm`` (from ``bare``) with these adapters added, the first active; deleted again on leaving."""
    try:
        for name, config in configs.items():
            gm.add_adapter(name, config)
        gm.set_adapter(next(iter(configs)))
        yield gm
    finally:
        for name in list(gm.peft_config):
            gm.delete_adapter(name)
        gm.eval()
        torch._dynamo.reset()



@pytest.mark.parametrize("name", list(CONV_CONFIGS))
def test_conv_sites_generate_as_peft(name):
    """Adapters at conv sites of a decoder (run from each generation graph as programs): greedy tokens and
    scores equal PEFT's generate."""
    torch.manual_seed(0)
    model = models.llama_with_conv().eval()
    kind, fields = CONV_CONFIGS[name]
    reference = peft.get_peft_model(copy.deepcopy(model), getattr(peft, kind)(**fields)).eval()
    gm = fxpeft.transform(model, getattr(fxpeft, kind)(**fields)).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.requires_grad:
                parameter.add_(0.3 * torch.randn_like(parameter))
    assert copy_adapter_weights(reference, gm) > 0
    inputs = models.hf_inputs("llama", batch=2)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    expected, got = reference.generate(**inputs, **kw), gm.generate(**inputs, **kw)
    with gm.disable_adapter():
        assert not torch.equal(gm.generate(**inputs, **kw).sequences, expected.sequences)
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

CHAINED = {  # two adapters whose maps chain at a site, shaped differently (kept blocks go dense to compose;
    # RoAd's pairs: the plain lowering, and in mixed steps each adapter's own partners)
    "oft": (fxpeft.OFTConfig(r=4, oft_block_size=0, init_weights=False, **SITES),
            fxpeft.OFTConfig(r=2, oft_block_size=0, init_weights=False, **SITES)),
    "boft": (fxpeft.BOFTConfig(boft_block_size=0, boft_block_num=4, init_weights=False, **SITES),
             fxpeft.BOFTConfig(boft_block_size=0, boft_block_num=2, init_weights=False, **SITES)),
    "hra": (fxpeft.HRAConfig(r=3, init_weights=False, **SITES), fxpeft.HRAConfig(r=2, init_weights=False, **SITES)),
    "road": (fxpeft.RoadConfig(variant="road_2", group_size=4, init_weights=False, **SITES),
             fxpeft.RoadConfig(variant="road_1", group_size=2, init_weights=False, **SITES)),
}


@pytest.mark.parametrize("name", list(CHAINED))
def test_kept_maps_chain_as_the_graph_without_a_cache_does(name, bare):
    """The orthogonal family and RoAd at once: two active adapters' maps compose in a generation graph (blocks
    of different sizes as dense products, HRA's low-rank form as dense reflections, RoAd's pairs as lowered)
    as in the graph without a cache; in a compiled mixed decode, each sequence's tokens are those of its
    adapter alone."""
    _, gm = bare(models.llama)
    torch.manual_seed(0)
    with adapters(gm, default=CHAINED[name][0], other=CHAINED[name][1]):
        check_chained(gm)


def check_chained(gm):
    inputs = models.hf_inputs("llama", batch=2)
    gm.set_adapter(["default", "other"])
    with torch.no_grad():
        expected = gm(**inputs).logits
        for _ in range(2):  # the first call captures the generation graph, the second reads what it kept
            cache = transformers.StaticCache(config=gm.config, max_cache_len=12)
            torch.testing.assert_close(gm(**inputs, cache=cache, use_cache=True).logits, expected,
                                       rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    alone = {}
    for adapter in ("default", "other"):
        gm.set_adapter(adapter)
        alone[adapter] = gm.generate(**inputs, **kw)
    assert not torch.equal(alone["default"], alone["other"])
    torch._dynamo.reset()
    try:
        config = transformers.CompileConfig(fullgraph=True, backend="eager", mode=None)
        mixed = gm.generate(**inputs, **kw, adapter_names=["other", "default"], compile_config=config)
    finally:
        torch._dynamo.reset()
    assert torch.equal(mixed, torch.stack([alone["other"][0], alone["default"][1]]))


WITH_DROPOUT = {  # the additive form (low rank), a weight map with SiteParts, one mapping the op's input
    "vera": lambda dropout=0.0: fxpeft.VeraConfig(r=4, init_weights=False, vera_dropout=dropout, **SITES),
    "dora": lambda dropout=0.0: fxpeft.LoraConfig(r=2, use_dora=True, init_lora_weights=False, lora_dropout=dropout,
                                                  **SITES),
    "boft": lambda dropout=0.0: fxpeft.BOFTConfig(boft_block_size=0, boft_block_num=4, init_weights=False,
                                                  boft_dropout=dropout, **SITES),
}


@pytest.mark.parametrize("name", list(WITH_DROPOUT))
def test_generation_graphs_compute_deltas_afresh_with_autograd_and_in_training(name, bare):
    """A generation graph reading kept adapters, called with a KV cache and autograd (or while training),
    computes each site as the graph without a cache does: the logits of a prepared call (each sample its
    own adapter's in a mixed batch), gradients into the adapter, and dropout in training."""
    _, gm = bare(models.llama)
    torch.manual_seed(0)
    config = WITH_DROPOUT[name]
    with adapters(gm, default=config(dropout=0.5), other=config()):
        check_afresh(gm)


def check_afresh(gm):
    inputs = models.hf_inputs("llama", batch=2)

    def logits(**kwargs):
        cache = transformers.StaticCache(config=gm.config, max_cache_len=12)
        return gm(**inputs, cache=cache, use_cache=True, **kwargs).logits

    prepared = {}
    for name in ("other", "default"):
        gm.set_adapter(name)
        with torch.no_grad():
            prepared[name] = logits()
    with torch.enable_grad():
        traced = logits()
        mixed = logits(adapter_names=["other", "default"])  # each sample its own adapter's
    torch.testing.assert_close(traced, prepared["default"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed, torch.stack([prepared["other"][0], prepared["default"][1]]), rtol=1e-5,
                               atol=1e-5)
    (traced.sum() + mixed.sum()).backward()
    grads = [p.grad for p in gm.parameters() if p.requires_grad]  # the active adapter's
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    prepared = prepared["default"]
    gm.train()
    with torch.no_grad():
        assert not torch.allclose(logits(), prepared)  # dropout acts
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(), prepared, rtol=0, atol=0)


@pytest.mark.parametrize("run", ["eager", "compiled", "mixed"])
def test_decoding_reads_adapters_written_in_place_between_calls(llama_pair, run):
    """Steps after the first of a generate call trust the stacks it prepared and the adapters it picked
    (two adapters: the dense graph picks them, eager too); the next call checks the adapters again:
    weights written in place (no optimizer step, no load) between two generate calls give PEFT's tokens
    for the new weights."""
    reference, gm = llama_pair
    prompt = models.hf_inputs("llama", batch=2)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    if run == "mixed":
        kw["adapter_names"] = ["a", "b"]
    if run == "compiled":
        kw["compile_config"] = transformers.CompileConfig(fullgraph=True, backend="eager", mode=None)
    written = [p for model in (reference, gm) for name, p in model.named_parameters() if "lora_B.a" in name]
    kept = [p.detach().clone() for p in written]
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            before = gm.generate(**prompt, **kw)
            assert torch.equal(before, reference.generate(**prompt, **kw))
            for p in written:
                p.mul_(-3.0)
            expected = reference.generate(**prompt, **kw)
            assert not torch.equal(expected, before)  # the write changes the tokens
            assert torch.equal(gm.generate(**prompt, **kw), expected)
    finally:
        with torch.no_grad():
            for p, value in zip(written, kept):
                p.copy_(value)
        torch._dynamo.reset()


def test_bad_compile_configs_fail_before_any_compute(llama_pair):
    _, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2)
    calls = []
    gm.__dict__["_run"] = lambda *args: calls.append(args)
    CompileConfig = transformers.CompileConfig
    try:
        with pytest.raises(TypeError, match="must be a transformers.CompileConfig"):
            gm.generate(**inputs, max_new_tokens=2, compile_config=dict(fullgraph=True))
        with pytest.raises(ValueError, match="Unrecognized mode=fast"):
            gm.generate(**inputs, max_new_tokens=2, compile_config=CompileConfig(mode="fast"))
        with pytest.raises(ValueError, match="Invalid backend"):
            gm.generate(**inputs, max_new_tokens=2, compile_config=CompileConfig(backend="nope", mode=None))
        with pytest.raises(ValueError, match="takes no mode: pass CompileConfig"):
            gm.generate(**inputs, max_new_tokens=2, compile_config=CompileConfig(backend=lambda graph, inputs: graph))
        with pytest.raises(ValueError, match="static KV cache, but this call asks for no cache"):
            gm.generate(**inputs, max_new_tokens=2, use_cache=False, compile_config=CompileConfig())
        with pytest.raises(ValueError, match="cache_implementation='offloaded'"):  # ("dynamic": read as static)
            gm.generate(**inputs, max_new_tokens=2, cache_implementation="offloaded", compile_config=CompileConfig())
    finally:
        del gm.__dict__["_run"]
    assert calls == []


def test_seq2seq_compiled_decoding_compiles_once():
    """BART with compile_config (T5 decodes through the same path): tokens equal eager decoding, dense and
    mixed; a set_adapter switch and another call do not recompile."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    reference, gm = two_adapters_pair(models.bart().eval())
    inputs = models.hf_inputs("bart", batch=3)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, do_sample=False)
    config = transformers.CompileConfig(fullgraph=True, backend="eager", mode=None)  # recompiles are dynamo's
    names = ["b", "__base__", "a"]
    torch._dynamo.reset()
    counters.clear()
    try:
        assert torch.equal(gm.generate(**inputs, **kw, compile_config=config), gm.generate(**inputs, **kw))
        assert torch.equal(gm.generate(**inputs, **kw, adapter_names=names, compile_config=config),
                           gm.generate(**inputs, **kw, adapter_names=names))
        with torch._dynamo.config.patch(error_on_recompile=True):
            gm.set_adapter("b")
            expected = gm.generate(**inputs, **kw)
            assert torch.equal(gm.generate(**inputs, **kw, compile_config=config), expected)
            assert not torch.equal(expected, reference.generate(**inputs, **kw))  # PEFT's is still on "a"
        assert counters["stats"]["unique_graphs"] == 2  # the dense and mixed decoder steps
    finally:
        gm.set_adapter("a")
        torch._dynamo.reset()


@pytest.mark.parametrize("name,method", [("llama", "prefix"), ("opt", "prompt")])
def test_prompt_methods_compiled_decoding_compiles_once(name, method):
    """Prompt and prefix tuning with compile_config: the virtual tokens go into the cache before the compiled
    steps, which equal eager decoding and do not recompile on a second call."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config_class, kwargs = PROMPT_METHODS[method]
    config = getattr(fxpeft, config_class)(task_type="CAUSAL_LM", **kwargs)
    gm = fxpeft.transform(getattr(models, name)().eval(), config).eval()
    with torch.no_grad():
        for param in gm.parameters():
            if param.requires_grad:
                param.normal_()
    inputs = models.hf_inputs(name, batch=2)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0, do_sample=False, eos_token_id=None,
              return_dict_in_generate=True, output_logits=True)
    compiled = transformers.CompileConfig(fullgraph=True, backend="eager", mode=None)  # recompiles are dynamo's

    def same(got, expected):
        assert torch.equal(got.sequences, expected.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), rtol=1e-5, atol=1e-5)

    torch._dynamo.reset()
    counters.clear()
    try:
        expected = gm.generate(**inputs, **kw)
        with gm.disable_adapter():
            assert not torch.allclose(torch.stack(gm.generate(**inputs, **kw).logits), torch.stack(expected.logits))
        same(gm.generate(**inputs, **kw, compile_config=compiled), expected)
        with torch._dynamo.config.patch(error_on_recompile=True):
            same(gm.generate(**inputs, **kw, compile_config=compiled), expected)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()
