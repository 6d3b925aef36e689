"""Small hooks into transformers' own tools, installed when `spri_hf` is imported."""

import functools
import glob
import os
import shutil

from transformers import Trainer


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


def install_trainer_checkpoint_push_hook():
    """Make the pushes Trainer makes at every save (`push_to_hub=True`) upload the SPRI code files and card too.

    `Trainer._push_from_checkpoint` copies only the config and weights from the checkpoint folder to the folder it
    uploads, so a mid-training revision on the Hub would have an `auto_map` naming code files it lacks. For SPRI
    models the code files and the card are copied along. Other models are untouched. Idempotent.
    """
    original = getattr(Trainer, "_push_from_checkpoint", None)
    if original is None or getattr(original, "_spri_hook", False):
        return

    @functools.wraps(original)
    def _push_from_checkpoint(self, checkpoint_folder):
        model = self.accelerator.unwrap_model(self.model)
        if self.is_world_process_zero() and _is_spri_model(model):
            for path in glob.glob(os.path.join(checkpoint_folder, "*.py")) + [os.path.join(checkpoint_folder, "README.md")]:
                if os.path.isfile(path):
                    shutil.copy(path, os.path.join(self.args.output_dir, os.path.basename(path)))
        return original(self, checkpoint_folder)

    _push_from_checkpoint._spri_hook = True
    Trainer._push_from_checkpoint = _push_from_checkpoint
