"""spri_hf: upcycle dense Hugging Face models into sparse mixture-of-experts models with SPRI.

Importing the package registers `model_type="spri"` with `AutoConfig`, `AutoModel`, `AutoModelForCausalLM`,
`AutoModelForSeq2SeqLM`, `AutoModelForSpeechSeq2Seq`, `AutoModelForSequenceClassification` and `AutoModelForMaskedLM`.
The public names live in `spri_hf/api.py`; this file re-exports them.
"""

import importlib as _importlib
import os as _os
import sys as _sys


__version__ = "0.2.0"

# The `spri-hf` console script parses its arguments before it imports torch and transformers, so that `--help` and
# argument errors answer at once; once it knows the command it imports what that command needs (`spri_hf.cli`).
# Every other `import spri_hf` imports and registers everything right here.
_CONSOLE_SCRIPT = _os.path.basename(_sys.argv[0]) == "spri-hf" if _sys.argv else False

if not _CONSOLE_SCRIPT:
    from . import api
    from .api import *  # noqa: F403

    __all__ = api.__all__
else:

    def __getattr__(name: str):
        """The public names on first use (the console script's process, after its arguments were parsed)."""
        if name.startswith("__"):
            raise AttributeError(name)
        # not `from . import api`: that statement asks this module for `api` first, i.e. calls this function again
        api = _importlib.import_module(f"{__name__}.api")
        try:
            return getattr(api, name)
        except AttributeError:
            raise AttributeError(f"module 'spri_hf' has no attribute {name!r}") from None
