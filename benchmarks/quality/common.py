"""Constants and imports shared by the quality benchmark's modules."""

import os
from pathlib import Path

from transformers.utils import logging as hf_logging


ROOT = Path(__file__).resolve().parents[2]
SAMPLING_RATE = 16000
FRAMES_PER_SECOND = 50  # Whisper encoder: 1500 states for 30 s
MAX_FRAMES = 1500
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spri_hf" / "quality"
# data language code -> Whisper language token (Whisper has one Chinese token)
WHISPER_LANGUAGE = {"zh-cn": "zh"}

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
