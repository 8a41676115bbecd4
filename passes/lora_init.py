"""LoRA initialisations that read (and may rewrite) the base weight: PiSSA, OLoRA, orthogonal,
LoftQ, CorDA; pure tensor functions with PEFT 0.21.2's numerics, for LoRA's wiring to call.

``init_weights(kind, weight, r, scaling, ...) -> (A, B, new_weight | None)``

- ``weight`` is the base weight in ``nn.Linear`` layout (out × in), whatever the site's storage;
  ``fan_in_fan_out=True`` says the site stores it transposed (GPT-2's ``Conv1D``). ``new_weight``
  comes back in the same nn.Linear layout, or ``None`` where the base is left alone.
- ``A`` (r × in) and ``B`` (out × r) come back in ``weight.dtype``: what a PEFT layer holds once
  ``update_layer`` has moved its adapter to the base's device and dtype. PEFT's model then casts
  half-precision adapters to float32 (``autocast_adapter_dtype``), as fxpeft's ``add_lora`` does
  with whatever it is given, so half-precision bases see the value rounded once to their dtype.
- ``r`` above ``min(out, in)``: PiSSA and OLoRA return that smaller rank (PEFT does too).
- Randomness (``pissa_niter_N``'s ``torch.svd_lowrank``, ``orthogonal``'s ``torch.randn``) reads
  the global generator, as PEFT does. PEFT builds ``nn.Linear(in, r)`` and ``nn.Linear(r, out)``
  (each drawing a kaiming init) before it initialises them: call this after doing the same to get
  PEFT's numbers from the same seed.
- ``layer_init(kind, layer)`` says what PEFT does on embedding and conv sites (see there).
- Conv1D: PiSSA and CorDA factor the nn.Linear-layout weight (correct); OLoRA and LoftQ factor the
  stored (in × out) weight as PEFT does, which is only shape-consistent on square layers and even
  there changes the layer's output: square layers get PEFT's tensors with a warning, others raise.

Where PEFT changes the base, ``new_weight + scaling · B @ A`` equals the original weight up to
float32 rounding (PiSSA, OLoRA, CorDA); LoftQ instead returns the quantize–dequantize round trip
of the weight, with ``B @ A`` (no scaling) approximating what quantization lost.

CorDA needs per-layer statistics of the layer inputs first: accumulate them with
``corda_covariance`` over calibration forwards, finish with ``corda_covariance_mean``, turn them
into ``corda_eigens`` and pass those as ``eigens=`` to ``init_weights("corda", ...)``.

Saving such an adapter so that it applies to the *original* base (PEFT's ``save_pretrained(...,
path_initial_model_for_weight_conversion=...)``): ``plain_lora_state`` and ``plain_lora_config``.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["LoftQConfig", "CordaEigens", "init_weights", "check_init", "layer_init", "modifies_base", "corda_covariance",
           "corda_covariance_mean", "corda_eigens", "nf4_round_trip", "int8_round_trip", "plain_lora_state",
           "plain_lora_config"]

_FLOAT_BASES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class LoftQConfig:
    """PEFT's ``LoftQConfig``: quantization bits (4: nf4, 8: int8) and alternating iterations."""
    loftq_bits: int = 4
    loftq_iter: int = 1


class CordaEigens(NamedTuple):
    """One layer's CorDA decomposition, cropped to its rank (PEFT's ``CordaEigens``)."""
    S_WC: Tensor  # (r,)
    U_WC: Tensor  # (out, r)
    V_WC: Tensor  # (in, r)


def modifies_base(kind: str) -> bool:
    """Whether the init replaces the base weight (PiSSA, OLoRA, CorDA: the residual; LoftQ: the
    quantized weight). Such adapters are the ones ``path_initial_model_for_weight_conversion``
    turns back into plain LoRA."""
    return kind.startswith(("pissa", "corda")) or kind.lower() == "olora" or kind == "loftq"


def layer_init(kind: str, layer: str) -> bool:
    """What PEFT does with ``kind`` on a ``layer`` site ("linear", "embedding" or "conv").

    True: ``init_weights`` applies. False: PEFT quietly gives the layer its default init
    (embeddings: A zeros, B normal) and leaves the base alone. Raises what PEFT raises.
    "eva" reads data, not the weight: linear layers get nn.Linear's own init for A and a zero B,
    and ``initialize_lora_eva_weights`` (passes/lora_eva.py) replaces A afterwards, as in PEFT.
    """
    if layer == "linear":
        return kind != "eva"
    if kind == "loftq":
        # PEFT's Embedding/Conv update_layer call loftq_init(adapter_name) without its config
        raise TypeError(f"PEFT 0.21.2 cannot initialise a {layer} layer with LoftQ: its loftq_init fails with "
                        "\"missing 1 required positional argument: 'config'\"")
    if layer == "embedding":
        return False
    if layer == "conv":
        raise ValueError(f"Unknown initialization init_lora_weights={kind!r}")
    raise ValueError(f"unknown layer kind {layer!r}: expected 'linear', 'embedding' or 'conv'")


def _as_peft_stores(weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """The weight as PEFT's layer holds it: Conv1D stores (in × out), contiguous. (Same values;
    matching the memory layout keeps BLAS/LAPACK's summation order, so results match bit for bit.)"""
    return weight.t().contiguous() if fan_in_fan_out else weight


def _check_float(dtype: torch.dtype, message: str) -> None:
    if dtype not in _FLOAT_BASES:
        raise TypeError(message)


# the checks below raise PEFT's errors; ``check_init`` runs them without a weight's values
def _check_pissa(kind: str, dtype: torch.dtype) -> Optional[int]:
    """PiSSA's checks, in PEFT's order; the subspace iterations of "pissa_niter_<N>" (None: full SVD)."""
    _check_float(dtype, "Please initialize PiSSA under float32, float16, or bfloat16. "
                 "Subsequently, re-quantize the residual model to help minimize quantization errors.")
    if kind == "pissa":
        return None
    if len(kind.split("_niter_")) == 2:
        return int(kind.split("_niter_")[-1])
    raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {kind} instead.")


def _check_olora(dtype: torch.dtype) -> None:
    if dtype not in _FLOAT_BASES:
        raise TypeError(f"Unsupported data type for the base layer. Got {dtype}.")


def _check_orthogonal(r: int) -> None:
    if r % 2 != 0:
        raise ValueError(f"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.")


def _check_loftq(bits: int, iters: int) -> None:
    if bits not in (4, 8):
        raise ValueError("Only nf4 and int8 quantization is supported")
    if iters <= 0:
        raise ValueError("Number of iterations must be greater than 0")


def _check_untransposed(kind: str, shape, fan_in_fan_out: bool) -> None:
    """See ``_untransposed_factors``: non-square Conv1D layers raise."""
    out_f, in_f = shape
    if fan_in_fan_out and out_f != in_f:
        raise ValueError(f"PEFT's {kind} init on a fan_in_fan_out (Conv1D) layer factors the stored (in × out) "
                         f"weight and builds lora_A of shape (r, {out_f}) where ({in_f}) inputs arrive: its "
                         "forward fails with a shape error")


def _pissa(kind: str, weight: Tensor, r: int, scaling: float, fan_in_fan_out: bool):
    dtype = weight.dtype
    niter = _check_pissa(kind, dtype)
    w = _as_peft_stores(weight, fan_in_fan_out).to(torch.float32)
    w = w.T if fan_in_fan_out else w
    if niter is None:
        V, S, Uh = torch.linalg.svd(w, full_matrices=False)  # W = V S Uh (PEFT's names)
        Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(w, r, niter=niter)
        Sr, Uhr = Sr / scaling, Ur.t()
    a = torch.diag(torch.sqrt(Sr)) @ Uhr
    b = Vr @ torch.diag(torch.sqrt(Sr))
    residual = w - scaling * b @ a
    return a.to(dtype), b.to(dtype), residual.to(dtype)


def _untransposed_factors(kind: str, weight: Tensor, fan_in_fan_out: bool) -> Tensor:
    """OLoRA and LoftQ factor the weight as PEFT stores it: on Conv1D that is (in × out), so PEFT
    builds A (r × out) and B (in × r): a model whose forward fails with a shape error, or, on a
    square layer, runs but no longer computes the base's output. Square layers get PEFT's tensors
    (with a warning); others raise."""
    if not fan_in_fan_out:
        return weight
    _check_untransposed(kind, weight.shape, fan_in_fan_out)
    warnings.warn(f"PEFT's {kind} init on a fan_in_fan_out (Conv1D) layer factors the stored, transposed "
                  "weight: A and B are PEFT's, and the adapted layer no longer computes the base's output")
    return weight.t().contiguous()


def _olora(weight: Tensor, r: int, scaling: float, fan_in_fan_out: bool):
    dtype = weight.dtype
    _check_olora(dtype)
    w = _untransposed_factors("olora", weight, fan_in_fan_out).to(torch.float32)
    Q, R = torch.linalg.qr(w)
    b, a = Q[:, :r].contiguous(), R[:r].contiguous()
    residual = (w - scaling * b @ a).to(dtype)
    return a.to(dtype), b.to(dtype), residual.t() if fan_in_fan_out else residual


@torch.no_grad()
def _orthogonal(weight: Tensor, r: int):
    _check_orthogonal(r)
    out_f, in_f = weight.shape
    Q, _ = torch.linalg.qr(torch.randn(r, r))
    q_odd, q_even = Q[0::2, :], Q[1::2, :]
    a = torch.randn(in_f, r // 2).mm(q_odd).T / 10.0
    b = torch.randn(r // 2, out_f).T.mm(q_even) / 10.0
    return a.contiguous().to(weight.device, weight.dtype), b.contiguous().to(weight.device, weight.dtype), None


# bitsandbytes' NF4 code (QLoRA), sorted ascending
_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0)


def nf4_round_trip(weight: Tensor, blocksize: int = 64) -> Tensor:
    """float32 ``dequantize_4bit(quantize_4bit(weight, nf4, blocksize))``: bitsandbytes' blockwise
    absmax NF4 over the flattened tensor (a short last block keeps its own absmax), nearest code
    value, ties to the lower one."""
    code = torch.tensor(_NF4, dtype=torch.float32, device=weight.device)
    flat = weight.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = [flat[:full].reshape(-1, blocksize)] + ([flat[full:].reshape(1, -1)] if full < n else [])
    out = []
    for x in blocks:
        absmax = x.abs().max(dim=-1)[0]
        scaled = torch.clamp(x * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1)
        index = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2)
        out.append((code[index] * absmax.view(-1, 1)).reshape(-1))
    return torch.cat(out).reshape(weight.shape)


def int8_round_trip(weight: Tensor) -> Tensor:
    """float32 round trip of bitsandbytes' ``Int8Params``: the weight in float16, per-row absmax,
    ``round(127 x / absmax)``, times ``absmax / 127``."""
    half = weight.to(torch.float16)
    row_absmax = torch.max(half.abs(), dim=1).values.float()
    codes = torch.round(half * (127.0 / row_absmax.unsqueeze(-1))).to(torch.int8)
    return codes * row_absmax.view(-1, 1) * 7.874015718698502e-3


def _low_rank(residual: Tensor, r: int):
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    return U @ torch.sqrt(torch.diag(S)[:, 0:r]), torch.sqrt(torch.diag(S)[0:r, :]) @ Vh


@torch.no_grad()
def _loftq(weight: Tensor, r: int, bits: int, iters: int, fan_in_fan_out: bool):
    _check_loftq(bits, iters)
    dtype = weight.dtype
    w = _untransposed_factors("loftq", weight, fan_in_fan_out).to(torch.float32)
    residual = w.clone()
    for i in range(iters):
        dequantized = nf4_round_trip(residual) if bits == 4 else int8_round_trip(residual)
        L, R = _low_rank(w - dequantized, r)
        if i + 1 == iters:
            break
        residual = w - torch.mm(L, R)
    dequantized = dequantized.to(dtype)
    return R.to(dtype), L.to(dtype), dequantized.t() if fan_in_fan_out else dequantized


def _check_corda(dtype: torch.dtype, shape, r: int, eigens: Optional[CordaEigens]) -> None:
    _check_float(dtype, "Please initialize CorDA under float32, float16, or bfloat16. "
                 "Subsequently, re-quantize the residual model to help minimize quantization errors.")
    if eigens is None:
        raise ValueError("`eigens` attribute not found for layer, please run `preprocess_corda` first: "
                         "fxpeft.preprocess_corda(model, config, run_model=...) on the model (or the transformed "
                         "module) before fxpeft.transform (or add_adapter) with this config.")
    S, U, V = eigens
    for name, t in (("S", S), ("U", U), ("V", V)):
        if torch.isnan(t).any() or torch.isinf(t).any():
            raise ValueError(f"Invalid value found in matrix {name}.")
    out_f, in_f = shape
    for name, t, want in (("U", U, (out_f, r)), ("S", S, (r,)), ("V", V, (in_f, r))):
        if tuple(t.shape) != want:
            raise ValueError(f"Matrix {name} size mismatch: {t.size()} vs. {want}. Please make sure the LoRA config "
                             "and model given to the CorDA preprocessing match the ones being adapted.")


def _corda(weight: Tensor, r: int, scaling: float, eigens: Optional[CordaEigens]):
    dtype = weight.dtype
    _check_corda(dtype, weight.shape, r, eigens)
    S, U, V = eigens
    S = S / scaling
    a = V.t().mul(S.sqrt().view(-1, 1)).contiguous()
    b = U.mul(S.sqrt()).contiguous()
    residual = weight.to(torch.float32) - scaling * b @ a
    return a.to(dtype), b.to(dtype), residual.to(dtype)


def init_weights(kind: str, weight: Tensor, r: int, scaling: float, *, fan_in_fan_out: bool = False,
                 loftq_bits: int = 4, loftq_iter: int = 1, loftq_config: Optional[LoftQConfig] = None,
                 eigens: Optional[CordaEigens] = None) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(A, B, new_weight or None)`` for ``init_lora_weights=kind`` on a linear site, as PEFT 0.21.2
    computes them (see the module docstring for layouts, dtypes and randomness).

    kind: "pissa", "pissa_niter_<N>", "olora", "orthogonal", "loftq" (``loftq_bits``/``loftq_iter``
    or ``loftq_config``), "corda" (``eigens`` from :func:`corda_eigens`). PEFT's spellings: any
    "pissa…"/"corda…" prefix dispatches there, "olora" in any case.
    """
    _check_shape(r, weight.shape)
    weight = weight.detach()
    if kind.startswith("pissa"):
        return _pissa(kind, weight, r, scaling, fan_in_fan_out)
    if kind.startswith("corda"):
        return _corda(weight, r, scaling, eigens)
    if kind.lower() == "olora":
        return _olora(weight, r, scaling, fan_in_fan_out)
    if kind == "loftq":
        if loftq_config is not None:
            loftq_bits, loftq_iter = loftq_config.loftq_bits, loftq_config.loftq_iter
        return _loftq(weight, r, loftq_bits, loftq_iter, fan_in_fan_out)
    if kind == "orthogonal":
        return _orthogonal(weight, r)
    raise ValueError(f"init_weights does not handle init_lora_weights={kind!r}")


def _check_shape(r: int, shape) -> None:
    if r <= 0:
        raise ValueError(f"`r` should be a positive integer value but the value passed is {r}")
    if len(shape) != 2:
        raise ValueError(f"init_weights takes a 2-D (out × in) weight, got shape {tuple(shape)}")


def check_init(kind: str, shape, dtype: torch.dtype, r: int, *, fan_in_fan_out: bool = False,
               loftq_bits: int = 4, loftq_iter: int = 1, loftq_config: Optional[LoftQConfig] = None,
               eigens: Optional[CordaEigens] = None) -> None:
    """Raise what ``init_weights(kind, weight, r, ...)`` raises for a weight of this (out × in)
    ``shape`` and ``dtype``, reading no weight values and drawing no random numbers: a caller checks
    every layer this way before initialising (and changing the base weight of) any. Warnings are
    left to ``init_weights``."""
    _check_shape(r, shape)
    if kind.startswith("pissa"):
        _check_pissa(kind, dtype)
    elif kind.startswith("corda"):
        _check_corda(dtype, shape, r, eigens)
    elif kind.lower() == "olora":
        _check_olora(dtype)
        _check_untransposed("olora", shape, fan_in_fan_out)
    elif kind == "loftq":
        if loftq_config is not None:
            loftq_bits, loftq_iter = loftq_config.loftq_bits, loftq_config.loftq_iter
        _check_loftq(loftq_bits, loftq_iter)
        _check_untransposed("loftq", shape, fan_in_fan_out)
    elif kind == "orthogonal":
        _check_orthogonal(r)
    else:
        raise ValueError(f"init_weights does not handle init_lora_weights={kind!r}")


# ---- CorDA preprocessing: input covariance → eigens (PEFT's preprocess_corda, per layer) ----

def corda_covariance(total: Optional[Tensor], count: int, layer_input: Tensor,
                     use_float16: bool = False) -> tuple[Tensor, int]:
    """Add one forward's input to a layer's running (sum, count), as PEFT's CorDA hook does: the
    input with its leading batch dim of 1 squeezed (PEFT's hook cannot take a larger batch: ``.t()``
    of a 3-D tensor raises), in float32 unless ``use_float16``, divided by ``|max(x)|``; adds xᵀx."""
    x = layer_input.detach().squeeze(0)
    if not use_float16:
        x = x.float()
    x = x / torch.max(x).abs()
    if torch.isnan(x).any() or torch.isinf(x).any():
        raise ValueError("Invalid value found in input, please check your input data.")
    covariance = x.t().matmul(x)
    if torch.isnan(covariance).any() or torch.isinf(covariance).any():
        raise ValueError("Invalid value found in covariance.")
    return (covariance if total is None else total + covariance), count + 1


def corda_covariance_mean(total: Tensor, count: int) -> Tensor:
    return total / count


@torch.no_grad()
def corda_eigens(weight: Tensor, covariance: Tensor, r: int, method: str = "ipm", *,
                 fan_in_fan_out: bool = False) -> CordaEigens:
    """PEFT's ``collect_eigens_for_layer`` + ``crop_corda_eigens``: SVD of W·(C + λI) (λ: 1 % of
    C's mean diagonal, doubled until the inverse is good), V = (Vh (C + λI)⁻¹)ᵀ; "ipm" keeps the r
    largest components, "kpm" the r smallest."""
    w = _as_peft_stores(weight.detach(), fan_in_fan_out).float()
    w = w.T if fan_in_fan_out else w
    covariance = covariance.float()
    n = covariance.size(0)
    damp = 0.01
    while True:
        compensate = torch.diag(torch.ones(n).to(covariance.device) * torch.mean(torch.diag(covariance)) * damp)
        fixed = covariance + compensate
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, torch.eye(n).to(covariance.device)).item() < 0.05:
            break
        damp *= 2
    U, S, Vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    V = (Vh @ inverse).transpose(0, 1)
    if method == "ipm":
        keep = slice(None, r)
    elif method == "kpm":
        keep = slice(-r, None)
    else:
        raise ValueError(f"Invalid corda_method found: {method}, it should be 'ipm' or 'kpm'.")
    eigens = CordaEigens(S[keep].clone(), U[:, keep].clone(), V[:, keep].clone())
    if eigens.S_WC.size(0) != r:
        raise ValueError(f"rank mismatch: {eigens.S_WC.size(0)} vs. {r}")
    return eigens


# ---- saving as plain LoRA: PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) ----

def plain_lora_state(trained: dict[str, Tensor], initial: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter that, on the *original* base, does what ``trained`` does on the modified base:
    ΔW = B A − B₀ A₀ = [B | −B₀] [A ; A₀], so rank 2r (PEFT's ``subtract_mutated_init``).

    Both dicts use the same keys. As in PEFT, only keys containing "lora_A" / "lora_B" survive:
    embedding adapters (``lora_embedding_A/B``) and modules_to_save are left out of the file.
    """
    out = {}
    for name, value in trained.items():
        if "lora_A" in name:
            out[name] = torch.cat([value, initial[name]], dim=0)
        elif "lora_B" in name:
            out[name] = torch.cat([value, -initial[name]], dim=1)
    return out


def plain_lora_config(init_lora_weights, r: int, lora_alpha: float, use_rslora: bool = False,
                      rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None) -> dict:
    """The LoraConfig fields PEFT writes beside :func:`plain_lora_state` (the rest of the config is
    saved unchanged): rank doubled, alpha adjusted so the scaling stays, ``init_lora_weights=True``."""
    if use_rslora and (rank_pattern or alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    if not str(init_lora_weights).lower().startswith(("pissa", "corda", "olora", "lora_ga", "true")):
        warnings.warn("`path_initial_model_for_weight_conversion` only works for converting a "
                      "PiSSA/CorDA/OLoRA/LoRA-GA adapter to a LoRA adapter")
    return {"init_lora_weights": True, "r": 2 * r, "lora_alpha": lora_alpha * (2 ** 0.5 if use_rslora else 2),
            "rank_pattern": {k: 2 * v for k, v in (rank_pattern or {}).items()},
            "alpha_pattern": {k: 2 * v for k, v in (alpha_pattern or {}).items()}}
