"""The upcycling settings of `SpriConfig`: type, default and allowed values of each, in one place that imports only
the standard library, so the command lines build their flags (and `spri-hf --help` answers) without torch.

`SpriConfig` declares these fields with these defaults; `spri-hf upcycle` and `spri-hf train` take them as flags.
Shipped with every checkpoint (configuration_spri.py imports it).
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class UpcyclingDefaults:
    """The upcycling fields the command lines take as flags, in their order (help: SpriConfig's docstring)."""

    num_experts: int = 8
    num_experts_per_tok: int = 2
    expert_granularity: int = 1
    init: str = "spri"
    principal_ratio: float | int = 0.5
    principal_energy: float | int | None = None
    partition: str = "interleaved"
    spri_mode: str = "balanced"
    diversity: float | int = 0.1
    residual_scale: float | int = 1.0
    noise_std: float | int = 0.01
    drop_ratio: float | int = 0.5
    moe_layers: list[int] | dict[str, list[int]] | None = None
    shared_expert: str | None = None
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.0
    router_balance: str = "aux_loss"
    router_bias_update_rate: float | int = 0.001
    norm_topk_prob: bool = True
    stage: int | None = None
    seed: int = 0


DEFAULTS = UpcyclingDefaults()
UPCYCLING_FLAGS = tuple(field.name for field in dataclasses.fields(UpcyclingDefaults))

INITS = ("spri", "copy", "noise", "drop", "random")
SPRI_MODES = ("balanced", "partition")
PARTITIONS = ("interleaved", "contiguous", "random")
STAGE1_EXPERTS = (None, "eager", "batched_mm", "grouped_mm")
SHARED_EXPERTS = (None, "dense")
ROUTER_BALANCE = ("aux_loss", "bias", "both")
UPCYCLE = (None, "decoder", "encoder", "both")
# Far beyond any released MoE; refuses absurd configs before anything is allocated.
MAX_EXPERTS = 4096
# upcycling seeds are mixed with layer indices into one 64-bit generator seed
MAX_SEED = 2**32 - 1
