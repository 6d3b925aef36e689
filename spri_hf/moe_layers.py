"""The MoE layers of SPRI models: the top-k router, the experts in both parametrisations, the block that replaces a
dense FFN, and the router losses (see docs/METHOD.md, "Two parametrisations, two stages").

- stage 1, `SpriResidualExperts`: one shared frozen base matrix per projection plus trainable low-rank residual
  factors per expert (`W_i = S + B_i A_i`). Like stage 2 it dispatches through the experts implementation: "eager"
  computes the base product once per token and the factors per expert; the kernels ("grouped_mm", "batched_mm") run
  on the `W_i` formed in the forward (differentiable in the factors), through the stage-2 experts module's own forward.
- stage 2, `SpriExperts` and its variants: ordinary fused expert tensors in the transformers v5 layout, dispatched
  through `@use_experts_implementation` (`experts_implementation="eager" | "batched_mm" | "grouped_mm"`).

Shipped with every checkpoint as remote code (imported by modeling_spri.py): imports only torch, transformers and its
shipped siblings.
"""

import copy

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from .architectures import FfnLayout
from .configuration_spri import SpriConfig


class SpriRouter(nn.Module):
    """Top-k softmax router. Returns `(router_logits, top_k_weights, top_k_index)`.

    With bias balancing (`router_balance="bias"` or `"both"`) the buffer `e_score_correction_bias` (float32, one value
    per expert, stored in checkpoints) is added to the routing probabilities for the top-k choice only; the mixing
    weights stay the probabilities of the chosen experts. Training forwards count each expert's top-k choices
    (`expert_load`, real tokens only where the model's forward sets `load_mask`) until `update_bias` moves the bias
    after the optimizer step.
    """

    def __init__(self, config: SpriConfig, layout: FfnLayout):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, layout.hidden_size(config.base_config)))
        balances_by_bias = config.router_balance in ("bias", "both")
        bias = torch.zeros(config.num_experts, dtype=torch.float32) if balances_by_bias else None
        self.register_buffer("e_score_correction_bias", bias)
        self.expert_load: torch.Tensor | None = None  # not a buffer: DDP would broadcast rank 0's counts
        self.load_mask: torch.Tensor | None = None  # (batch, length) of real tokens, set by the model's forward

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight)  # (tokens, num_experts)
        router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        if self.e_score_correction_bias is None:
            top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)
        else:
            choice_scores = router_probs.detach() + self.e_score_correction_bias.float()
            top_k_index = torch.topk(choice_scores, self.top_k, dim=-1).indices
            top_k_weights = router_probs.gather(-1, top_k_index)
            if self.training and torch.is_grad_enabled():
                self._count_load(top_k_index)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index

    @torch.no_grad()
    def _count_load(self, top_k_index: torch.Tensor):
        mask = self.load_mask
        if mask is not None and mask.numel() == top_k_index.shape[0]:  # padding routes too, but is no load
            top_k_index = top_k_index[mask.reshape(-1).to(top_k_index.device).bool()]
        counts = torch.bincount(top_k_index.flatten(), minlength=self.num_experts)[: self.num_experts].float()
        self.expert_load = counts if self.expert_load is None else self.expert_load + counts

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float):
        """One step of auxiliary-loss-free balancing (DeepSeek-V3's rule): every expert busier than the mean load
        loses `rate`, every idler one gains it (`load`: the step's top-k counts, all processes summed)."""
        if load.sum() > 0:
            self.e_score_correction_bias += rate * torch.sign(load.mean() - load).to(
                self.e_score_correction_bias.device
            )
        self.expert_load = None


class SpriExpertsBase(nn.Module):
    """Fused expert weights `gate_up_proj` (E, 2I, H) or `up_proj` (E, I, H), and `down_proj` (E, H, I).

    The forward below is the eager implementation; `@use_experts_implementation` on the concrete subclasses swaps in
    `batched_mm` / `grouped_mm` according to `config._experts_implementation`.
    """

    def __init__(self, config: SpriConfig, layout: FfnLayout):
        super().__init__()
        base = config.base_config
        self.num_experts = config.num_experts
        self.hidden_dim = layout.hidden_size(base)
        self.intermediate_dim = config.expert_intermediate_size(layout)
        self.act_fn = ACT2FN[layout.activation(base)]
        num_experts, hidden, inter = self.num_experts, self.hidden_dim, self.intermediate_dim
        if layout.gated:
            self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        else:
            self.up_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))
        if layout.has_bias(base):
            if layout.gated:
                self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * inter))
            else:
                self.up_proj_bias = nn.Parameter(torch.empty(num_experts, inter))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # one extra class: expert parallelism marks the routes to other ranks' experts with id num_experts
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)  # (E+1, k, tokens)
            expert_hit = torch.greater(expert_mask[: self.num_experts].sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current_state = hidden_states[token_idx]
            if self.has_gate:
                bias = self.gate_up_proj_bias[expert_idx] if self.has_bias else None
                current = self._apply_gate(F.linear(current_state, self.gate_up_proj[expert_idx], bias))
            else:
                bias = self.up_proj_bias[expert_idx] if self.has_bias else None
                current = self.act_fn(F.linear(current_state, self.up_proj[expert_idx], bias))
            bias = self.down_proj_bias[expert_idx] if self.has_bias else None
            current = F.linear(current, self.down_proj[expert_idx], bias)
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, current.to(final_hidden_states.dtype))
        return final_hidden_states


@use_experts_implementation
class SpriExperts(SpriExpertsBase):
    """Gated experts without biases (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3)."""


@use_experts_implementation(has_bias=True)
class SpriExpertsWithBias(SpriExpertsBase):
    """Gated experts with biases (Llama with `mlp_bias=True`)."""


@use_experts_implementation(has_gate=False, has_bias=True)
class SpriPlainExpertsWithBias(SpriExpertsBase):
    """Plain `down(act(up(x)))` experts with biases (GPT-2, GPT-NeoX)."""


@use_experts_implementation(has_gate=False)
class SpriPlainExperts(SpriExpertsBase):
    """Plain `down(act(up(x)))` experts without biases."""


def experts_class_for(config: SpriConfig, layout: FfnLayout) -> type[SpriExpertsBase]:
    bias = layout.has_bias(config.base_config)
    if layout.gated:
        return SpriExpertsWithBias if bias else SpriExperts
    return SpriPlainExpertsWithBias if bias else SpriPlainExperts


class SpriResidualExperts(nn.Module):
    """Stage-1 experts: `W_i = shared + B_i A_i` for every projection, with `shared` frozen and the factors trained.

    Parameters (E experts, k = `config.residual_rank`): `gate_up_shared` (2I, H) or `up_shared` (I, H),
    `gate_up_residual_a` (E, 2k, H) = [A_gate; A_up], `gate_up_residual_b` (E, 2I, k) = [B_gate; B_up] (or the
    `up_*` pair for plain FFNs), `down_shared` (H, I), `down_residual_a` (E, k, I), `down_residual_b` (E, H, k), and
    the per-expert biases under their stage-2 names.
    """

    def __init__(self, config: SpriConfig, layout: FfnLayout):
        super().__init__()
        base = config.base_config
        self.config = config
        self.layout = layout
        self.num_experts = config.num_experts
        self.hidden_dim = layout.hidden_size(base)
        self.intermediate_dim = config.expert_intermediate_size(layout)  # one expert's width
        self.granularity = config.expert_granularity
        self.rank = config.residual_rank or 1
        self.has_gate = layout.gated
        self.has_bias = layout.has_bias(base)
        self.act_fn = ACT2FN[layout.activation(base)]
        num_experts, hidden, inter, rank = self.num_experts, self.hidden_dim, self.intermediate_dim, self.rank
        parts = 2 if self.has_gate else 1
        prefix = "gate_up" if self.has_gate else "up"
        # the shared base holds every slice of the dense FFN, slice after slice ([gate_s; up_s] rows of slice s, the
        # dense matrices themselves when expert_granularity is 1); expert e adds its factors to slice e % G
        slices = self.granularity
        setattr(self, f"{prefix}_shared", nn.Parameter(torch.empty(slices * parts * inter, hidden)))
        setattr(self, f"{prefix}_residual_a", nn.Parameter(torch.empty(num_experts, parts * rank, hidden)))
        setattr(self, f"{prefix}_residual_b", nn.Parameter(torch.empty(num_experts, parts * inter, rank)))
        self.down_shared = nn.Parameter(torch.empty(hidden, slices * inter))
        self.down_residual_a = nn.Parameter(torch.empty(num_experts, rank, inter))
        self.down_residual_b = nn.Parameter(torch.empty(num_experts, hidden, rank))
        if self.has_bias:
            setattr(self, f"{prefix}_proj_bias", nn.Parameter(torch.empty(num_experts, parts * inter)))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden))

    @property
    def _prefix(self) -> str:
        return "gate_up" if self.has_gate else "up"

    def _up_delta(self, hidden_states: torch.Tensor, expert_idx: torch.Tensor) -> torch.Tensor:
        """`B_i A_i x` of the gate/up projections for tokens routed to one expert."""
        factor_a = getattr(self, f"{self._prefix}_residual_a")[expert_idx]
        factor_b = getattr(self, f"{self._prefix}_residual_b")[expert_idx]
        projected = F.linear(hidden_states, factor_a)  # (n, parts * k)
        if not self.has_gate:
            return F.linear(projected, factor_b)
        n = hidden_states.shape[0]
        # gate and up have their own factors: block-diagonal product without materialising the block matrix
        projected = projected.view(n, 2, self.rank)
        factor_b = factor_b.view(2, self.intermediate_dim, self.rank)
        return torch.einsum("npk,pik->npi", projected, factor_b).reshape(n, 2 * self.intermediate_dim)

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Through the experts-implementation interface, as the stage-2 experts (`config.stage1_experts_implementation`,
        by default the model's on accelerators, "eager" on CPU): "eager" runs the low-rank form (the shared base once
        per token, the factors per expert); "grouped_mm" / "batched_mm" (and any registered kernel) run on the experts
        `W_i = S + B_i A_i`, formed in the forward (differentiable in the factors; the transient weights are the size
        of the stage-2 experts, which stage 2 keeps as parameters anyway)."""
        implementation = self.config.stage1_experts_implementation
        if implementation is None:  # the model's on accelerators; the low-rank form on CPU (faster there)
            implementation = "eager" if hidden_states.device.type == "cpu" else self.config._experts_implementation
        if implementation in (None, "eager"):
            return self.low_rank_forward(hidden_states, top_k_index, top_k_weights)
        # the stage-2 experts module's own forward (its kernel dispatch), run on the formed weights
        up, down = self.formed_weights()
        weights = {f"{self._prefix}_proj": up, "down_proj": down}
        if self.has_bias:
            weights[f"{self._prefix}_proj_bias"] = getattr(self, f"{self._prefix}_proj_bias")
            weights["down_proj_bias"] = self.down_proj_bias
        return functional_call(self._stage2_template(implementation), weights, (hidden_states, top_k_index, top_k_weights))

    def _stage2_template(self, implementation: str) -> "SpriExpertsBase":
        """A stage-2 experts module without storage (meta device) whose experts implementation is `implementation`:
        `functional_call` runs its forward on the formed weights. Built once per implementation, kept out of the module
        tree (no parameters, no state-dict entries)."""
        templates = self.__dict__.setdefault("_stage2_templates", {})
        if implementation not in templates:
            config = copy.copy(self.config)
            config.base_config = copy.copy(self.config.base_config)  # the setter below recurses into sub-configs
            config._experts_implementation = implementation
            with torch.device("meta"):
                templates[implementation] = experts_class_for(self.config, self.layout)(config, self.layout)
        return templates[implementation]

    def residual_factors(self) -> list[nn.Parameter]:
        """The trainable parameters of stage 1: every projection's `B_i` and `A_i`."""
        return [getattr(self, f"{prefix}_residual_{factor}") for prefix in (self._prefix, "down") for factor in "ab"]

    def formed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(gate_up or up (E, parts * I, H), down (E, H, I))` = shared + B_i A_i, in the autograd graph."""
        parts = 2 if self.has_gate else 1
        num_experts, inter, rank = self.num_experts, self.intermediate_dim, self.rank
        factor_a = getattr(self, f"{self._prefix}_residual_a").view(num_experts, parts, rank, self.hidden_dim)
        factor_b = getattr(self, f"{self._prefix}_residual_b").view(num_experts, parts, inter, rank)
        up_delta = torch.matmul(factor_b, factor_a).reshape(num_experts, parts * inter, self.hidden_dim)
        down_delta = torch.bmm(self.down_residual_b, self.down_residual_a)
        shared_up, shared_down = getattr(self, f"{self._prefix}_shared"), self.down_shared
        if self.granularity == 1:
            return shared_up + up_delta, shared_down + down_delta
        slices = self.slice_of_expert(shared_up.device)
        shared_up = shared_up.view(self.granularity, parts * inter, self.hidden_dim)[slices]
        shared_down = shared_down.view(self.hidden_dim, self.granularity, inter).transpose(0, 1)[slices]
        return shared_up + up_delta, shared_down + down_delta

    def slice_of_expert(self, device=None) -> torch.Tensor:
        """The dense FFN slice each expert holds (`expert % expert_granularity`)."""
        return torch.arange(self.num_experts, device=device) % self.granularity

    def low_rank_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # The shared base is applied once per token: S x for gate/up, and S (sum_k w_k h_k) for down. With fine-grained
        # experts S holds every slice: expert e reads and writes the columns of its slice e % G.
        shared_up = F.linear(hidden_states, getattr(self, f"{self._prefix}_shared"))
        width = (2 if self.has_gate else 1) * self.intermediate_dim
        mixed_intermediate = hidden_states.new_zeros(hidden_states.shape[0], self.granularity * self.intermediate_dim)
        final_hidden_states = torch.zeros_like(hidden_states)
        up_bias = getattr(self, f"{self._prefix}_proj_bias", None)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            routing_weight = top_k_weights[token_idx, top_k_pos, None]
            piece = int(expert_idx) % self.granularity
            projected = shared_up[token_idx, piece * width : (piece + 1) * width]
            projected = projected + self._up_delta(hidden_states[token_idx], expert_idx)
            if up_bias is not None:
                projected = projected + up_bias[expert_idx]
            if self.has_gate:
                gate, up = projected.chunk(2, dim=-1)
                intermediate = self.act_fn(gate) * up
            else:
                intermediate = self.act_fn(projected)
            weighted = intermediate * routing_weight
            own_columns = mixed_intermediate.narrow(1, piece * self.intermediate_dim, self.intermediate_dim)
            own_columns.index_add_(0, token_idx, weighted.to(mixed_intermediate.dtype))
            delta = F.linear(F.linear(intermediate, self.down_residual_a[expert_idx]), self.down_residual_b[expert_idx])
            if self.has_bias:
                delta = delta + self.down_proj_bias[expert_idx]
            final_hidden_states.index_add_(0, token_idx, (delta * routing_weight).to(final_hidden_states.dtype))
        return final_hidden_states + F.linear(mixed_intermediate, self.down_shared)

    @torch.no_grad()
    def materialize(self) -> SpriExpertsBase:
        """The equivalent stage-2 experts module (`W_i = shared + B_i A_i`), on the same device and dtype."""
        reference = self.down_shared
        with torch.device(reference.device):
            experts = experts_class_for(self.config, self.layout)(self.config, self.layout).to(reference.dtype)
        up, down = self.formed_weights()
        getattr(experts, "gate_up_proj" if self.has_gate else "up_proj").copy_(up)
        experts.down_proj.copy_(down)
        if self.has_bias:
            getattr(experts, f"{self._prefix}_proj_bias").copy_(getattr(self, f"{self._prefix}_proj_bias"))
            experts.down_proj_bias.copy_(self.down_proj_bias)
        return experts


class SpriMoeBlock(nn.Module):
    """Router -> experts, plus an optional always-on shared expert; a drop-in replacement of a dense FFN."""

    def __init__(self, config: SpriConfig, layout: FfnLayout, shared_expert: nn.Module | None = None):
        super().__init__()
        self.router = SpriRouter(config, layout)
        experts_class = SpriResidualExperts if config.stage == 1 else experts_class_for(config, layout)
        self.experts = experts_class(config, layout)
        self.shared_expert = shared_expert
        dropout = layout.dropout(config.base_config)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        # Set by `SpriPreTrainedModel.collect_router_logits` for the duration of one forward call.
        self.router_logits_sink: list | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        router_logits, top_k_weights, top_k_index = self.router(flat)
        if self.router_logits_sink is not None:
            self.router_logits_sink.append(router_logits)
        output = self.dropout(self.experts(flat, top_k_index, top_k_weights))
        if self.shared_expert is not None:
            output = output + self.shared_expert(flat)
        return output.reshape(shape)


def real_token_masks(inputs: dict, labels: torch.Tensor | None, encoder_decoder: bool) -> dict:
    """`{stack: (batch, length) mask of real tokens, or None}` for a forward's `inputs`: the decoder of an
    encoder-decoder model takes `decoder_attention_mask`, else the positions whose `labels` are not -100; every other
    stack takes `attention_mask`. A router whose tokens the mask does not match counts every token."""
    masks = {"encoder": inputs.get("attention_mask"), "decoder": inputs.get("attention_mask")}
    if encoder_decoder:
        masks["decoder"] = inputs.get("decoder_attention_mask")
        if masks["decoder"] is None and labels is not None:
            masks["decoder"] = labels != -100
    return {stack: mask if mask is not None and mask.dim() == 2 else None for stack, mask in masks.items()}


def load_balancing_loss(
    router_logits: list[torch.Tensor] | tuple[torch.Tensor, ...], top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """transformers' load-balancing loss (`load_balancing_loss_func`, the one Mixtral, Qwen3-MoE and TRL compute):
    `num_experts * sum_e f_e * P_e` over the pooled tokens of every MoE layer, where `f_e` counts each top-k slot, so
    it is `top_k` at perfectly uniform routing. `router_aux_loss_coef` multiplies exactly this value in SPRI's forward,
    under TRL's trainers and in the native export.

    Layers that see other tokens than the mask's (the encoder and the decoder of a seq2seq model) form their own group,
    without the mask; the groups' losses are averaged, weighted by their number of layers. A decoder-only model has one
    group: the value is transformers' to the bit.
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for layer_logits in router_logits:
        groups.setdefault(layer_logits.shape[0], []).append(layer_logits)
    losses, weights = [], []
    for num_tokens, layers in groups.items():
        mask = attention_mask
        if mask is None or mask.dim() != 2 or mask.numel() != num_tokens:
            mask = None
        num_experts = layers[0].shape[-1]
        device = layers[0].device
        loss = load_balancing_loss_func(tuple(layers), num_experts, top_k, mask)
        losses.append(torch.as_tensor(loss, dtype=torch.float, device=device))
        weights.append(len(layers))
    total = sum(weights)
    return sum(loss.to(losses[0].device) * (weight / total) for loss, weight in zip(losses, weights))


def router_z_loss(router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared log-sum-exp of the router logits (ST-MoE), averaged over MoE layers."""
    losses = []
    for layer_logits in router_logits:
        weights = token_weights(attention_mask, layer_logits.shape[0], layer_logits.device)
        z = torch.logsumexp(layer_logits.float(), dim=-1).square()
        losses.append((z * weights).sum() / weights.sum())
    return torch.stack(losses).mean()


def token_weights(attention_mask: torch.Tensor | None, num_tokens: int, device) -> torch.Tensor:
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.numel() == num_tokens:
        return attention_mask.reshape(-1).to(device=device, dtype=torch.float)
    return torch.ones(num_tokens, device=device)

