"""Presets, titles and constants shared by the performance benchmark's modules."""

import sys
from pathlib import Path

from transformers.utils import logging as hf_logging

import spri_hf  # noqa: F401  (registers model_type "spri")


hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parents[2]
# how a figure starts its measured child processes (`python -m benchmarks.perf _stage-memory ...`)
COMMAND = [sys.executable, "-m", "benchmarks.perf"]
FIGURES = ("block", "stage", "upcycle", "mergekit", "generate", "stream")
IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
MERGEKIT_VENV = ROOT / "benchmarks" / ".venv-mergekit"
# torch first: a plain torch requirement pulls the newest release with GBs of CUDA wheels
MERGEKIT_SETUP = "python3 -m venv {venv} && {venv}/bin/pip install torch==2.13.0 && {venv}/bin/pip install mergekit"

# Model shapes: `layers`, `hidden`, `intermediate` (the dense FFN = one expert), `heads`, `kv_heads`, `vocab`.
QWEN3_TINY = dict(layers=2, hidden=32, intermediate=48, heads=4, kv_heads=2, vocab=97)
QWEN3_SMALL = dict(layers=2, hidden=256, intermediate=384, heads=4, kv_heads=2, vocab=2048)
# Expert width 768 is Qwen3-30B-A3B's `moe_intermediate_size`; hidden is half of its 2048, and 16 experts top-2 stand
# in for its 128 top-8, so the per-expert GEMMs (~128 routed tokens each at 1024 tokens) keep a realistic size while
# one forward+backward of a block takes 0.3-2 s on one CPU core.
QWEN3_FULL = dict(layers=4, hidden=1024, intermediate=768, heads=16, kv_heads=8, vocab=4096)
QWEN25_05B = dict(layers=24, hidden=896, intermediate=4864, heads=14, kv_heads=2, vocab=151936)
QWEN25_15B = dict(layers=28, hidden=1536, intermediate=8960, heads=12, kv_heads=2, vocab=151936)

# Per figure: shapes, `experts` / `top_k`, `warmup` + `repeats` (timed in-process calls), `runs` (fresh processes per
# measured command); `jobs`: measured processes at once (tiny is a smoke test: its process timings do not count).
PRESETS = {
    "tiny": {
        "block": dict(QWEN3_TINY, layers=1, experts=4, top_k=2, tokens=64, batched_mm_mb=64, warmup=1, repeats=3),
        "stage": dict(QWEN3_TINY, experts=4, top_k=2, batch=2, seq=16, warmup=1, repeats=3, memory_steps=2),
        "upcycle": dict(QWEN3_TINY, experts=8, top_k=2, runs=1, svd_shape=(32, 48), svd_repeats=3),
        "mergekit": None,
        "generate": dict(QWEN3_TINY, experts=4, top_k=2, prompt=8, new_tokens=8, batches=(1, 8), warmup=1, repeats=2),
        "stream": dict(QWEN3_TINY, experts=8, top_k=2, dtype="bfloat16"),
        "jobs": 4,
    },
    "small": {
        "block": dict(QWEN3_SMALL, layers=1, experts=8, top_k=2, tokens=512, batched_mm_mb=256, warmup=1, repeats=5),
        "stage": dict(QWEN3_SMALL, experts=8, top_k=2, batch=4, seq=64, warmup=1, repeats=5, memory_steps=3),
        "upcycle": dict(QWEN25_05B, layers=4, vocab=8192, experts=8, top_k=2, runs=1, svd_shape=(896, 4864),
                        svd_repeats=3),
        "mergekit": dict(experts=8, top_k=2, runs=3),
        "generate": dict(QWEN3_SMALL, experts=8, top_k=2, prompt=16, new_tokens=16, batches=(1, 8), warmup=1,
                         repeats=3),
        "stream": dict(QWEN25_15B, layers=4, vocab=8192, experts=8, top_k=2, dtype="bfloat16"),
        "jobs": 1,
    },
    "full": {
        "block": dict(QWEN3_FULL, layers=1, experts=16, top_k=2, tokens=1024, batched_mm_mb=768, warmup=1,
                      repeats=7),
        "stage": dict(QWEN3_FULL, experts=16, top_k=2, batch=4, seq=256, warmup=1, repeats=5, memory_steps=3),
        "upcycle": dict(QWEN25_05B, experts=8, top_k=2, runs=1, svd_shape=(896, 4864), svd_repeats=3),
        "mergekit": dict(experts=8, top_k=2, runs=3),
        "generate": dict(QWEN3_FULL, experts=16, top_k=2, prompt=32, new_tokens=32, batches=(1, 8), warmup=1,
                         repeats=5),
        "stream": dict(QWEN25_15B, experts=8, top_k=2, dtype="bfloat16"),
        "jobs": 1,
    },
}

TITLES = {
    "block": "(a) MoE block: SpriMoeBlock (stage 2) vs transformers' Qwen3MoeSparseMoeBlock",
    "stage": "(b) training step: stage 1 (shared principal + residual factors) vs stage 2 (full experts)",
    "upcycle": "(c) upcycling a Qwen2.5-0.5B-shaped checkpoint: spri vs copy, default SVD vs plain SVD",
    "mergekit": "(d) spri-hf upcycle vs mergekit-moe on the real SmolLM2-135M",
    "generate": "(e) greedy generation: SPRI model vs its native Qwen3-MoE export",
    "stream": "(stream) spri-hf upcycle --dtype bfloat16 of a Qwen2.5-1.5B-shaped checkpoint",
}
