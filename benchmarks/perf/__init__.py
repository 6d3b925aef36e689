"""Performance of spri_hf: every figure is a ratio of two things measured side by side in one run.

A shared CPU makes absolute timings noisy, so each figure times SPRI and its reference in the same process (calls
alternate A B / B A after a warm-up; the median of the repeats is kept) or, for whole commands, in fresh processes run
one after the other, with the peak RSS of each read from the kernel (`wait4`).

    python -m benchmarks.perf COMMAND [--device cpu|cuda] [--preset tiny|small|full] [--repeats N] [--out FILE]

Commands (one per figure; `all` runs every figure in one run):
    block     MoE block forward and forward+backward tokens/s: `SpriMoeBlock` (stage 2) vs transformers'
              `Qwen3MoeSparseMoeBlock`, same shapes, weights and `experts_implementation` (eager, batched_mm,
              grouped_mm). Target: spri/native >= 0.95.
    stage     stage 1 vs stage 2 training step (forward, backward, AdamW step) at equal shapes: time, trainable
              parameters, optimizer state, peak memory. Target: stage 1 no slower, far fewer trainable parameters
              and optimizer bytes.
    upcycle   `spri-hf upcycle` of a Qwen2.5-0.5B-shaped random checkpoint into 8 experts: spri vs copy (time, peak
              RSS), and the default SVD method vs plain `torch.linalg.svd` per matrix (time, accuracy). Targets: SVD
              >= 3x faster at relative reconstruction error <= 1e-5 (fp32); spri <= 3x copy's time.
    mergekit  `mergekit-moe` (gate_mode random, 8 copies, fp32; in its own virtual environment) vs `spri-hf upcycle
              --init spri` of the real SmolLM2-135M. Target: spri no slower and no larger in peak RSS.
    generate  greedy generation tokens/s of an SPRI model vs the same model exported to native Qwen3-MoE, batch 1
              and 8. Target: spri/native >= 0.95.
    stream    `spri-hf upcycle --dtype bfloat16` of a Qwen2.5-1.5B-shaped bf16 checkpoint: wall time and peak RSS
              against the checkpoint sizes, then `from_pretrained` of the result and one forward.

Presets: `tiny` runs everything on tiny shapes (the test suite's slow tier runs it so that the script never rots;
it skips `mergekit`), `small` in a few minutes, `full` (default) uses Qwen3- and Qwen2.5-sized shapes
(benchmarks/perf/common.py). The random checkpoints and the SmolLM2 folder are written once to `--cache-dir` and
reused. Only the public API of spri_hf is used.
"""

import os
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# the measured child processes (`python -m benchmarks.perf ...`) import this package too, from wherever they start
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys(filter(None, [str(Path(__file__).resolve().parents[2]), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]))
)
