"""Both SPRI training stages in one `Trainer` run: `SpriTrainer`, `SpriSeq2SeqTrainer` and their arguments.

TRL's convention: a `TrainingArguments` subclass carries the method's settings and a `Trainer` subclass runs it.
`SpriTrainer(...).train()` trains stage 1 (residual factors and routers, at `stage1_learning_rate`), switches with
`model.set_stage(2)` at `stage1_steps`, saves a checkpoint there, and trains stage 2 (everything, at `learning_rate`,
after a re-warm-up of `stage2_warmup_steps`) to the end of the run, with one global step and one learning-rate curve.

How the switch works: the stage-1 part is one `Trainer.train` call that stops at the switch step; right before the
Trainer writes the checkpoint of that step, the model is switched and the stage-2 optimizer (state of the parameters
both stages train carried over) and scheduler take the stage-1 ones' place, so the switch checkpoint is a stage-2
checkpoint. Stage 2 is then a second `Trainer.train` call resumed from that checkpoint, which re-wraps the model
(DDP and the optimizer follow the new expert parameters). An uninterrupted run and a run resumed from the switch
checkpoint therefore take the same path.
"""

import inspect
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from transformers import (
    EvalPrediction,
    PreTrainedModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.optimization import get_scheduler
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_callback import ExportableState, TrainerState
from transformers.trainer_utils import TrainOutput, get_last_checkpoint
from transformers.utils import logging

from .callbacks import SpriRouterBiasCallback
from .integrations import SpriHubCallback, add_spri_card_section, find_spri_model, is_spri_model


logger = logging.get_logger(__name__)

# stage1_learning_rate=None means this multiple of learning_rate: low-rank factors conventionally take about 10x the
# full fine-tuning rate (LoRA practice), and one sign step of the stage-1 factors decreases the loss ~20x less than
# one of the dense weights at the same rate (docs/RESULTS.md, "Defaults").
STAGE1_LR_MULTIPLIER = 10.0



@dataclass
class SpriStageArguments:
    """The two-stage schedule; mixed into `SpriTrainingArguments` and `SpriSeq2SeqTrainingArguments`.

    Args:
        stage1_steps (`float`, defaults to 0.25):
            How long stage 1 (residual factors and routers) runs: a whole number >= 1 of optimizer steps, or a fraction
            in (0, 1) of the run's steps. 0 trains stage 2 only. Ignored (plain stage 2) for models without a stage 1:
            `init` other than `"spri"`, or already switched with `set_stage(2)`. The default is the quality benchmark's
            choice (docs/RESULTS.md, "Defaults"): half the run in stage 1 scored significantly below no stage 1 at all,
            a quarter at 10x was level with it. With several target languages, 0 scored significantly above the
            default: for short fine-tuning, 0 is the safer choice.
        stage1_learning_rate (`float`, *optional*):
            Peak learning rate of stage 1. Default: `STAGE1_LR_MULTIPLIER` (10) x `learning_rate`; low-rank factors
            learn far more slowly than full weights at the same rate.
        stage2_warmup_steps (`float`, defaults to 0.1):
            Re-warm-up at the start of stage 2: whole steps (>= 1) or a fraction of stage 2's steps. Restarting AdamW
            at the full rate right after the switch breaks the model (a loss spike); the warm-up avoids it.
            `warmup_steps` (of `TrainingArguments`) is the warm-up of stage 1, or of the whole run without stage 1.
        stage2_carry_optimizer_state (`bool`, defaults to `True`):
            Whether the optimizer state (e.g. AdamW's moments) of the parameters trained in both stages (routers, and
            whatever `stage1_trainable` unfroze) carries over the switch. The new expert tensors and the parameters
            unfrozen by stage 2 always start with a fresh state.
    """

    stage1_steps: float = field(
        default=0.25,
        metadata={"help": "Length of stage 1: optimizer steps (>= 1) or a fraction (0, 1) of the run; 0 = stage 2 only."},
    )
    stage1_learning_rate: float | None = field(
        default=None,
        metadata={"help": f"Peak learning rate of stage 1 (default: {STAGE1_LR_MULTIPLIER:g} x learning_rate)."},
    )
    stage2_warmup_steps: float = field(
        default=0.1,
        metadata={"help": "Re-warm-up at the start of stage 2: steps (>= 1) or a fraction (0, 1) of stage 2."},
    )
    stage2_carry_optimizer_state: bool = field(
        default=True,
        metadata={"help": "Carry the optimizer state of parameters trained in both stages (routers) over the switch."},
    )

    def __post_init__(self):
        _check_steps("stage1_steps", self.stage1_steps)
        _check_steps("stage2_warmup_steps", self.stage2_warmup_steps)
        if self.stage1_learning_rate is not None and not self.stage1_learning_rate > 0:
            raise ValueError(
                f"stage1_learning_rate={self.stage1_learning_rate} must be > 0, or None for "
                f"{STAGE1_LR_MULTIPLIER:g} x learning_rate."
            )
        super().__post_init__()
        if self.stage1_steps >= 1 and self.max_steps > 0 and self.stage1_steps >= self.max_steps:
            raise ValueError(
                f"stage1_steps={self.stage1_steps:g} is not shorter than the run (max_steps={self.max_steps}): stage 2 "
                "would never run. Use fewer steps, a fraction such as 0.25, or set_stage(2) and stage1_steps=0."
            )


def _check_steps(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={value!r} must be a number >= 0: whole steps (>= 1) or a fraction in (0, 1).")
    if value >= 1 and value != int(value):
        raise ValueError(f"{name}={value!r}: a value >= 1 counts steps and must be a whole number (or use a fraction < 1).")


@dataclass
class SpriTrainingArguments(SpriStageArguments, TrainingArguments):
    __doc__ = "`TrainingArguments` plus SPRI's two-stage schedule.\n\n" + SpriStageArguments.__doc__.split("\n\n", 1)[1]


@dataclass
class SpriSeq2SeqTrainingArguments(SpriStageArguments, Seq2SeqTrainingArguments):
    __doc__ = (
        "`Seq2SeqTrainingArguments` plus SPRI's two-stage schedule.\n\n" + SpriStageArguments.__doc__.split("\n\n", 1)[1]
    )


_STAGE_DEFAULTS = {f.name: f.default for f in fields(SpriStageArguments)}


def resolve_steps(value: float, total: int) -> int:
    """Whole steps (value >= 1) or a fraction of `total` (0 < value < 1) as a step count."""
    return int(value) if value >= 1 or value == 0 else max(1, round(value * total))


class SpriStageRecord(TrainerCallback, ExportableState):
    """Keeps the switch step in every checkpoint's `trainer_state.json` (a resumed run needs it for its schedule)."""

    def __init__(self, switch_step: int | None = None):
        self.switch_step = switch_step

    def state(self) -> dict:
        return {"args": {"switch_step": self.switch_step}, "attributes": {}}


class _StageSwitch(TrainerCallback):
    """Switches the trainer's model to stage 2 after the optimizer step that ends stage 1, and asks for a checkpoint."""

    def __init__(self, trainer: "SpriTrainerMixin"):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.trainer.switch_step:
            self.trainer.switch_to_stage2()
            control.should_log = control.should_save = True  # the last stage-1 steps' loss, and the checkpoint
            control.should_training_stop = True
        return control


class SpriTrainerMixin:
    """What `SpriTrainer` and `SpriSeq2SeqTrainer` add to `Trainer` / `Seq2SeqTrainer` (see the module docstring)."""

    _args_class = SpriTrainingArguments

    def __init__(self, *args, **kwargs):
        # the parent trainer's own signature says which argument is `args` and which `optimizers`, positional or not
        parent_init = super().__init__
        bound = inspect.signature(parent_init).bind(*args, **kwargs)
        given = bound.arguments.get("args")
        bound.arguments["args"] = self._args_class(output_dir="trainer_output") if given is None else self._stage_args(given)
        optimizers = bound.arguments.get("optimizers") or (None, None)
        if any(item is not None for item in optimizers):
            raise ValueError(
                "SpriTrainer builds the optimizer and scheduler of each stage itself (the parameters change at the "
                "switch), so optimizers=(optimizer, scheduler) cannot be used; pass optimizer_cls_and_kwargs=(cls, "
                "kwargs) for another optimizer class, and lr_scheduler_type for another schedule shape."
            )
        parent_init(*bound.args, **bound.kwargs)
        self.switch_step: int | None = None  # global step after which the model is in stage 2; None: no stage 1
        self._stage_record = SpriStageRecord()
        self.add_callback(self._stage_record)
        if not any(isinstance(callback, SpriHubCallback) for callback in self.callback_handler.callbacks):
            self.add_callback(SpriHubCallback())  # mid-training pushes carry the code files and the card
        balance = getattr(getattr(find_spri_model(self.model), "config", None), "router_balance", "aux_loss")
        biased = any(isinstance(callback, SpriRouterBiasCallback) for callback in self.callback_handler.callbacks)
        if balance in ("bias", "both") and not biased:
            self.add_callback(SpriRouterBiasCallback())  # the bias moves after every optimizer step
        if getattr(self.args, "fsdp", None) and not self.is_fsdp_enabled and not self.is_fsdp_xla_enabled:
            logger.warning(
                "TrainingArguments(fsdp=...) is set, but accelerate did not enable FSDP (distributed type %s): "
                "accelerate 1.15 enables FSDP on accelerator devices only, so these CPU processes train with DDP, "
                "every rank holding the whole model (docs/DISTRIBUTED.md, 'FSDP').",
                self.accelerator.distributed_type,
            )

    # ---- settings -------------------------------------------------------------------------------------------------
    def _stage_args(self, args: TrainingArguments) -> TrainingArguments:
        """The training arguments the trainer runs with; plain `TrainingArguments` take the stage defaults."""
        return args

    def stage_setting(self, name: str):
        """A two-stage setting of `self.args`, or its default when plain `TrainingArguments` were passed."""
        return getattr(self.args, name, _STAGE_DEFAULTS[name])

    @property
    def stage1_learning_rate(self) -> float:
        value = self.stage_setting("stage1_learning_rate")
        return value if value is not None else STAGE1_LR_MULTIPLIER * self.args.learning_rate

    def spri_model(self):
        """The SPRI model under training (`None` for other models, which train as with `Trainer`)."""
        model = self.model
        if is_spri_model(model):
            return model
        base = model.get_base_model() if hasattr(model, "get_base_model") else None
        if is_spri_model(base) and base.config.stage == 1:
            raise ValueError(
                "SpriTrainer got a PEFT-wrapped SPRI model in stage 1: the switch to stage 2 cannot run under an "
                "adapter. Call set_stage(2) before get_peft_model (then it trains as plain stage 2)."
            )
        return None

    def _current_stage(self) -> int:
        model = self.spri_model()
        return model.config.stage if model is not None else 2

    # ---- training -------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """Train stage 1, switch at `stage1_steps` (checkpoint `checkpoint-<switch step>`), train stage 2 to the end.

        `resume_from_checkpoint` (a folder, or `True` for the last one in `output_dir`) may be any checkpoint of the
        run, before, at or after the switch; the model passed to the trainer may be the fresh stage-1 model.
        """
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir}).")
        elif resume_from_checkpoint is False:
            resume_from_checkpoint = None
        model = self.spri_model()
        record = _checkpoint_switch_step(resume_from_checkpoint) if resume_from_checkpoint else None
        if model is not None and resume_from_checkpoint:
            checkpoint_stage = _checkpoint_stage(resume_from_checkpoint)
            if checkpoint_stage == 2 and model.config.stage == 1:
                model.set_stage(2)  # the checkpoint's weights are loaded into the stage-2 layout
            elif checkpoint_stage == 1 and model.config.stage == 2:
                raise ValueError(
                    f"{resume_from_checkpoint} is a stage-1 checkpoint but the model is in stage 2; pass the model in "
                    "stage 1 (as upcycled by from_dense) to resume it."
                )
        has_stage1 = model is not None and (model.config.stage == 1 or record is not None)
        self.switch_step = record if record is not None else (self.planned_switch_step() if has_stage1 else None)
        if self.switch_step == 0:
            model.set_stage(2)
            self.switch_step = None
        self._stage_record.switch_step = self.switch_step
        if self.switch_step is not None:
            logger.info(
                "SPRI two-stage run: stage 1 for %d steps at learning rate %g, then stage 2 at %g.",
                self.switch_step, self.stage1_learning_rate, self.args.learning_rate,
            )

        if model is not None and model.config.stage == 1:
            self.check_switch_is_supported()
            switch = _StageSwitch(self)
            self.add_callback(switch)
            load_best = self.args.load_best_model_at_end
            self.args.load_best_model_at_end = False  # a stage-1 best checkpoint does not load into stage 2
            start_step = _checkpoint_global_step(resume_from_checkpoint) if resume_from_checkpoint else 0
            try:
                stage1 = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
            finally:
                self.remove_callback(switch)
                self.args.load_best_model_at_end = load_best
            if model.config.stage == 1:  # stopped before the switch (e.g. by another callback)
                return stage1
            self.accelerator.wait_for_everyone()  # rank 0 has written the switch checkpoint
            self.model_wrapped = self.model  # so that stage 2 wraps the new parameters (DDP) afresh
            switch_checkpoint = os.path.join(self.args.output_dir, f"checkpoint-{self.switch_step}")
            stage2 = super().train(switch_checkpoint, trial, ignore_keys_for_eval, **kwargs)
            # one summary for this call: the loss averaged over the steps of both parts, the runtimes added
            steps1, steps2 = self.switch_step - start_step, stage2.global_step - self.switch_step
            loss = (stage1.training_loss * steps1 + stage2.training_loss * steps2) / max(steps1 + steps2, 1)
            metrics = dict(stage2.metrics, train_loss=loss)
            metrics["train_runtime"] = stage1.metrics.get("train_runtime", 0.0) + stage2.metrics.get("train_runtime", 0.0)
            return TrainOutput(stage2.global_step, loss, metrics)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)

    def check_switch_is_supported(self):
        """The in-process switch runs under DDP and FSDP2; elsewhere, a clear error before stage 1 starts."""
        if self.is_deepspeed_enabled:
            raise ValueError(
                "SpriTrainer cannot switch stages inside one run under DeepSpeed: the engine owns the optimizer and "
                "the checkpoints (and, with ZeRO-3, the partitioned stage-1 parameters that set_stage(2) replaces). "
                "Use FSDP2 (fsdp_config={'version': 2}), where the switch runs inside one train(); or train in two "
                "launches: stage 1 with the plain Trainer (the model's trainability is stage 1's) and save_model() "
                "(ZeRO-3: stage3_gather_16bit_weights_on_model_save=true), then SpriForCausalLM.from_pretrained(folder)"
                ".set_stage(2) and SpriTrainer with stage1_steps=0. See docs/DISTRIBUTED.md, 'DeepSpeed'."
            )
        if self.is_fsdp_enabled and "forward" in vars(self.spri_model()):
            # e.g. TRL's fused LM head (add_fused_lm_head), set on the model instance by SFT/DPO/GRPO trainers
            raise ValueError(
                f"{type(self).__name__} under FSDP: the model's forward is patched on the instance (TRL's fused LM "
                "head), and the FSDP2 switch rebuilds the model in stage 2 as a new object, which would lose the patch. "
                "Train the two stages in two launches: stage 1 with the plain TRL trainer (the model's trainability "
                "is stage 1's) and save_model(), then SpriForCausalLM.from_pretrained(folder).set_stage(2) with "
                "stage1_steps=0; or use DDP, where the switch keeps the model object."
            )
        version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) if self.is_fsdp_enabled else 2
        if version != 2:
            raise ValueError(
                f"fsdp_version={version}: SpriTrainer's in-process stage switch re-wraps the model with FSDP2 only. Set "
                "fsdp_config={'version': 2} (accelerate launch --fsdp_version 2); FSDP1 is deprecated in transformers "
                "5.x."
            )

    def planned_switch_step(self) -> int:
        """The step stage 1 ends at, from `stage1_steps` and the run's length; refuses a stage 1 as long as the run."""
        total = self.planned_total_steps()
        switch = resolve_steps(self.stage_setting("stage1_steps"), total)
        if switch >= total:
            rows = len(self.train_dataset) if self.args.max_steps <= 0 and hasattr(self.train_dataset, "__len__") else 0
            over = f" over {rows} examples" if rows else ""
            raise ValueError(
                f"stage1_steps={self.stage_setting('stage1_steps'):g} gives a stage 1 of {switch} steps, not shorter "
                f"than the run ({total} optimizer steps{over}): stage 2 would never run. Use fewer steps or a fraction."
            )
        return switch

    def planned_total_steps(self) -> int:
        """The run's optimizer steps (as `Trainer` counts them)."""
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]

    @torch.no_grad()
    def switch_to_stage2(self):
        """`set_stage(2)` in the middle of training: new optimizer (carried state) and scheduler, same global step.

        Under FSDP2 the sharded stage-1 model is replaced by a new stage-2 model that accelerate shards afresh
        (spri_hf/fsdp.py): `self.model` is a new object afterwards."""
        model = self.spri_model()
        old_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        carry = self.stage_setting("stage2_carry_optimizer_state") and old_optimizer is not None
        if self.is_fsdp_enabled:
            from . import fsdp

            carried = fsdp.optimizer_state_by_name(model, old_optimizer) if carry else {}
            self.optimizer = old_optimizer = None
            model = fsdp.rebuild_in_stage2(
                model, self.accelerator.is_main_process, getattr(self.args, "activation_checkpointing_kwargs", None)
            )
            self.model = self.model_wrapped = model
            self.model, optimizer = fsdp.prepare_rebuilt(self.accelerator, model, self.create_optimizer())
            self.model_wrapped, self.optimizer = self.model, optimizer
            kept = fsdp.carry_optimizer_state(self.model, optimizer, carried)
            fsdp.initialize_missing_state(optimizer)  # the switch checkpoint must hold state for every parameter
        else:
            carried = {}
            if carry:
                carried = {id(p): (p, old_optimizer.state[p]) for g in old_optimizer.param_groups for p in g["params"]}
            model.set_stage(2)
            self.optimizer = None
            optimizer = self.create_optimizer()
            kept = 0
            for group in optimizer.param_groups:
                for param in group["params"]:
                    old = carried.get(id(param))
                    if old is not None and old[0] is param and old[1]:
                        optimizer.state[param] = old[1]
                        kept += 1
        self.lr_scheduler = self._two_stage_scheduler(optimizer, self.state.max_steps, last_epoch=self.state.global_step - 1)
        self.callback_handler.optimizer, self.callback_handler.lr_scheduler = optimizer, self.lr_scheduler
        self.callback_handler.model = self.model
        if self.state.best_model_checkpoint is not None:
            logger.info("SPRI stage switch: the best checkpoint so far is a stage-1 one; best-model tracking restarts.")
            self.state.best_model_checkpoint, self.state.best_metric, self.state.best_global_step = None, None, None
        logger.info(
            "SPRI stage switch after step %d: %d parameter tensors keep their optimizer state; learning rate %g next.",
            self.state.global_step, kept, optimizer.param_groups[0]["lr"],
        )

    # ---- optimizer and schedule -----------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if getattr(self, "switch_step", None) is not None and self._current_stage() == 1:
            for group in optimizer.param_groups:
                group["lr"] = self.stage1_learning_rate
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if self.switch_step is None:  # no stage 1: Trainer's own schedule
            return super().create_scheduler(num_training_steps, optimizer)
        self.lr_scheduler = self._two_stage_scheduler(optimizer or self.optimizer, num_training_steps)
        return self.lr_scheduler

    def _two_stage_scheduler(self, optimizer, num_training_steps: int, last_epoch: int = -1):
        """One `LambdaLR` over the run's global step: stage 1's warm-up and decay, then stage 2's re-warm-up and decay.

        Each optimizer's groups carry their stage's peak rate, so one factor curve serves both optimizers.
        """
        switch = self.switch_step
        if switch >= num_training_steps:
            raise ValueError(f"stage 1 ({switch} steps) is not shorter than the run ({num_training_steps} optimizer steps).")
        stage2_steps = num_training_steps - switch
        stage1 = self._schedule_shape(self.args.get_warmup_steps(switch), switch)
        stage2 = self._schedule_shape(resolve_steps(self.stage_setting("stage2_warmup_steps"), stage2_steps), stage2_steps)

        def factor(step: int) -> float:
            return stage1(step) if step < switch else stage2(step - switch)

        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=last_epoch)

    def _schedule_shape(self, warmup_steps: int, total_steps: int):
        """`lr_scheduler_type`'s factor curve (transformers' own) over one stage."""
        probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = get_scheduler(
            self.args.lr_scheduler_type, optimizer=probe, num_warmup_steps=warmup_steps,
            num_training_steps=total_steps, scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
        )  # fmt: skip
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            raise ValueError(
                f"lr_scheduler_type={str(self.args.lr_scheduler_type)!r} is not a step-wise schedule; SpriTrainer "
                "supports the LambdaLR ones (linear, cosine, constant, constant_with_warmup, polynomial, ...)."
            )
        return scheduler.lr_lambdas[0]

    # ---- sharing --------------------------------------------------------------------------------------------------
    def create_model_card(self, *args, **kwargs):
        """The trainer's own card (transformers' or TRL's), then the SPRI section added back to it."""
        result = super().create_model_card(*args, **kwargs)
        add_spri_card_section(self)
        return result

    # ---- logs -----------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self.spri_model() is not None and "stage" not in logs:
            step = self.state.global_step
            logs = {**logs, "stage": 1 if self.switch_step is not None and step <= self.switch_step else 2}
        super().log(logs, *args, **kwargs)


class SpriTrainer(SpriTrainerMixin, Trainer):
    """`Trainer` that runs both SPRI stages in one `train()`; configure it with `SpriTrainingArguments`."""

    _args_class = SpriTrainingArguments

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: SpriTrainingArguments | TrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init: Callable[..., PreTrainedModel] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, model_init=model_init,
            compute_loss_func=compute_loss_func, compute_metrics=compute_metrics, callbacks=callbacks,
            optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )  # fmt: skip


class SpriSeq2SeqTrainer(SpriTrainerMixin, Seq2SeqTrainer):
    """`Seq2SeqTrainer` that runs both SPRI stages in one `train()`; configure it with
    `SpriSeq2SeqTrainingArguments`."""

    _args_class = SpriSeq2SeqTrainingArguments

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | None = None,
        args: SpriSeq2SeqTrainingArguments | Seq2SeqTrainingArguments | None = None,
        data_collator: Callable | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        model_init: Callable[..., PreTrainedModel] | None = None,
        compute_loss_func: Callable | None = None,
        compute_metrics: Callable[[EvalPrediction], dict] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        preprocess_logits_for_metrics: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(
            model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, model_init=model_init,
            compute_loss_func=compute_loss_func, compute_metrics=compute_metrics, callbacks=callbacks,
            optimizers=optimizers, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )  # fmt: skip


def _checkpoint_stage(checkpoint: str) -> int:
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{checkpoint} has no config.json: not a checkpoint of a Trainer run.")
    with open(path, encoding="utf-8") as handle:
        return int(json.load(handle).get("stage", 2))


def _checkpoint_global_step(checkpoint: str) -> int:
    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    return TrainerState.load_from_json(path).global_step if os.path.isfile(path) else 0


def _checkpoint_switch_step(checkpoint: str) -> int | None:
    path = os.path.join(checkpoint, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        return None
    record = TrainerState.load_from_json(path).stateful_callbacks.get(SpriStageRecord.__name__) or {}
    if isinstance(record, list):
        record = record[0] if record else {}
    return record.get("args", {}).get("switch_step")
