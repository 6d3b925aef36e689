"""The one SPRI-model check, and hooks into transformers' own tools: the SPRI section of the card a trainer writes (SPRI's trainers add it; nothing
is patched at import) and the checkpoint-push callback."""

import glob
import os
import shutil

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


def is_spri_model(model) -> bool:
    """Whether `model` is a SPRI model: spri_hf's classes, or the copy a checkpoint's remote code defines (so the
    check is by config and interface, not by class)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "spri" and callable(getattr(model, "moe_sites", None))


def find_spri_model(model):
    """The SPRI model inside `model` (itself, or wrapped by DDP, accelerate, PEFT or `torch.compile`), else `None`."""
    if model is None:
        return None
    return next((module for module in model.modules() if is_spri_model(module)), None)


def add_spri_card_section(trainer) -> None:
    """After a trainer wrote its training card into `output_dir/README.md` (`create_model_card`, right before a push
    uploads the folder), add the SPRI section back (base model, settings, parameter counts, license, how to load), as
    transformers does for PEFT adapters. SPRI's trainers call it from their `create_model_card`; other models are left
    as they are."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_world_process_zero() and is_spri_model(model):
        model.create_or_update_model_card(trainer.args.output_dir, repo_id=trainer.hub_model_id)


class SpriHubCallback(TrainerCallback):
    """Make the pushes Trainer makes at every save (`push_to_hub=True`) upload the SPRI code files and card too.

    Trainer copies only the config and weights from the checkpoint folder into the folder it uploads, so without this
    a mid-training revision on the Hub has an `auto_map` naming code files it lacks. On `on_push_begin` (Trainer's
    public hook, called right before that copy) the code files and the card of the checkpoint just saved are copied
    along. SPRI's trainers (`SpriTrainer`, `SpriSeq2SeqTrainer`, `spri_hf.trl`'s) add it themselves; with another
    trainer pass `callbacks=[SpriHubCallback()]`. Other models are untouched.
    """

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or not is_spri_model(model):
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        for path in glob.glob(os.path.join(checkpoint, "*.py")) + [os.path.join(checkpoint, "README.md")]:
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(args.output_dir, os.path.basename(path)))
