"""spri_hf: upcycle dense Hugging Face models into sparse mixture-of-experts models with SPRI.

Importing the package registers `model_type="spri"` with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM`,
`AutoModelForSeq2SeqLM`, `AutoModelForSpeechSeq2Seq`, `AutoModelForSequenceClassification` and `AutoModelForMaskedLM`.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
)

from .architectures import FFN_LAYOUTS, FfnLayout, get_ffn_layout, get_ffn_layouts
from .callbacks import SpriMonitorCallback, add_spri_monitor
from .configuration_spri import SpriConfig
from .export import export_native, fold_to_dense
from .initializers import thin_svd
from .integrations import SpriHubCallback, install_trainer_model_card_hook
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
from .streaming import upcycle_checkpoint
from .trainer import (
    SpriSeq2SeqTrainer,
    SpriSeq2SeqTrainingArguments,
    SpriTrainer,
    SpriTrainingArguments,
)


__version__ = "0.1.0"

AutoConfig.register("spri", SpriConfig, exist_ok=True)
AutoModel.register(SpriConfig, SpriModel, exist_ok=True)
AutoModelForCausalLM.register(SpriConfig, SpriForCausalLM, exist_ok=True)
AutoModelForSeq2SeqLM.register(SpriConfig, SpriForSeq2SeqLM, exist_ok=True)
AutoModelForSpeechSeq2Seq.register(SpriConfig, SpriForSpeechSeq2Seq, exist_ok=True)
AutoModelForSequenceClassification.register(SpriConfig, SpriForSequenceClassification, exist_ok=True)
AutoModelForMaskedLM.register(SpriConfig, SpriForMaskedLM, exist_ok=True)
install_trainer_model_card_hook()

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
    "SpriPreTrainedModel",
    "SpriSeq2SeqTrainer",
    "SpriSeq2SeqTrainingArguments",
    "SpriTrainer",
    "SpriTrainingArguments",
    "add_spri_monitor",
    "export_native",
    "fold_to_dense",
    "get_ffn_layout",
    "get_ffn_layouts",
    "thin_svd",
    "upcycle_checkpoint",
]
