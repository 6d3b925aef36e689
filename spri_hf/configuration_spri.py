"""Configuration of SPRI mixture-of-experts models (shipped to the Hub: imports only transformers)."""

import functools

from transformers import AutoConfig, GenerationConfig, PreTrainedConfig

# `strict` is huggingface_hub's; taken through transformers so the Hub copy of this file imports transformers only.
from transformers.configuration_utils import strict

from .architectures import get_ffn_layouts
from .defaults import (
    DEFAULTS,
    INITS,
    MAX_EXPERTS,
    MAX_SEED,
    PARTITIONS,
    ROUTER_BALANCE,
    SHARED_EXPERTS,
    SPRI_MODES,
    STAGE1_EXPERTS,
    UPCYCLE,
)


# This file is also the remote code of every checkpoint, so it must load in every transformers 5.x from 5.16 on (the
# ones vLLM and SGLang pin), not only in the one spri_hf needs.
try:  # transformers >= 5.20: `PreTrainedConfig.__post_init__` builds each sub-config from its `SubConfigSpec`
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # 5.16 - 5.19: a plain `sub_configs` map; the config builds its sub-config itself (__post_init__)
    SubConfigSpec = None


# The fields that say how the dense model was upcycled (the model card lists them).
UPCYCLING_SETTINGS = (
    "num_experts",
    "num_experts_per_tok",
    "expert_granularity",
    "init",
    "principal_ratio",
    "principal_energy",
    "partition",
    "spri_mode",
    "diversity",
    "residual_scale",
    "noise_std",
    "drop_ratio",
    "upcycle",
    "moe_layers",
    "shared_expert",
    "router_aux_loss_coef",
    "router_z_loss_coef",
    "router_balance",
    "router_bias_update_rate",
    "norm_topk_prob",
    "seed",
)
# Fields a SPRI config and its dense `base_config` both hold, kept equal: a write to either name through the SPRI
# config reaches the dense model, which reads its own config (the special tokens, what the forward returns, labels).
MIRRORED_FIELDS = (
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "decoder_start_token_id",
    "tie_word_embeddings",
    "output_hidden_states",
    "output_attentions",
    "chunk_size_feed_forward",
    "id2label",
    "label2id",
    "problem_type",
    "num_labels",
)


@strict
class SpriConfig(PreTrainedConfig):
    r"""
    Configuration of a dense model upcycled into a sparse mixture of experts with SPRI (SVD-Partitioned Residual
    Initialization). The dense model's own configuration is kept whole in `base_config`; the fields below say how
    its FFN layers were turned into experts and how they are trained.

    Args:
        base_config (`dict` or `PreTrainedConfig`):
            Configuration of the dense model (any supported decoder family).
        num_experts (`int`, defaults to 8):
            Routed experts per upcycled FFN layer.
        num_experts_per_tok (`int`, defaults to 2):
            Experts each token is sent to (top-k).
        expert_granularity (`int`, defaults to 1):
            Fine-grained experts (granular upcycling): each expert holds one of `G` slices of the dense FFN's
            intermediate neurons (width `intermediate_size / G`); `num_experts` and `num_experts_per_tok` count these
            small experts and must be multiples of `G`. Expert `e` holds slice `e % G` of virtual group `e // G`; the
            router rows of a group start equal and the experts' down projections are scaled by `G`, so that
            `init="copy"` reproduces the dense model exactly (top-k picks whole groups).
        init (`str`, defaults to `"spri"`):
            How experts start: `"spri"` (shared principal + SVD-partitioned residual), `"copy"` (every expert is the
            dense FFN), `"noise"` (copy + Gaussian noise), `"drop"` (Drop-Upcycling) or `"random"` (from scratch).
        principal_ratio (`float`, defaults to 0.5):
            Share of the singular directions of each FFN matrix kept in the principal part `P` shared by all experts.
        principal_energy (`float`, *optional*):
            Instead of `principal_ratio`: keep the smallest rank whose directions hold this share of `sum(s**2)`.
        partition (`str`, defaults to `"interleaved"`):
            How the residual tail directions are dealt to experts: `"interleaved"`, `"contiguous"` or `"random"`.
        spri_mode (`str`, defaults to `"balanced"`):
            `"balanced"`: `W_i = P + (1 - diversity) R + diversity * N * R_i`, so experts average exactly to the dense
            weight. `"partition"`: `W_i = P + residual_scale * R_i`, each expert keeps only its own slice of the tail.
        diversity (`float`, defaults to 0.1):
            Balanced mode: 0 is copy upcycling, 1 gives each expert only its own residual slice (times N).
        residual_scale (`float`, defaults to 1.0):
            Partition mode: scale of each expert's residual slice.
        noise_std (`float`, defaults to 0.01):
            `init="noise"`: noise standard deviation relative to each matrix's own.
        drop_ratio (`float`, defaults to 0.5):
            `init="drop"`: share of intermediate neurons re-initialised per expert.
        upcycle (`str`, *optional*):
            Which FFN stacks of an encoder-decoder model become MoE: `"decoder"` (the default for encoder-decoder
            models), `"encoder"` or `"both"`. Single-stack models (decoder-only, BERT-like encoders) upcycle theirs.
        moe_layers (`list[int]` or `dict[str, list[int]]`, *optional*):
            Indices of the FFN layers to upcycle; `None` upcycles all of them. A dict gives them per stack
            (`{"encoder": [...], "decoder": [...]}`); a list applies to every upcycled stack.
        shared_expert (`str`, *optional*):
            `"dense"` keeps an always-on copy of the dense FFN next to the routed experts (Qwen2-MoE style).
        router_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the Switch load-balancing loss, added to the loss whenever labels are given.
        router_z_loss_coef (`float`, defaults to 0.0):
            Weight of the router z-loss (mean squared log-sum-exp of the router logits).
        router_balance (`str`, defaults to `"aux_loss"`):
            How experts are kept busy alike: `"aux_loss"` (the load-balancing loss, `router_aux_loss_coef`), `"bias"`
            (auxiliary-loss-free balancing: a per-expert bias `e_score_correction_bias` added to the routing scores
            for the top-k choice only, not to the mixing weights, and moved after every optimizer step toward the
            under-loaded experts; `router_aux_loss_coef` is set to 0, so no trainer adds the loss) or `"both"`.
            SpriTrainer and the SPRI TRL trainers update the bias; with a plain `Trainer` add
            `spri_hf.callbacks.SpriRouterBiasCallback()`.
        router_bias_update_rate (`float`, defaults to 0.001):
            With bias balancing: how far each bias moves per optimizer step (`bias += rate * sign(mean load - load)`).
        norm_topk_prob (`bool`, defaults to `True`):
            Renormalise the top-k routing weights to sum to one.
        output_router_logits (`bool`, defaults to `False`):
            Return the router logits of every MoE layer in the model output.
        stage (`int`, *optional*):
            1: residual parametrization (shared frozen base + trainable low-rank factors per expert), 2: full experts.
            Defaults to 1 for `init="spri"` and 2 otherwise.
        residual_rank (`int`, *optional*):
            Rank of each expert's residual factors in stage 1; set by `from_dense`.
        stage1_experts_implementation (`str`, *optional*):
            How stage-1 experts compute: `"eager"` is the low-rank form (the shared base once per token, the factors
            per expert); `"grouped_mm"` / `"batched_mm"` run those kernels on `W_i = S + B_i A_i` formed in the
            forward. `None` follows the model's `experts_implementation` on accelerators and uses the low-rank form on
            CPU, where it measured faster (`python -m benchmarks.perf block`, small preset, 512 tokens: forward+backward
            at 0.78 of the FLOP floor vs 0.34 for grouped_mm on the formed weights).
        stage1_trainable (`list[str]`, *optional*):
            Extra parameter-name substrings left trainable in stage 1 (routers and residual factors always are).
        stage2_train_all (`bool`, defaults to `True`):
            In stage 2 train the whole model; `False` trains only routers, experts and shared experts.
        stage2_frozen (`list[str]`, *optional*):
            Parameter-name substrings kept frozen in stage 2 whatever `stage2_train_all` says (e.g. `["encoder."]`
            to keep a speech encoder fixed, `["embed_tokens"]` for the token embeddings).
        seed (`int`, defaults to 0):
            Seed of every random choice of the upcycling (same seed, same inputs => identical weights).
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the router initialisation (never zero: equal logits route all tokens alike).
        base_model (`str`, *optional*):
            Where the dense model came from (Hub id or folder), recorded by `from_dense` for the model card.
        base_model_license (`str`, *optional*):
            The dense model's license, recorded by `from_dense` when its model card states one; carried to the card.
    """

    model_type = "spri"
    if SubConfigSpec is not None:
        sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    else:
        sub_configs = {"base_config": AutoConfig}

    base_config: dict | PreTrainedConfig | None = None
    num_experts: int = DEFAULTS.num_experts
    num_experts_per_tok: int = DEFAULTS.num_experts_per_tok
    expert_granularity: int = DEFAULTS.expert_granularity
    init: str = DEFAULTS.init
    principal_ratio: float | int = DEFAULTS.principal_ratio
    principal_energy: float | int | None = DEFAULTS.principal_energy
    partition: str = DEFAULTS.partition
    spri_mode: str = DEFAULTS.spri_mode
    diversity: float | int = DEFAULTS.diversity
    residual_scale: float | int = DEFAULTS.residual_scale
    noise_std: float | int = DEFAULTS.noise_std
    drop_ratio: float | int = DEFAULTS.drop_ratio
    upcycle: str | None = None
    moe_layers: list[int] | dict[str, list[int]] | None = DEFAULTS.moe_layers
    shared_expert: str | None = DEFAULTS.shared_expert
    router_aux_loss_coef: float | int = DEFAULTS.router_aux_loss_coef
    router_z_loss_coef: float | int = DEFAULTS.router_z_loss_coef
    router_balance: str = DEFAULTS.router_balance
    router_bias_update_rate: float | int = DEFAULTS.router_bias_update_rate
    norm_topk_prob: bool = DEFAULTS.norm_topk_prob
    output_router_logits: bool = False
    stage: int | None = DEFAULTS.stage
    residual_rank: int | None = None
    stage1_experts_implementation: str | None = None
    stage1_trainable: list[str] | None = None
    stage2_train_all: bool = True
    stage2_frozen: list[str] | None = None
    seed: int = DEFAULTS.seed
    initializer_range: float = 0.02
    base_model: str | None = None
    base_model_license: str | None = None
    tie_word_embeddings: bool = False
    # the dense model's, copied at construction (generation defaults read them from here)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    decoder_start_token_id: int | None = None

    def __post_init__(self, **kwargs):
        if self.stage is None:
            self.stage = 1 if self.init == "spri" else 2
        if self.router_balance == "bias":  # every trainer (TRL's too) reads the coefficient: no aux loss anywhere
            self.router_aux_loss_coef = 0.0
        if SubConfigSpec is None:  # transformers < 5.20 (see the import): build `base_config` as 5.20's spec would
            self.base_config = _sub_config(self.base_config, default_model_type="llama")
        super().__post_init__(**kwargs)
        # The wrapped dense model owns its embeddings: tying is decided by `base_config`.
        self.tie_word_embeddings = bool(getattr(self.base_config, "tie_word_embeddings", False))
        # Trainers, pipelines and generation read these from the top-level config (Seq2SeqTrainer pads with
        # pad_token_id, GenerationConfig.from_model_config stops at eos_token_id).
        self.is_encoder_decoder = bool(getattr(self.base_config, "is_encoder_decoder", False))
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            if self.__dict__.get(name) is None and getattr(self.base_config, name, None) is not None:
                self.__dict__[name] = getattr(self.base_config, name)

    def validate_spri_settings(self):
        """Check every SPRI field; raise `ValueError` naming the field, the value and the allowed range."""
        _check_choice("init", self.init, INITS)
        _check_choice("spri_mode", self.spri_mode, SPRI_MODES)
        _check_choice("partition", self.partition, PARTITIONS)
        _check_choice("shared_expert", self.shared_expert, SHARED_EXPERTS)
        if not 1 <= self.num_experts <= MAX_EXPERTS:
            raise ValueError(f"num_experts={self.num_experts} must be between 1 and {MAX_EXPERTS}.")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and num_experts="
                f"{self.num_experts}; lower num_experts_per_tok or raise num_experts."
            )
        self._validate_granularity()
        _check_choice("router_balance", self.router_balance, ROUTER_BALANCE)
        if not 0 <= self.router_bias_update_rate < float("inf"):
            raise ValueError(f"router_bias_update_rate={self.router_bias_update_rate} must be a finite number >= 0.")
        for name in ("principal_ratio", "diversity", "drop_ratio"):
            _check_unit_interval(name, getattr(self, name))
        if self.principal_energy is not None:
            _check_unit_interval("principal_energy", self.principal_energy)
        for name in ("noise_std", "router_aux_loss_coef", "router_z_loss_coef"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number >= 0.")
        if not abs(self.residual_scale) < float("inf"):
            raise ValueError(f"residual_scale={self.residual_scale} must be finite.")
        if not self.initializer_range > 0:
            raise ValueError(f"initializer_range={self.initializer_range} must be > 0 (a zero router routes all alike).")
        if self.stage not in (1, 2):
            raise ValueError(f"stage={self.stage} must be 1 (residual factors) or 2 (full experts).")
        if self.stage == 1 and self.init != "spri":
            raise ValueError(
                f"stage=1 needs init='spri' (only SPRI has residual factors), got init={self.init!r}; use stage=2."
            )
        _check_choice("stage1_experts_implementation", self.stage1_experts_implementation, STAGE1_EXPERTS)
        if self.residual_rank is not None and self.residual_rank < 1:
            raise ValueError(f"residual_rank={self.residual_rank} must be >= 1.")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed={self.seed} must be between 0 and {MAX_SEED} (2**32 - 1).")
        _check_choice("upcycle", self.upcycle, UPCYCLE)
        stacks = get_ffn_layouts(self.base_config)
        if self.upcycle in ("encoder", "decoder") and self.upcycle not in stacks:
            raise ValueError(
                f"upcycle={self.upcycle!r}, but a {self.base_config.model_type} model has only the FFN stack(s) "
                f"{sorted(stacks)}; pass upcycle=None."
            )
        if self.upcycle == "both" and len(stacks) < 2:
            raise ValueError(f"upcycle='both' needs an encoder-decoder model; {self.base_config.model_type} has one stack.")
        if isinstance(self.moe_layers, dict):
            unknown = sorted(set(self.moe_layers) - (set(stacks) if self.upcycle is None else set(self.upcycled_stacks())))
            if unknown:
                raise ValueError(
                    f"moe_layers names the stack(s) {unknown}, which are not upcycled (stacks of this model: "
                    f"{sorted(stacks)}, upcycle={self.upcycle!r}); fix the keys or upcycle=."
                )
        for stack in self.upcycled_stacks():
            layers = self.moe_layers.get(stack) if isinstance(self.moe_layers, dict) else self.moe_layers
            if layers is None:
                continue
            num_layers = stacks[stack].num_layers(self.base_config)
            if len(layers) == 0:
                raise ValueError("moe_layers=[] upcycles nothing; pass None for every FFN layer or a non-empty list.")
            for idx in layers:
                if not 0 <= idx < num_layers:
                    raise ValueError(f"moe_layers contains {idx}, outside the dense model's {stack} layers 0..{num_layers - 1}.")
            if len(set(layers)) != len(layers):
                raise ValueError(f"moe_layers={layers} lists a layer twice.")

    def _validate_granularity(self):
        granularity = self.expert_granularity
        if not isinstance(granularity, int) or granularity < 1:
            raise ValueError(f"expert_granularity={granularity!r} must be a positive integer (1: full-size experts).")
        if granularity == 1:
            return
        if self.num_experts % granularity:
            valid = [n for n in range(granularity, 4 * granularity + 1, granularity)]
            raise ValueError(
                f"num_experts={self.num_experts} is not a multiple of expert_granularity={granularity}: each virtual "
                f"group holds all {granularity} slices of the dense FFN. Use num_experts={valid} or another multiple."
            )
        valid = list(range(granularity, self.num_experts + 1, granularity))
        if self.num_experts_per_tok % granularity:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} is not a multiple of expert_granularity={granularity}"
                f": top-k must pick whole virtual groups. With num_experts={self.num_experts} the valid values are "
                f"{valid}."
            )
        for stack, layout in get_ffn_layouts(self.base_config).items():
            width = layout.intermediate_size(self.base_config)
            if width % granularity:
                divisors = [g for g in range(1, min(width, 64) + 1) if width % g == 0]
                raise ValueError(
                    f"expert_granularity={granularity} does not divide the {stack} FFN width (intermediate size "
                    f"{width}); choose one of {divisors}."
                )

    def expert_intermediate_size(self, layout) -> int:
        """The FFN width of one routed expert of a stack with FFN `layout`: the dense width / `expert_granularity`."""
        return layout.intermediate_size(self.base_config) // self.expert_granularity

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PreTrainedConfig.from_dict`; a field that fails validation raises its `ValueError` / `TypeError` (naming
        field, value and range) instead of huggingface_hub's wrapper, before any model is built."""
        try:
            return super().from_dict(config_dict, **kwargs)
        except Exception as err:  # huggingface_hub's StrictDataclass*Error: matched by name (no hub import here)
            cause = err.__cause__
            if type(err).__name__.startswith("StrictDataclass") and isinstance(cause, (ValueError, TypeError)):
                raise type(cause)(f"Invalid SPRI config: {cause}") from None
            if type(err).__name__.startswith("StrictDataclass"):
                raise ValueError(f"Invalid SPRI config: {err}") from None
            raise

    def get_text_config(self, decoder=None, encoder=None) -> PreTrainedConfig:
        """The config of the text model. For decoder-only models this config itself, with every dense field read
        through from `base_config` (`__getattr__`): engines that read the text config (vLLM's Transformers backend)
        then see the MoE fields (`num_experts`, `num_experts_per_tok`, `norm_topk_prob`) next to the dense ones.
        Otherwise the wrapped dense model's (generation builds its cache from it either way)."""
        if self._is_decoder_only():
            return self
        return self.base_config.get_text_config(decoder=decoder, encoder=encoder)

    def _is_decoder_only(self) -> bool:
        base = self.__dict__.get("base_config")
        if not isinstance(base, PreTrainedConfig) or getattr(base, "is_encoder_decoder", False):
            return False
        try:
            return list(get_ffn_layouts(base)) == ["decoder"]
        except (ValueError, TypeError):
            return False

    def check_vllm_can_run(self):
        """vLLM's Transformers backend (it sets the attention implementation to "vllm") replaces every experts module
        whose parameters are all 3D by its fused MoE, which computes `down(silu(gate(x)) * up(x))`: refuse the
        stage-2 experts it would compute wrongly (another activation, ungated FFNs) rather than serve wrong text."""
        if getattr(self, "_attn_implementation", None) != "vllm" or self.stage != 2:
            return  # stage 1's shared base is 2D: vLLM leaves those experts to the modeling file's eager forward
        reason = self.fused_moe_unsupported_reason()
        if reason is not None:
            raise ValueError(
                f"This SPRI checkpoint cannot run in vLLM's Transformers backend: {reason}. Serve its native export "
                "instead (spri_hf.export_native / `spri-hf export-native`, for Llama, Mistral, Qwen2 and Qwen3 "
                "bases), or run it with transformers."
            )

    def fused_moe_unsupported_reason(self) -> str | None:
        """Why a fused-MoE kernel (vLLM's `FusedMoE`: `down(silu(gate(x)) * up(x))` per expert, no biases) cannot run
        these experts, or `None` when it can (stage 2, gated SiLU FFNs without biases, a decoder-only model)."""
        if not self._is_decoder_only():
            return "only decoder-only models have a fused-MoE counterpart"
        base = self.base_config
        layout = get_ffn_layouts(base)["decoder"]
        if self.stage != 2:
            return (
                "stage 1 keeps low-rank residual factors (W_i = S + B_i A_i), which a fused MoE kernel has no form "
                "for"
            )
        if not layout.gated:
            return f"{base.model_type}'s FFN is not gated (down(act(up(x)))) and fused MoE kernels compute gated experts"
        if layout.activation(base) not in ("silu", "swish"):
            return (
                f"{base.model_type}'s experts use the {layout.activation(base)!r} activation and fused MoE kernels "
                "compute SiLU"
            )
        if layout.has_bias(base):
            return f"{base.model_type}'s FFNs have biases (mlp_bias=True) and fused MoE kernels run experts without"
        if self.router_balance in ("bias", "both"):
            return (
                f"router_balance={self.router_balance!r} adds e_score_correction_bias to the routing scores for the "
                "top-k choice, and vLLM's fused MoE, which replaces the router as well, applies it otherwise "
                "(other tokens than transformers); serve it with transformers"
            )
        return None

    def __getattr__(self, name: str):
        # Only reached when normal lookup fails: the dense fields (hidden_size, num_attention_heads, use_cache, ...)
        # are the base config's, read through as on a native MoE config.
        base = self.__dict__.get("base_config")
        if name.startswith("_") or not isinstance(base, PreTrainedConfig) or name in _generation_parameters():
            # generation parameters a dense config declares (BART's num_beams, ...) are not read through:
            # transformers refuses to save a model config that shows any (they belong to generation_config.json)
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        try:
            return getattr(base, name)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__} has no attribute {name!r}, nor has its base_config "
                f"({type(base).__name__})"
            ) from None

    def __setattr__(self, name: str, value):
        # A faithful view of the dense config, as a native MoE config is one config: once built, a dense field written
        # through this config is written to `base_config`, whose values the dense model reads (`config.use_cache =
        # False`, `config.num_hidden_layers = 1`, ...); the shared fields (MIRRORED_FIELDS) are written to both.
        base = self.__dict__.get("base_config")
        if name == "router_balance" and value == "bias" and self.__dict__.get("_post_init_done"):
            super().__setattr__("router_aux_loss_coef", 0.0)  # as at construction: no trainer adds the aux loss
        if name.startswith("_") or not self.__dict__.get("_post_init_done") or not isinstance(base, PreTrainedConfig):
            super().__setattr__(name, value)
            return
        if name in MIRRORED_FIELDS:
            super().__setattr__(name, value)
            if hasattr(base, name):
                setattr(base, name, value)
        elif name in type(self).__dataclass_fields__ or name in _OWN_PROPERTIES or not hasattr(base, name):
            super().__setattr__(name, value)
        else:
            setattr(base, name, value)

    def upcycled_stacks(self) -> list[str]:
        """The FFN stacks that are mixtures of experts ("encoder", "decoder")."""
        stacks = get_ffn_layouts(self.base_config)
        if self.upcycle == "both":
            return ["encoder", "decoder"]
        if self.upcycle is not None:
            return [self.upcycle]
        if isinstance(self.moe_layers, dict):  # the stacks it names
            return [stack for stack in ("encoder", "decoder") if stack in self.moe_layers]
        return ["decoder"] if "decoder" in stacks else list(stacks)

    def upcycled_layers(self, stack: str | None = None) -> list[int]:
        """Indices of the FFN layers of `stack` that are mixtures of experts (`None`: the only upcycled stack)."""
        if stack is None:
            stacks = self.upcycled_stacks()
            if len(stacks) != 1:
                raise ValueError(f"Several stacks are upcycled ({stacks}); pass stack=.")
            stack = stacks[0]
        layers = self.moe_layers.get(stack) if isinstance(self.moe_layers, dict) else self.moe_layers
        if layers is not None:
            return sorted(layers)
        return list(range(get_ffn_layouts(self.base_config)[stack].num_layers(self.base_config)))


# Properties of the config itself that the dense config also has: they stay on the SPRI config.
_OWN_PROPERTIES = ("name_or_path",)

# `save_pretrained` copies this file into every checkpoint and records it in `auto_map` (remote code).
SpriConfig.register_for_auto_class()


def record_base_model_class(config: SpriConfig):
    """Name `SpriModel` as the checkpoint's `AutoModel` in `config.auto_map` (next to the saved class's entry): vLLM's
    Transformers backend builds the backbone with `AutoModel.from_config(config, trust_remote_code=True)` and adds its
    own LM head. Decoder-only models only: there `SpriModel` wraps the dense family's backbone."""
    if config._is_decoder_only():
        config.auto_map = dict(getattr(config, "auto_map", None) or {}, AutoModel="modeling_spri.SpriModel")


@functools.cache
def _generation_parameters() -> frozenset:
    """The names `GenerationConfig` holds (but `use_cache`, which model configs hold too)."""
    return frozenset(GenerationConfig().to_dict()) - {"use_cache"}


def _sub_config(value, default_model_type: str) -> PreTrainedConfig:
    """A config instance from a config, a dict (its `model_type` or the default) or None (the default's defaults)."""
    if isinstance(value, PreTrainedConfig):
        return value
    value = dict(value or {})
    return AutoConfig.for_model(value.pop("model_type", default_model_type), **value)


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {allowed}.")


def _check_unit_interval(name, value):
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is outside [0, 1]; pass a value between 0 and 1.")


__all__ = ["SpriConfig", "record_base_model_class"]
