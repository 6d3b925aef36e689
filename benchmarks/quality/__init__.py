"""Quality benchmark: SPRI against dense fine-tuning and the upcycling baselines on speech translation.

Whisper (the real Whisper base, or a tiny random one for the test suite) is fine-tuned on a CoVoST2-shaped set that
`python -m benchmarks.data.build` writes, with the same budget for every method (steps, batch, schedule shape, data
order and seed), every method through the product's own `SpriSeq2SeqTrainer` (dense too: it trains a plain model as
`Seq2SeqTrainer` does), decoded with `generate`, and scored with sacrebleu (chrF++ primary, BLEU) per language, plus
the teacher-forced cross-entropy of the references. Paired differences (sentence chrF++, 95% bootstrap interval over
seeds and test sentences) against dense and the best upcycling baseline; routing diagnostics as JSON and PNG.

    python -m benchmarks.data.build --direction xx-en --langs de,sv,ca,tr,id --disjoint-train --train-sources 300 \
        --dev-sources 40 --test-sources 60 --out benchmarks/data/covost_xx_en_disjoint
    python -m benchmarks.quality --preset pilot --data benchmarks/data/covost_xx_en_disjoint \
        --out benchmarks/results/pilot-disjoint-4langs
    python -m benchmarks.quality --preset cpu-xx-en --data benchmarks/data/covost_xx_en_disjoint \
        --out docs/results/cpu-xx-en --select-lr 1e-4,3e-4,1e-3 --threads 1
    python -m benchmarks.quality --preset cpu-xx-en-ablations --data benchmarks/data/covost_xx_en_disjoint \
        --out docs/results/cpu-xx-en-ablations --learning-rates docs/results/cpu-xx-en/lr-selection/lr-selection.json \
        --reuse docs/results/cpu-xx-en --threads 1

Two tasks on the same clips: Whisper transcribes each XX clip (the XX text) and translates it (the
English), so the decoder writes five languages; the pilot (dev, no test) gates the grid, which adds compute-matched
variants (`copy-cm`, ...: as many steps as dense's training time)::

    python -m benchmarks.data.build --direction xx-en --disjoint-train --tasks transcribe,translate \
        --langs ca,de,id,sv --train-sources 1000 --dev-sources 40 --test-sources 60 --out benchmarks/data/covost_multi
    python -m benchmarks.quality --preset pilot-multi --data benchmarks/data/covost_multi --eval-split dev \
        --out docs/results/pilot-multi --threads 1
    python -m benchmarks.quality --preset cpu-multi --data benchmarks/data/covost_multi --out docs/results/cpu-multi \
        --learning-rates docs/results/cpu-multi/learning-rates.json --threads 1
    python -m benchmarks.quality --preset multi-beyond --data benchmarks/data/covost_multi --eval-split dev \
        --out docs/results/multi-beyond --learning-rates docs/results/cpu-multi/learning-rates.json \
        --reuse docs/results/pilot-multi --threads 1

cpu-multi's rates are not chosen on its own dev split (that selection alone would cost more than the grid's budget):
`learning-rates.json` takes cpu-xx-en's dev choice (3e-4 for every method) and trains spri at the library's stage-1
defaults. multi-beyond's budget equals pilot-multi's, so dense and copy come from the pilot's runs.

The ablations train at spri's chosen rate and stage 1 (the main run's `lr-selection.json`) and take spri's own runs
from the main comparison; a stage-1 ablation that equals spri's chosen schedule is spri's run, so once dev has chosen
another stage 1 the ablations pair the former default (0.5 of the steps, 10x) against it.

On 2 cores, two such processes with disjoint `--methods` (for example `dense,copy,noise,random` and
`drop,spri,spri-stage2only,spri-div0`) share the work: each writes its own runs, and a last run of the whole preset
with the same options finds them all finished and writes the complete summary and `lr-selection.json`. (A process
given `--methods` or `--seeds` also summarises the preset's finished runs that it did not train, so its summary never
drops another process's rows.) A process's `--select-lr` chooses only for its own methods, and spri's stage 1 only if
spri is among them: a process that trains spri-div0 (or another two-stage method) without spri would train it with
the default stage 1 instead of spri's choice. Once the selection is complete (the committed `docs/results/cpu-xx-en/lr-selection/lr-selection.json`),
give every process `--learning-rates` that file instead of `--select-lr`, and split the methods as you like. Runs go
seed by seed (every method of seed 0, then of seed 1, ...), so an interrupted grid leaves seeds that pair. Processes
sharing a cache split a new cache's encoder states between them (a `.claim` file per clip) instead of computing
every clip twice. `--status --out DIR` lists the finished runs under DIR, with an interim table of paired
differences over the seeds finished so far (`--reuse` folders fill in the (method, seed) pairs DIR lacks, such as
spri's runs for the ablations).

Options: `--methods a,b` and `--seeds 0,1,2` override the preset; `--select-lr GRID` picks each method's learning rate
on dev (seed 0) first, `--learning-rates FILE` reuses such a choice; `--stage1-fraction`, `--stage1-lr-multiplier`;
`--langs a,b` keeps only those languages of the data; `--test-pairs FILE` also scores every trained model on your own pairs (the builder's row format; the speech is
synthesised); `--keep-models`; `--status`; `--device cuda`; `--eval-split dev`; `--cache DIR` (encoder states and the converted
Whisper folder, default ~/.cache/spri_hf/quality); `--context-check`.

Presets:
    tiny                 tiny random Whisper (byte-level tokenizer), a couple of steps, every method (the test suite).
    pilot                real Whisper base, X->En (ca, de, id, sv): the untrained model, copying the source and
                         dense, 400 steps, dev scored every 50 steps (does the reference method clearly learn?).
    cpu-xx-en            the main comparison, X->En, 5 seeds.
    cpu-xx-en-ablations  SPRI's open settings, one variant each, 3 seeds (`--methods` runs the tables' other
                         variants, such as spri-pr0.25 or spri-s1lr1x, into the same folder).
    pilot-multi          two tasks (transcribe, translate) on ca, de, id, sv: the untrained model, copying the source,
                         dense and copy on dev (does dense learn both tasks; does copy's routing depend on the language?).
    cpu-multi            the comparison on the two-task data, with compute-matched variants, 5 seeds.
    multi-beyond         issue 37's rows on the two-task data (dev, seed 0): spri and copy with k-means routers
                         (`init_routers` on 128 training examples), spri with fine-grained experts (G = 4) and spri
                         balanced by a routing bias, next to dense, copy and spri.
    gpu                  the paper's direction (En->XX, 15 languages), for an accelerator (`--device cuda`).

Design (the same for every method; see docs/RESULTS.md):
- The encoder is frozen and run once per clip; its states are cached in float16, every clip to one shared length (the
  longest clip plus `context_margin_s`, its own trailing-silence states), so batches need no padding frames.
- Decoder prompt `<|startoftranscript|><|xx|><|task|><|notimestamps|>`: X->En uses Whisper's native translate task;
  En->XX uses the target-language token with the transcribe task. Prompt positions carry no loss.
- CPU presets restrict the output vocabulary to the tokens of the target side (train, dev, test) plus the prompt
  specials; every method and the untrained model share the restricted model.
- Dense: every decoder parameter trains (embeddings too when `train_embeddings`). MoE methods: decoder FFNs
  upcycled (`upcycle="decoder"`, `stage2_frozen` keeps the encoder and embeddings frozen); two-stage SPRI runs stage 1
  for `stage1_fraction` of the steps at `stage1_lr_multiplier` x its rate (None: SpriTrainingArguments' default), then
  SpriSeq2SeqTrainer's switch and re-warm-up; the other inits and `spri-stage2only` train stage 2 throughout.
- The loss is the model's own: cross-entropy plus the router load-balancing loss for MoE models.

Results: `<out>/runs/<method>-seed<k>.json` (written as each run ends; a rerun skips finished runs with the same
spec), `<out>/summary.json`, `<out>/summary.md` and `<out>/plots/*.png`.
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from dataclasses import replace  # noqa: E402  (presets are frozen dataclasses: replace(PRESETS[...], ...))

from .data import language_token_id  # noqa: E402
from .harness import (  # noqa: E402
    CONTEXT_CHECK_MARGINS,
    main,
    paired_bootstrap,
    paired_differences,
    run_benchmark,
    select_learning_rates,
)
from .methods import METHODS, PRESETS, Method, Preset  # noqa: E402
from .models import tiny_whisper  # noqa: E402
from .training import bleu_tokenizer  # noqa: E402


__all__ = [
    "CONTEXT_CHECK_MARGINS",
    "METHODS",
    "PRESETS",
    "Method",
    "Preset",
    "bleu_tokenizer",
    "language_token_id",
    "main",
    "paired_bootstrap",
    "paired_differences",
    "replace",
    "run_benchmark",
    "select_learning_rates",
    "tiny_whisper",
]
