"""The methods of the comparison and the presets (the budget every method of a run shares)."""

from dataclasses import dataclass

from spri_hf.trainer import STAGE1_LR_MULTIPLIER


# ----------------------------------------------------------------------------------------------------------------
# methods and presets
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One row of the comparison. `settings` go to `from_dense`; `None` is the dense model itself."""

    name: str
    settings: dict | None
    train: bool = True
    description: str = ""
    # two-stage schedule overrides of the preset's (`stage1_fraction`, `stage1_lr_multiplier`): the stage-1 ablations
    stage1: dict | None = None
    # compute-matched variant of this method: its steps scaled so that its training time matches dense's (both
    # measured on the first seed's step-matched runs, which must be finished)
    compute_matched_from: str | None = None
    # `spri_hf.init_routers(method=...)` after upcycling, on training batches (issue 37's rows)
    router_init: str | None = None
    # the row this one changes one thing of (issue 37's rows): the summary pairs the two in "Beyond the paper"
    variant_of: str | None = None

    @property
    def is_moe(self) -> bool:
        return self.settings is not None

    @property
    def two_stage(self) -> bool:
        # init="spri" starts in stage 1 unless a stage is given (spri_hf's own default)
        return self.is_moe and self.settings.get("init", "spri") == "spri" and self.settings.get("stage") in (None, 1)


STAGE1_FRACTIONS = (0.25, 0.5, 0.75)
STAGE1_LR_MULTIPLIERS = (1.0, 3.0, 10.0, 30.0)


def _methods() -> dict[str, Method]:
    rows = [
        Method("dense-untrained", None, train=False, description="Whisper base as it is (zero-shot reference)"),
        Method("source-copy", None, train=False, description="the spoken source sentence, copied (trivial baseline)"),
        Method("dense", None, description="dense full fine-tuning of the decoder"),
        Method("copy", {"init": "copy"}, description="sparse upcycling: every expert a copy"),
        Method("noise", {"init": "noise"}, description="copy + 1% relative Gaussian noise"),
        Method("drop", {"init": "drop"}, description="Drop-Upcycling, 50% of neurons re-initialised"),
        Method("random", {"init": "random"}, description="experts from scratch"),
        Method("spri", {"init": "spri"}, description="SPRI, spri_hf defaults, two stages"),
        Method("spri-stage2only", {"init": "spri", "stage": 2}, description="SPRI init, stage 2 throughout"),
        Method("spri-div0", {"init": "spri", "diversity": 0.0},
               description="control: two stages, per-expert low-rank adapters on an exact copy"),
    ]
    for diversity in (0.05, 0.2, 0.5):
        settings = {"init": "spri", "spri_mode": "balanced", "diversity": diversity}
        rows.append(Method(f"spri-div{diversity:g}", settings))
    rows.append(Method("spri-partition", {"init": "spri", "spri_mode": "partition", "residual_scale": 1.0}))
    for ratio in (0.25, 0.75, 0.9):
        rows.append(Method(f"spri-pr{ratio:g}", {"init": "spri", "principal_ratio": ratio}))
    rows.append(Method("spri-contiguous", {"init": "spri", "partition": "contiguous"}))
    # stage-1 length (share of the steps) and learning rate (x the method's rate; spri_hf's default is 10x). The
    # values include the benchmark's starting schedule (0.5, 10x: spri_hf's default when the benchmark was built;
    # its results moved `stage1_steps` to 0.25): once dev has chosen another schedule for spri, the ablations pair
    # that schedule against it; a value that is spri's own schedule is spri's run (`same_schedule_as_spri`)
    for fraction in STAGE1_FRACTIONS:
        rows.append(Method(f"spri-s1len{fraction:g}", {"init": "spri"}, stage1={"stage1_fraction": fraction}))
    for multiplier in STAGE1_LR_MULTIPLIERS:
        rows.append(Method(f"spri-s1lr{multiplier:g}x", {"init": "spri"}, stage1={"stage1_lr_multiplier": multiplier}))
    # beyond the paper (docs/METHOD.md): routers from data, fine-grained experts (the same active FFN width as G = 1:
    # 4x the experts, 4x the top-k), balancing by a routing bias instead of the aux loss
    rows.append(Method("spri-kmeans", {"init": "spri"}, router_init="kmeans", variant_of="spri",
                       description="SPRI, routers from k-means of the decoder states"))  # fmt: skip
    rows.append(Method("copy-kmeans", {"init": "copy"}, router_init="kmeans", variant_of="copy",
                       description="copy, routers from k-means of the decoder states"))  # fmt: skip
    rows.append(Method("spri-g4", {"init": "spri", "expert_granularity": 4}, variant_of="spri",
                       description="SPRI with fine-grained experts (G = 4: 4x the experts and the top-k)"))  # fmt: skip
    rows.append(Method("spri-bias", {"init": "spri", "router_balance": "bias"}, variant_of="spri",
                       description="SPRI, balanced by a routing bias instead of the aux loss"))  # fmt: skip
    for base in ("copy", "drop", "spri", "spri-stage2only"):
        method = next(row for row in rows if row.name == base)
        rows.append(Method(f"{base}-cm", method.settings, description=f"{base}, as many steps as dense's training time",
                           compute_matched_from=base))  # fmt: skip
    return {method.name: method for method in rows}


METHODS = _methods()
BASELINES = ("dense-untrained", "source-copy")
MAIN_METHODS = BASELINES + ("dense", "copy", "noise", "drop", "random", "spri", "spri-stage2only", "spri-div0")
# the upcycling baselines SPRI is compared with ("the best baseline": the best of these on the evaluation split)
UPCYCLING_BASELINES = ("copy", "noise", "drop", "random")
# rows of the main table and of the per-language plot
HEADLINE_METHODS = MAIN_METHODS
# rows beyond the paper, each paired with the row it varies (`Method.variant_of`)
BEYOND_METHODS = tuple(name for name, method in METHODS.items() if method.variant_of)
# ablation tables: which runs differ in one setting from the default `spri`
ABLATIONS = {
    "diversity (spri_mode balanced)": ("spri-div0", "spri-div0.05", "spri", "spri-div0.2", "spri-div0.5"),
    "spri_mode": ("spri", "spri-partition"),
    "principal_ratio": ("spri-pr0.25", "spri", "spri-pr0.75", "spri-pr0.9"),
    "partition": ("spri", "spri-contiguous"),
    "training stages": ("spri", "spri-stage2only"),
    "stage-1 length": ("spri", "spri-s1len0.25", "spri-s1len0.5", "spri-s1len0.75"),
    "stage-1 learning rate": ("spri", "spri-s1lr1x", "spri-s1lr3x", "spri-s1lr10x", "spri-s1lr30x"),
}

# the ablation preset: one variant per open setting (at least 3 seeds each), plus the trivial baselines,
# dense and the main comparison's spri, spri-div0 and spri-stage2only (taken from it with `--reuse`). The other
# variants of the tables above run with `--methods` and join the summary's tables when they are finished.
ABLATION_PRESET_METHODS = ("dense-untrained", "source-copy", "dense", "spri", "spri-div0", "spri-div0.5",
                           "spri-partition", "spri-pr0.75", "spri-contiguous", "spri-stage2only", "spri-s1len0.5",
                           "spri-s1lr10x")


@dataclass(frozen=True)
class Preset:
    """Everything that sets the budget; identical for every method of a run."""

    name: str
    model: str  # "whisper-base" or "tiny"
    methods: tuple[str, ...]
    seeds: tuple[int, ...] = (0,)
    steps: int = 40
    batch_size: int = 16
    learning_rate: float = 3e-4  # every method's, unless `learning_rates` names it
    # per-method learning rates chosen on dev (`--select-lr`): ((method, lr), ...)
    learning_rates: tuple[tuple[str, float], ...] = ()
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # two-stage SPRI through SpriSeq2SeqTrainer: stage-1 length (fraction of the steps), its rate as a multiple of the
    # method's (None: SpriTrainingArguments' default), the re-warm-up after the switch (fraction of stage 2). The
    # length is always passed to the trainer, so its 0.5 (spri_hf's former default) keeps the finished runs' specs
    # when the library default changes
    stage1_fraction: float = 0.5
    stage1_lr_multiplier: float | None = None
    stage2_warmup_ratio: float = 0.1
    # spri's stage-1 length and rate chosen on dev (`--select-lr`): ((key, value), ...) where the choice differs from
    # the two fields above; every two-stage method trains with it (a method's own `stage1` overrides it)
    stage1_choice: tuple[tuple[str, float], ...] = ()
    train_embeddings: bool = False  # token embeddings (tied with the output projection)
    num_experts: int = 8
    num_experts_per_tok: int = 2
    max_target_tokens: int = 128
    max_train_sources: int | None = None
    max_eval_sources: int | None = None
    langs: tuple[str, ...] | None = None  # only these languages of the data (None: all of them)
    eval_batch_size: int = 32
    # max_new_tokens per language: this percentile of its training targets' lengths (in tokens, with <eot>) + slack
    generation_percentile: float = 99.0
    generation_slack: int = 4
    # seconds of encoder states kept after each clip: zero-shot English transcription of the test clips loses 12
    # chrF++ with 1 s, none with 4 s (docs/RESULTS.md); 30 s is Whisper's own full window
    context_margin_s: float = 4.0
    context_bucket: int = 50
    # bfloat16 autocast: on accelerators, and on CPUs with AVX512-BF16/AMX (the CPU presets: a Whisper base step of 16
    # costs 2.7x less than in float32 on this project's machines; weights and optimizer states stay float32)
    amp: bool = False
    eval_every: int = 0  # > 0: score the dev split every so many steps (the pilot's learning curve)
    # output vocabulary restricted to the tokens of the target side (train, dev and test) + prompt specials: ~12x
    # fewer logits per token; every method and the untrained model share it (CPU presets)
    restrict_vocab: bool = False


ALL_METHODS = tuple(METHODS)
# the X->En languages of the CPU presets (the pilot kept ca, de, id, sv; see docs/RESULTS.md)
XX_EN_LANGS = ("ca", "de", "id", "sv")
PRESETS = {
    "tiny": Preset(
        "tiny", "tiny", ALL_METHODS, steps=4, batch_size=4, learning_rate=1e-3, num_experts=4,
        max_target_tokens=16, eval_batch_size=8, generation_slack=0, restrict_vocab=True,
    ),
    # X->English on espeak-ng speech (`python -m benchmarks.data.build --direction xx-en --disjoint-train ...`, see the
    # package docstring): Whisper's native translate task, each language its own 300 training sources; tr is built
    # but left out (`langs`): with it dense gained only +13.6 chrF++ over copying the source (docs/RESULTS.md)
    "pilot": Preset("pilot", "whisper-base", ("dense-untrained", "source-copy", "dense"), steps=400, eval_every=50,
                    max_eval_sources=30, langs=XX_EN_LANGS, restrict_vocab=True, amp=True),
    "cpu-xx-en": Preset("cpu-xx-en", "whisper-base", MAIN_METHODS, seeds=(0, 1, 2, 3, 4), steps=400,
                        max_eval_sources=60, langs=XX_EN_LANGS, restrict_vocab=True, amp=True),
    "cpu-xx-en-ablations": Preset("cpu-xx-en-ablations", "whisper-base", ABLATION_PRESET_METHODS, seeds=(0, 1, 2),
                                  steps=400, max_eval_sources=60, langs=XX_EN_LANGS, restrict_vocab=True, amp=True),
    # two tasks on the same XX clips: transcribe (XX text) and translate (English), so the decoder writes
    # five languages (`python -m benchmarks.data.build --direction xx-en --disjoint-train --tasks
    # transcribe,translate ...`); the pilot gates the grid: dense must learn both tasks, and routing of a copy-upcycled
    # model must depend on the language
    "pilot-multi": Preset("pilot-multi", "whisper-base", ("dense-untrained", "source-copy", "dense", "copy"),
                          steps=400, max_eval_sources=30, langs=XX_EN_LANGS, restrict_vocab=True, amp=True),
    "cpu-multi": Preset("cpu-multi", "whisper-base", ("dense-untrained", "source-copy", "dense", "copy", "drop", "spri",
                                                      "spri-stage2only", "copy-cm", "drop-cm", "spri-cm",
                                                      "spri-stage2only-cm", "copy-kmeans", "spri-kmeans"),
                        seeds=(0, 1, 2, 3, 4), steps=400, max_eval_sources=60, langs=XX_EN_LANGS, restrict_vocab=True,
                        amp=True),  # fmt: skip
    # issue 37's rows on the two-task data (dev, seed 0), next to dense, copy and spri; the two most promising on dev
    # (copy-kmeans, spri-kmeans) are in cpu-multi for the test seeds
    "multi-beyond": Preset("multi-beyond", "whisper-base", ("dense-untrained", "source-copy", "dense", "copy", "spri",
                                                            "spri-kmeans", "copy-kmeans", "spri-g4", "spri-bias"),
                           steps=400, max_eval_sources=30, langs=XX_EN_LANGS, restrict_vocab=True, amp=True),
    # the paper's direction, 15 En->XX languages (`python -m benchmarks.data.build`), for an accelerator
    "gpu": Preset(
        "gpu", "whisper-base", MAIN_METHODS, seeds=(0, 1, 2, 3, 4), steps=600, batch_size=32, learning_rate=1e-4,
        train_embeddings=True, eval_batch_size=64, amp=True, context_margin_s=30.0,
    ),
}
# fields of a Preset that are not part of a run's spec (they do not change its result)
NOT_IN_SPEC = {"name", "methods", "seeds", "eval_batch_size", "stage1_choice"}
# the runs on dev that choose spri's stage-1 length and rate (at spri's chosen learning rate), next to spri itself:
# every stage-1 variant but those of the defaults (0.5 of the steps, 10x), which are spri's own run
STAGE1_CANDIDATES = tuple(
    name for name, method in METHODS.items()
    if method.stage1 and method.settings == {"init": "spri"}
    and method.stage1 not in ({"stage1_fraction": Preset.stage1_fraction},
                              {"stage1_lr_multiplier": STAGE1_LR_MULTIPLIER})
)  # fmt: skip
