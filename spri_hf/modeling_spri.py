"""SPRI mixture-of-experts models: a dense Hugging Face model whose FFN blocks are sparse experts.

The dense architecture is built as it is (attention, norms, embeddings untouched) and each upcycled FFN is swapped
for a `SpriMoeBlock` = top-k router -> experts (+ optional always-on shared expert). Experts exist in two
parametrizations (see spri_hf's docs/METHOD.md, "Two parametrisations, two stages"):

- stage 1, `SpriResidualExperts`: one shared frozen base matrix per projection plus trainable low-rank residual
  factors per expert (`W_i = S + B_i A_i`). Like stage 2 it dispatches through the experts implementation: "eager"
  computes the base product once per token and the factors per expert; the kernels ("grouped_mm", "batched_mm") run
  on the `W_i` formed in the forward (differentiable in the factors).
- stage 2, `SpriExperts` and its variants: ordinary fused expert tensors in the transformers v5 layout, dispatched
  through `@use_experts_implementation` (`experts_implementation="eager" | "batched_mm" | "grouped_mm"`).

This file is shipped to the Hub as remote code: it imports only torch, transformers and its relative siblings
(persistence.py holds how checkpoints are read and written).
"""

import copy
import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_MASKED_LM_MAPPING,
    MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING,
    MODEL_MAPPING,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.utils.generic import can_return_tuple


try:  # transformers >= 5.20 (this file must load from 5.16 on: see CACHE_NAME)
    from transformers.utils.output_capturing import OutputRecorder
except ImportError:
    from transformers.utils.generic import OutputRecorder

from .architectures import FfnLayout, get_ffn_layouts
from .configuration_spri import SpriConfig, record_base_model_class
from .model_card import write_model_card
from .parallel import add_expert_parallel_plans, check_distributed_config, writes_on_another_rank
from .persistence import load_checkpoint, push_with_clear_errors, save_atomically


# This file is also the remote code of every checkpoint: it must load in every transformers 5.x from 5.16 on (the
# ones vLLM and SGLang pin). transformers 5.24 renamed the key/value cache of forwards and outputs from
# `past_key_values` to `cache`: the name this transformers uses.
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class SpriRouter(nn.Module):
    """Top-k softmax router. Returns `(router_logits, top_k_weights, top_k_index)`."""

    def __init__(self, config: SpriConfig, layout: FfnLayout):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.weight = nn.Parameter(torch.empty(config.num_experts, layout.hidden_size(config.base_config)))

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        router_logits = F.linear(hidden_states, self.weight)  # (tokens, num_experts)
        router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        top_k_weights, top_k_index = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
        return router_logits, top_k_weights.to(hidden_states.dtype), top_k_index


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
        self.intermediate_dim = layout.intermediate_size(base)
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
        self.intermediate_dim = layout.intermediate_size(base)
        self.rank = config.residual_rank or 1
        self.has_gate = layout.gated
        self.has_bias = layout.has_bias(base)
        self.act_fn = ACT2FN[layout.activation(base)]
        num_experts, hidden, inter, rank = self.num_experts, self.hidden_dim, self.intermediate_dim, self.rank
        parts = 2 if self.has_gate else 1
        prefix = "gate_up" if self.has_gate else "up"
        setattr(self, f"{prefix}_shared", nn.Parameter(torch.empty(parts * inter, hidden)))
        setattr(self, f"{prefix}_residual_a", nn.Parameter(torch.empty(num_experts, parts * rank, hidden)))
        setattr(self, f"{prefix}_residual_b", nn.Parameter(torch.empty(num_experts, parts * inter, rank)))
        self.down_shared = nn.Parameter(torch.empty(hidden, inter))
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
        experts_forward = ALL_EXPERTS_FUNCTIONS.get_interface(implementation, None)
        return experts_forward(_FormedExperts(self), hidden_states, top_k_index, top_k_weights)

    def formed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(gate_up or up (E, parts * I, H), down (E, H, I))` = shared + B_i A_i, in the autograd graph."""
        parts = 2 if self.has_gate else 1
        num_experts, inter, rank = self.num_experts, self.intermediate_dim, self.rank
        factor_a = getattr(self, f"{self._prefix}_residual_a").view(num_experts, parts, rank, self.hidden_dim)
        factor_b = getattr(self, f"{self._prefix}_residual_b").view(num_experts, parts, inter, rank)
        up_delta = torch.matmul(factor_b, factor_a).reshape(num_experts, parts * inter, self.hidden_dim)
        up = getattr(self, f"{self._prefix}_shared") + up_delta
        down = self.down_shared + torch.bmm(self.down_residual_b, self.down_residual_a)
        return up, down

    def low_rank_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # The shared base is applied once per token: S x for gate/up, and S (sum_k w_k h_k) for down.
        shared_up = F.linear(hidden_states, getattr(self, f"{self._prefix}_shared"))
        mixed_intermediate = hidden_states.new_zeros(hidden_states.shape[0], self.intermediate_dim)
        final_hidden_states = torch.zeros_like(hidden_states)
        up_bias = getattr(self, f"{self._prefix}_proj_bias", None)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            routing_weight = top_k_weights[token_idx, top_k_pos, None]
            projected = shared_up[token_idx] + self._up_delta(hidden_states[token_idx], expert_idx)
            if up_bias is not None:
                projected = projected + up_bias[expert_idx]
            if self.has_gate:
                gate, up = projected.chunk(2, dim=-1)
                intermediate = self.act_fn(gate) * up
            else:
                intermediate = self.act_fn(projected)
            weighted = intermediate * routing_weight
            mixed_intermediate.index_add_(0, token_idx, weighted.to(mixed_intermediate.dtype))
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


class _FormedExperts:
    """Stage-1 experts seen as stage-2 ones (fused `W_i = S + B_i A_i`, same attributes) for an experts kernel."""

    def __init__(self, residual: SpriResidualExperts):
        stage2 = experts_class_for(residual.config, residual.layout)
        self.config = residual.config
        self.num_experts, self.act_fn = residual.num_experts, residual.act_fn
        self.has_gate, self.has_bias = residual.has_gate, residual.has_bias
        self.is_transposed, self.is_concatenated, self.has_post_expert_norm = False, True, False
        self._is_expert_parallel = False
        up, self.down_proj = residual.formed_weights()
        setattr(self, "gate_up_proj" if self.has_gate else "up_proj", up)
        if self.has_bias:
            name = "gate_up_proj_bias" if self.has_gate else "up_proj_bias"
            setattr(self, name, getattr(residual, name))
            self.down_proj_bias = residual.down_proj_bias
        self._apply_gate = stage2._apply_gate.__get__(self)


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


@dataclass
class SpriCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss (already included in `loss` when labels are given)."""

    z_loss: torch.Tensor | None = None


class SpriBackboneMixin:
    """Mixed into the dense family's backbone class (`LlamaModel`, `Qwen3Model`, `BertModel`, ...) of a SPRI model,
    whose FFN blocks are `SpriMoeBlock`s: the backbone a SPRI model's `base_model` returns.

    As on Mixtral and Qwen3-MoE, the routers' logits are declared in `_can_record_outputs` and recorded by transformers'
    output capturing: `output_router_logits=True` (or `model.config.output_router_logits`) returns them, one tensor
    (tokens, experts) per MoE layer, in `router_logits`; decoder backbones return `MoeModelOutputWithPast`. Callers
    that compute their loss from the backbone (TRL's fused LM head) add the load-balancing loss themselves, with
    transformers' `load_balancing_loss_func`, the same loss SPRI's own forward adds.
    """

    # Set by `SpriPreTrainedModel.__init__`: the SPRI config (MoE settings, `output_router_logits`), next to the dense
    # `config` the backbone was built with.
    spri_config: SpriConfig | None = None

    def forward(self, *args, **kwargs):
        spri_config = self.spri_config
        if spri_config is not None:
            if spri_config.output_router_logits:
                kwargs.setdefault("output_router_logits", True)
            if self.training and spri_config.router_z_loss_coef and not getattr(self, "_spri_loss_owner", False):
                raise ValueError(
                    f"router_z_loss_coef={spri_config.router_z_loss_coef}: the router z-loss is added by the SPRI "
                    "model's own forward when it computes the loss (labels given), and this training call runs the "
                    "backbone directly (as TRL's trainers do), so the z-loss would be silently lost. Set "
                    "model.config.router_z_loss_coef = 0 to train without it here, or train through the model's forward "
                    "with labels (SpriTrainer, Trainer)."
                )
        outputs = super().forward(*args, **kwargs)
        if type(outputs) is BaseModelOutputWithPast:
            # decoder backbones return the MoE output class, as Mixtral's and Qwen3-MoE's do (those with another
            # output class, e.g. GPT-2's with cross-attentions, keep it: their LM head reads its fields)
            outputs = MoeModelOutputWithPast(**dict(outputs.items()))
        return outputs


_BACKBONE_CLASSES: dict[type, type] = {}


def spri_backbone_class(dense_class: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """`Spri<DenseBackbone>`: the dense backbone class with `SpriBackboneMixin` and the routers in its
    `_can_record_outputs`; one class per dense class, registered with transformers' output capturing."""
    if dense_class in _BACKBONE_CLASSES or issubclass(dense_class, SpriBackboneMixin):
        return _BACKBONE_CLASSES.get(dense_class, dense_class)
    recordable = dict(dense_class._can_record_outputs or {})
    recordable["router_logits"] = OutputRecorder(SpriRouter, index=0)

    def forward(self, *args, **kwargs):
        return SpriBackboneMixin.forward(self, *args, **kwargs)

    functools.update_wrapper(forward, dense_class.forward)  # the dense signature, which callers inspect
    backbone_class = type(
        f"Spri{dense_class.__name__}",
        (SpriBackboneMixin, dense_class),
        {"__module__": __name__, "__doc__": SpriBackboneMixin.__doc__, "_can_record_outputs": recordable,
         "forward": forward},
    )
    _BACKBONE_CLASSES[dense_class] = backbone_class
    return backbone_class


def make_spri_backbone(backbone: PreTrainedModel, spri_config: SpriConfig) -> None:
    """Turn the dense backbone module (already holding the SPRI blocks) into its `Spri<DenseBackbone>` class in place."""
    if isinstance(backbone, SpriBackboneMixin):  # built as one (SpriModel's)
        backbone.spri_config = spri_config
        return
    if not backbone._can_record_outputs:  # encoder-decoder backbones (BartModel, T5): their stacks record outputs
        return
    backbone_class = spri_backbone_class(type(backbone))
    if not getattr(backbone_class, "_spri_registered", False):
        # transformers registers each class's `_can_record_outputs` when an instance of it is built: build one
        # without weights (meta tensors) from this config, once per class
        with torch.device("meta"):
            backbone_class(copy.deepcopy(backbone.config))  # a copy: building sets fields on the config
        backbone_class._spri_registered = True
    backbone.__class__ = backbone_class
    backbone.spri_config = spri_config


class SpriPreTrainedModel(PreTrainedModel):
    """Wraps the dense architecture named by `config.base_config` and swaps its FFN blocks for `SpriMoeBlock`s."""

    config: SpriConfig
    config_class = SpriConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["SpriMoeBlock"]
    # Which auto mapping builds the wrapped dense architecture (and the auto class that loads a dense checkpoint).
    _dense_mapping = MODEL_MAPPING
    _dense_auto_class = "AutoModel"

    def __init__(self, config: SpriConfig):
        _check_vllm_can_run(config)
        super().__init__(config)
        dense_class = self._dense_class(config)
        if self._dense_mapping is MODEL_MAPPING and dense_class._can_record_outputs:
            # SpriModel: its child is the backbone itself, built as `Spri<DenseBackbone>` through its own __init__ (vLLM's
            # Transformers backend decorates that class's __init__ for torch.compile)
            dense_class = spri_backbone_class(dense_class)
        # The experts live in this wrapper; the dense architecture has none and refuses an experts implementation.
        config.base_config._experts_implementation_internal = None
        self.model = dense_class(config.base_config)
        self._swap_ffn_blocks()
        if self.model.base_model is not self.model or self._dense_mapping is MODEL_MAPPING:
            # a backbone under a head (LlamaModel in LlamaForCausalLM), or SpriModel's own; not a head model that
            # holds its stacks itself (T5ForConditionalGeneration: its base_model is itself, as on a dense T5)
            make_spri_backbone(self.model.base_model, config)
        # A `Spri<DenseBackbone>` class lives in this module, which has experts, so transformers sets an experts
        # implementation on the config it is built with; the dense config keeps none (the dense model folded or
        # exported from it must build).
        config.base_config._experts_implementation_internal = None
        self.post_init()
        self.apply_stage_trainability()
        # The tied LM head is not stored in checkpoints; Trainer's resume then re-ties it instead of warning about it
        tied = sorted(getattr(self, "all_tied_weights_keys", None) or {})
        self._keys_to_ignore_on_save = tied or None

    @property
    def base_model(self) -> nn.Module:
        """The backbone, as on every transformers model: the dense family's base model with the SPRI blocks inside
        (for a Llama base a `LlamaModel`, `SpriLlamaModel`, returning `last_hidden_state` and, on request,
        `router_logits`)."""
        return self.model.base_model

    @property
    def _can_compile_fullgraph(self) -> bool:
        # Stage 2 compiles in one graph (fused experts). Stage 1's low-rank forward loops over the experts that
        # received tokens, a data-dependent loop that breaks the graph; it compiles with graph breaks.
        return self.config.stage == 2

    def init_parallel_plans(self) -> None:
        """The dense family's tensor/expert/pipeline plans (inherited from the wrapped model) plus the MoE blocks'
        entries (spri_hf/parallel.py), so that `from_pretrained(..., distributed_config=...)` shards SPRI models.
        Entries that name no parameter or module of this model (the dense MLPs that became MoE blocks, the stage-2
        experts of a stage-1 model) are dropped; `set_stage(2)` builds the plans again."""
        super().init_parallel_plans()
        add_expert_parallel_plans(self)

    def _resolve_parallel_plans(self, distributed_config):
        check_distributed_config(self, distributed_config)  # stage 1 and pipeline parallelism: a clear error
        return super()._resolve_parallel_plans(distributed_config)

    @classmethod
    def _dense_class(cls, config: SpriConfig) -> type[PreTrainedModel]:
        get_ffn_layouts(config.base_config)  # clear error for unsupported families
        if type(config.base_config) not in cls._dense_mapping:
            raise ValueError(
                f"{cls.__name__} wraps {cls._dense_auto_class} models, and a {config.base_config.model_type} model is "
                "not one; pick the Spri class of its task (SpriForCausalLM, SpriForSeq2SeqLM, SpriForSpeechSeq2Seq, "
                "SpriForSequenceClassification, SpriForMaskedLM, or SpriModel)."
            )
        return cls._dense_mapping[type(config.base_config)]

    @property
    def ffn_layouts(self) -> dict[str, FfnLayout]:
        """The FFN layout of every stack of the dense family ("decoder", "encoder")."""
        return get_ffn_layouts(self.config.base_config)

    @property
    def ffn_layout(self) -> FfnLayout:
        """The FFN layout of the upcycled stack (models with one upcycled stack)."""
        stacks = self.config.upcycled_stacks()
        if len(stacks) != 1:
            raise ValueError(f"Several stacks are upcycled ({stacks}); use ffn_layouts[stack].")
        return self.ffn_layouts[stacks[0]]

    def stack_layers(self, stack: str) -> nn.ModuleList:
        """The dense architecture's list of blocks of one stack."""
        return self.ffn_layouts[stack].layers(self.model)

    def decoder_layers(self) -> nn.ModuleList:
        """The blocks of the upcycled stack (models with one upcycled stack; the name predates encoders)."""
        return self.stack_layers(self.ffn_layout.stack)

    def moe_sites(self) -> list[tuple[str, int, SpriMoeBlock]]:
        """`(stack, layer index, block)` of every upcycled FFN, encoder first."""
        sites = []
        for stack in self.config.upcycled_stacks():
            layers, layout = self.stack_layers(stack), self.ffn_layouts[stack]
            sites += [(stack, idx, layers[idx].get_submodule(layout.mlp_attr)) for idx in self.config.upcycled_layers(stack)]
        return sites

    def moe_blocks(self, stack: str | None = None) -> dict[int, SpriMoeBlock]:
        """The upcycled FFN blocks of one stack, by layer index (`moe_sites()` lists every stack's).

        `stack` defaults to the upcycled one; a seq2seq model with both stacks upcycled needs it named.
        """
        stacks = self.config.upcycled_stacks()
        if stack is None:
            if len(stacks) != 1:
                raise ValueError(f"Several stacks are upcycled ({stacks}): pass moe_blocks(stack=...) with one of them.")
            stack = stacks[0]
        elif stack not in stacks:
            raise ValueError(f"stack={stack!r} is not upcycled in this model; its upcycled stacks are {stacks}.")
        return {idx: block for site, idx, block in self.moe_sites() if site == stack}

    def _swap_ffn_blocks(self):
        for stack in self.config.upcycled_stacks():
            layout = self.ffn_layouts[stack]
            layers = self.stack_layers(stack)
            for idx in self.config.upcycled_layers(stack):
                layer = layers[idx]
                shared = layer.get_submodule(layout.mlp_attr) if self.config.shared_expert == "dense" else None
                layer.set_submodule(layout.mlp_attr, SpriMoeBlock(self.config, layout, shared_expert=shared))
                for path in layout.split:  # the MoE block computes the whole FFN
                    layer.set_submodule(path, nn.Identity())
                for name in layout.zero_attrs:
                    setattr(layer, name, 0.0)

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SpriRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (SpriExpertsBase, SpriResidualExperts)):
            for name, param in module.named_parameters(recurse=False):
                if name.endswith("_bias"):
                    init.zeros_(param)
                else:
                    init.normal_(param, mean=0.0, std=std)

    @torch.no_grad()
    def initialize_weights(self):
        # The wrapped dense model dispatches its own `_init_weights`, which knows nothing of the swapped-in
        # SPRI modules: initialise those first, so that the dense pass finds them done.
        for module in self.modules():
            if isinstance(module, (SpriRouter, SpriExpertsBase, SpriResidualExperts)):
                self._initialize_weights(module)
        super().initialize_weights()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading safetensors only unless `use_safetensors=False` is passed
        (pickle files can run code when read), with clear errors for corrupt files and config/weights mismatches."""
        load = super().from_pretrained
        loaded = load_checkpoint(cls, load, pretrained_model_name_or_path, *args, **kwargs)
        # Loading may replace parameters; trainability follows the stage recorded in the config.
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        model.apply_stage_trainability()
        return loaded

    @classmethod
    def from_dense(cls, dense, **settings):
        """Upcycle a dense model into this SPRI class. See `spri_hf.upcycling.upcycle` for every setting."""
        try:
            # not a `from .x import` line: the Hub copy of this file ships without the upcycler
            from . import upcycling
        except ImportError as err:
            raise ImportError(
                "from_dense needs the spri_hf package (this is the modeling code shipped with a checkpoint): "
                "pip install spri_hf, then use spri_hf.SpriForCausalLM.from_dense."
            ) from err
        return upcycling.upcycle(cls, dense, **settings)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, atomic, plus the model card (`README.md`, SPRI section created or updated).

        The modeling and configuration code is saved next to the weights and `config.json` gets an `auto_map`, so the
        folder loads with `trust_remote_code=True` where spri_hf is not installed.
        """
        record_base_model_class(self.config)
        if writes_on_another_rank(self):  # sharded by from_pretrained(distributed_config=...): every rank gathers
            kwargs["is_main_process"] = False
        if not kwargs.get("is_main_process", True) or kwargs.get("push_to_hub", False):
            super().save_pretrained(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                self.create_or_update_model_card(save_directory)
            return

        def save(folder: str):
            super(SpriPreTrainedModel, self).save_pretrained(folder, *args, **kwargs)
            self.create_or_update_model_card(folder)

        save_atomically(save, save_directory)

    def create_or_update_model_card(self, output_dir, repo_id: str | None = None) -> str:
        """Write this model's card into `output_dir/README.md`, keeping any text already there."""
        return write_model_card(self, output_dir, repo_id=repo_id)

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        """`PreTrainedModel.push_to_hub` (weights, config with `auto_map`, code files, model card).

        A failed upload raises an `OSError` that says what failed; nothing local is touched (the upload is made from
        a temporary folder) and the Hub keeps its previous revision, since a commit is all-or-nothing.
        """
        return push_with_clear_errors(super().push_to_hub, repo_id, *args, **kwargs)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # push_to_hub has just replaced README.md with the Hub's (or a blank) card: put the SPRI section back in.
        self.create_or_update_model_card(working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    def apply_stage_trainability(self):
        """Freeze/unfreeze parameters as the current stage prescribes (see `SpriConfig.stage`)."""
        extra = tuple(self.config.stage1_trainable or ())
        frozen = tuple(self.config.stage2_frozen or ())
        for name, param in self.named_parameters():
            if self.config.stage == 1:
                trainable = _is_router_or_residual(name) or any(pattern in name for pattern in extra)
            else:
                trainable = (self.config.stage2_train_all or _is_expert_parameter(name)) and not any(
                    pattern in name for pattern in frozen
                )
            param.requires_grad_(trainable)

    def set_stage(self, stage: int):
        """Switch to `stage` (only 1 -> 2 exists: materialise `W_i = S + B_i A_i`). Idempotent; returns the model."""
        if stage == self.config.stage:
            return self
        if any(type(module).__module__.startswith("peft.") for module in self.modules()):
            # set_stage re-applies SPRI's trainability, which would unfreeze the base weights under an adapter
            raise ValueError(
                "set_stage was called on a PEFT-wrapped model: call set_stage(2) before get_peft_model, or "
                "merge_and_unload() first."
            )
        if not (self.config.stage == 1 and stage == 2):
            raise ValueError(
                f"Cannot go from stage {self.config.stage} to stage {stage}: the only transition is 1 -> 2 "
                "(materialising the residual factors into full experts)."
            )
        for _, _, block in self.moe_sites():
            block.experts = block.experts.materialize()
        self.config.stage = 2
        self.apply_stage_trainability()
        self.init_parallel_plans()  # the stage-2 expert entries now name parameters
        return self

    @contextmanager
    def collect_router_logits(self, enabled: bool = True):
        """Within the context, every MoE block appends its router logits (tokens, experts) to the yielded list.

        `enabled=False` yields an empty list and touches nothing (generation steps pay no overhead).
        """
        sink: list[torch.Tensor] = []
        if not enabled:
            yield sink
            return
        blocks = [block for _, _, block in self.moe_sites()]
        for block in blocks:
            block.router_logits_sink = sink
        try:
            yield sink
        finally:
            for block in blocks:
                block.router_logits_sink = None

    def router_losses(
        self, router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(aux_loss, z_loss)` of one forward pass."""
        return (
            load_balancing_loss(router_logits, self.config.num_experts_per_tok, attention_mask),
            router_z_loss(router_logits, attention_mask),
        )

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def resize_token_embeddings(self, *args, **kwargs):
        """The dense model's own (BART's also resizes its `final_logits_bias`); the new size is recorded in
        `base_config`, which `config.vocab_size` reads."""
        return self.model.resize_token_embeddings(*args, **kwargs)

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()  # None for heads without one (SpriModel, classification)

    def set_output_embeddings(self, new_embeddings):
        self.model.set_output_embeddings(new_embeddings)

    def _forward_with_router_losses(self, labels, output_router_logits, inputs: dict):
        """The wrapped dense model's forward, with the router losses added to `loss` whenever labels are given.

        The output is the dense model's output plus `aux_loss`, `z_loss` and, on request, `router_logits`. Explicit
        forward signatures (in the subclasses) let Trainer keep the right dataset columns; None means "not given".
        """
        inputs = {name: value for name, value in inputs.items() if value is not None}
        inputs.pop("output_router_logits", None)
        if "cache" in inputs and CACHE_NAME != "cache":  # transformers < 5.24 calls it past_key_values
            inputs[CACHE_NAME] = inputs.pop("cache")
        inputs["return_dict"] = True  # the caller's return_dict is applied by `can_return_tuple` on the way out
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        if labels is not None:
            inputs["labels"] = labels
        elif self.training and self.config.router_z_loss_coef and torch.is_grad_enabled():
            raise ValueError(
                f"router_z_loss_coef={self.config.router_z_loss_coef}: the router z-loss is added to the loss this "
                "forward computes from labels, and this training call passes none (the caller computes its own loss, "
                "as TRL's trainers do), so the z-loss would be silently lost. Pass labels, or set "
                "model.config.router_z_loss_coef = 0 to train without it."
            )
        backbone = self.base_model
        backbone._spri_loss_owner = True
        try:
            with self.collect_router_logits(enabled=labels is not None or output_router_logits) as router_logits:
                outputs = self.model(**inputs)
        finally:
            backbone._spri_loss_owner = False
        if router_logits and (labels is not None or output_router_logits):
            # encoder and decoder tokens differ: the mask applies to the layers whose token count it matches
            aux_loss, z_loss = self.router_losses(router_logits, inputs.get("attention_mask"))
            if labels is not None and outputs.get("loss") is not None:
                loss = outputs["loss"] + self.config.router_aux_loss_coef * aux_loss.to(outputs["loss"].device)
                if self.config.router_z_loss_coef:
                    loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.device)
                outputs["loss"] = loss
            outputs["aux_loss"], outputs["z_loss"] = aux_loss, z_loss
        if output_router_logits:
            outputs["router_logits"] = tuple(router_logits)
        return outputs


def _check_vllm_can_run(config: SpriConfig):
    """vLLM's Transformers backend (it sets the attention implementation to "vllm") replaces every experts module
    whose parameters are all 3D by its fused MoE, which computes `down(silu(gate(x)) * up(x))`: refuse the stage-2
    experts it would compute wrongly (another activation, ungated FFNs) rather than serve wrong text."""
    if getattr(config, "_attn_implementation", None) != "vllm" or config.stage != 2:
        return  # stage 1's shared base is 2D: vLLM leaves those experts to this file's eager forward
    reason = config.fused_moe_unsupported_reason()
    if reason is not None:
        raise ValueError(
            f"This SPRI checkpoint cannot run in vLLM's Transformers backend: {reason}. Serve its native export "
            "instead (spri_hf.export_native / `spri-hf export-native`, for Llama, Mistral, Qwen2 and Qwen3 bases), or "
            "run it with transformers."
        )


def _is_router_or_residual(name: str) -> bool:
    return ".router." in name or "_residual_a" in name or "_residual_b" in name


def _is_expert_parameter(name: str) -> bool:
    return ".router." in name or ".experts." in name or ".shared_expert." in name


class SpriModel(SpriPreTrainedModel):
    """The upcycled backbone (no LM head): returns hidden states and, on request, router logits."""

    @can_return_tuple  # return_dict=False (vLLM's Transformers backend passes it) gives a tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        outputs = self._forward_with_router_losses(
            None,
            output_router_logits,
            dict(kwargs, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                 inputs_embeds=inputs_embeds, use_cache=use_cache),
        )  # fmt: skip
        return MoeModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            **{CACHE_NAME: outputs.get(CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.get("router_logits"),
        )


class SpriForCausalLM(SpriPreTrainedModel, GenerationMixin):
    """The upcycled causal LM. With labels, the loss includes the load-balancing and z losses of the routers."""

    _dense_mapping = MODEL_FOR_CAUSAL_LM_MAPPING
    _dense_auto_class = "AutoModelForCausalLM"

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SpriCausalLMOutputWithPast:
        outputs = self._forward_with_router_losses(
            labels,
            output_router_logits,
            dict(kwargs, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                 inputs_embeds=inputs_embeds, use_cache=use_cache, logits_to_keep=logits_to_keep),
        )  # fmt: skip
        return SpriCausalLMOutputWithPast(
            loss=outputs.get("loss"),
            aux_loss=outputs.get("aux_loss"),
            z_loss=outputs.get("z_loss"),
            logits=outputs.logits,
            **{CACHE_NAME: outputs.get(CACHE_NAME)},
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.get("router_logits"),
        )


class _SpriTaskModel(SpriPreTrainedModel):
    """A task head of the dense family (seq2seq, speech seq2seq, classification, masked LM) with SPRI FFNs.

    The forward is the dense model's own, with the router losses added to `loss` whenever labels are given; the output
    is the dense model's output class plus `aux_loss`, `z_loss` and, on request, `router_logits`.
    """


class _SpriGenerativeTaskModel(_SpriTaskModel, GenerationMixin):
    """Seq2seq heads generate through the dense model's own `generate` (Whisper's language / task handling included):
    the wrapped model holds the SPRI blocks, so its generation runs the experts."""

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        input_features: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs=None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ):
        # text models take input_ids, speech models input_features: whichever is given is passed on
        return self._forward_with_router_losses(
            labels,
            output_router_logits,
            dict(
                kwargs,
                input_ids=input_ids,
                input_features=input_features,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                encoder_outputs=encoder_outputs,
                inputs_embeds=inputs_embeds,
                decoder_inputs_embeds=decoder_inputs_embeds,
                use_cache=use_cache,
            ),
        )

    def generate(self, *args, **kwargs):
        self.model.generation_config = self.generation_config
        return self.model.generate(*args, **kwargs)

    def get_encoder(self, *args, **kwargs):
        return self.model.get_encoder(*args, **kwargs)

    def get_decoder(self, *args, **kwargs):
        return self.model.get_decoder(*args, **kwargs)


class SpriForSeq2SeqLM(_SpriGenerativeTaskModel):
    """Text-to-text models (T5, mT5, Marian, M2M100/NLLB, mBART, BART) with SPRI FFNs (decoder stack by default)."""

    _dense_mapping = MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    _dense_auto_class = "AutoModelForSeq2SeqLM"


class SpriForSpeechSeq2Seq(_SpriGenerativeTaskModel):
    """Speech-to-text models (Whisper, Speech2Text) with SPRI FFNs (decoder stack by default)."""

    _dense_mapping = MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING
    _dense_auto_class = "AutoModelForSpeechSeq2Seq"
    main_input_name = "input_features"


class _SpriEncoderTaskModel(_SpriTaskModel):
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,
    ):
        return self._forward_with_router_losses(
            labels,
            output_router_logits,
            dict(
                kwargs,
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                position_ids=position_ids,
                inputs_embeds=inputs_embeds,
            ),
        )


class SpriForSequenceClassification(_SpriEncoderTaskModel):
    """Encoders (BERT, RoBERTa, XLM-R) with SPRI FFNs and the dense family's classification head."""

    _dense_mapping = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING
    _dense_auto_class = "AutoModelForSequenceClassification"


class SpriForMaskedLM(_SpriEncoderTaskModel):
    """Encoders (BERT, RoBERTa, XLM-R) with SPRI FFNs and the dense family's masked-LM head."""

    _dense_mapping = MODEL_FOR_MASKED_LM_MAPPING
    _dense_auto_class = "AutoModelForMaskedLM"


# `save_pretrained` copies this file, its relative imports and an `auto_map` into every checkpoint (remote code).
SpriModel.register_for_auto_class("AutoModel")
SpriForCausalLM.register_for_auto_class("AutoModelForCausalLM")
SpriForSeq2SeqLM.register_for_auto_class("AutoModelForSeq2SeqLM")
SpriForSpeechSeq2Seq.register_for_auto_class("AutoModelForSpeechSeq2Seq")
SpriForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
SpriForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")

__all__ = [
    "SpriExperts",
    "SpriForCausalLM",
    "SpriForMaskedLM",
    "SpriForSeq2SeqLM",
    "SpriForSequenceClassification",
    "SpriForSpeechSeq2Seq",
    "SpriModel",
    "SpriMoeBlock",
    "SpriPreTrainedModel",
    "SpriRouter",
]
