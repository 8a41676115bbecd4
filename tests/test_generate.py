"""gm.generate: transformers' decoding over fxpeft's graphs with a static KV cache, against PEFT's generate."""
import copy

import peft
import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode

import fxpeft
import models
from peft_oracle import ALL_LINEAR as LORA
from peft_oracle import copy_adapter_weights, lora_pair

NEW = 6


class AttendedKeys(TorchDispatchMode):
    """How many keys each attention (SDPA, as the op runs) attends over, in call order."""

    def __init__(self):
        super().__init__()
        self.lengths = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.overloadpacket.__name__ and type(args[1]) is torch.Tensor:  # not traced
            self.lengths.append(args[1].shape[2])
        return func(*args, **(kwargs or {}))


def both(reference, gm, seed=1, **kwargs):
    torch.manual_seed(seed)
    expected = reference.generate(**kwargs)
    torch.manual_seed(seed)
    return expected, gm.generate(**kwargs)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "opt"])
def test_greedy_with_left_padding_matches_peft(name):
    model = getattr(models, name)().eval()
    reference, gm = lora_pair(model, {"default": dict(r=4, lora_alpha=8, **LORA)})
    inputs = models.hf_inputs(name, batch=2)  # row 0 left-padded
    expected, got = both(reference, gm, **inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                         return_dict_in_generate=True, output_scores=True)
    assert type(got) is type(expected)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == NEW
    for ours, theirs in zip(got.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # one row, no padding: the prompt's mask is None (Qwen2: in the dict of masks it passes), the steps' are not
    expected, got = both(reference, gm, **models.hf_inputs(name, batch=1), max_new_tokens=NEW, do_sample=False,
                         pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("options", [
    dict(num_beams=3, num_return_sequences=2),
    dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, num_return_sequences=2),
    dict(min_new_tokens=4, eos_token_id=[5, 54, 57, 63]),
], ids=["beams", "sampling", "min-eos"])
def test_decoding_strategies_match_peft(llama_pair, options):
    reference, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2)
    expected, got = both(reference, gm, **inputs, max_new_tokens=NEW, pad_token_id=0, **options)
    assert torch.equal(got, expected)


def test_generation_config_and_streamer(llama_pair):
    reference, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=1)
    config = transformers.GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=0)

    class Collect(transformers.generation.BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.append(value.flatten().tolist())

        def end(self):
            pass

    streamer = Collect()
    expected = reference.generate(**inputs, generation_config=config)
    got = gm.generate(**inputs, generation_config=config, streamer=streamer)
    assert torch.equal(got, expected)
    assert sum(streamer.tokens, []) == got[0].tolist()
    assert config.cache_implementation is None  # the caller's config is not changed


@pytest.mark.parametrize("capacity", [None, 40], ids=["sized-by-generate", "larger"])
def test_decode_steps_read_one_token_and_write_the_cache_in_place(llama_pair, capacity):
    """The KV cache is real: after the prompt, every step's graph gets one token per sequence (so it
    cannot recompute the context), all steps run one captured graph, and the cache tensors are
    written in place to the prompt plus the generated tokens. Each step attends over the tokens so
    far, as a dynamic cache holds them, not over every position of the static cache (a larger one
    is what transformers keeps for later calls, e.g. after a compiled call with max_cache_len)."""
    _, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2, seq=7)
    seen = []
    run = type(gm)._run

    def recording(signature, adapter_names, batch_input, *args):
        _, call = torch.utils._pytree.tree_unflatten(list(args), signature.in_spec)
        seen.append((signature, tuple(call["input_ids"].shape)))
        return run(gm, signature, adapter_names, batch_input, *args)

    gm.__dict__["_run"] = recording
    try:
        with AttendedKeys() as attention:
            out = gm.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                              return_dict_in_generate=True, **({} if capacity is None else dict(max_cache_len=capacity)))
    finally:
        del gm.__dict__["_run"]
    assert [shape for _, shape in seen] == [(2, 7)] + [(2, 1)] * (NEW - 1)
    layers = gm.config.num_hidden_layers
    assert attention.lengths == [7 + step for step in range(NEW) for _ in range(layers)]
    assert len({id(signature) for signature, _ in seen}) == 1
    cache = out.past_key_values
    assert isinstance(cache, transformers.StaticCache)
    for layer in cache.layers:
        assert int(layer.cumulative_length) == 7 + NEW - 1
        written = layer.keys.abs().sum(dim=(0, 1, 3))
        assert bool((written[: 7 + NEW - 1] > 0).all()) and bool((written[7 + NEW - 1:] == 0).all())


def test_adapter_names_per_sequence(llama_pair):
    """One adapter per sequence in one decode graph: equal to PEFT (beams repeat names per beam) and to
    generating each sequence alone with its adapter."""
    reference, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=3)
    names = ["a", "__base__", "b"]
    for options in (dict(do_sample=False), dict(num_beams=2)):
        expected, got = both(reference, gm, **inputs, max_new_tokens=NEW, pad_token_id=0, adapter_names=names, **options)
        assert torch.equal(got, expected)
    mixed = gm.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0, adapter_names=names)
    try:
        for row, name in enumerate(names):
            alone = {k: v[row:row + 1] for k, v in inputs.items()}
            if name == "__base__":
                with gm.disable_adapter():
                    single = gm.generate(**alone, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
            else:
                gm.set_adapter(name)
                single = gm.generate(**alone, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
            assert torch.equal(single[0], mixed[row]), name
    finally:
        gm.set_adapter("a")


# test_methods.METHODS: one row per weight-adapting method (a new method adds a row there and is checked
# here too); what those rows target on their tiny models, changed for Qwen2's layers
QWEN2_SITES = ["q_proj", "v_proj", "down_proj"]
ON_QWEN2 = {"road": dict(target_modules=["q_proj", "v_proj"]), "boft": dict(boft_block_num=4),
            "trainable_tokens": dict(target_modules=["embed_tokens"], token_indices=[1, 3, 5])}


def loaded_from_peft(gm, model, config, tmp_path, name: str):
    """PEFT's adapter on a copy of ``model``, random and then perturbed (so that it changes the greedy tokens),
    loaded into ``gm`` through PEFT's checkpoint as ``name`` and set active; PEFT's model is returned."""
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(model), config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            if parameter.requires_grad:
                parameter.add_(0.2 * torch.randn_like(parameter))
    reference.save_pretrained(tmp_path / name)
    gm.load_adapter(str(tmp_path / name), name)
    gm.set_adapter(name)
    return reference


def test_every_weight_adapting_method_generates_as_peft(tmp_path):
    """Every site method fxpeft has, on one module captured once: each method's adapter, made in PEFT
    (loaded_from_peft), generates the tokens and per-step scores PEFT's generate gives, and is deleted before the next method's."""
    import test_methods

    torch.manual_seed(0)
    model = models.qwen2().eval()
    with torch.no_grad():  # Qwen2's q, k, v biases: not the zeros a new model has (methods that change them)
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0, 0.02)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    gm.delete_adapter("default")  # a module with no adapter computes the base model, and takes any method's
    inputs = models.hf_inputs("qwen2", batch=2)
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    base = gm.generate(**inputs, **kw).sequences
    site = test_methods.SiteModel(models.qwen2, None, QWEN2_SITES, ["down_proj"])
    for name, spec in test_methods.METHODS.items():
        options = {**spec.options(site), **spec.random, **ON_QWEN2.get(name, {})}
        reference = loaded_from_peft(gm, model, spec.peft(**options), tmp_path, name)
        expected, got = reference.generate(**inputs, **kw), gm.generate(**inputs, **kw)
        assert not torch.equal(expected.sequences, base), f"{name}: the adapter does not change the tokens"
        assert torch.equal(got.sequences, expected.sequences), name
        torch.testing.assert_close(got.scores, expected.scores, rtol=1e-5, atol=1e-5,
                                   msg=lambda text: f"{name}: {text}")
        gm.delete_adapter(name)


# ------------------------------------------------------------------------------------------ bad input


def test_models_that_cannot_generate_say_so():
    gm = fxpeft.transform(models.bert(), fxpeft.LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(TypeError, match="BertForSequenceClassification cannot generate"):
        gm.generate(**models.hf_inputs("bert"))
    gm = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(TypeError, match="MLP cannot generate"):
        gm.generate(torch.randn(2, 12))


def test_bad_adapter_names_fail_before_any_compute(llama_pair):
    _, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2)
    calls = []
    gm.__dict__["_run"] = lambda *args: calls.append(args)
    try:
        with pytest.raises(ValueError, match="3 entries but the batch has 2"):
            gm.generate(**inputs, max_new_tokens=2, adapter_names=["a", "b", "a"])
        with pytest.raises(ValueError, match="unknown adapter"):
            gm.generate(**inputs, max_new_tokens=2, adapter_names=["a", "nope"])
    finally:
        del gm.__dict__["_run"]
    assert calls == []


def test_a_prompt_longer_than_the_cache_names_both_lengths(llama_pair):
    _, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2, seq=7)
    cache = transformers.StaticCache(config=gm.config, max_cache_len=5)
    with pytest.raises(ValueError, match="prompt has 7 tokens but the KV cache holds 5"):
        gm.generate(**inputs, max_new_tokens=2, pad_token_id=0, cache=cache)
    sliding = transformers.cache_utils.Cache(
        layers=[transformers.cache_utils.DynamicSlidingWindowLayer(sliding_window=4) for _ in range(2)])
    with pytest.raises(NotImplementedError, match="static cache .*DynamicSlidingWindowLayer"):
        gm.generate(**inputs, max_new_tokens=2, pad_token_id=0, cache=sliding)


def test_generation_continues_from_the_cache_it_returned(llama_pair):
    """A returned cache passed back to continue (multi-turn decoding): fxpeft's static cache, sized for the call
    that made it, grows (PEFT's dynamic one does), and the tokens equal PEFT's, dense and with adapter_names; a
    static cache the caller made too short for the call is refused before any compute, naming both lengths."""
    reference, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    for extra in ({}, dict(adapter_names=["b", "__base__"])):
        first = [model.generate(**inputs, **kw, **extra, return_dict_in_generate=True) for model in (reference, gm)]
        assert torch.equal(first[0].sequences, first[1].sequences)
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, NEW, dtype=torch.long)], 1)
        expected, got = (model.generate(input_ids=out.sequences, attention_mask=mask, cache=out.cache, **kw, **extra)
                         for model, out in zip((reference, gm), first))
        assert got.shape[1] == inputs["input_ids"].shape[1] + 2 * NEW
        assert torch.equal(got, expected)
    cache = transformers.StaticCache(config=gm.config, max_cache_len=11)  # 7 + 6 new needs 12: the last not fed back
    gm(**inputs, cache=cache, use_cache=True)
    held = [layer.keys.clone() for layer in cache.layers]
    with pytest.raises(ValueError, match=r"holds 11 positions but this call needs 12 \(7 tokens so far"):
        gm.generate(**inputs, **kw, cache=cache)
    assert all(torch.equal(layer.keys, keys) for layer, keys in zip(cache.layers, held))
    with pytest.raises(ValueError, match=r"holds 11 positions but this call needs 12"):  # one not used yet too
        gm.generate(**inputs, **kw, cache=transformers.StaticCache(config=gm.config, max_cache_len=11))
    fits = gm.generate(**inputs, **kw, cache=transformers.StaticCache(config=gm.config, max_cache_len=12))
    assert torch.equal(fits, reference.generate(**inputs, **kw))


def test_dynamic_caches_are_read_and_written_as_peft_writes_them(llama_pair):
    """A DynamicCache (transformers' default, a multi-turn script's) given to generate, asked for by name, or
    given to a forward call: the graphs read it as a static cache over what it holds (one per generate call,
    also compiled), and the caller's object ends up holding what PEFT's holds; tokens equal PEFT's."""
    reference, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    compiled = transformers.CompileConfig(fullgraph=True, backend="eager", mode=None)
    from torch._dynamo.utils import counters

    def assert_same(ours, theirs):
        assert type(ours) is transformers.DynamicCache and len(ours.layers) == len(theirs.layers)
        for mine, peft_layer in zip(ours.layers, theirs.layers):
            torch.testing.assert_close(mine.keys, peft_layer.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.values, peft_layer.values, rtol=1e-5, atol=1e-5)

    for extra in ({}, dict(compile_config=compiled)):
        caches = [transformers.DynamicCache(config=gm.config) for _ in range(2)]
        expected = reference.generate(**inputs, **kw, cache=caches[0], return_dict_in_generate=True)
        torch._dynamo.reset()
        counters.clear()
        with torch._dynamo.config.patch(error_on_recompile=True):  # one static cache for the call, its steps one graph
            got = gm.generate(**inputs, **kw, **extra, cache=caches[1], return_dict_in_generate=True)
        # compiled: transformers compiles no step over a DynamicCache (not compileable); over the static one, once
        assert counters["stats"]["unique_graphs"] == (1 if extra else 0)
        assert torch.equal(got.sequences, expected.sequences) and got.cache is caches[1]
        assert_same(caches[1], caches[0])
        mask = torch.cat([inputs["attention_mask"], torch.ones(2, NEW, dtype=torch.long)], 1)  # the next turn
        expected = reference.generate(input_ids=expected.sequences, attention_mask=mask, cache=caches[0], **kw)
        assert torch.equal(gm.generate(input_ids=got.sequences, attention_mask=mask, cache=caches[1], **kw, **extra),
                           expected)
        assert_same(caches[1], caches[0])
    expected, got = (model.generate(**inputs, **kw, cache_implementation="dynamic", return_dict_in_generate=True)
                     for model in (reference, gm))
    assert torch.equal(got.sequences, expected.sequences)
    assert_same(got.cache, expected.cache)
    with torch.no_grad():  # a prompt's cache made by a forward call, reused by generate calls (transformers' docs)
        prompt_caches = [model(**inputs, cache=transformers.DynamicCache(config=gm.config)).cache
                         for model in (reference, gm)]
    assert_same(prompt_caches[1], prompt_caches[0])
    longer = {"input_ids": torch.cat([inputs["input_ids"], inputs["input_ids"][:, -3:]], 1),
              "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(2, 3, dtype=torch.long)], 1)}
    expected, got = (model.generate(**longer, **kw, cache=copy.deepcopy(cache))
                     for model, cache in zip((reference, gm), prompt_caches))
    assert torch.equal(got, expected)
    step = dict(input_ids=inputs["input_ids"][:, -1:], attention_mask=longer["attention_mask"][:, :8])
    with torch.no_grad():  # a forward call over a filled one (the dispatcher copies it in, appends the new position)
        expected, got = (model(**step, cache=cache).logits for model, cache in zip((reference, gm), prompt_caches))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert_same(prompt_caches[1], prompt_caches[0])


def test_generation_from_inputs_embeds_matches_peft(llama_pair):
    """generate(inputs_embeds=...) (a decoder-only model: the new tokens only), as PEFT's."""
    reference, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2)
    embeds = gm.get_input_embeddings()(inputs["input_ids"]).detach()
    expected, got = both(reference, gm, inputs_embeds=embeds, attention_mask=inputs["attention_mask"],
                         max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert got.shape == (2, NEW) and torch.equal(got, expected)


def test_a_forward_loop_with_a_static_cache_matches_peft(llama_pair):
    """Called directly (a user's own decoding loop, 2-d masks, either cache keyword), the graph
    writes the cache it is given and returns it, as the model does."""
    reference, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [transformers.StaticCache(config=gm.config, max_cache_len=12) for _ in range(2)]
    expected = reference(input_ids=ids, attention_mask=mask, position_ids=position, cache=caches[0], use_cache=True)
    got = gm(input_ids=ids, attention_mask=mask, position_ids=position, cache=caches[1], use_cache=True)
    assert got.cache is caches[1]
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    step = dict(input_ids=expected.logits[:, -1:].argmax(-1), attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                position_ids=position[:, -1:] + 1)
    expected = reference(**step, cache=caches[0]).logits
    torch.testing.assert_close(gm(**step, past_key_values=caches[1]).logits, expected, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(caches[1].layers, caches[0].layers):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)


def test_a_forward_loop_asking_for_a_cache_matches_peft(llama_pair):
    """``use_cache=True`` without a cache object (the usual hand-written decoding loop): the call returns a
    DynamicCache holding the prompt, as the model's does, and each step fed that cache back gives PEFT's
    logits and cache (fxpeft returned None, and the loop's next step ran without the tokens before it)."""
    reference, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2)
    with torch.no_grad():
        outputs = [model(**inputs, use_cache=True) for model in (reference, gm)]
        mask = inputs["attention_mask"]
        for _ in range(3):
            assert type(outputs[1].cache) is transformers.DynamicCache
            torch.testing.assert_close(outputs[1].logits, outputs[0].logits, rtol=1e-5, atol=1e-5)
            for ours, theirs in zip(outputs[1].cache.layers, outputs[0].cache.layers):
                torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)
            mask = torch.cat([mask, mask[:, -1:]], 1)
            token = outputs[0].logits[:, -1:].argmax(-1)
            outputs = [model(input_ids=token, attention_mask=mask, cache=out.cache, use_cache=True)
                       for model, out in zip((reference, gm), outputs)]
    with pytest.warns(UserWarning, match="returns no KV cache, as autograd is on"):  # training graphs take none
        assert gm(**inputs, use_cache=True).cache is None
    compiled = torch.compile(gm, backend="eager")  # (a StaticCache passed in is written, as in generate)
    try:
        with torch.no_grad(), pytest.warns(UserWarning, match="returns no KV cache, as it runs under torch.compile"):
            assert compiled(**inputs, use_cache=True).cache is None
    finally:
        torch._dynamo.reset()
    sliding = transformers.MistralForCausalLM(transformers.MistralConfig(  # its DynamicCache: sliding-window layers
        vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4)).eval()
    sliding = fxpeft.transform(sliding, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with torch.no_grad(), pytest.warns(UserWarning, match="DynamicSlidingWindowLayer"):  # it raised
        assert sliding(**inputs, use_cache=True).cache is None


IA3 = dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False)


@pytest.mark.parametrize("config", [fxpeft.LoraConfig(r=2, **LORA), fxpeft.IA3Config(**IA3),
                                    fxpeft.VeraConfig(r=4, init_weights=False, target_modules=["q_proj", "v_proj"])],
                         ids=["lora", "ia3", "vera"])
def test_generate_after_a_dtype_change(config):
    torch.manual_seed(0)
    gm = fxpeft.transform(models.llama().eval(), config).eval()
    inputs = models.hf_inputs("llama", batch=2)
    before = gm.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    gm.to(torch.float64)  # captures every signature again, the cache's included
    assert torch.equal(gm.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0), before)
    assert gm(**inputs).logits.dtype == torch.float64


# ------------------------------------------------------------------------------------------- seq2seq


def test_seq2seq_greedy_and_beams_match_peft(seq2seq_pair):
    """T5 and BART: the encoder runs once through fxpeft's graph, every decoder step reads one token,
    the first step writes the encoder's keys and values into the cross-attention cache and later steps
    read them (two decoder graphs); tokens and scores equal PEFT's."""
    reference, gm, inputs = seq2seq_pair
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0)  # min: tiny BART ends at once
    seen = []
    run = type(gm)._run

    def recording(signature, adapter_names, batch_input, *args):
        _, call = torch.utils._pytree.tree_unflatten(list(args), signature.in_spec)
        if "cache" in call:
            seen.append((sorted(call["cache"]), tuple(call["decoder_input_ids"].shape)))
        return run(gm, signature, adapter_names, batch_input, *args)

    greedy = dict(kw, do_sample=False, return_dict_in_generate=True, output_scores=True)
    expected = reference.generate(**inputs, **greedy)
    gm.__dict__["_run"] = recording
    try:
        with AttendedKeys() as attention:
            got = gm.generate(**inputs, **greedy)
    finally:
        del gm.__dict__["_run"]
    assert torch.equal(got.sequences, expected.sequences)
    for ours, theirs in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert seen == [(["cross_attention", "self_attention"], (3, 1))] + [
        (["cross_attention_filled", "self_attention"], (3, 1))] * (NEW - 1)
    # the decoder's self-attention attends over its tokens so far, not the whole cache (the source's 7 keys:
    # the encoder's self-attention and the cross-attention; the first 1s: the encoder's pass, see generation)
    own = [length for length in attention.lengths if length != inputs["input_ids"].shape[1]]
    layers = own.count(NEW)
    assert layers and own == [1] * layers + [1 + step for step in range(NEW) for _ in range(layers)]
    expected, got = both(reference, gm, **inputs, **kw, num_beams=3, num_return_sequences=2)
    assert torch.equal(got, expected)


def test_seq2seq_adapter_names_match_peft(seq2seq_pair):
    reference, gm, inputs = seq2seq_pair
    expected, got = both(reference, gm, **inputs, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                         do_sample=False, adapter_names=["b", "__base__", "a"])
    assert torch.equal(got, expected)



SEQ2SEQ_METHODS = {  # one of each kind of generation-graph reading (scaling, rotation, pair turns, a traced call;
    # per-feature factors, low-rank factors, a dense ΔW), on layers of the encoder and the decoder (self- and
    # cross-attention); each changes the greedy tokens of its model
    "t5": (["q", "v", "wo"], ["wo"], ["ia3", "oft", "road", "lily"]),
    "bart": (["q_proj", "v_proj", "fc2"], ["fc2"], ["dora", "vera", "lokr"]),
}


@pytest.mark.parametrize("name", list(SEQ2SEQ_METHODS))
def test_seq2seq_weight_adapting_methods_generate_as_peft(name, tmp_path):
    """Methods other than LoRA on encoder-decoder models, each loaded from PEFT's checkpoint into one module
    captured once: tokens and scores equal PEFT's generate; with adapter_names each sequence gets what it gets
    generated in a batch of its adapter's sequences alone."""
    import test_methods

    targets, feedforward, methods = SEQ2SEQ_METHODS[name]
    torch.manual_seed(0)
    model = getattr(models, name)().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=targets[:1]))
    gm.delete_adapter("default")
    inputs = models.hf_inputs("bart", batch=3)  # row 0 padded
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    base = gm.generate(**inputs, **kw)
    site = test_methods.SiteModel(getattr(models, name), None, targets, feedforward)
    rows = lambda picked: {key: value[picked] for key, value in inputs.items()}  # noqa: E731
    for method in methods:
        spec = test_methods.METHODS[method]
        options = {**spec.options(site), **spec.random}
        if method == "road":  # its row targets the MLP's layer by name
            options.update(target_modules=targets[:2])
        reference = loaded_from_peft(gm, model, spec.peft(**options), tmp_path, method)
        scored = dict(kw, return_dict_in_generate=True, output_scores=True)
        expected, got = reference.generate(**inputs, **scored), gm.generate(**inputs, **scored)
        assert not torch.equal(expected.sequences, base), f"{method}: the adapter does not change the tokens"
        assert torch.equal(got.sequences, expected.sequences), method
        for ours, theirs in zip(got.scores, expected.scores, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=lambda text: f"{method}: {text}")
        mixed = gm.generate(**inputs, **kw, adapter_names=[method, "__base__", method])
        assert torch.equal(mixed[[0, 2]], gm.generate(**rows([0, 2]), **kw)), method
        with gm.disable_adapter():
            assert torch.equal(mixed[1], gm.generate(**rows([1]), **kw)[0]), method
        gm.delete_adapter(method)


# ------------------------------------------------------------------------- prompt and prefix tuning

PROMPT_METHODS = {
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=4)),
    "p-tuning": ("PromptEncoderConfig", dict(num_virtual_tokens=4, encoder_hidden_size=16)),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=4)),
}


def peft_greedy(reference, ids, mask, steps):
    """PEFT's own forward without a cache, greedy (PEFT 0.21.2's generate is broken on transformers 5.24
    for these methods: prefix tuning returns the base model's tokens, prompt tuning drifts after the
    first step)."""
    logits = []
    with torch.no_grad():
        for _ in range(steps):
            logits.append(reference(input_ids=ids, attention_mask=mask).logits[:, -1])
            ids = torch.cat([ids, logits[-1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, mask[:, -1:]], dim=1)
    return ids, logits


@pytest.mark.parametrize("name,method", [("llama", "prompt"), ("qwen2", "p-tuning"), ("llama", "prefix"),
                                         ("gpt2", "prefix"), ("opt", "prompt"), ("opt", "prefix")])
def test_prompt_methods_match_peft_forward(name, method):
    """The virtual tokens go into the cache once (the prompt run as input embeddings, or the prefixes
    written), then every step reads the real tokens only; tokens and per-step logits equal greedy
    decoding over PEFT's forward on the whole sequence, left padding included."""
    torch.manual_seed(0)
    model = getattr(models, name)().eval()
    config_class, kwargs = PROMPT_METHODS[method]
    reference = peft.get_peft_model(copy.deepcopy(model), getattr(peft, config_class)(task_type="CAUSAL_LM", **kwargs))
    gm = fxpeft.transform(model, getattr(fxpeft, config_class)(task_type="CAUSAL_LM", **kwargs)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            if param.requires_grad:
                param.normal_()
    assert copy_adapter_weights(reference.eval(), gm) > 0
    inputs = models.hf_inputs(name, batch=2)
    expected, logits = peft_greedy(reference, inputs["input_ids"], inputs["attention_mask"], NEW)
    seen = []
    run = type(gm)._run

    def recording(signature, adapter_names, batch_input, *args):
        _, call = torch.utils._pytree.tree_unflatten(list(args), signature.in_spec)
        seen.append(tuple(call["input_ids"].shape) if "input_ids" in call else "prompt")
        return run(gm, signature, adapter_names, batch_input, *args)

    gm.__dict__["_run"] = recording
    try:
        got = gm.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                          return_dict_in_generate=True, output_logits=True)
    finally:
        del gm.__dict__["_run"]
    assert torch.equal(got.sequences, expected)
    for ours, theirs in zip(got.logits, logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert seen == (["prompt"] if method != "prefix" else []) + [(2, 7)] + [(2, 1)] * (NEW - 1)
    assert int(got.past_key_values.layers[0].cumulative_length) == 4 + 7 + NEW - 1
    with pytest.raises(ValueError, match="adapter_names picks adapters per sequence"):
        gm.generate(**inputs, max_new_tokens=2, adapter_names=["default", "default"])
    with pytest.raises(ValueError, match="builds its own KV cache"):
        gm.generate(**inputs, max_new_tokens=2, use_cache=False)
    # a forward call's cache lacks the virtual tokens: refused (it ran without the adapter, silently)
    with pytest.raises(ValueError, match="puts its virtual tokens into the KV cache first"):
        gm(**inputs, cache=transformers.DynamicCache(config=gm.config))
    if method == "prefix" and name == "llama":  # asked for by use_cache=True: none is returned, and it says so
        with torch.no_grad(), pytest.warns(UserWarning, match="returns no KV cache, as adapter 'default' puts"):
            assert gm(**inputs, use_cache=True).cache is None


@pytest.mark.parametrize("name,method", [("bart", "p-tuning"), ("bart", "prefix")])  # prompt tuning: p-tuning's path
def test_seq2seq_prompt_methods_match_peft_forward(name, method):
    """Encoder-decoder models: prompt and p-tuning tokens go into the encoder's input (its outputs and
    mask carry them), prefixes into the decoder's self-attention cache once; every step's logits equal
    PEFT's forward over the whole decoder sequence so far (PEFT's generate is the broken reference
    here too), for rows of different padding."""
    torch.manual_seed(0)
    model = getattr(models, name)().eval()
    config_class, kwargs = PROMPT_METHODS[method]
    reference = peft.get_peft_model(copy.deepcopy(model), getattr(peft, config_class)(task_type="SEQ_2_SEQ_LM", **kwargs))
    gm = fxpeft.transform(model, getattr(fxpeft, config_class)(task_type="SEQ_2_SEQ_LM", **kwargs)).eval()
    with torch.no_grad():
        for param in reference.parameters():
            if param.requires_grad:
                param.normal_()
    assert copy_adapter_weights(reference.eval(), gm) > 0
    inputs = models.hf_inputs("bart", batch=3)  # row 0 padded
    got = gm.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0, forced_bos_token_id=None,
                      forced_eos_token_id=None, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    assert got.sequences.shape == (3, NEW + 1)
    with torch.no_grad():
        for step, ours in enumerate(got.logits, start=1):
            theirs = reference(**inputs, decoder_input_ids=got.sequences[:, :step]).logits[:, -1]
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.sequences[:, step], theirs.argmax(-1))  # greedy over PEFT's forward



# ------------------------------------------------------------------------------------------ deployment


def test_export_merged_seq2seq_for_generation_matches_generate(tmp_path):
    """An encoder-decoder's export_merged(generation=True): encode.pt2, generate_first.pt2 (writes the
    cross-attention cache) and generate.pt2 (reads it), driven by its generate.py (loaded from the folder;
    that such a loop runs where fxpeft cannot be imported is the causal-LM test's); its tokens equal
    gm.generate's greedy tokens for a padded batch (BART: learned positions counted from the cache,
    forced tokens switched off on both sides)."""
    import importlib.util

    torch.manual_seed(0)
    gm = fxpeft.transform(models.bart(layers=1).eval(), fxpeft.LoraConfig(r=4, lora_alpha=8, **LORA)).eval()
    inputs = models.hf_inputs("bart", batch=3)  # row 0 padded
    written = fxpeft.export_merged(gm, str(tmp_path), generation=True)
    assert {written["encoder"], written["first_step"], written["decoding"]} == {
        str(tmp_path / name) for name in ("encode.pt2", "generate_first.pt2", "generate.pt2")}
    spec = importlib.util.spec_from_file_location("seq2seq_generate", tmp_path / "generate.py")
    loop = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loop)
    tokens = loop.greedy(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=NEW, pad_token_id=0)
    expected = gm.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0, forced_bos_token_id=None,
                           forced_eos_token_id=None)
    assert torch.equal(tokens, expected)


def test_export_merged_for_generation_runs_without_fxpeft(llama_pair, tmp_path):
    """export_merged(generation=True): generate.pt2 (the merged model with a static cache written in
    place) and generate.py, a greedy loop that needs only torch; run in a process where fxpeft cannot
    be imported, its tokens equal gm.generate's (a left-padded batch, and one prompt alone)."""
    import subprocess
    import sys

    _, gm = llama_pair
    inputs = models.hf_inputs("llama", batch=2)
    written = fxpeft.export_merged(gm, str(tmp_path), generation=True)
    assert written["loop"] == str(tmp_path / "generate.py")
    torch.save(inputs, tmp_path / "inputs.pt")
    script = (
        "import sys, torch; sys.modules['fxpeft'] = None; sys.path.insert(0, sys.argv[1]); import generate\n"
        "inputs = torch.load(sys.argv[1] + '/inputs.pt')\n"
        f"both = generate.greedy(inputs['input_ids'], inputs['attention_mask'], max_new_tokens={NEW}, pad_token_id=0)\n"
        f"alone = generate.greedy(inputs['input_ids'][1:], max_new_tokens={NEW}, pad_token_id=0)\n"
        "torch.save((both, alone), sys.argv[1] + '/tokens.pt')\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, env={"OMP_NUM_THREADS": "1"})
    both, alone = torch.load(tmp_path / "tokens.pt")
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    assert torch.equal(both, gm.generate(**inputs, **kw))
    assert torch.equal(alone, gm.generate(input_ids=inputs["input_ids"][1:], **kw))
    with pytest.raises(NotImplementedError, match="MLP is neither"):  # before anything is merged
        fxpeft.export_merged(fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"])),
                             str(tmp_path / "mlp"), example_inputs=(torch.randn(2, 12),), generation=True)
