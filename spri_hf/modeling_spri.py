"""SPRI mixture-of-experts models: a dense Hugging Face model whose FFN blocks are sparse experts.

The dense architecture is built as it is (attention, norms, embeddings untouched) and each upcycled FFN is swapped
for a `SpriMoeBlock` = top-k router -> experts (+ optional always-on shared expert); the blocks, both experts
parametrisations and the router losses live in moe_layers.py, the backbone class with recordable router logits in
backbone.py (see spri_hf's docs/METHOD.md).

This file is shipped to the Hub as remote code with its relative imports: they import only torch, transformers and
one another (persistence.py holds how checkpoints are read and written).
"""

from contextlib import contextmanager

import torch
from torch import nn
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
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.utils.generic import can_return_tuple

from .architectures import FfnLayout, get_ffn_layouts
from .backbone import (
    CACHE_NAME,
    SpriCausalLMOutputWithPast,
    install_moe_blocks,
    make_spri_backbone,
    spri_backbone_class,
)
from .configuration_spri import SpriConfig
from .moe_layers import (
    SpriExperts,
    SpriExpertsBase,
    SpriMoeBlock,
    SpriResidualExperts,
    SpriRouter,
    load_balancing_loss,
    real_token_masks,
    router_z_loss,
)
from .parallel import add_expert_parallel_plans, check_distributed_config
from .persistence import SpriCheckpointMixin


class SpriPreTrainedModel(SpriCheckpointMixin, PreTrainedModel):
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
        config.check_vllm_can_run()
        super().__init__(config)
        dense_class = self._dense_class(config)
        if self._dense_mapping is MODEL_MAPPING and dense_class._can_record_outputs:
            # SpriModel: its child is the backbone itself, built as `Spri<DenseBackbone>` through its own __init__ (vLLM's
            # Transformers backend decorates that class's __init__ for torch.compile)
            dense_class = spri_backbone_class(dense_class)
        # The experts live in this wrapper; the dense architecture has none and refuses an experts implementation.
        config.base_config._experts_implementation_internal = None
        self.model = dense_class(config.base_config)
        install_moe_blocks(self)
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

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides by looking for the experts decorator in the source of the model class's own file; SPRI's
        # experts are decorated in moe_layers.py
        return True

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

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SpriRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.e_score_correction_bias is not None:  # bias balancing turned on for a checkpoint without one
                init.zeros_(module.e_score_correction_bias)
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

    def apply_stage_trainability(self):
        """Freeze/unfreeze parameters as the current stage prescribes (see `SpriConfig.stage`).

        Decided by module type, not by parameter names (a dense family may have modules called `router`): stage 1
        trains the `SpriRouter`s and the residual factors of the `SpriResidualExperts`; stage 2 trains everything
        (`stage2_train_all`, the default) or the MoE blocks' routers, experts and shared experts. The config's
        `stage1_trainable` / `stage2_frozen` name substrings add to / take from that.
        """
        stage1, moe = set(), set()
        for block in self.modules():
            if not isinstance(block, SpriMoeBlock):
                continue
            moe.update(map(id, block.parameters()))
            stage1.update(map(id, block.router.parameters()))
            if isinstance(block.experts, SpriResidualExperts):
                stage1.update(map(id, block.experts.residual_factors()))
        extra = tuple(self.config.stage1_trainable or ())
        frozen = tuple(self.config.stage2_frozen or ())
        for name, param in self.named_parameters():
            if self.config.stage == 1:
                trainable = id(param) in stage1 or any(pattern in name for pattern in extra)
            else:
                trainable = (self.config.stage2_train_all or id(param) in moe) and not any(
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

    @contextmanager
    def counting_real_tokens(self, inputs: dict, labels: torch.Tensor | None):
        """Within the context, every bias-balanced router counts the load of real tokens only: padding routes too, and
        counted it would steer the bias (`real_token_masks` says which mask each stack takes)."""
        training = self.training and torch.is_grad_enabled()  # asked first: a serving engine may swap the routers
        routers = [(stack, block.router) for stack, _, block in self.moe_sites()
                   if training and block.router.e_score_correction_bias is not None]  # fmt: skip
        if not routers:
            yield
            return
        masks = real_token_masks(inputs, labels, getattr(self.config.base_config, "is_encoder_decoder", False))
        for stack, router in routers:
            router.load_mask = masks.get(stack)
        try:
            yield
        finally:
            for _, router in routers:
                router.load_mask = None

    def router_losses(
        self, router_logits: list[torch.Tensor], attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(aux_loss, z_loss)` of one forward pass."""
        return (
            load_balancing_loss(router_logits, self.config.num_experts_per_tok, attention_mask),
            router_z_loss(router_logits, attention_mask),
        )

    @torch.no_grad()
    def update_router_biases(self) -> bool:
        """Auxiliary-loss-free balancing, after an optimizer step: move every router's `e_score_correction_bias` by the
        expert load the step's training forwards counted, summed over the processes when torch.distributed is
        initialised (every rank then applies the same update). Returns whether any router balances by bias.
        `SpriRouterBiasCallback` calls it (SpriTrainer and the TRL trainers add it)."""
        routers = [block.router for _, _, block in self.moe_sites() if block.router.e_score_correction_bias is not None]
        if not routers:
            return False
        device = routers[0].e_score_correction_bias.device
        loads = torch.stack([
            router.expert_load.to(device) if router.expert_load is not None else torch.zeros(router.num_experts, device=device)
            for router in routers
        ])  # fmt: skip
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(loads)
        for router, load in zip(routers, loads):  # the rate read now: a change of the config applies at once
            router.update_bias(load, self.config.router_bias_update_rate)
        return True

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
            with (
                self.collect_router_logits(enabled=labels is not None or output_router_logits) as router_logits,
                self.counting_real_tokens(inputs, labels),
            ):
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
    "SpriExpertsBase",
    "SpriForCausalLM",
    "SpriForMaskedLM",
    "SpriForSeq2SeqLM",
    "SpriForSequenceClassification",
    "SpriForSpeechSeq2Seq",
    "SpriModel",
    "SpriMoeBlock",
    "SpriPreTrainedModel",
    "SpriResidualExperts",
    "SpriRouter",
    "load_balancing_loss",
    "router_z_loss",
]
