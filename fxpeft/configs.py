"""Adapter configs with PEFT's field names, defaults and validation.

A config says *what* to adapt; the matching pass in ``passes/`` says *how*.
Invalid values fail here, when the config is built, not later inside a rewrite.
"""
from __future__ import annotations

import dataclasses
import enum
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Union


class TaskType(str, enum.Enum):
    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# PEFT's default targets when `target_modules` is None (subset of its table, same values).
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "vit": ["query", "value"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
}

# Heads that PEFT adds to modules_to_save for sequence classification (only one exists per model).
SEQ_CLS_HEAD_NAMES = ["classifier", "score"]


def _as_list_or_str(value):
    if value is None or isinstance(value, str):
        return value
    return list(value)


LAYER_FIELDS = ("layers_to_transform", "layers_pattern")


def check_layer_fields(config, regex: tuple[str, ...] = LAYER_FIELDS, pattern: bool = True) -> None:
    """PEFT's checks of a config's layer fields, in PEFT's words, each config with the subset its PEFT
    class makes: the ``regex`` fields cannot be set beside a regex (str) ``target_modules``, and with
    ``pattern`` a ``layers_pattern`` needs ``layers_to_transform``."""
    for name in regex:
        if isinstance(config.target_modules, str) and getattr(config, name) is not None:
            raise ValueError(f"`{name}` cannot be used when `target_modules` is a str.")
    if pattern and config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")


def check_bias(config, only: str) -> None:
    """PEFT's ``bias`` options: 'none', 'all' or ``only`` (the method's own layers' biases)."""
    if config.bias not in ("none", "all", only):
        raise ValueError(f"{type(config).__name__}.bias must be 'none', 'all' or '{only}', got {config.bias!r}.")


def check_dropout(config, field: str) -> None:
    """A dropout probability in [0, 1] (what PEFT accepts and then computes nonsense with, or fails on later)."""
    value = getattr(config, field)
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{type(config).__name__}.{field} is a dropout probability and must be in [0, 1], "
                         f"got {value!r}.")


@dataclass
class PeftConfigBase:
    """Fields every adapter method shares with PEFT's PeftConfig."""

    task_type: Optional[Union[str, TaskType]] = None
    inference_mode: bool = False
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None

    peft_type = "UNKNOWN"  # class attribute, overridden per method

    def __post_init__(self):
        # PEFT's module-name fields: a regex string or a collection of names, held as a list
        for name in ("target_modules", "exclude_modules", "layers_pattern", "feedforward_modules"):
            if hasattr(self, name):
                setattr(self, name, _as_list_or_str(getattr(self, name)))
        if getattr(self, "modules_to_save", None) is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.task_type, TaskType):
            self.task_type = self.task_type.value
        if self.task_type is not None and self.task_type not in TaskType._value2member_map_:
            raise ValueError(
                f"Unknown task_type {self.task_type!r}; use one of {sorted(TaskType._value2member_map_)}."
            )

    # PEFT fields of this config type that fxpeft does not implement: a checkpoint setting one is
    # refused, naming it. PEFT bookkeeping this config ignores (no effect on the computation).
    UNSUPPORTED = ()  # class attributes (not annotated: no dataclass fields)
    IGNORED = ()

    @classmethod
    def unsupported(cls, data: dict) -> list[str]:
        """What a saved config (PEFT's JSON) asks for that fxpeft does not implement."""
        return [k for k in cls.UNSUPPORTED if data.get(k) not in (None, False, {}, [], "")]

    @classmethod
    def known_fields(cls) -> set[str]:
        """Saved fields this config knows but does not store (refused or ignored)."""
        return {*cls.UNSUPPORTED, *cls.IGNORED}

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["peft_type"] = self.peft_type
        for key, value in out.items():
            if dataclasses.is_dataclass(value) and not isinstance(value, type):  # sub-configs, as PEFT saves them
                out[key] = dataclasses.asdict(value)
            elif isinstance(value, (set, tuple)):
                out[key] = sorted(value) if isinstance(value, set) else list(value)
        return out


@dataclass
class EvaConfig:
    """PEFT's ``EvaConfig`` (``LoraConfig(init_lora_weights="eva", eva_config=...)``): how
    ``fxpeft.initialize_lora_eva_weights`` turns the layers' input SVDs into LoRA's A and ranks."""

    rho: float = 2.0  # a layer may get up to round(r · rho) components
    tau: float = 0.99  # cosine similarity between successive components that counts as converged
    use_label_mask: bool = True  # leave out positions whose label is label_mask_value
    label_mask_value: int = -100
    whiten: bool = False  # divide each component by the square root of its singular value
    adjust_scaling_factors: bool = True  # alpha follows the redistributed rank, so alpha / r stays

    def __post_init__(self):
        if self.rho < 1.0:
            raise ValueError("`rho` must be >= 1.0")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ValueError("`tau` must be between 0.0 and 1.0.")


@dataclass
class CordaConfig:
    """PEFT's ``CordaConfig`` (``LoraConfig(init_lora_weights="corda", corda_config=...)``): how
    ``fxpeft.preprocess_corda`` collects the layers' input covariances and decomposes the weights."""

    cache_file: Optional[str] = None  # torch.save'd decompositions (read instead of recomputed when present)
    covariance_file: Optional[str] = None  # torch.save'd covariances (read instead of run_model when present)
    corda_method: Optional[str] = "ipm"  # "ipm": largest components, "kpm": smallest
    verbose: bool = False  # PEFT shows a progress bar; no effect here
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True  # PEFT's bookkeeping switch; fxpeft keeps no temporary fields

    def __post_init__(self):
        if self.corda_method not in (None, "ipm", "kpm"):
            raise ValueError(f"Invalid corda_method found: {self.corda_method}, it should be 'ipm' or 'kpm'.")


def _subconfig(value, config_type):
    """A sub-config as PEFT takes it: None, an instance (fxpeft's or PEFT's: its fields), or the
    dict a saved adapter_config.json holds."""
    if value is None or isinstance(value, config_type):
        return value
    if not isinstance(value, dict):
        if not dataclasses.is_dataclass(value) and not hasattr(value, "__dict__"):
            raise TypeError(f"`{config_type.__name__}` must be a `{config_type.__name__}`, a dict, or None.")
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(config_type) if hasattr(value, f.name)}
    known = {f.name for f in dataclasses.fields(config_type)}
    return config_type(**{k: v for k, v in value.items() if k in known})


@dataclass
class LoraConfig(PeftConfigBase):
    """LoRA: ``y = W x + b + s * B(A(dropout(x)))`` with ``s = lora_alpha / r`` (or ``/ sqrt(r)``)."""

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    # PEFT's other fields, at PEFT's defaults: accepted so that PEFT scripts and configs that leave
    # them alone work; any other value raises NotImplementedError naming the field (UNSUPPORTED)
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Union[list[int], dict]] = None
    loftq_config: dict = field(default_factory=dict)  # {"loftq_bits": 4, "loftq_iter": 1} with init "loftq"
    eva_config: Optional[EvaConfig] = None  # with init "eva" (default EvaConfig()), else ignored with a warning
    corda_config: Optional[CordaConfig] = None  # with init "corda" (default CordaConfig()), else ignored
    lora_ga_config: Optional[Any] = None
    velora_config: Optional[Any] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[Any] = None
    layer_replication: Optional[list] = None
    target_parameters: Optional[list[str]] = None
    use_bdlora: Optional[Any] = None
    arrow_config: Optional[Any] = None
    kasa_config: Optional[Any] = None
    ensure_weight_tying: bool = False

    peft_type = "LORA"
    UNSUPPORTED = (
        "megatron_config", "use_qalora",
        "alora_invocation_tokens", "arrow_config", "use_bdlora", "kasa_config", "lora_ga_config",
        "monteclora_config", "velora_config",
    )
    IGNORED = ("runtime_config",)  # PEFT never saves it; qalora_group_size and megatron_core are fields, unused
    # init_lora_weights values fxpeft implements, by family (``init_family``): "pissa" stands for
    # "pissa" and "pissa_niter_<N>"; "olora" and "gaussian" in any case (PEFT lower-cases them)
    INITS = (True, False, "gaussian", "pissa", "olora", "orthogonal", "loftq", "eva", "corda")
    # PEFT's other inits: why fxpeft refuses them (NotImplementedError naming the init)
    REFUSED_INITS = {
        "lora_ga": "LoRA-GA is data-driven: PEFT's preprocess_loraga estimates gradients on data first",
        "mica": "MiCA (a LoRA variant with B frozen) is not implemented",
    }

    @staticmethod
    def init_family(init):
        """The INITS / REFUSED_INITS entry ``init_lora_weights=init`` is dispatched to, as PEFT's LoRA
        layer dispatches it: any "pissa…" or "corda…" string by its prefix (the rest checked when
        used), "olora", "gaussian" and "mica" in any case; anything else is itself."""
        if isinstance(init, str):
            for prefix in ("pissa", "corda"):
                if init.startswith(prefix):
                    return prefix
            if init.lower() in ("olora", "gaussian", "mica"):
                return init.lower()
        return init

    @classmethod
    def unsupported(cls, data: dict) -> list[str]:
        found = super().unsupported(data)
        init = data.get("init_lora_weights", True)
        family = cls.init_family(init)
        if family in cls.INITS:
            return found
        reason = cls.REFUSED_INITS.get(family) if isinstance(family, str) else None
        return found + [f"init_lora_weights={init!r}" + (f" ({reason})" if reason else "")]

    def __post_init__(self):
        super().__post_init__()
        unsupported = PeftConfigBase.unsupported.__func__(type(self), self.to_dict())  # fields; inits checked below
        if unsupported:
            raise NotImplementedError(f"LoraConfig: {', '.join(unsupported)} is not implemented in fxpeft yet (the "
                                      "README's table of PEFT options says which are); leave it at PEFT's default.")
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        check_bias(self, "lora_only")
        self._check_init()
        if self.lora_bias and self.init_lora_weights not in (True, False):
            raise ValueError(f"The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                             f"init_lora_weights={self.init_lora_weights!r} (as in PEFT).")
        if self.lora_bias and self.use_dora:
            raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False.")
        for name, rank in self.rank_pattern.items():
            if not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{name!r}] must be a positive integer, got {rank!r}.")
        self._check_token_indices()
        if isinstance(self.target_parameters, str):  # PEFT's error
            raise TypeError("`target_parameters` must be a list of strings or None.")
        if self.target_parameters is not None:
            self.target_parameters = list(self.target_parameters)
            if self.use_dora:  # PEFT's ParamWrapper refuses it
                raise ValueError("target_parameters (LoRA on nn.Parameters) does not work with use_dora=True.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig.layers_pattern only takes effect with layers_to_transform; set both.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                "LoraConfig.layers_to_transform cannot be combined with a regex target_modules; "
                "encode the layer indices in the regex instead."
            )

    def _check_token_indices(self) -> None:
        """``trainable_token_indices``: token ids for the input embedding, or {module name: token ids}."""
        spec = self.trainable_token_indices
        if spec is None:
            return
        groups = spec.items() if isinstance(spec, dict) else [("", spec)]
        for name, indices in groups:
            if (isinstance(indices, (str, bytes)) or not isinstance(indices, (list, tuple)) or not indices
                    or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)):
                where = f"[{name!r}]" if name else ""
                raise ValueError(f"LoraConfig.trainable_token_indices{where} must be a non-empty list of token ids "
                                 f"(ints >= 0), or a dict of module name -> such a list; got {indices!r}.")
        if isinstance(spec, dict):
            self.trainable_token_indices = {name: list(indices) for name, indices in spec.items()}
        else:
            self.trainable_token_indices = list(spec)

    def _check_init(self) -> None:
        """``init_lora_weights`` and ``loftq_config`` as PEFT takes them; what PEFT's layers would raise
        on every layer (a malformed "pissa_niter_<N>") raises here."""
        init = self.init_lora_weights
        family = self.init_family(init)
        if isinstance(family, str) and family in self.REFUSED_INITS:
            raise NotImplementedError(f"LoraConfig: init_lora_weights={init!r} is not implemented in fxpeft yet: "
                                      f"{self.REFUSED_INITS[family]}.")
        if family not in self.INITS:
            raise ValueError(f"LoraConfig.init_lora_weights must be True, False or one of 'gaussian', 'pissa', "
                             f"'pissa_niter_<N>', 'olora', 'orthogonal', 'loftq', 'eva', 'corda', got {init!r}.")
        if family == "pissa" and init != "pissa":  # PEFT's pissa_init, which raises on every layer
            if len(init.split("_niter_")) != 2:
                raise ValueError(f"init_lora_weights should be 'pissa' or 'pissa_niter_[number of iters]', got {init} "
                                 "instead.")
            int(init.split("_niter_")[-1])
        if init == "loftq":
            if not self.loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
            if not isinstance(self.loftq_config, dict):  # a LoftQConfig (fxpeft's or PEFT's): its fields, as PEFT
                self.loftq_config = dict(vars(self.loftq_config))
            missing = [k for k in ("loftq_bits", "loftq_iter") if k not in self.loftq_config]
            if missing:  # PEFT fails on the first layer with a KeyError
                raise ValueError(f"LoraConfig.loftq_config lacks {', '.join(missing)}: pass "
                                 "loftq_config={'loftq_bits': 4, 'loftq_iter': 1} (or a LoftQConfig).")
        elif self.loftq_config:
            self.loftq_config = {}
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")
        self.eva_config = _subconfig(self.eva_config, EvaConfig)
        self.corda_config = _subconfig(self.corda_config, CordaConfig)
        for name, kind, config_type in (("eva", "eva_config", EvaConfig), ("corda", "corda_config", CordaConfig)):
            if init == name and getattr(self, kind) is None:  # PEFT's defaults, with its warnings
                warnings.warn(f"`init_lora_weights` is '{name}' but `{kind}` is not specified. Using default "
                              f"{'EVA' if name == 'eva' else 'CorDA'} config.")
                setattr(self, kind, config_type())
            elif init != name and getattr(self, kind) is not None:
                warnings.warn(f"`{kind}` specified but will be ignored when `init_lora_weights` is not '{name}'.")


_COMPUTE_DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
                   "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


@dataclass
class BnbConfig:
    """bitsandbytes quantization of the frozen base, with ``transformers.BitsAndBytesConfig``'s
    field names and defaults. Not an adapter: a pass that runs before the adapter passes
    (``fxpeft.transform(model, [BnbConfig(load_in_4bit=True), LoraConfig(...)])``).
    ``BnbConfig.from_transformers(BitsAndBytesConfig(...))`` converts transformers' config."""

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: Optional[list[str]] = None
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: Any = None  # torch dtype or its name; None: float32 (as transformers)
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: Any = None  # only uint8 (the default) is supported

    def __post_init__(self):
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("BnbConfig: load_in_4bit and load_in_8bit are both True; choose one.")
        if not (self.load_in_4bit or self.load_in_8bit):
            raise ValueError("BnbConfig: set load_in_4bit=True or load_in_8bit=True.")
        if self.bnb_4bit_quant_type not in ("nf4", "fp4"):
            raise ValueError(f"BnbConfig.bnb_4bit_quant_type must be 'nf4' or 'fp4', got {self.bnb_4bit_quant_type!r}.")
        dtype = self.bnb_4bit_compute_dtype
        name = "float32" if dtype is None else _COMPUTE_DTYPES.get(str(dtype).replace("torch.", ""))
        if name is None:
            raise ValueError(
                f"BnbConfig.bnb_4bit_compute_dtype={dtype!r} is not a dtype bitsandbytes computes in; "
                "use torch.float32, torch.float16 or torch.bfloat16."
            )
        self.bnb_4bit_compute_dtype = name
        if self.bnb_4bit_quant_storage not in (None, "uint8") and str(self.bnb_4bit_quant_storage) != "torch.uint8":
            raise NotImplementedError("BnbConfig.bnb_4bit_quant_storage: only uint8 storage is supported.")
        if self.llm_int8_has_fp16_weight:
            raise NotImplementedError("BnbConfig.llm_int8_has_fp16_weight=True (trainable 8-bit weights) is not supported.")
        if float(self.llm_int8_threshold) < 0:
            raise ValueError(f"BnbConfig.llm_int8_threshold must be >= 0, got {self.llm_int8_threshold!r}.")
        if self.llm_int8_skip_modules is not None:
            self.llm_int8_skip_modules = [self.llm_int8_skip_modules] if isinstance(
                self.llm_int8_skip_modules, str) else list(self.llm_int8_skip_modules)

    @classmethod
    def from_transformers(cls, config) -> "BnbConfig":
        """A ``transformers.BitsAndBytesConfig`` (or its ``to_dict()``) as a BnbConfig."""
        values = config if isinstance(config, dict) else config.to_dict()
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


# --------------------------------------------------------------------------- prompt learning


@dataclass
class PromptLearningConfig(PeftConfigBase):
    """Fields PEFT's prompt-learning configs share. ``token_dim``, ``num_layers``,
    ``num_attention_heads`` and ``num_transformer_submodules`` are filled in when the adapter is
    attached (read from the graph, or from a transformers config as PEFT does) and saved."""

    num_virtual_tokens: Optional[int] = None
    token_dim: Optional[int] = None
    num_transformer_submodules: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_layers: Optional[int] = None
    modules_to_save: Optional[list[str]] = None

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        if not isinstance(self.num_virtual_tokens, int) or isinstance(self.num_virtual_tokens, bool) \
                or self.num_virtual_tokens <= 0:
            raise ValueError(f"{name}.num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}.")


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``num_virtual_tokens`` learned embeddings prepended to the token embeddings.

    ``prompt_tuning_init="TEXT"`` initialises them from the embeddings of
    ``prompt_tuning_init_text``, tokenized by ``tokenizer_name_or_path`` (a path or a tokenizer
    object; an object is saved as its ``name_or_path``)."""

    prompt_tuning_init: Union[str, PromptTuningInit] = "RANDOM"
    prompt_tuning_init_text: Optional[str] = None
    tokenizer_name_or_path: Optional[Any] = None
    tokenizer_kwargs: Optional[dict] = None

    peft_type = "PROMPT_TUNING"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.prompt_tuning_init, PromptTuningInit):
            self.prompt_tuning_init = self.prompt_tuning_init.value
        if self.prompt_tuning_init not in PromptTuningInit._value2member_map_:
            raise ValueError(f"PromptTuningConfig.prompt_tuning_init must be one of "
                             f"{sorted(PromptTuningInit._value2member_map_)}, got {self.prompt_tuning_init!r}.")
        if self.prompt_tuning_init == "TEXT" and (not self.tokenizer_name_or_path or self.prompt_tuning_init_text is None):
            raise ValueError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path "
                             "(a tokenizer object or the path of one).")
        if self.tokenizer_kwargs and self.prompt_tuning_init != "TEXT":
            raise ValueError("tokenizer_kwargs only applies with prompt_tuning_init='TEXT'.")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        tokenizer = out["tokenizer_name_or_path"]
        if tokenizer is not None and not isinstance(tokenizer, str):  # a tokenizer object: save where it came from
            out["tokenizer_name_or_path"] = getattr(tokenizer, "name_or_path", None) or None
        return out


@dataclass
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: the virtual-token embeddings come out of a small encoder (an MLP, or an LSTM
    followed by an MLP) over learned inputs; ``encoder_hidden_size`` defaults to ``token_dim``."""

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: Optional[int] = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    peft_type = "P_TUNING"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.encoder_reparameterization_type, enum.Enum):
            self.encoder_reparameterization_type = self.encoder_reparameterization_type.value
        if self.encoder_reparameterization_type not in ("MLP", "LSTM"):
            raise ValueError("PromptEncoderConfig.encoder_reparameterization_type must be 'MLP' or 'LSTM', "
                             f"got {self.encoder_reparameterization_type!r}.")
        if not 0.0 <= float(self.encoder_dropout) < 1.0:
            raise ValueError(f"PromptEncoderConfig.encoder_dropout must be in [0, 1), got {self.encoder_dropout!r}.")


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned keys and values prepended at every attention. With
    ``prefix_projection`` they are the output of a two-layer MLP (hidden ``encoder_hidden_size``)."""

    encoder_hidden_size: Optional[int] = None
    prefix_projection: bool = False
    init_weights: Optional[str] = None

    peft_type = "PREFIX_TUNING"

    def __post_init__(self):
        super().__post_init__()
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"PrefixTuningConfig.init_weights must be None or 'zero', got {self.init_weights!r}.")
