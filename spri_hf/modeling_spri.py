"""SPRI mixture-of-experts models: a dense Hugging Face model whose FFN blocks are sparse experts.

The dense architecture is built as it is (attention, norms, embeddings untouched) and each upcycled FFN is swapped
for a `SpriMoeBlock` = top-k router -> experts (+ optional always-on shared expert). Experts exist in two
parametrizations (see SPRI.md, "Two-stage training"):

- stage 1, `SpriResidualExperts`: one shared frozen base matrix per projection plus trainable low-rank residual
  factors per expert (`W_i = S + B_i A_i`); the base product is computed once per token, not once per expert.
- stage 2, `SpriExperts` and its variants: ordinary fused expert tensors in the transformers v5 layout, dispatched
  through `@use_experts_implementation` (`experts_implementation="eager" | "batched_mm" | "grouped_mm"`).

This file is shipped to the Hub as remote code: it imports only torch, transformers and its relative siblings.
"""

import glob
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_MAPPING,
    GenerationMixin,
    PreTrainedModel,
)
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

# safetensors and huggingface_hub names taken through transformers: the Hub copy of this file imports only torch
# and transformers.
from transformers.modeling_utils import safe_open
from transformers.utils.hub import HfHubHTTPError

from .architectures import get_ffn_layout
from .configuration_spri import SpriConfig
from .model_card import write_model_card


class SpriRouter(nn.Module):
    """Top-k softmax router. Returns `(router_logits, top_k_weights, top_k_index)`."""

    def __init__(self, config: SpriConfig):
        super().__init__()
        layout = get_ffn_layout(config.base_config.model_type)
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

    def __init__(self, config: SpriConfig):
        super().__init__()
        base = config.base_config
        layout = get_ffn_layout(base.model_type)
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
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, tokens)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
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


def experts_class_for(config: SpriConfig) -> type[SpriExpertsBase]:
    layout = get_ffn_layout(config.base_config.model_type)
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

    def __init__(self, config: SpriConfig):
        super().__init__()
        base = config.base_config
        layout = get_ffn_layout(base.model_type)
        self.config = config
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
            experts = experts_class_for(self.config)(self.config).to(reference.dtype)
        parts = 2 if self.has_gate else 1
        num_experts, inter, rank = self.num_experts, self.intermediate_dim, self.rank
        factor_a = getattr(self, f"{self._prefix}_residual_a").view(num_experts, parts, rank, self.hidden_dim)
        factor_b = getattr(self, f"{self._prefix}_residual_b").view(num_experts, parts, inter, rank)
        up = getattr(self, f"{self._prefix}_shared") + torch.matmul(factor_b, factor_a).reshape(num_experts, -1, self.hidden_dim)
        getattr(experts, "gate_up_proj" if self.has_gate else "up_proj").copy_(up)
        experts.down_proj.copy_(self.down_shared + torch.bmm(self.down_residual_b, self.down_residual_a))
        if self.has_bias:
            getattr(experts, f"{self._prefix}_proj_bias").copy_(getattr(self, f"{self._prefix}_proj_bias"))
            experts.down_proj_bias.copy_(self.down_proj_bias)
        return experts


class SpriMoeBlock(nn.Module):
    """Router -> experts, plus an optional always-on shared expert; a drop-in replacement of a dense FFN."""

    def __init__(self, config: SpriConfig, shared_expert: nn.Module | None = None):
        super().__init__()
        layout = get_ffn_layout(config.base_config.model_type)
        self.router = SpriRouter(config)
        self.experts = SpriResidualExperts(config) if config.stage == 1 else experts_class_for(config)(config)
        self.shared_expert = shared_expert
        self.dropout = nn.Dropout(layout.dropout(config.base_config))
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
    router_logits: list[torch.Tensor], top_k: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Switch-Transformer load-balancing loss averaged over MoE layers; 1.0 for perfectly uniform routing.

    `num_experts * sum_e f_e * P_e`, where `f_e` is the share of routed (token, slot) pairs that chose expert e and
    `P_e` the mean router probability of e, both over the non-padding tokens.
    """
    logits = torch.stack([layer_logits.float() for layer_logits in router_logits])  # (layers, tokens, E)
    num_experts = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(dim=-2).float()  # (layers, tokens, E)
    weights = _token_weights(attention_mask, logits.shape[1], logits.device)
    share_routed = (chosen * weights[None, :, None]).sum(1) / (top_k * weights.sum())
    mean_prob = (probs * weights[None, :, None]).sum(1) / weights.sum()
    return num_experts * (share_routed * mean_prob).sum(-1).mean()


def router_z_loss(router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared log-sum-exp of the router logits (ST-MoE), averaged over MoE layers."""
    logits = torch.stack([layer_logits.float() for layer_logits in router_logits])
    weights = _token_weights(attention_mask, logits.shape[1], logits.device)
    z = torch.logsumexp(logits, dim=-1).square()  # (layers, tokens)
    return ((z * weights).sum(-1) / weights.sum()).mean()


def _token_weights(attention_mask: torch.Tensor | None, num_tokens: int, device) -> torch.Tensor:
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.numel() == num_tokens:
        return attention_mask.reshape(-1).to(device=device, dtype=torch.float)
    return torch.ones(num_tokens, device=device)


@dataclass
class SpriCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss (already included in `loss` when labels are given)."""

    z_loss: torch.Tensor | None = None


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
    # Which auto mapping builds the wrapped dense architecture.
    _dense_mapping = MODEL_MAPPING

    def __init__(self, config: SpriConfig):
        super().__init__(config)
        dense_class = self._dense_class(config)
        # The experts live in this wrapper; the dense architecture has none and refuses an experts implementation.
        config.base_config._experts_implementation_internal = None
        self.model = dense_class(config.base_config)
        self._swap_ffn_blocks()
        self.post_init()
        self.apply_stage_trainability()

    @classmethod
    def _dense_class(cls, config: SpriConfig) -> type[PreTrainedModel]:
        get_ffn_layout(config.base_config.model_type)  # clear error for unsupported families
        return cls._dense_mapping[type(config.base_config)]

    @property
    def ffn_layout(self):
        return get_ffn_layout(self.config.base_config.model_type)

    def decoder_layers(self) -> nn.ModuleList:
        """The dense architecture's list of decoder blocks."""
        return getattr(self.model.base_model, self.ffn_layout.layers_attr)

    def moe_blocks(self) -> dict[int, SpriMoeBlock]:
        """Upcycled FFN blocks by layer index."""
        layers = self.decoder_layers()
        return {idx: getattr(layers[idx], self.ffn_layout.mlp_attr) for idx in self.config.upcycled_layers()}

    def _swap_ffn_blocks(self):
        layout = self.ffn_layout
        for idx, layer in enumerate(self.decoder_layers()):
            if idx in self.config.upcycled_layers():
                dense_ffn = getattr(layer, layout.mlp_attr)
                shared = dense_ffn if self.config.shared_expert == "dense" else None
                setattr(layer, layout.mlp_attr, SpriMoeBlock(self.config, shared_expert=shared))

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
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except Exception as err:
            # safetensors' error class is matched by name: the Hub copy of this file imports only torch/transformers
            if type(err).__name__ == "SafetensorError":
                raise OSError(
                    f"Could not read the weights of {pretrained_model_name_or_path}: a safetensors file is corrupt or "
                    f"truncated ({err}). Save or download the checkpoint again."
                ) from err
            mismatch = _first_shape_mismatch(cls, pretrained_model_name_or_path) if isinstance(err, RuntimeError) else None
            if mismatch is None:
                raise
            raise ValueError(
                f"{pretrained_model_name_or_path}: {mismatch}. The config.json and the weights do not belong "
                "together (e.g. num_experts, residual_rank or stage changed); restore the matching config."
            ) from err
        # Loading may replace parameters; trainability follows the stage recorded in the config.
        model.apply_stage_trainability()
        return model

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
        """`PreTrainedModel.save_pretrained`, plus the model card (`README.md`, SPRI section created or updated).

        The modeling and configuration code is saved next to the weights and `config.json` gets an `auto_map`, so the
        folder loads with `trust_remote_code=True` where spri_hf is not installed.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            self.create_or_update_model_card(save_directory)

    def create_or_update_model_card(self, output_dir, repo_id: str | None = None) -> str:
        """Write this model's card into `output_dir/README.md`, keeping any text already there."""
        return write_model_card(self, output_dir, repo_id=repo_id)

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        """`PreTrainedModel.push_to_hub` (weights, config with `auto_map`, code files, model card).

        A failed upload raises an `OSError` that says what failed; nothing local is touched (the upload is made from
        a temporary folder) and the Hub keeps its previous revision, since a commit is all-or-nothing.
        """
        try:
            return super().push_to_hub(repo_id, *args, **kwargs)
        except HfHubHTTPError as err:
            raise OSError(
                f"Pushing the model to the Hub repo {repo_id!r} failed: {err}. Nothing local was changed and no "
                "partial commit was made. Check the endpoint and token (HF_ENDPOINT, HF_TOKEN), then push again; "
                "or save_pretrained() locally and upload the folder later."
            ) from err

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # push_to_hub has just replaced README.md with the Hub's (or a blank) card: put the SPRI section back in.
        self.create_or_update_model_card(working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)

    def apply_stage_trainability(self):
        """Freeze/unfreeze parameters as the current stage prescribes (see `SpriConfig.stage`)."""
        extra = tuple(self.config.stage1_trainable or ())
        for name, param in self.named_parameters():
            if self.config.stage == 1:
                trainable = _is_router_or_residual(name) or any(pattern in name for pattern in extra)
            else:
                trainable = self.config.stage2_train_all or _is_expert_parameter(name)
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
        for block in self.moe_blocks().values():
            block.experts = block.experts.materialize()
        self.config.stage = 2
        self.apply_stage_trainability()
        return self

    @contextmanager
    def collect_router_logits(self):
        """Within the context, every MoE block appends its router logits (tokens, experts) to the yielded list."""
        sink: list[torch.Tensor] = []
        blocks = list(self.moe_blocks().values())
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

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)


def _first_shape_mismatch(model_class, folder) -> str | None:
    """Describe the first tensor of a local checkpoint whose shape differs from what its config builds."""
    if not os.path.isdir(str(folder)):
        return None
    with torch.device("meta"):
        expected = model_class(SpriConfig.from_pretrained(folder)).state_dict()
    for path in sorted(glob.glob(os.path.join(str(folder), "*.safetensors"))):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                shape = list(handle.get_slice(name).get_shape())
                if name in expected and list(expected[name].shape) != shape:
                    return f"tensor {name!r} has shape {shape} in {os.path.basename(path)} but the config expects {list(expected[name].shape)}"
    return None


def _is_router_or_residual(name: str) -> bool:
    return ".router." in name or "_residual_a" in name or "_residual_b" in name


def _is_expert_parameter(name: str) -> bool:
    return ".router." in name or ".experts." in name or ".shared_expert." in name


class SpriModel(SpriPreTrainedModel):
    """The upcycled backbone (no LM head): returns hidden states and, on request, router logits."""

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
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        with self.collect_router_logits() as router_logits:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        return MoeModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=tuple(router_logits) if output_router_logits else None,
        )


class SpriForCausalLM(SpriPreTrainedModel, GenerationMixin):
    """The upcycled causal LM. With labels, the loss includes the load-balancing and z losses of the routers."""

    _dense_mapping = MODEL_FOR_CAUSAL_LM_MAPPING

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def set_output_embeddings(self, new_embeddings):
        self.model.set_output_embeddings(new_embeddings)

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
        if output_router_logits is None:
            output_router_logits = self.config.output_router_logits
        with self.collect_router_logits() as router_logits:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                labels=labels,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        loss, aux_loss, z_loss = outputs.loss, None, None
        if router_logits and (labels is not None or output_router_logits):
            aux_loss, z_loss = self.router_losses(router_logits, attention_mask)
            if labels is not None:
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
                if self.config.router_z_loss_coef:
                    loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.device)
        return SpriCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            z_loss=z_loss,
            logits=outputs.logits,
            cache=getattr(outputs, "cache", None),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=tuple(router_logits) if output_router_logits else None,
        )


# `save_pretrained` copies this file, its relative imports and an `auto_map` into every checkpoint (remote code).
SpriModel.register_for_auto_class("AutoModel")
SpriForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["SpriPreTrainedModel", "SpriModel", "SpriForCausalLM", "SpriMoeBlock", "SpriRouter", "SpriExperts"]
