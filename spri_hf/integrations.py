"""Hooks into transformers' own tools: the Trainer card hook (installed when `spri_hf` is imported) and the
checkpoint-push callback."""

import functools
import glob
import os
import shutil

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


def _is_spri_model(model) -> bool:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "spri" and hasattr(model, "create_or_update_model_card")


def install_trainer_model_card_hook():
    """Make `Trainer.create_model_card` keep the SPRI section of the card.

    `Trainer.push_to_hub` writes its own training card over `README.md` right before uploading; for SPRI models the
    SPRI section (base model, settings, parameter counts, license, how to load) is added back, as transformers does
    for PEFT adapters. Other models are untouched. Idempotent.
    """
    original = Trainer.create_model_card
    if getattr(original, "_spri_hook", False):
        return

    @functools.wraps(original)
    def create_model_card(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if self.is_world_process_zero() and _is_spri_model(model):
            model.create_or_update_model_card(self.args.output_dir, repo_id=self.hub_model_id)
        return result

    create_model_card._spri_hook = True
    Trainer.create_model_card = create_model_card


class SpriHubCallback(TrainerCallback):
    """Make the pushes Trainer makes at every save (`push_to_hub=True`) upload the SPRI code files and card too.

    Trainer copies only the config and weights from the checkpoint folder into the folder it uploads, so without this
    a mid-training revision on the Hub has an `auto_map` naming code files it lacks. On `on_push_begin` (Trainer's
    public hook, called right before that copy) the code files and the card of the checkpoint just saved are copied
    along. `SpriTrainer` and `SpriSeq2SeqTrainer` add it themselves; with a plain `Trainer` pass
    `callbacks=[SpriHubCallback()]`. Other models are untouched.
    """

    def on_push_begin(self, args, state, control, model=None, **kwargs):
        if not state.is_world_process_zero or not _is_spri_model(model):
            return
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        for path in glob.glob(os.path.join(checkpoint, "*.py")) + [os.path.join(checkpoint, "README.md")]:
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(args.output_dir, os.path.basename(path)))
