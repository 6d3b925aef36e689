"""Leave SPRI behind: export to transformers' native MoE formats, or fold the experts back into the dense model.

- `export_native(model, out_dir)`: a Mixtral (Llama/Mistral/Ministral/SmolLM3/Seed-OSS bases), Qwen2-MoE (Qwen2,
  Seed-OSS with q/k/v biases) or Qwen3-MoE (Qwen3)
  checkpoint that plain transformers loads with no custom code. Only exact exports are written: a model that no
  native format expresses exactly gets a `ValueError` saying why, and every export is checked numerically against
  the SPRI model before anything is written.
- `fold_to_dense(model)`: Experts Weights Averaging, the dense architecture with each FFN the mean of its experts.

Each native format is one small `NativeFormat` class: `unsupported_reason(config)` says why not, `native_config`
builds the target config and `block_tensors` maps one MoE block. Adding a format is adding one class.
"""

import contextlib
import copy
import dataclasses
import os

import torch
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MixtralConfig,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)
from transformers.modeling_utils import local_torch_dtype

from .architectures import FfnLayout, get_ffn_layout
from .configuration_spri import SpriConfig
from .modeling_spri import SpriForCausalLM, SpriPreTrainedModel
from .moe_layers import SpriMoeBlock, SpriResidualExperts
from .persistence import atomic_save
from .torch_tools import module_name
from .utils import is_occupied


# Config fields that describe a file, not a model: never carried from the dense config to the native one.
_NOT_CARRIED = {"model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"}


class NativeFormat:
    """One of transformers' own MoE architectures that an SPRI model can be written as, exactly."""

    model_type: str
    config_class: type[PreTrainedConfig]
    sources: tuple[str, ...]

    def unsupported_reason(self, config: SpriConfig) -> str | None:
        """Why this format cannot express `config` exactly, or `None` when it can."""
        return None

    def moe_fields(self, config: SpriConfig) -> dict:
        raise NotImplementedError

    def native_config(self, config: SpriConfig) -> PreTrainedConfig:
        base = config.base_config.to_dict()
        known = {field.name for field in dataclasses.fields(self.config_class)}
        carried = {key: value for key, value in base.items() if key in known and key not in _NOT_CARRIED}
        carried.update(self.moe_fields(config))
        return self.config_class(**carried)

    def block_tensors(self, block: SpriMoeBlock, experts) -> dict[str, torch.Tensor]:
        """Tensors of one native sparse block, keyed relative to the layer's `mlp`."""
        return {
            "gate.weight": block.router.weight,
            "experts.gate_up_proj": experts.gate_up_proj,
            "experts.down_proj": experts.down_proj,
        }


def _common_reasons(config: SpriConfig, name: str) -> list[str]:
    base = config.base_config
    reasons = []
    if getattr(base, "mlp_bias", False):
        reasons.append(f"the dense FFNs have biases (mlp_bias=True) and {name} experts have none")
    return reasons


def _dense_layers(config: SpriConfig) -> list[int]:
    upcycled = set(config.upcycled_layers())
    return [idx for idx in range(config.base_config.num_hidden_layers) if idx not in upcycled]


class MixtralFormat(NativeFormat):
    model_type = "mixtral"
    config_class = MixtralConfig
    sources = ("llama", "mistral", "ministral", "smollm3", "seed_oss")

    def unsupported_reason(self, config):
        base = config.base_config
        reasons = _common_reasons(config, "Mixtral") + _attention_reasons(base, "Mixtral")
        if getattr(base, "attention_bias", False):
            reasons.append("the attention projections have biases (attention_bias=True); Mixtral's have none")
        if config.shared_expert is not None:
            reasons.append("Mixtral has no shared expert (a Qwen2 base exports a dense shared expert exactly)")
        if _dense_layers(config):
            reasons.append(f"layers {_dense_layers(config)} are dense and every Mixtral layer is a MoE layer")
        if not config.norm_topk_prob:
            reasons.append("norm_topk_prob=False and Mixtral always renormalises the top-k routing weights")
        layer_types = set(getattr(base, "layer_types", None) or ())
        if len(layer_types) > 1:
            reasons.append(
                "the layers mix sliding-window and full attention (layer_types) and Mixtral applies one sliding_window "
                "to every layer"
            )
        return "; ".join(reasons) or None

    def moe_fields(self, config):
        base = config.base_config
        layer_types = set(getattr(base, "layer_types", None) or ())
        # SmolLM3 keeps a sliding_window value while its layers use full attention: Mixtral would apply it
        sliding = None if layer_types == {"full_attention"} else getattr(base, "sliding_window", None)
        return dict(
            num_local_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            router_aux_loss_coef=config.router_aux_loss_coef,  # the same loss function: the same coefficient
            router_jitter_noise=0.0,
            output_router_logits=False,
            sliding_window=sliding,
            intermediate_size=base.intermediate_size // config.expert_granularity,  # one expert's width
        )


def _attention_reasons(base, name: str) -> list[str]:
    """What the attention of the newer Llama-like bases (SmolLM3, Seed-OSS) does that a native MoE's does not."""
    reasons = []
    no_rope = [idx for idx, has_rope in enumerate(getattr(base, "no_rope_layers", None) or ()) if not has_rope]
    if no_rope:
        reasons.append(f"layers {no_rope} use no rotary embedding (NoPE, no_rope_layers) and every {name} layer applies RoPE")
    if getattr(base, "attention_out_bias", False):
        reasons.append(f"the attention output projection has a bias (attention_out_bias=True); {name}'s has none")
    return reasons


def _qwen_moe_fields(config: SpriConfig) -> dict:
    """The MoE fields Qwen2-MoE and Qwen3-MoE share; layers that were not upcycled stay dense (`mlp_only_layers`)."""
    return dict(
        num_experts=config.num_experts,
        num_experts_per_tok=config.num_experts_per_tok,
        norm_topk_prob=config.norm_topk_prob,
        router_aux_loss_coef=config.router_aux_loss_coef,  # the same loss function: the same coefficient
        moe_intermediate_size=config.base_config.intermediate_size // config.expert_granularity,
        mlp_only_layers=_dense_layers(config),
        decoder_sparse_step=1,
        output_router_logits=False,
    )


class Qwen2MoeFormat(NativeFormat):
    model_type = "qwen2_moe"
    config_class = Qwen2MoeConfig
    sources = ("qwen2", "seed_oss")

    def unsupported_reason(self, config):
        base = config.base_config
        if base.model_type == "qwen2":
            return None
        reasons = _common_reasons(config, "Qwen2-MoE") + _attention_reasons(base, "Qwen2-MoE")
        if not getattr(base, "attention_bias", True):
            reasons.append("the q/k/v projections have no biases (attention_bias=False) and Qwen2-MoE's have them")
        return "; ".join(reasons) or None

    def native_config(self, config):
        native = super().native_config(config)
        head_dim = getattr(config.base_config, "head_dim", None)
        if head_dim is not None and head_dim != native.hidden_size // native.num_attention_heads:
            native.head_dim = head_dim  # Seed-OSS: Qwen2-MoE's attention reads config.head_dim when it is set
        return native

    def moe_fields(self, config):
        inter = config.base_config.intermediate_size
        return dict(
            _qwen_moe_fields(config),
            # No shared expert: a width-1 all-zero one adds exactly nothing (see block_tensors).
            shared_expert_intermediate_size=inter if config.shared_expert == "dense" else 1,
            qkv_bias=True,
        )

    def block_tensors(self, block, experts):
        tensors = super().block_tensors(block, experts)
        router = block.router.weight
        if block.shared_expert is not None:
            shared = block.shared_expert
            # Qwen2-MoE multiplies the shared expert by sigmoid(gate(x)): a zero gate gives 0.5, so down is doubled.
            tensors["shared_expert.gate_proj.weight"] = shared.gate_proj.weight
            tensors["shared_expert.up_proj.weight"] = shared.up_proj.weight
            tensors["shared_expert.down_proj.weight"] = 2 * shared.down_proj.weight
            tensors["shared_expert_gate.weight"] = router.new_zeros(1, router.shape[1])
        else:
            # Not zero-width: llama.cpp's qwen2moe needs a shared expert of nonzero width (a width-0 one fails its
            # tensor-shape check), and it computes the gate's sigmoid as silu(z) / z, which is NaN at z = 0: a zero
            # gate times a zero expert would be NaN there. An all-ones gate leaves z = sum(x), zero only by coincidence in
            # practice, and the zero expert makes the product exactly 0 in both transformers and llama.cpp.
            hidden = router.shape[1]
            tensors["shared_expert.gate_proj.weight"] = router.new_zeros(1, hidden)
            tensors["shared_expert.up_proj.weight"] = router.new_zeros(1, hidden)
            tensors["shared_expert.down_proj.weight"] = router.new_zeros(hidden, 1)
            tensors["shared_expert_gate.weight"] = router.new_ones(1, hidden)
        return tensors


class Qwen3MoeFormat(NativeFormat):
    model_type = "qwen3_moe"
    config_class = Qwen3MoeConfig
    sources = ("qwen3",)

    def unsupported_reason(self, config):
        reasons = _common_reasons(config, "Qwen3-MoE")
        if config.shared_expert is not None:
            reasons.append("Qwen3-MoE has no shared expert (a Qwen2 base exports a dense shared expert exactly)")
        return "; ".join(reasons) or None

    def moe_fields(self, config):
        return _qwen_moe_fields(config)


NATIVE_FORMATS: tuple[NativeFormat, ...] = (MixtralFormat(), Qwen2MoeFormat(), Qwen3MoeFormat())


# Why the gated-SiLU families without a native format have none (checked in transformers 5.24's modeling files).
_NO_NATIVE_REASONS = {
    "olmo": "its LayerNorm has no weights (OlmoLayerNorm), where Mixtral's RMSNorm has",
    "olmo2": "it normalises q and k (q_norm / k_norm) and puts its norms after attention and FFN",
    "olmo3": "it normalises q and k (q_norm / k_norm) and puts its norms after attention and FFN",
    "exaone4": "it normalises q and k (q_norm / k_norm) and puts its norms after attention and FFN",
    "cohere": "its blocks run attention and FFN in parallel from one LayerNorm and it scales the logits (logit_scale)",
    "cohere2": "its blocks run attention and FFN in parallel from one LayerNorm and it scales the logits (logit_scale)",
    "stablelm": "it uses LayerNorm with biases and partial rotary embeddings",
    "granite": "it scales embeddings, residuals, attention and logits (embedding_multiplier, residual_multiplier, ...)",
    "helium": "its rotary embedding rotates interleaved (even/odd) channels",
    "ernie4_5": "its rotary embedding rotates interleaved (even/odd) channels",
    "glm": "its rotary embedding is partial and rotates interleaved (even/odd) channels",
    "glm4": "its rotary embedding is partial and interleaved, and it has norms after attention and FFN",
}


def _no_native_reason(config: SpriConfig) -> str:
    base = config.base_config
    layout = get_ffn_layout(base)
    activation = layout.activation(base)
    if not layout.gated:
        return (f"its FFN is plain up/down ({activation}, no gate) and every native MoE expert is a gated SiLU FFN")
    if activation not in ("silu", "swish"):
        return f"its FFN's activation is {activation} and native MoE experts use SiLU"
    return _NO_NATIVE_REASONS.get(base.model_type, "its decoder block differs from Mixtral's and Qwen-MoE's")


def native_format_for(config: SpriConfig) -> NativeFormat:
    """The native format of `config`'s dense family, or a `ValueError` saying why there is none."""
    model_type = config.base_config.model_type
    targets = [fmt for fmt in NATIVE_FORMATS if model_type in fmt.sources]
    if not targets:
        supported = ", ".join(f"{'/'.join(fmt.sources)} -> {fmt.model_type}" for fmt in NATIVE_FORMATS)
        raise ValueError(
            f"No native transformers MoE format expresses a {model_type!r} base exactly: {_no_native_reason(config)} "
            f"(supported: {supported}). "
            "Share the SPRI checkpoint itself (push_to_hub: it loads with trust_remote_code=True), or use "
            "spri_hf.fold_to_dense for a dense model."
        )
    reasons = {fmt.model_type: fmt.unsupported_reason(config) for fmt in targets}
    exact = next((fmt for fmt in targets if reasons[fmt.model_type] is None), None)
    if exact is None:  # a base with two candidate formats (Seed-OSS) says why neither fits
        reason = "; ".join(f"{name}: {why}" if len(targets) > 1 else why for name, why in reasons.items())
        names = " or ".join(fmt.model_type for fmt in targets)
        raise ValueError(
            f"This {model_type} SPRI model cannot be exported to {names} exactly: {reason}. Nothing "
            "was written; no approximate export is made."
        )
    return exact


def _stage2_experts(block: SpriMoeBlock):
    """The block's full experts; stage-1 factors are materialised into a copy (the model itself is unchanged)."""
    return block.experts.materialize() if isinstance(block.experts, SpriResidualExperts) else block.experts


def _unwrap(model) -> SpriPreTrainedModel:
    if not isinstance(model, SpriPreTrainedModel):
        raise TypeError(f"Expected an SPRI model (SpriForCausalLM / SpriModel), got {type(model).__name__}.")
    return model


def _inner_tensors(model: SpriPreTrainedModel) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the wrapped dense architecture, by name (FFN blocks included)."""
    tensors = dict(model.model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.model.named_buffers(remove_duplicate=False)))
    return tensors


def _build_skeleton(model_class, config, like: torch.Tensor) -> PreTrainedModel:
    with torch.no_grad(), local_torch_dtype(like.dtype), torch.device("meta"):
        skeleton = model_class(config)
    return skeleton.to_empty(device=like.device)


def _fill(target: PreTrainedModel, tensors: dict[str, torch.Tensor], what: str):
    """Copy `tensors` into `target` by name (`load_state_dict` checks every shape; the buffers that are not part of a
    state dict, such as rotary frequencies, are copied beside it); every target tensor but the tied ones must be
    filled, and no tensor may be left over."""
    stored = set(target.state_dict())
    report = target.load_state_dict({name: value for name, value in tensors.items() if name in stored}, strict=False)
    buffers = dict(target.named_buffers())
    unexpected = [name for name in tensors if name not in stored and name not in buffers]
    missing = set(report.missing_keys) - set(target.all_tied_weights_keys)
    if missing or unexpected:
        raise RuntimeError(
            f"Internal error: {what} left {sorted(missing)[:5]} unset and has no slot for {sorted(unexpected)[:5]}; "
            "please report it."
        )
    with torch.no_grad():
        for name in set(tensors) - stored:
            buffers[name].copy_(tensors[name])
    target.tie_weights()


def _refuse_routing_bias(model: SpriPreTrainedModel, native_type: str):
    """Bias balancing changes which experts a token visits; the native formats choose by the softmax alone."""
    biased = [
        f"{stack}.{idx}" for stack, idx, block in model.moe_sites()
        if block.router.e_score_correction_bias is not None and block.router.e_score_correction_bias.any()
    ]  # fmt: skip
    if biased:
        raise ValueError(
            f"The routers of layers {biased} carry a non-zero e_score_correction_bias (router_balance="
            f"{model.config.router_balance!r}), which changes the top-k choice, and {native_type} routes by the "
            "softmax alone: the export would route differently. Nothing was written. Share the SPRI checkpoint "
            "(it loads with trust_remote_code=True), or fold_to_dense."
        )


@torch.no_grad()
def to_native(model: SpriForCausalLM):
    """The native transformers MoE model equal to `model` (in memory; see `export_native`)."""
    model = _unwrap(model)
    if not isinstance(model, SpriForCausalLM):
        raise TypeError(
            f"export_native needs a SpriForCausalLM (native MoE checkpoints are causal LMs), got {type(model).__name__}."
        )
    target = native_format_for(model.config)
    _refuse_routing_bias(model, target.model_type)
    native_config = target.native_config(model.config)
    native_config.dtype = model.dtype
    reference = next(model.parameters())
    native = _build_skeleton(MODEL_FOR_CAUSAL_LM_MAPPING[type(native_config)], native_config, reference)

    layers_name = module_name(model.model, model.decoder_layers())
    mlp = model.ffn_layout.mlp_attr
    ffn_prefixes = tuple(f"{layers_name}.{idx}.{mlp}." for idx in model.config.upcycled_layers())
    tensors = {name: value for name, value in _inner_tensors(model).items() if not name.startswith(ffn_prefixes)}
    for idx, block in model.moe_blocks().items():
        for name, value in target.block_tensors(block, _stage2_experts(block)).items():
            tensors[f"{layers_name}.{idx}.{mlp}.{name}"] = value
    _fill(native, tensors, f"the {target.model_type} export")
    if model.generation_config is not None:
        native.generation_config = copy.deepcopy(model.generation_config)
    return native.eval()


@contextlib.contextmanager
def _experts_formed_like(model: SpriPreTrainedModel, native: PreTrainedModel):
    """Within the context, stage-1 experts compute on their formed weights `W_i = S + B_i A_i` (what `set_stage(2)`
    and the export hold) with the native model's experts implementation, instead of the low-rank form.

    The low-rank form rounds differently (`S x + B_i (A_i x)` vs `(S + B_i A_i) x`); where a router is nearly tied,
    that rounding alone can send a token to another expert and move the logits far beyond float rounding, although
    the export equals `set_stage(2)` exactly. The export is what stage 2 computes, so it is checked against that.
    Kernels (grouped_mm, batched_mm) form the weights per layer in the forward; "eager" swaps in materialised copies.
    """
    blocks = [block for _, _, block in model.moe_sites() if isinstance(block.experts, SpriResidualExperts)]
    implementation = getattr(native.config, "_experts_implementation", None) or "eager"
    config, previous = model.config, model.config.stage1_experts_implementation
    residual = {id(block): block.experts for block in blocks}
    try:
        if implementation == "eager":
            for block in blocks:
                block.experts = block.experts.materialize()
        else:
            config.stage1_experts_implementation = implementation
        yield
    finally:
        config.stage1_experts_implementation = previous
        for block in blocks:
            block.experts = residual[id(block)]


def _check_equal_logits(model, native, vocab_size: int):
    """Refuse an export whose logits differ from the SPRI model's (a silent approximation is never written); stage-1
    models are compared on their formed experts (`_experts_formed_like`)."""
    device = next(model.parameters()).device
    probe = torch.arange(1, 17, device=device).remainder(vocab_size - 1).add(1)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _experts_formed_like(model, native):
            expected = model(probe).logits.float()
            got = native(probe).logits.float()
    finally:
        model.train(was_training)
    tolerance = 1e-4 if model.dtype == torch.float32 else 5e-2
    difference = (expected - got).abs().max().item()
    if not difference <= tolerance * max(1.0, expected.abs().max().item()):
        raise ValueError(
            f"The {native.config.model_type} export does not reproduce this model (max logit difference "
            f"{difference:.3g}): some setting of the dense base has no native counterpart. Nothing was written; "
            "please report the base model's config."
        )


def export_native(model: SpriForCausalLM, out_dir: str | os.PathLike, *, overwrite: bool = False, verify: bool = True):
    """Write `model` as a native transformers MoE checkpoint that loads with no custom code.

    Llama, Mistral, Ministral, SmolLM3 and bias-free Seed-OSS bases become Mixtral, Qwen2 (and Seed-OSS with q/k/v
    biases) becomes Qwen2-MoE (a dense shared expert is exact: zero shared
    gate, doubled shared down projection; non-upcycled layers stay dense via `mlp_only_layers`) and Qwen3 becomes
    Qwen3-MoE. A stage-1 model is exported after materialising its experts (`W_i = S + B_i A_i`) into a copy; the
    model passed in is not changed. Anything no native format expresses exactly raises a `ValueError` saying why.

    Args:
        model: a `SpriForCausalLM`.
        out_dir: folder to write; written to a temporary sibling and renamed, so it is never half written.
        overwrite: replace `out_dir` if it exists (otherwise `FileExistsError`).
        verify: compare the logits of both models on a probe sequence before writing (refuses on any difference
            beyond float rounding).

    Returns:
        The native model (`MixtralForCausalLM`, `Qwen2MoeForCausalLM` or `Qwen3MoeForCausalLM`).
    """
    out_dir = os.path.abspath(out_dir)
    if is_occupied(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True to replace it, or choose another folder.")
    native = to_native(model)
    if verify:
        _check_equal_logits(model, native, native.config.vocab_size)
    atomic_save(native, out_dir, overwrite=overwrite)
    return native


def _write_dense_ffn(mlp: torch.nn.Module, layout: FfnLayout, experts, gated: bool, granularity: int = 1):
    """Set a dense FFN to the mean of the experts (views from `FfnLayout.ffn_weights` write through). Fine-grained
    experts (`expert_granularity` G) are averaged per slice, the slices laid side by side and the down projection
    divided by G again."""
    matrices, biases = layout.ffn_weights(mlp)
    up_names = ("gate", "up") if gated else ("up",)
    prefix = "gate_up" if gated else "up"

    def per_slice(tensor: torch.Tensor) -> torch.Tensor:  # (E, ...) -> (G, ...): the mean of each slice's experts
        return tensor.view(-1, granularity, *tensor.shape[1:]).mean(0)

    up = per_slice(getattr(experts, f"{prefix}_proj")).chunk(len(up_names), dim=1)  # each (G, I / G, H)
    for proj, value in zip(up_names, up):
        matrices[proj].copy_(value.flatten(0, 1))
    down = per_slice(experts.down_proj)  # (G, H, I / G)
    matrices["down"].copy_(down.transpose(0, 1).flatten(1) / granularity)
    if biases:
        up_bias = per_slice(getattr(experts, f"{prefix}_proj_bias")).chunk(len(up_names), dim=1)
        for proj, value in zip(up_names, up_bias):
            biases[proj].copy_(value.flatten())
        biases["down"].copy_(experts.down_proj_bias.mean(0))


@torch.no_grad()
def fold_to_dense(model: SpriPreTrainedModel) -> PreTrainedModel:
    """Average the experts back into the dense architecture (Experts Weights Averaging).

    Each upcycled FFN becomes the mean of its routed experts (stage-1 factors are materialised first); every other
    tensor is copied. The result is an instance of the base model's own class (`LlamaForCausalLM`, ...), which
    transformers loads with no custom code. `init="copy"` models, or any model whose experts are still equal, fold
    back to exactly the dense model; trained experts fold to their average, an approximation of the MoE.

    Raises:
        ValueError: with a dense shared expert (the sum of two FFNs is not one FFN of the same width).
    """
    model = _unwrap(model)
    config = model.config
    if config.shared_expert is not None:
        raise ValueError(
            f"fold_to_dense cannot fold shared_expert={config.shared_expert!r}: the shared expert plus the averaged "
            "routed experts are two FFNs, which no single FFN of the dense width expresses. Use export_native "
            "(a Qwen2 base keeps the shared expert exactly) or share the SPRI checkpoint."
        )
    base_config = copy.deepcopy(config.base_config)
    reference = next(model.parameters())
    dense = _build_skeleton(model._dense_class(config), base_config, reference)

    ffn_prefixes, folded = [], {}
    for stack, idx, block in model.moe_sites():
        layout = model.ffn_layouts[stack]
        layers_name = module_name(model.model, model.stack_layers(stack))
        ffn_prefixes += [f"{layers_name}.{idx}.{path}." for path in layout.ffn_paths()]
        owner = layout.ffn_owner(layout.layers(dense)[idx])
        _write_dense_ffn(owner, layout, _stage2_experts(block), layout.gated, config.expert_granularity)
        owner_name = f"{layers_name}.{idx}" + ("" if layout.split else f".{layout.mlp_attr}")
        for name, value in list(owner.named_parameters()) + list(owner.named_buffers()):
            folded[f"{owner_name}.{name}"] = value.detach().clone()
    tensors = {name: value for name, value in _inner_tensors(model).items() if not name.startswith(tuple(ffn_prefixes))}
    tensors.update({name: value for name, value in folded.items() if name not in tensors})
    _fill(dense, tensors, "the folded dense model")
    if getattr(model, "generation_config", None) is not None and dense.can_generate():
        dense.generation_config = copy.deepcopy(model.generation_config)
    return dense.eval()


__all__ = ["NATIVE_FORMATS", "NativeFormat", "export_native", "fold_to_dense", "native_format_for", "to_native"]
