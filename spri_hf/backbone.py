"""The backbone of a SPRI model: the dense family's backbone class (`LlamaModel`, `BertModel`, ...) with the SPRI
blocks inside, its routers declared in `_can_record_outputs` as Mixtral's and Qwen3-MoE's are.

Shipped with every checkpoint as remote code (imported by modeling_spri.py).
"""

import copy
import functools
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast, MoeModelOutputWithPast


try:  # transformers >= 5.20 (the shipped files load from 5.16 on: see CACHE_NAME)
    from transformers.utils.output_capturing import OutputRecorder
except ImportError:
    from transformers.utils.generic import OutputRecorder

from .configuration_spri import SpriConfig
from .moe_layers import SpriMoeBlock, SpriRouter


# The shipped files are the remote code of every checkpoint: they must load in every transformers 5.x from 5.16 on (the
# ones vLLM and SGLang pin). transformers 5.24 renamed the key/value cache of forwards and outputs from
# `past_key_values` to `cache`: the name this transformers uses.
CACHE_NAME = "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class SpriCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`MoeCausalLMOutputWithPast` plus the router z-loss (already included in `loss` when labels are given)."""

    z_loss: torch.Tensor | None = None


def install_moe_blocks(model) -> None:
    """Replace every upcycled FFN of a SPRI model's dense architecture by a `SpriMoeBlock` (stage and settings from
    `model.config`); with `shared_expert="dense"` the dense FFN becomes the block's always-on shared expert."""
    config = model.config
    for stack in config.upcycled_stacks():
        layout = model.ffn_layouts[stack]
        layers = model.stack_layers(stack)
        for idx in config.upcycled_layers(stack):
            layer = layers[idx]
            shared = layer.get_submodule(layout.mlp_attr) if config.shared_expert == "dense" else None
            layer.set_submodule(layout.mlp_attr, SpriMoeBlock(config, layout, shared_expert=shared))
            for path in layout.split:  # the MoE block computes the whole FFN
                layer.set_submodule(path, nn.Identity())
            for name in layout.zero_attrs:
                setattr(layer, name, 0.0)


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

