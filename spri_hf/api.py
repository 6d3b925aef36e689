"""The public API that `spri_hf` re-exports, and its registration with transformers' Auto classes.

Importing this module registers `model_type="spri"` with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM`,
`AutoModelForSeq2SeqLM`, `AutoModelForSpeechSeq2Seq`, `AutoModelForSequenceClassification` and
`AutoModelForMaskedLM`. `import spri_hf` imports it (see `spri_hf/__init__.py`).
"""

from .architectures import FFN_LAYOUTS, FfnLayout, get_ffn_layout, get_ffn_layouts
from .callbacks import SpriMonitorCallback, SpriRouterBiasCallback, add_spri_monitor
from .configuration_spri import SpriConfig
from .export import export_native, fold_to_dense
from .integrations import SpriHubCallback
from .modeling_spri import (
    SpriForCausalLM,
    SpriForMaskedLM,
    SpriForSeq2SeqLM,
    SpriForSequenceClassification,
    SpriForSpeechSeq2Seq,
    SpriModel,
    SpriMoeBlock,
    SpriPreTrainedModel,
)
from .registration import register_auto_classes
from .router_init import init_routers
from .trainer import (
    SpriSeq2SeqTrainer,
    SpriSeq2SeqTrainingArguments,
    SpriStageArguments,
    SpriTrainer,
    SpriTrainerMixin,
    SpriTrainingArguments,
)
from .upcycling import upcycle_checkpoint
from .upcycling.initializers import thin_svd


register_auto_classes()

__all__ = [
    "FFN_LAYOUTS",
    "FfnLayout",
    "SpriConfig",
    "SpriForCausalLM",
    "SpriForMaskedLM",
    "SpriForSeq2SeqLM",
    "SpriForSequenceClassification",
    "SpriForSpeechSeq2Seq",
    "SpriHubCallback",
    "SpriModel",
    "SpriMoeBlock",
    "SpriMonitorCallback",
    "SpriRouterBiasCallback",
    "SpriPreTrainedModel",
    "SpriSeq2SeqTrainer",
    "SpriSeq2SeqTrainingArguments",
    "SpriStageArguments",
    "SpriTrainer",
    "SpriTrainerMixin",
    "SpriTrainingArguments",
    "add_spri_monitor",
    "export_native",
    "fold_to_dense",
    "get_ffn_layout",
    "get_ffn_layouts",
    "init_routers",
    "thin_svd",
    "upcycle_checkpoint",
]
