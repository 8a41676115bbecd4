"""AdaLoRA's math (passes/adalora.py) against PEFT's own AdaLoRA on a tiny Llama.

The allocator test trains the same PEFT model twice from one seed: once allocating with PEFT's
``update_and_allocate``, once with fxpeft's ``RankAllocator.step`` fed PEFT's parameters through an
explicit ``{path: (A, E, B)}`` mapping, and requires every step's E values, rank pattern and
importance EMAs to be equal bit for bit.
"""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file

from models import VOCAB, gpt2, llama

peft = pytest.importorskip("peft")
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator  # noqa: E402

from fxpeft.passes import adalora as ada  # noqa: E402

ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SCHEDULE = dict(init_r=6, target_r=3, tinit=4, tfinal=6, total_step=36, deltaT=3, beta1=0.85, beta2=0.85)
STEPS = 40  # beyond total_step: the last steps re-apply the final pattern


def peft_adalora(seed=0, model_fn=llama, **kwargs):
    torch.manual_seed(seed)
    model = model_fn()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(model, peft.AdaLoraConfig(**kwargs))


def sites_of(pm, adapter="default"):
    """PEFT's AdaLoRA parameters as the explicit mapping fxpeft's allocator takes."""
    inner = pm.base_model.model
    return {path: (m.lora_A[adapter], m.lora_E[adapter], m.lora_B[adapter])
            for path, m in inner.named_modules() if hasattr(m, "lora_E") and adapter in m.lora_E}


def train(pm, allocate, monkeypatch, steps=STEPS, lr=2e-2):
    """A real loop (dropout on, AdamW, PEFT's orthogonal regulariser in the loss); ``allocate(step)``
    between optimizer.step and zero_grad. Returns, per step, the E values, the config's rank
    pattern, the allocator's EMAs and the triplet scores the threshold was taken over (both
    allocators call ``torch.kthvalue`` once per masking, on every site's scores)."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr)
    pm.train()
    history, scores = [], []
    kthvalue = torch.kthvalue

    def spy(values, k, *args, **kwargs):
        scores.append((values.clone(), k))
        return kthvalue(values, k, *args, **kwargs)
    monkeypatch.setattr(torch, "kthvalue", spy)
    for step in range(steps):
        torch.manual_seed(1000 + step)  # same batch and dropout masks in every run
        ids = torch.randint(0, VOCAB, (2, 9))
        pm(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        scores.clear()
        state = allocate(step)
        history.append(dict(
            E={path: E.detach().clone() for path, (_, E, _) in sites_of(pm).items()},
            pattern=copy.deepcopy(state["config"].rank_pattern),
            ipt={n: t.clone() for n, t in state["allocator"].exp_avg_ipt.items()},
            unc={n: t.clone() for n, t in state["allocator"].exp_avg_unc.items()},
            scores=list(scores),
        ))
        opt.zero_grad()
    monkeypatch.setattr(torch, "kthvalue", kthvalue)
    return history


COMMON = dict(target_modules=ALL_PROJ, lora_alpha=16, lora_dropout=0.1, task_type="CAUSAL_LM")


def run_peft(monkeypatch, **config):
    pm = peft_adalora(**COMMON, **config)
    model = pm.base_model

    def allocate(step):
        model.update_and_allocate(step)
        return dict(config=model.peft_config["default"], allocator=model.rankallocator)
    return pm, train(pm, allocate, monkeypatch)


def run_fxpeft(monkeypatch, **config):
    pm = peft_adalora(**COMMON, **config)
    ours = ada.AdaLoraConfig(**COMMON, **config)
    sites = sites_of(pm)
    allocator = ada.RankAllocator(ours, "default", sites)

    def allocate(step):
        allocator.step(sites, step)
        return dict(config=ours, allocator=allocator)
    return pm, train(pm, allocate, monkeypatch)


@pytest.fixture(scope="module")
def peft_run():
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_peft(monkeypatch, **SCHEDULE)


def first_difference(ref, got):
    for step, (a, b) in enumerate(zip(ref, got)):
        if a["pattern"] != b["pattern"]:
            return step, "rank pattern"
        if len(a["scores"]) != len(b["scores"]):
            return step, f"{len(a['scores'])} vs {len(b['scores'])} maskings"
        for (score_a, k_a), (score_b, k_b) in zip(a["scores"], b["scores"]):
            if k_a != k_b or not torch.equal(score_a, score_b):
                return step, "triplet scores or k"
        for what in ("E", "ipt", "unc"):
            if a[what].keys() != b[what].keys():
                return step, f"{what} keys {sorted(a[what])[:2]} vs {sorted(b[what])[:2]}"
            for key in a[what]:
                if not torch.equal(a[what][key], b[what][key]):
                    return step, f"{what}[{key}]"
    return None


@pytest.mark.filterwarnings("ignore:Adapter .* invalid shape")  # PEFT on saving a site resized to rank 0
def test_allocator_matches_peft_bit_for_bit_over_a_training_run(peft_run, tmp_path, monkeypatch):
    peft_pm, ref = peft_run
    pm, got = run_fxpeft(monkeypatch, **SCHEDULE)
    assert len(got) == STEPS
    assert first_difference(ref, got) is None, first_difference(ref, got)

    # the run exercised what it claims: masking happened, ranks differ per site, the budget was met
    final = got[-1]["pattern"]
    ranks = {name: sum(keep) for name, keep in final.items()}
    assert len(ranks) == 14 and all(name.endswith(".lora_E.default") for name in ranks)
    assert sum(ranks.values()) == SCHEDULE["target_r"] * 14
    assert len(set(ranks.values())) > 1
    assert sum(len(h["scores"]) for h in got) == 9  # steps 6, 9, ..., 27 by deltaT and 30 forced
    patterns = [h["pattern"] for h in got]
    assert patterns[SCHEDULE["tinit"]] is None  # warmup: no mask yet
    assert len({str(p) for p in patterns if p is not None}) > 2  # the pattern moved during budgeting
    final_E = got[-1]["E"]
    for path, E in final_E.items():
        keep = torch.tensor(final[f"{path}.lora_E.default"])
        assert torch.all(E.view(-1)[~keep] == 0) and torch.all(E.view(-1)[keep] != 0)
    # the EMAs were reset at the final allocation (step total_step - tfinal), as PEFT does
    final_step = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    assert got[final_step - 1]["ipt"] and not got[final_step]["ipt"]

    # the checkpoint PEFT writes holds the kept rows/columns: resize_by_rank_pattern gives them
    peft_pm.save_pretrained(str(tmp_path))
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert not any("ranknum" in key for key in saved)
    for path, (A, E, B) in sites_of(pm).items():
        a, e, b = ada.resize_by_rank_pattern(A, E, B, final[f"{path}.lora_E.default"])
        prefix = f"base_model.model.{path}"
        assert torch.equal(saved[f"{prefix}.lora_A"], a) and torch.equal(saved[f"{prefix}.lora_E"], e)
        assert torch.equal(saved[f"{prefix}.lora_B"], b)


def test_a_different_allocator_is_caught(peft_run, monkeypatch):
    """The comparison is not vacuous: a slightly different EMA diverges from PEFT."""
    _, ref = peft_run
    _, got = run_fxpeft(monkeypatch, **{**SCHEDULE, "beta1": 0.8})
    assert first_difference(ref, got) is not None


def test_allocator_level_calls_match_peft_including_force_mask():
    """PEFT's RankAllocator.update_and_allocate / mask_to_budget / mask_using_rank_pattern,
    called directly on the same gradients, mask the same E entries and return the same pattern."""
    config = dict(target_modules=["q_proj", "v_proj"], init_r=5, target_r=2, tinit=1, tfinal=2, total_step=10,
                  deltaT=2)
    pm_ref = peft_adalora(seed=3, **config)
    pm_got = peft_adalora(seed=3, **config)
    ref = PeftRankAllocator(pm_ref.base_model.model, pm_ref.peft_config["default"], "default")
    sites = sites_of(pm_got)
    got = ada.RankAllocator(ada.AdaLoraConfig(**config), "default")  # budget set on the first call
    generator = torch.Generator().manual_seed(7)
    masked = 0
    for step in range(8):
        ids = torch.randint(0, VOCAB, (2, 6), generator=generator)
        for pm in (pm_ref, pm_got):
            pm.zero_grad()
            with torch.no_grad():  # non-zero E so that gradients reach A and B
                for _, E, _ in sites_of(pm).values():
                    E.add_(0.01 * (step + 1))
            pm(input_ids=ids, labels=ids).loss.backward()
        force = step in (3, 6)
        budget_ref, pattern_ref = ref.update_and_allocate(pm_ref.base_model.model, step, force_mask=force)
        budget_got, pattern_got = got.update_and_allocate(sites, step, force_mask=force)
        assert (budget_ref, pattern_ref) == (budget_got, pattern_got)
        masked += pattern_got is not None
        for (_, E_ref, _), (_, E_got, _) in zip(sites_of(pm_ref).values(), sites.values()):
            assert torch.equal(E_ref, E_got)
    assert masked == 4  # steps 2, 4, 6 by deltaT and 3 forced
    assert got.init_bgt == ref.init_bgt == 20 and got.target_bgt == ref.target_bgt == 8

    # a saved (adapter-name-less) pattern masks the same entries
    pattern = {f"{path}.lora_E": [i % 2 == 0 for i in range(5)] for path in sites}
    with torch.no_grad():
        for pm in (pm_ref, pm_got):
            for _, E, _ in sites_of(pm).values():
                E.fill_(1.0)
    ref.mask_using_rank_pattern(pm_ref.base_model.model, pattern)
    got.mask_using_rank_pattern(sites, pattern)
    for (_, E_ref, _), (_, E_got, _) in zip(sites_of(pm_ref).values(), sites.values()):
        assert torch.equal(E_ref, E_got) and E_got.view(-1).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert ada.rank_pattern_key(pattern, "model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj.lora_E"
    pattern_live = {f"{name}.default": keep for name, keep in pattern.items()}
    assert ada.rank_pattern_key(pattern_live, "model.layers.0.self_attn.q_proj") == \
        "model.layers.0.self_attn.q_proj.lora_E.default"
    assert ada.rank_pattern_key(pattern_live, "model.layers.0.self_attn.q_proj", "other") is None
    with pytest.raises(KeyError, match="no entry"):
        got.mask_using_rank_pattern(sites, {"elsewhere.lora_E": [True] * 5})


@pytest.mark.filterwarnings("ignore:Adapter .* invalid shape")  # PEFT on saving a site resized to rank 0
def test_peft_loads_a_rank_pattern_as_resize_by_rank_pattern_with_ranknum_init_r(tmp_path):
    """What the loader must replicate: PEFT saves the kept rows/columns and, loading, shrinks each
    site to them while ranknum stays init_r (the scale does not change; 0 for an emptied site)."""
    config = dict(target_modules=["q_proj", "v_proj"], init_r=4, lora_alpha=8, total_step=10)
    pm = peft_adalora(seed=1, **config)
    sites = sites_of(pm)
    torch.manual_seed(2)
    with torch.no_grad():
        for _, E, _ in sites.values():
            E.normal_()
    keeps = [[True, False, True, True], [False] * 4, [True, True, True, True], [False, True, False, False]]
    pattern = {f"{path}.lora_E.default": keep for path, keep in zip(sites, keeps)}
    ada.RankAllocator(ada.AdaLoraConfig(**config), sites=sites).mask_using_rank_pattern(sites, pattern)
    pm.peft_config["default"].rank_pattern = pattern
    pm.save_pretrained(str(tmp_path))
    assert pm.peft_config["default"].rank_pattern == {k.replace(".default", ""): v for k, v in pattern.items()}
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(llama(), str(tmp_path))
    x = torch.randn(2, 3, 32)
    for (path, (A, E, B)), keep in zip(sites.items(), keeps):
        layer = _svd_layer(loaded, path)
        a, e, b = ada.resize_by_rank_pattern(A, E, B, keep)
        assert torch.equal(layer.lora_A["default"], a) and torch.equal(layer.lora_E["default"], e)
        assert torch.equal(layer.lora_B["default"], b) and a.shape[0] == sum(keep)
        assert layer.ranknum["default"].item() == (4.0 if any(keep) else 0.0)
        with torch.no_grad():
            got = layer.base_layer(x)
            got += ada.adalora_delta(x, a, e, b, 8, 4.0)
            assert torch.equal(got, layer(x))


class _Holder(torch.nn.Module):
    def __init__(self, ranks):
        super().__init__()
        self.site = torch.nn.ModuleDict()
        for i, r in enumerate(ranks):
            m = torch.nn.Module()
            m.lora_A = torch.nn.ParameterDict({"default": torch.nn.Parameter(torch.zeros(r, 4))})
            self.site[str(i)] = m


@pytest.mark.parametrize("schedule", [
    dict(init_r=12, target_r=8, tinit=0, tfinal=0, total_step=10, deltaT=1),
    dict(init_r=6, target_r=2, tinit=5, tfinal=7, total_step=40, deltaT=3),
    dict(init_r=4, target_r=1, tinit=9, tfinal=0, total_step=10, deltaT=2),
    dict(init_r=8, target_r=0, tinit=0, tfinal=99, total_step=100, deltaT=1),
])
def test_budget_schedule_matches_peft_at_every_step(schedule):
    ranks = [schedule["init_r"]] * 3 + [schedule["init_r"] - 1]
    ref = PeftRankAllocator(_Holder(ranks), peft.AdaLoraConfig(**schedule), "default")
    sites = {str(i): (torch.zeros(r, 4), torch.zeros(r, 1), torch.zeros(4, r)) for i, r in enumerate(ranks)}
    got = ada.RankAllocator(ada.AdaLoraConfig(**schedule), "default", sites)
    assert (got.init_bgt, got.target_bgt) == (ref.init_bgt, ref.target_bgt) == (sum(ranks), 4 * schedule["target_r"])
    total, tinit, tfinal = schedule["total_step"], schedule["tinit"], schedule["tfinal"]
    for step in range(total + 3):
        assert got.budget_schedule(step) == ref.budget_schedule(step), step
    # the boundaries, spelled out
    assert got.budget_schedule(tinit) == (got.init_bgt, False)
    assert got.budget_schedule(tinit + 1)[0] < got.init_bgt
    final = total - tfinal
    assert got.budget_schedule(final) == (got.target_bgt, final % schedule["deltaT"] == 0)
    assert got.budget_schedule(final + 1) == (got.target_bgt, True)


def test_orth_regularization_is_the_loss_peft_adds():
    pm = peft_adalora(target_modules=ALL_PROJ, init_r=4, total_step=10, orth_reg_weight=0.3, task_type="CAUSAL_LM")
    torch.manual_seed(5)
    with torch.no_grad():
        for A, E, B in sites_of(pm).values():
            A.normal_(0, 0.4)
            E.normal_()
            B.normal_(0, 0.4)
    ids = torch.randint(0, VOCAB, (2, 7))
    with_reg = pm(input_ids=ids, labels=ids).loss
    plain = pm.base_model.model(input_ids=ids, labels=ids).loss
    pairs = [(A, B) for A, _, B in sites_of(pm).values()]
    ours = plain + ada.orth_regularization(pairs, 0.3)
    assert torch.equal(ours, with_reg)
    assert (with_reg - plain).item() > 0.05  # large enough that a different formula shows
    # same gradients through the regulariser
    grads_ref = torch.autograd.grad(with_reg, [A for A, _ in pairs] + [B for _, B in pairs])
    ours = pm.base_model.model(input_ids=ids, labels=ids).loss + ada.orth_regularization(pairs, 0.3)
    grads_got = torch.autograd.grad(ours, [A for A, _ in pairs] + [B for _, B in pairs])
    for g_ref, g_got in zip(grads_ref, grads_got):
        torch.testing.assert_close(g_got, g_ref, rtol=0, atol=0)
    # no labels: PEFT adds nothing
    assert pm(input_ids=ids).loss is None


def test_peft_adds_no_orth_regularization_without_a_task_type():
    """PEFT quirk the wiring must keep: a PeftModel without task_type calls the base model directly,
    skipping AdaLoraModel.forward, so its loss carries no regulariser."""
    pm = peft_adalora(target_modules=["q_proj"], init_r=4, total_step=10, orth_reg_weight=0.3)
    ids = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(pm(input_ids=ids, labels=ids).loss, pm.base_model.model(input_ids=ids, labels=ids).loss)
    assert pm.base_model(input_ids=ids, labels=ids).loss > pm(input_ids=ids, labels=ids).loss


def test_orth_regularization_edges():
    assert ada.orth_regularization([], 0.3).item() == 0.0
    eye_a, eye_b = torch.eye(3, 5), torch.eye(4, 3)  # orthonormal rows of A, columns of B
    assert ada.orth_regularization([(eye_a, eye_b)], 0.3).item() == 0.0
    # a rank-0 site (resized away) still counts in the mean, as in PEFT: ||A A^T - I|| of 2A is 3*sqrt(3)
    empty = (torch.zeros(0, 5), torch.zeros(4, 0))
    value = ada.orth_regularization([(2 * eye_a, eye_b), empty], 1.0).item()
    assert value == pytest.approx(3 * 3 ** 0.5 / 4)
    with pytest.raises(ValueError, match="orth_reg_weight"):
        ada.orth_regularization([(eye_a, eye_b)], -1.0)


def _svd_layer(pm, path):
    return pm.base_model.model.get_submodule(path)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_delta_and_delta_weight_match_svd_linear(dropout):
    pm = peft_adalora(target_modules=["q_proj", "v_proj"], init_r=5, lora_alpha=12, lora_dropout=dropout, total_step=10)
    layer = _svd_layer(pm, "model.layers.1.self_attn.v_proj")
    torch.manual_seed(2)
    with torch.no_grad():
        layer.lora_E["default"].normal_()
        layer.lora_A["default"].normal_()
    A, E, B = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    scaling, ranknum = layer.scaling["default"], layer.ranknum["default"]
    assert scaling == ada.adalora_scaling(12, 5) == 12 and ada.adalora_scaling(0, 5) == 5.0
    layer.train()
    x = torch.randn(2, 3, 32)
    torch.manual_seed(9)
    ref = layer(x)
    torch.manual_seed(9)
    got = layer.base_layer(x)
    got += ada.adalora_delta(x, A, E, B, scaling, ranknum, layer.lora_dropout["default"])
    assert torch.equal(got, ref)
    assert not torch.equal(ref, layer.base_layer(x))
    assert torch.equal(ada.adalora_delta_weight(A, E, B, scaling, ranknum), layer.get_delta_weight("default"))
    # a float ranknum (e.g. a constant folded into the graph) agrees to rounding
    torch.testing.assert_close(ada.adalora_delta_weight(A, E, B, scaling, 5.0), layer.get_delta_weight("default"))


def test_delta_weight_fan_in_fan_out_matches_conv1d():
    pm = peft_adalora(model_fn=gpt2, target_modules=["c_attn"], init_r=4, total_step=10)
    layer = _svd_layer(pm, "transformer.h.0.attn.c_attn")
    assert layer.fan_in_fan_out
    with torch.no_grad():
        layer.lora_E["default"].normal_()
    A, E, B = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    ref = layer.get_delta_weight("default")
    got = ada.adalora_delta_weight(A, E, B, layer.scaling["default"], layer.ranknum["default"], fan_in_fan_out=True)
    assert got.shape == layer.base_layer.weight.shape == (32, 96)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("init", [True, False])
def test_created_parameters_are_peft_s_from_the_same_seed(init):
    """Seeded alike, creating the sites in module order gives PEFT's initial A, E, B, ranknum."""
    pm = peft_adalora(seed=11, target_modules=["q_proj", "v_proj", "down_proj"], init_r=5, total_step=10,
                      init_lora_weights=init)
    torch.manual_seed(11)
    base = llama()
    for path, (A, E, B) in sites_of(pm).items():
        linear = base.get_submodule(path)
        a, e, b, ranknum = ada.create_adalora_parameters(5, linear.in_features, linear.out_features, init,
                                                         device=linear.weight.device, dtype=linear.weight.dtype)
        assert torch.equal(a, A) and torch.equal(e, E) and torch.equal(b, B), path
        assert torch.equal(ranknum, _svd_layer(pm, path).ranknum["default"]) and not ranknum.requires_grad
    if init:
        assert torch.all(E == 0) and abs(A.std().item() - 0.02) < 0.005
    with pytest.raises(ValueError, match="positive integer or 0"):
        ada.create_adalora_parameters(-1, 4, 4)


def test_init_adalora_weights_is_reset_lora_parameters():
    layer = _svd_layer(peft_adalora(target_modules=["q_proj"], init_r=3, total_step=10), "model.layers.0.self_attn.q_proj")
    A, E, B = (torch.randn_like(layer.lora_A["default"]), torch.randn_like(layer.lora_E["default"]),
               torch.randn_like(layer.lora_B["default"]))
    torch.manual_seed(4)
    layer.reset_lora_parameters("default")
    torch.manual_seed(4)
    ada.init_adalora_weights(A, E, B, True)
    assert torch.equal(A, layer.lora_A["default"]) and torch.equal(B, layer.lora_B["default"])
    assert torch.equal(E, layer.lora_E["default"]) and torch.all(E == 0)
    before = A.clone()
    ada.init_adalora_weights(A, E, B, False)
    assert torch.equal(A, before)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_dict_agree_with_peft():
    ref = peft.AdaLoraConfig(total_step=10).to_dict()
    got = ada.AdaLoraConfig(total_step=10).to_dict()
    assert got["peft_type"] == "ADALORA" == ref["peft_type"].value
    assert set(got) <= set(ref)
    for key in got:
        if key != "peft_type":
            assert got[key] == ref[key], key
    for key in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                "total_step", "rank_pattern", "lora_alpha", "lora_dropout", "init_lora_weights"):
        assert key in got
    listed = ada.AdaLoraConfig(total_step=10, target_modules=("q_proj", "v_proj")).to_dict()
    assert listed["target_modules"] == ["q_proj", "v_proj"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "total_step"),
    (dict(total_step=0), "total_step"),
    (dict(total_step=-3), "total_step"),
    (dict(total_step=10, tinit=5, tfinal=5), "budgeting phase"),
    (dict(total_step=10, tinit=10), "budgeting phase"),
    (dict(total_step=10, orth_reg_weight=-0.1), "orth_reg_weight"),
    (dict(total_step=10, use_dora=True), "DoRA"),
    (dict(total_step=10, target_modules="q_proj", layers_to_transform=[0]), "layers_to_transform"),
    (dict(total_step=10, target_modules="q_proj", layers_pattern="layers"), "layers_pattern"),
    (dict(total_step=10, target_modules=["q_proj"], layers_pattern="layers"), "layers_to_transform"),
])
def test_config_rejects_what_peft_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match) as ours:
        ada.AdaLoraConfig(**kwargs)
    with pytest.raises(ValueError) as theirs:
        peft.AdaLoraConfig(**kwargs)
    # same message, up to PEFT's enum repr
    assert str(ours.value).strip() == str(theirs.value).replace("PeftType.", "").strip()


def test_config_accepts_the_edges_peft_accepts_and_warns_on_r():
    ada.AdaLoraConfig(total_step=10, tinit=9)  # one budgeting step
    ada.AdaLoraConfig(total_step=1)
    with pytest.warns(UserWarning, match="init_r"):
        ada.AdaLoraConfig(total_step=10, r=4)
    for bad in (dict(init_r=-1), dict(deltaT=0), dict(lora_dropout=1.0), dict(bias="some"),
                dict(init_lora_weights="pissa"), dict(rank_pattern={"a.lora_E": 3})):
        with pytest.raises(ValueError):
            ada.AdaLoraConfig(total_step=10, **bad)
    config = ada.AdaLoraConfig(total_step=10, rank_pattern={"a.lora_E": torch.tensor([True, False])})
    assert config.rank_pattern == {"a.lora_E": [True, False]}
    with pytest.raises(ValueError, match="beta1"):
        ada.RankAllocator(ada.AdaLoraConfig(total_step=10, beta1=1.0))
    with pytest.raises(RuntimeError, match="no budget"):
        ada.RankAllocator(ada.AdaLoraConfig(total_step=10)).budget_schedule(3)
