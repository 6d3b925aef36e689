"""Small hooks into transformers' own tools, installed when `spri_hf` is imported."""

import functools

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
