"""SPRI's two-stage schedule in TRL's trainers: `SpriSFTTrainer` / `SpriSFTConfig` and `SpriDPOTrainer` /
`SpriDPOConfig` (`pip install "spri_hf[trl]"`).

Each is TRL's trainer with `SpriTrainerMixin` in front, the same schedule `SpriTrainer` runs: stage 1 (routers and
residual factors) at `stage1_learning_rate`, the switch to stage 2 after `stage1_steps` with a checkpoint there, a
re-warm-up, the optimizer state of the parameters both stages train carried over, one global step and one
learning-rate curve with `stage` in the logs, and `resume_from_checkpoint` from any checkpoint. Everything else is
TRL's: data formats, chat templates, completion-only and assistant-only loss, packing, the DPO losses.

Any other `Trainer` subclass gets the schedule the same way, in three lines::

    @dataclass
    class SpriGRPOConfig(SpriStageArguments, GRPOConfig): ...
    class SpriGRPOTrainer(SpriTrainerMixin, GRPOTrainer): _args_class = SpriGRPOConfig

A model given with `peft_config` is wrapped by TRL before training starts, and a stage-1 model cannot switch under
an adapter: switch first (`model.set_stage(2)`) and train the adapter in stage 2, where it trains as with TRL alone.
"""

from dataclasses import dataclass, fields

from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from .trainer import SpriStageArguments, SpriTrainerMixin, logger


def _stage_doc(base: type) -> str:
    return f"`{base.__name__}` plus SPRI's two-stage schedule.\n\n" + SpriStageArguments.__doc__.split("\n\n", 1)[1]


@dataclass
class SpriSFTConfig(SpriStageArguments, SFTConfig):
    __doc__ = _stage_doc(SFTConfig)


@dataclass
class SpriDPOConfig(SpriStageArguments, DPOConfig):
    __doc__ = _stage_doc(DPOConfig)


class _SpriTRLTrainerMixin(SpriTrainerMixin):
    """Takes TRL's plain config class too: it is converted to the SPRI one, with the stage defaults, and said so."""

    def _stage_args(self, args):
        if isinstance(args, SpriStageArguments):
            return args
        converted = _with_stage_defaults(args, self._args_class)
        logger.warning(
            "%s got a plain %s: the SPRI stage settings take their defaults (%s). Pass a %s to set them.",
            type(self).__name__, type(args).__name__,
            ", ".join(f"{f.name}={getattr(converted, f.name)}" for f in fields(SpriStageArguments)),
            self._args_class.__name__,
        )  # fmt: skip
        return converted


def _with_stage_defaults(config, spri_class: type):
    """`config` (a TRL config) as an instance of `spri_class`, every field it sets kept."""
    values = {f.name: getattr(config, f.name) for f in fields(config) if f.init and hasattr(config, f.name)}
    return spri_class(**values)


class SpriSFTTrainer(_SpriTRLTrainerMixin, SFTTrainer):
    """TRL's `SFTTrainer` running both SPRI stages in one `train()`; configure it with `SpriSFTConfig`."""

    _args_class = SpriSFTConfig


class SpriDPOTrainer(_SpriTRLTrainerMixin, DPOTrainer):
    """TRL's `DPOTrainer` running both SPRI stages in one `train()`; configure it with `SpriDPOConfig`.

    The reference model stays as TRL builds it (by default the policy's checkpoint, in the policy's starting stage):
    it is frozen, so its stage does not change what it computes."""

    _args_class = SpriDPOConfig


__all__ = ["SpriDPOConfig", "SpriDPOTrainer", "SpriSFTConfig", "SpriSFTTrainer"]
