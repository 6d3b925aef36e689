"""`model_type="spri"` with transformers' Auto classes (what `import spri_hf` does; the console script calls it for
the commands that load or write SPRI checkpoints without importing the Trainer side of the package)."""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    AutoModelForSpeechSeq2Seq,
)

from .configuration_spri import SpriConfig
from .modeling_spri import (
    SpriForCausalLM,
    SpriForMaskedLM,
    SpriForSeq2SeqLM,
    SpriForSequenceClassification,
    SpriForSpeechSeq2Seq,
    SpriModel,
)


def register_auto_classes():
    """Register SpriConfig and the SPRI model classes with the Auto classes (idempotent)."""
    AutoConfig.register("spri", SpriConfig, exist_ok=True)
    AutoModel.register(SpriConfig, SpriModel, exist_ok=True)
    AutoModelForCausalLM.register(SpriConfig, SpriForCausalLM, exist_ok=True)
    AutoModelForSeq2SeqLM.register(SpriConfig, SpriForSeq2SeqLM, exist_ok=True)
    AutoModelForSpeechSeq2Seq.register(SpriConfig, SpriForSpeechSeq2Seq, exist_ok=True)
    AutoModelForSequenceClassification.register(SpriConfig, SpriForSequenceClassification, exist_ok=True)
    AutoModelForMaskedLM.register(SpriConfig, SpriForMaskedLM, exist_ok=True)
