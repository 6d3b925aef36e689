"""Training through SpriSeq2SeqTrainer, decoding with generate, scoring (chrF++, BLEU, cross-entropy)."""

import statistics
import tempfile
from collections import defaultdict

import torch
from transformers import (
    TrainerCallback,
)
from transformers.modeling_outputs import BaseModelOutput

from spri_hf import SpriSeq2SeqTrainer, SpriSeq2SeqTrainingArguments
from spri_hf.trainer import STAGE1_LR_MULTIPLIER

from .data import Example, ExampleDataset, StatesCollator, Vocabulary, collate, stack_states, whisper_language
from .methods import METHODS, Method, Preset
from .models import freeze


# ----------------------------------------------------------------------------------------------------------------
# training, decoding, scoring
# ----------------------------------------------------------------------------------------------------------------


def training_arguments(preset: Preset, method: Method, seed: int, output_dir: str, device):
    """The same budget for every method: steps, batch, schedule shape, warm-up, clipping, data order and seed.

    The learning rate is the method's own (chosen on dev, `Preset.learning_rates`); for two-stage SPRI,
    `SpriSeq2SeqTrainer` runs stage 1 for `stage1_fraction` of the steps at `stage1_lr_multiplier` x that rate (the
    method's `stage1` overrides the preset's), switches,
    re-warms up over `stage2_warmup_ratio` of stage 2 and decays to zero at the last step.
    """
    stage1 = {}
    if method.two_stage:
        schedule = {"stage1_fraction": preset.stage1_fraction, "stage1_lr_multiplier": preset.stage1_lr_multiplier}
        schedule.update(stage1_overrides(preset, method))
        stage1 = dict(stage1_steps=schedule["stage1_fraction"], stage2_warmup_steps=preset.stage2_warmup_ratio)
        if schedule["stage1_lr_multiplier"] is not None:
            stage1["stage1_learning_rate"] = schedule["stage1_lr_multiplier"] * method_learning_rate(preset, method)
    return SpriSeq2SeqTrainingArguments(
        output_dir=output_dir,
        max_steps=preset.steps,
        per_device_train_batch_size=preset.batch_size,
        learning_rate=method_learning_rate(preset, method),
        lr_scheduler_type="linear",
        warmup_steps=preset.warmup_ratio,
        weight_decay=preset.weight_decay,
        max_grad_norm=preset.max_grad_norm,
        # fused AdamW: the per-parameter loop of the default CPU implementation costs as much as a Whisper base step
        optim="adamw_torch_fused" if device.type in ("cpu", "cuda") else "adamw_torch",
        seed=seed,
        data_seed=seed,
        bf16=preset.amp,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=device.type == "cpu",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        **stage1,
    )


def stage1_overrides(preset: Preset, method: Method) -> dict:
    """What a two-stage run changes in the preset's stage-1 schedule: spri's choice on dev, then the method's own."""
    if not method.two_stage:
        return {}
    return dict(preset.stage1_choice) | (method.stage1 or {})


def stage1_schedule(preset: Preset, method: Method) -> tuple[float, float] | None:
    """(stage-1 length, stage-1 rate as a multiple of the method's) that a two-stage run trains with; None for a
    run that trains stage 2 throughout. The multiplier `None` is SpriTrainingArguments' default, named here."""
    if not method.two_stage:
        return None
    schedule = {"stage1_fraction": preset.stage1_fraction, "stage1_lr_multiplier": preset.stage1_lr_multiplier}
    schedule.update(stage1_overrides(preset, method))
    multiplier = schedule["stage1_lr_multiplier"]
    return schedule["stage1_fraction"], STAGE1_LR_MULTIPLIER if multiplier is None else multiplier


def same_run_as_spri(preset: Preset, method: Method) -> bool:
    """A stage-1 ablation that, under the preset's stage-1 choice, trains exactly as spri does (for example
    `spri-s1len0.25` once dev has chosen 0.25 for spri): it is spri's run, and the benchmark does not train it twice."""
    spri = METHODS["spri"]
    return (
        method.name != spri.name and method.stage1 is not None and method.settings == spri.settings
        and method_learning_rate(preset, method) == method_learning_rate(preset, spri)
        and stage1_schedule(preset, method) == stage1_schedule(preset, spri)
    )  # fmt: skip


def method_learning_rate(preset: Preset, method: Method) -> float:
    """The method's rate chosen on dev; an ablation of SPRI's settings without its own trains at spri's (it is paired
    to spri); otherwise the preset's."""
    rates = dict(preset.learning_rates)
    name = method.compute_matched_from or method.name  # a compute-matched variant trains at its base method's rate
    if name in rates:
        return rates[name]
    if method.is_moe and method.settings.get("init", "spri") == "spri" and "spri" in rates:
        return rates["spri"]
    return preset.learning_rate


class DevScores(TrainerCallback):
    """Scores the dev examples every `every` steps (the pilot's learning curve): translation, not training."""

    def __init__(self, every: int, score_fn):
        self.every, self.score_fn, self.scores = every, score_fn, []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every and state.global_step % self.every == 0:
            self.scores.append({"step": state.global_step, **self.score_fn(model)})
            model.train()


def train(model, method: Method, examples, states, preset: Preset, seed: int, device, log, callbacks=()) -> list[dict]:
    """Fine-tune with `SpriSeq2SeqTrainer` (every method, dense included: it trains a plain model as Seq2SeqTrainer)."""
    freeze(model, preset)
    with tempfile.TemporaryDirectory(prefix="spri-quality-") as scratch:
        trainer = SpriSeq2SeqTrainer(
            model=model, args=training_arguments(preset, method, seed, scratch, device),
            train_dataset=ExampleDataset(examples), data_collator=StatesCollator(states, model.config.pad_token_id),
            callbacks=list(callbacks),
        )  # fmt: skip
        trainer.train()
    history = []
    for entry in trainer.state.log_history:
        if "loss" in entry:
            history.append({"step": entry["step"], "stage": entry.get("stage"), "lr": entry["learning_rate"],
                            "loss": entry["loss"], "grad_norm": entry.get("grad_norm")})  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if history:
        history[-1]["trainable_params"] = trainable
    for row in history:
        if row is history[0] or row["step"] % max(1, preset.steps // 8) == 0 or row["step"] == preset.steps:
            log(f"    step {row['step']}/{preset.steps} stage {row['stage']} loss {row['loss']:.3f} lr {row['lr']:.2e}")
    model.eval()
    return history


def eval_batches(examples: list[Example], batch_size: int):
    """Evaluation batches of one language (and task) each (one prompt per batch), in a fixed order."""
    groups = defaultdict(list)
    for index, example in enumerate(examples):
        groups[example.group].append(index)
    for lang in sorted(groups):
        indices = sorted(groups[lang], key=lambda i: examples[i].source_id)
        for start in range(0, len(indices), batch_size):
            yield indices[start : start + batch_size]


@torch.no_grad()
def translate(model, tokenizer, examples, states, preset: Preset, max_new_tokens: dict[str, int], device,
              direction: str = "en-xx", vocabulary: Vocabulary | None = None) -> list[str]:
    """Greedy translations through the model's own `generate` (Whisper's prompt, suppression and stopping rules)."""
    hypotheses = [""] * len(examples)
    for indices in eval_batches(examples, preset.eval_batch_size):
        lang, group = examples[indices[0]].lang, examples[indices[0]].group
        task = examples[indices[0]].task or ("translate" if direction == "xx-en" else "transcribe")
        encoder = stack_states([examples[i] for i in indices], states, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=preset.amp):
            generated = model.generate(
                encoder_outputs=BaseModelOutput(last_hidden_state=encoder), language=whisper_language(lang),
                task=task, max_new_tokens=max_new_tokens[group], do_sample=False, num_beams=1,
            )  # fmt: skip
        sequences = [vocabulary.decode(row.tolist()) for row in generated] if vocabulary else generated
        for i, text in zip(indices, tokenizer.batch_decode(sequences, skip_special_tokens=True)):
            hypotheses[i] = text.strip()
    return hypotheses


@torch.no_grad()
def teacher_forced_cross_entropy(model, examples, states, preset: Preset, device) -> float:
    """Token-mean cross-entropy of the references (no router loss), the second metric."""
    total, count = 0.0, 0
    for indices in eval_batches(examples, preset.eval_batch_size):
        batch = collate([examples[i] for i in indices], states, model.config.pad_token_id, device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
        total, count = total + loss.item(), count + int((labels != -100).sum())
    return total / max(count, 1)


def bleu_tokenizer(lang: str) -> str:
    """sacrebleu's tokenizer for a target language: "zh" for Chinese, MeCab for Japanese when installed."""
    if lang.startswith("zh"):
        return "zh"
    if lang == "ja":
        try:
            from sacrebleu.tokenizers.tokenizer_ja_mecab import TokenizerJaMecab

            TokenizerJaMecab()
            return "ja-mecab"
        except Exception:  # noqa: BLE001  (mecab-python3 / ipadic missing: sacrebleu[ja] not installed)
            return "char"
    return "13a"


def score(hypotheses: list[str], examples: list[Example]) -> dict:
    from sacrebleu.metrics import BLEU, CHRF

    by_lang, written = defaultdict(lambda: ([], [])), {}
    for hypothesis, example in zip(hypotheses, examples):
        by_lang[example.group][0].append(hypothesis)
        by_lang[example.group][1].append(example.reference)
        written[example.group] = example.target_language
    per_lang = {}
    chrf = CHRF(word_order=2)  # chrF++
    for lang in sorted(by_lang):
        hyps, refs = by_lang[lang]
        tokenize = bleu_tokenizer(written[lang])
        per_lang[lang] = {
            "bleu": BLEU(tokenize=tokenize).corpus_score(hyps, [refs]).score,
            "chrf": chrf.corpus_score(hyps, [refs]).score,
            "bleu_tokenize": tokenize,
            "sentences": len(hyps),
        }
    result = {
        "bleu": statistics.fmean(row["bleu"] for row in per_lang.values()),
        "chrf": statistics.fmean(row["chrf"] for row in per_lang.values()),
        "per_lang": per_lang,
    }
    tasks = sorted({example.task for example in examples if example.task})
    if tasks:  # two-task data: the macro average over the languages of each task
        result["per_task"] = {
            task: {
                metric: statistics.fmean(row[metric] for group, row in per_lang.items() if group.endswith(f"-{task}"))
                for metric in ("bleu", "chrf")
            }
            for task in tasks
        }
    return result
