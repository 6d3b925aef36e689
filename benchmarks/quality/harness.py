"""Runs, resume, paired statistics, the summary and the command line."""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers.modeling_outputs import BaseModelOutput

import spri_hf
from benchmarks.data import build as builder
from benchmarks.machine import cpu_model

from .common import DEFAULT_CACHE, ROOT, SAMPLING_RATE
from .data import (
    Example,
    collate,
    context_frames,
    data_direction,
    data_fingerprint,
    encoder_states,
    fingerprint,
    group_of,
    language_token_id,
    load_split,
    make_examples,
    note_context_frames,
    read_wav,
)
from .methods import (
    ABLATIONS,
    BEYOND_METHODS,
    HEADLINE_METHODS,
    METHODS,
    NOT_IN_SPEC,
    PRESETS,
    STAGE1_CANDIDATES,
    UPCYCLING_BASELINES,
    Method,
    Preset,
)
from .models import build_model, load_dense, restrict_vocabulary, spri_settings
from .plots import plot_routing, plot_summary
from .routing import ROUTING_MEANS, pairwise_distances, routing_diagnostics
from .training import (
    DevScores,
    bleu_tokenizer,
    method_learning_rate,
    same_run_as_spri,
    score,
    stage1_overrides,
    stage1_schedule,
    teacher_forced_cross_entropy,
    train,
    translate,
)


CPU = torch.device("cpu")  # run_benchmark's default device


# ----------------------------------------------------------------------------------------------------------------
# runs, resume, summary
# ----------------------------------------------------------------------------------------------------------------


def run_spec(method: Method, seed: int, preset: Preset, model_id: str, data_id: str, eval_split: str) -> dict:
    budget = {key: value for key, value in asdict(preset).items() if key not in NOT_IN_SPEC}
    budget["context"] = "longest clip of the batch"  # `stack_states`; earlier runs cut at the longest clip of the data
    if method.train:  # only the method's own rate is part of its spec
        budget["learning_rate"], budget["learning_rates"] = method_learning_rate(preset, method), None
    else:
        budget = {key: value for key, value in budget.items() if key in ("model", "max_target_tokens",
                  "max_eval_sources", "langs", "context_margin_s", "generation_percentile", "generation_slack",
                  "context", "amp")}  # fmt: skip
    # as it reads back from JSON (tuples become lists), so a finished run is recognised
    spec = {
        "method": method.name,
        "settings": method.settings,
        "train": method.train,
        "seed": seed if method.train or method.is_moe else 0,
        "budget": budget,
        "model": model_id,
        "data": data_id,
        "eval_split": eval_split,
    }
    if method.router_init:
        spec["router_init"] = method.router_init
    overrides = stage1_overrides(preset, method)
    if overrides:  # only where set: the specs of every other run stay as they were written
        spec["stage1"] = overrides
    return json.loads(json.dumps(spec))


def compute_matched_steps(preset: Preset, method: Method, out: Path) -> dict:
    """The steps of a compute-matched run: the preset's, times dense's training seconds over its base method's, both
    from the first seed's finished step-matched runs in `out` (fixed once they exist, so the spec is stable). A
    two-stage method keeps at least 2 steps, one per stage (a slow MoE on a tiny preset would otherwise get 1)."""
    seed = preset.seeds[0]
    seconds = {}
    for name in ("dense", method.compute_matched_from):
        path = out / "runs" / f"{name}-seed{seed}.json"
        if not path.is_file():
            raise ValueError(f"{method.name} needs the finished {name} run of seed {seed} ({path}): list {name} first")
        seconds[name] = json.loads(path.read_text())["timings"]["train_s"]
    ratio = seconds["dense"] / seconds[method.compute_matched_from]
    least = 2 if method.two_stage else 1
    return {"steps": max(least, round(preset.steps * ratio)), "time_ratio_dense_over_method": ratio, "seed": seed}


def write_json(path: Path, payload):
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(json.dumps(payload, indent=1, ensure_ascii=False))
    os.replace(partial, path)


def find_finished(spec: dict, path: Path, reuse: list[Path]) -> dict | None:
    for candidate in [path] + [folder / "runs" / path.name for folder in reuse]:
        if candidate.is_file():
            result = json.loads(candidate.read_text())
            if result.get("spec") == spec:
                return result
    return None


def sentence_chrf(hypotheses: list[str], examples: list[Example]) -> list[float]:
    """chrF++ of every sentence: the unit the paired bootstrap resamples."""
    from sacrebleu.metrics import CHRF

    chrf = CHRF(word_order=2)
    return [chrf.sentence_score(hypothesis, [example.reference]).score for hypothesis, example in zip(hypotheses, examples)]


def evaluate_model(model, method: Method, examples, ctx: dict, with_cross_entropy: bool = True) -> dict:
    """Translations, corpus and sentence scores, and teacher-forced cross-entropy of one model on `examples`."""
    preset, device = ctx["preset"], ctx["device"]
    clock = time.perf_counter()
    if method.name == "source-copy":
        hypotheses = [example.source_text for example in examples]
    else:
        hypotheses = translate(model, ctx["tokenizer"], examples, ctx["states"], preset, ctx["max_new_tokens"], device,
                               ctx["direction"], ctx["vocabulary"])  # fmt: skip
    result = {"generate_s": time.perf_counter() - clock, "hypotheses": hypotheses}
    result["metrics"] = score(hypotheses, examples)
    result["sentence_chrf"] = sentence_chrf(hypotheses, examples)
    if with_cross_entropy and method.name != "source-copy":
        result["metrics"]["cross_entropy"] = teacher_forced_cross_entropy(model, examples, ctx["states"], preset, device)
    return result


def calibration_batches(ctx: dict, seed: int, device, count: int = 128, batch_size: int = 16) -> list[dict]:
    """Router-init calibration data: `count` training examples drawn with the run's seed (every language and task
    in proportion), as the model's input dicts; decoder padding is marked by `decoder_attention_mask`."""
    examples = ctx["train_examples"]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = [examples[i] for i in order[start : start + batch_size]]
        batch = collate(chosen, ctx["states"], ctx["dense"].config.pad_token_id, device)
        batch.pop("labels")
        lengths = torch.tensor([len(example.decoder_input_ids) for example in chosen], device=device)
        positions = torch.arange(batch["decoder_input_ids"].shape[1], device=device)
        batch["decoder_attention_mask"] = (positions[None] < lengths[:, None]).long()
        batches.append(batch)
    return batches


def run_one(method: Method, seed: int, ctx: dict, log) -> dict:
    preset, device = ctx["preset"], ctx["device"]
    timings = {}
    clock = time.perf_counter()
    torch.manual_seed(seed)
    model = build_model(method, ctx["dense"], preset, seed).to(device)
    if method.router_init:
        spri_hf.init_routers(model, method=method.router_init, batches=calibration_batches(ctx, seed, device),
                     seed=seed, show_progress=False)  # fmt: skip
    timings["upcycle_s"] = time.perf_counter() - clock
    distance_before = pairwise_distances(model) if method.is_moe else None
    initial_settings = spri_settings(model)
    history, dev_curve = [], []
    if method.train:
        callbacks = []
        if preset.eval_every and ctx.get("dev_examples"):
            def dev_score(current):
                current.eval()
                hyps = translate(current, ctx["tokenizer"], ctx["dev_examples"], ctx["states"], preset,
                                 ctx["max_new_tokens"], device, ctx["direction"], ctx["vocabulary"])  # fmt: skip
                row = score(hyps, ctx["dev_examples"])
                log(f"    dev at this step: chrF++ {row['chrf']:.2f} BLEU {row['bleu']:.2f}")
                return {"chrf": row["chrf"], "bleu": row["bleu"]}

            callbacks.append(DevScores(preset.eval_every, dev_score))
        clock = time.perf_counter()
        history = train(model, method, ctx["train_examples"], ctx["states"], preset, seed, device, log, callbacks)
        timings["train_s"] = time.perf_counter() - clock
        dev_curve = callbacks[0].scores if callbacks else []
    evaluation = evaluate_model(model, method, ctx["eval_examples"], ctx)
    timings["generate_s"] = evaluation["generate_s"]
    routing = None
    if method.is_moe:
        clock = time.perf_counter()
        routing = routing_diagnostics(model, ctx["eval_examples"], ctx["states"], preset, device)
        routing["pairwise_distance_before"] = distance_before
        routing["pairwise_distance_after"] = pairwise_distances(model)
        timings["routing_s"] = time.perf_counter() - clock
    extra = {}
    if ctx.get("extra_examples"):  # --test-pairs: the user's own pairs
        extra_eval = evaluate_model(model, method, ctx["extra_examples"], ctx)
        extra = {"metrics": extra_eval["metrics"], "hypotheses": extra_eval["hypotheses"]}
    if ctx.get("keep_models") and method.train:
        model.save_pretrained(ctx["out"] / "models" / f"{method.name}-seed{seed}")
    samples = {}
    for example, hypothesis in zip(ctx["eval_examples"], evaluation["hypotheses"]):
        if example.group not in samples:
            samples[example.group] = {"reference": example.reference, "hypothesis": hypothesis}
    return {
        "method": method.name,
        "description": method.description,
        "seed": seed,
        "settings": initial_settings,
        "learning_rate": method_learning_rate(preset, method) if method.train else None,
        "metrics": evaluation["metrics"],
        "routing": routing,
        "history": history,
        "dev_curve": dev_curve,
        "timings": timings,
        # where the timings were taken: the wall times of runs on different machines do not compare
        "machine": {"cpu": cpu_model(), "device": str(device), "threads": torch.get_num_threads()},
        "samples": samples,
        "hypotheses": evaluation["hypotheses"],
        "sentence_chrf": evaluation["sentence_chrf"],
        "test_pairs": extra or None,
    }


def paired_bootstrap(a: list[list[float]], b: list[list[float]], samples: int = 2000, seed: int = 0) -> dict:
    """Mean paired difference `a - b` with a 95% percentile interval, resampling seeds and sentences.

    `a[s][j]`, `b[s][j]`: the score of sentence `j` under seed `s` (same sentences, same seed pairing). Each bootstrap
    sample draws seeds and sentences with replacement and averages `a - b` over the drawn cells. A method without
    seeds (one row) is paired with every seed of the other.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape[0] == 1 and b.shape[0] > 1:
        a = np.repeat(a, b.shape[0], axis=0)
    if b.shape[0] == 1 and a.shape[0] > 1:
        b = np.repeat(b, a.shape[0], axis=0)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need the same seeds x sentences, got {a.shape} and {b.shape}")
    difference = a - b
    rng = np.random.default_rng(seed)
    seeds, sentences = difference.shape
    draws = np.empty(samples)
    for k in range(samples):
        rows = rng.integers(0, seeds, seeds)
        columns = rng.integers(0, sentences, sentences)
        draws[k] = difference[np.ix_(rows, columns)].mean()
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"mean": float(difference.mean()), "low": float(low), "high": float(high),
            "significant": bool(low > 0 or high < 0), "seeds": seeds, "sentences": sentences}  # fmt: skip


def paired_differences(results: list[dict], pairs: tuple[tuple[str, str], ...] = ()) -> dict:
    """Sentence chrF++ of every trained method against dense, the best upcycling baseline, for a variant in an
    ablation table the default `spri`, and for a row beyond the paper the row it varies (`Method.variant_of`); each pair over the seeds both methods have (an untrained method, one run
    without seeds, pairs with every seed of the other). `pairs`: more (a, b) comparisons, under "pairs" as "a vs b"
    (left out where either has no runs)."""
    by_method = defaultdict(dict)
    for result in results:
        if result.get("sentence_chrf") is not None:
            by_method[result["method"]][result["seed"]] = result["sentence_chrf"]
    means = {name: float(np.mean(list(rows.values()))) for name, rows in by_method.items()}
    baselines = [name for name in UPCYCLING_BASELINES if name in by_method]
    best = max(baselines, key=means.get) if baselines else None
    ablated = {name for names in ABLATIONS.values() for name in names}

    def pair(name, reference):
        rows, other = by_method[name], by_method[reference]
        if not METHODS[reference].train:
            a, b = [rows[seed] for seed in sorted(rows)], list(other.values())[:1]
        elif not METHODS[name].train:
            a, b = list(rows.values())[:1], [other[seed] for seed in sorted(other)]
        else:
            seeds = sorted(set(rows) & set(other))
            a, b = [rows[seed] for seed in seeds], [other[seed] for seed in seeds]
        if not a or not b or len(a[0]) != len(b[0]):
            return None
        return paired_bootstrap(a, b)

    paired = {}
    for name in by_method:
        references = ["dense", best] + (["spri"] if name in ablated else []) + [METHODS[name].variant_of]
        entry = {}
        for reference in dict.fromkeys(references):
            if reference and reference != name and reference in by_method:
                stat = pair(name, reference)
                if stat is not None:
                    entry[f"vs_{reference}"] = stat
        paired[name] = entry
    extra = {f"{a} vs {b}": pair(a, b) for a, b in pairs if a in by_method and b in by_method}
    return {"metric": "sentence chrF++", "best_baseline": best, "default": "spri", "methods": paired,
            "pairs": {name: stat for name, stat in extra.items() if stat is not None}}


def paired_by_task(results: list[dict], tasks: list[str | None], pairs: tuple[tuple[str, str], ...] = ()) -> dict:
    """`paired_differences` within each task of two-task data: `tasks[j]` is the task of evaluation sentence `j` (the
    order of every run's `sentence_chrf`); {} when the data has no tasks. Each task picks its own best baseline."""
    per_task = {}
    for task in sorted({task for task in tasks if task}):
        keep = [j for j, name in enumerate(tasks) if name == task]
        sliced = [dict(result, sentence_chrf=[result["sentence_chrf"][j] for j in keep])
                  if result.get("sentence_chrf") is not None else result for result in results]  # fmt: skip
        per_task[task] = paired_differences(sliced, pairs)
    return per_task


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "per_seed": values,
    }


def summarise(results: list[dict], langs: list[str]) -> dict:
    by_method = defaultdict(list)
    for result in results:
        by_method[result["method"]].append(result)
    methods = {}
    for name in [name for name in METHODS if name in by_method]:
        runs = sorted(by_method[name], key=lambda r: r["seed"])
        row = {
            "description": runs[0]["description"],
            "settings": runs[0]["settings"],
            "seeds": [run["seed"] for run in runs],
            "bleu": _mean_std([run["metrics"]["bleu"] for run in runs]),
            "chrf": _mean_std([run["metrics"]["chrf"] for run in runs]),
            "learning_rate": runs[0].get("learning_rate"),
            # a two-stage run's stage-1 schedule where it differs from the preset's (spri's choice on dev, its own)
            "stage1": runs[0].get("spec", {}).get("stage1"),
            "per_lang": {
                lang: {
                    "bleu": _mean_std([run["metrics"]["per_lang"][lang]["bleu"] for run in runs]),
                    "chrf": _mean_std([run["metrics"]["per_lang"][lang]["chrf"] for run in runs]),
                }
                for lang in langs
            },
            "timings": {
                key: statistics.fmean(run["timings"].get(key, 0.0) for run in runs)
                for key in ("upcycle_s", "train_s", "generate_s", "routing_s")
            },
        }
        if all("per_task" in run["metrics"] for run in runs):
            row["per_task"] = {
                task: {metric: _mean_std([run["metrics"]["per_task"][task][metric] for run in runs])
                       for metric in ("bleu", "chrf")}
                for task in runs[0]["metrics"]["per_task"]
            }  # fmt: skip
        if all("cross_entropy" in run["metrics"] for run in runs):
            row["cross_entropy"] = _mean_std([run["metrics"]["cross_entropy"] for run in runs])
        if all(run.get("test_pairs") for run in runs):
            row["test_pairs"] = {key: _mean_std([run["test_pairs"]["metrics"][key] for run in runs])
                                 for key in ("chrf", "bleu")}  # fmt: skip
        if runs[0]["history"]:
            curves = [[step["loss"] for step in run["history"]] for run in runs]
            row["loss_curve"] = [statistics.fmean(losses) for losses in zip(*curves)]
            row["trainable_params_last_step"] = runs[0]["history"][-1].get("trainable_params")
        if runs[0]["routing"]:
            row["routing"] = {
                key: statistics.fmean(run["routing"]["mean"][key] for run in runs)
                for key in ROUTING_MEANS if all(key in run["routing"]["mean"] for run in runs)
            } | {
                "pairwise_distance_before": statistics.fmean(
                    statistics.fmean(run["routing"]["pairwise_distance_before"]) for run in runs
                ),
                "pairwise_distance_after": statistics.fmean(
                    statistics.fmean(run["routing"]["pairwise_distance_after"]) for run in runs
                ),
            }
        methods[name] = row
    return methods


def _cell(stat: dict, digits: int = 2) -> str:
    if len(stat["per_seed"]) > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def _setting_label(name: str, row: dict) -> str:
    settings = row["settings"]
    if not settings:
        return {"source-copy": "the spoken source text", "dense-untrained": "zero-shot"}.get(name, "dense")
    label = f"init={settings['init']}"
    if settings["init"] == "spri":
        label += (
            f", {settings['spri_mode']}, div={settings['diversity']:g}" if settings["spri_mode"] == "balanced"
            else f", partition mode, scale={settings['residual_scale']:g}"
        )
        label += f", pr={settings['principal_ratio']:g}, {settings['partition']}"
        label += ", two-stage" if METHODS[name].two_stage else ", stage 2 only"
        for key, value in (row.get("stage1") or METHODS[name].stage1 or {}).items():
            label += f", stage 1 {'x' if key.endswith('multiplier') else ''}{value:g}" + (
                " of the rate" if key.endswith("multiplier") else " of the steps")
    if settings.get("expert_granularity", 1) != 1:
        label += f", G={settings['expert_granularity']}"
    if settings.get("router_balance", "aux_loss") != "aux_loss":
        label += f", {settings['router_balance']} balancing"
    if row.get("router_init") or METHODS[name].router_init:
        label += f", {row.get('router_init') or METHODS[name].router_init} routers"
    return label


def describe_bleu_tokenize(tokenizers: dict[str, str]) -> str:
    """`13a` for every language, or the languages that use another tokeniser and `13a` for the rest."""
    special = [f"{lang} `{tok}`" for lang, tok in tokenizers.items() if tok != "13a"]
    if not special:
        return "`13a` for every language"
    return ", ".join(special) + (", others `13a`" if len(special) < len(tokenizers) else "")


def interval_cell(stat: dict | None) -> str:
    """A paired difference as a table cell: `+mean [low, high]`, marked (n.s.) when the interval includes 0."""
    if not stat:
        return ""
    return f"{stat['mean']:+.2f} [{stat['low']:+.2f}, {stat['high']:+.2f}]" + ("" if stat["significant"] else " (n.s.)")


def per_task_paired_lines(per_task: dict) -> list[str]:
    """The per-task paired differences (`paired_by_task`) as a markdown table: each trained method against dense and
    against the task's best upcycling baseline."""
    if not per_task:
        return []
    tasks = sorted(per_task)
    lines = ["", "## Paired differences per task", "",
             "Sentence chrF++ within each task, 95% bootstrap interval over seeds and sentences (the task's best "
             "baseline: " + ", ".join(f"{task} {per_task[task]['best_baseline']}" for task in tasks) + ").", "",
             "| method | " + " | ".join(f"{task} vs dense | {task} vs best baseline" for task in tasks) + " |",
             "|---" * (2 * len(tasks) + 1) + "|"]  # fmt: skip
    names = [name for name in METHODS if any(name in per_task[task]["methods"] for task in tasks)]
    for name in names:
        cells = []
        for task in tasks:
            entry = per_task[task]["methods"].get(name, {})
            for reference in ("dense", per_task[task]["best_baseline"]):
                cells.append(interval_cell(entry.get(f"vs_{reference}")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict) -> str:
    methods, langs = summary["methods"], summary["languages"]
    header = (f"| method | settings | lr | chrF++ | BLEU | {summary['eval_split']} CE | ΔchrF++ vs dense [95% CI] | "
              "ΔchrF++ vs best baseline [95% CI] | train s | generate s |")
    paired = summary.get("paired", {}).get("methods", {})
    best = summary.get("paired", {}).get("best_baseline")
    lines = [
        f"# Quality benchmark: preset `{summary['preset']}`",
        "",
        f"Model {summary['model']}; data {summary['data']['path']} ({summary['data']['train_pairs']} training pairs, "
        f"{summary['data']['eval_pairs']} {summary['eval_split']} pairs, {len(langs)} languages); "
        f"budget: {summary['budget']['steps']} steps x batch {summary['budget']['batch_size']}, "
        f"lr {summary['budget']['learning_rate']:g}; seeds {summary['seeds']}; "
        f"device {summary['environment']['device']}.",
        "BLEU tokenisation: " + describe_bleu_tokenize(summary["bleu_tokenize"])
        + ". Scores are macro averages over languages; ± is the standard deviation over seeds.",
        "",
        "## Main comparison",
        "",
        "Δ columns: paired sentence-level chrF++ differences, 95% bootstrap interval over seeds and test sentences; "
        f"best baseline = {best}. An interval that includes 0 is no difference.",
        "",
        header,
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def interval(name, against):
        return interval_cell(paired.get(name, {}).get(f"vs_{against}"))

    def row_line(name, references=("dense", best)):
        row = methods[name]
        timings = row["timings"]
        ce = _cell(row["cross_entropy"], 3) if row.get("cross_entropy") else ""
        lr = f"{row['learning_rate']:g}" if row.get("learning_rate") else ""
        deltas = " | ".join(interval(name, reference) for reference in references)
        return (
            f"| {name} | {_setting_label(name, row)} | {lr} | {_cell(row['chrf'])} | {_cell(row['bleu'])} | {ce} | "
            f"{deltas} | {timings['train_s']:.0f} | {timings['generate_s']:.0f} |"
        )

    lines += [row_line(name) for name in HEADLINE_METHODS if name in methods]
    ablation_header = (f"| method | settings | lr | chrF++ | BLEU | {summary['eval_split']} CE | "
                       "ΔchrF++ vs spri (default) [95% CI] | ΔchrF++ vs dense [95% CI] | train s | generate s |")
    for title, names in ABLATIONS.items():
        names = [name for name in names if name in methods]
        if len(names) < 2 or "spri" not in names:
            continue
        lines += ["", f"## Ablation: {title}", "",
                  "Δ vs spri: each variant paired with the default over the seeds both have.", "",
                  ablation_header, "|---|---|---|---|---|---|---|---|---|---|"]
        lines += [row_line(name, ("spri", "dense")) for name in names]
    beyond = [name for name in BEYOND_METHODS if name in methods]
    if beyond:
        lines += ["", "## Beyond the paper", "",
                  "Each row changes one thing of the row named in its first Δ column, paired over the seeds both have.",
                  "", ablation_header.replace("vs spri (default)", "vs the row it varies"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for name in beyond:
            base = METHODS[name].variant_of
            line = row_line(name, (base, "dense"))
            lines.append(line.replace(f"| {name} |", f"| {name} (vs {base}) |", 1))
    tasked = [name for name, row in methods.items() if row.get("per_task")]
    if tasked:
        tasks = sorted(methods[tasked[0]]["per_task"])
        lines += ["", "## Per task (macro over languages; ± over seeds)", "",
                  "| method | " + " | ".join(f"{task} chrF++ | {task} BLEU" for task in tasks) + " |",
                  "|---" * (2 * len(tasks) + 1) + "|"]  # fmt: skip
        for name in tasked:
            cells = [_cell(methods[name]["per_task"][task][metric]) for task in tasks for metric in ("chrf", "bleu")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += per_task_paired_lines(summary.get("paired_per_task") or {})
    for metric, title in (("bleu", "BLEU"), ("chrf", "chrF++")):
        lines += ["", f"## {title} per language", "", "| method | " + " | ".join(langs) + " | avg |",
                  "|---" * (len(langs) + 2) + "|"]
        for name, row in methods.items():
            cells = [f"{row['per_lang'][lang][metric]['mean']:.1f}" for lang in langs]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {row[metric]['mean']:.2f} |")
    moe = [name for name, row in methods.items() if row.get("routing")]
    if moe:
        lines += [
            "",
            "## Routing (evaluation set, teacher forcing; means over layers and seeds)",
            "",
            "| method | load CV | max expert share | router entropy (max {:.2f}) | language-expert MI (bits) | "
            "task-expert MI | written-language-expert MI | pairwise expert distance before → after |".format(
                math.log(summary["budget"]["num_experts"])
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
        for name in moe:
            r = methods[name]["routing"]
            extra = " | ".join(f"{r[key]:.3f}" if key in r else "" for key in ("task_expert_mi_bits",
                                                                                "target_language_expert_mi_bits"))
            lines.append(
                f"| {name} | {r['cv']:.3f} | {r['max_share']:.3f} | {r['router_entropy']:.3f} | "
                f"{r['language_expert_mi_bits']:.3f} | {extra} | "
                f"{r['pairwise_distance_before']:.4f} → {r['pairwise_distance_after']:.4f} |"
            )
    lines += ["", f"Wall time of this invocation: {summary['wall_seconds'] / 60:.1f} min "
              f"(encoder states {summary['encoder_seconds']:.0f} s)."]
    return "\n".join(lines) + "\n"


CONTEXT_CHECK_MARGINS = (0.0, 1.0, 2.0, 4.0, 8.0, 30.0)


def context_check(dense, processor, data_dir: Path, rows: list[dict], preset: Preset, device, log) -> dict:
    """Zero-shot English transcription of the evaluation clips with the encoder states trimmed at several margins.

    chrF++ against the English source text: how much the trimmed context (`context_margin_s`) costs the untrained
    model, with 30 s being Whisper's own full window.
    """
    from sacrebleu.metrics import CHRF

    clips = list({row["source_id"]: row for row in rows}.values())
    outputs = {margin: [] for margin in CONTEXT_CHECK_MARGINS}
    with torch.no_grad():
        for row in clips:
            audio = read_wav(data_dir / row["audio"])
            features = processor.feature_extractor([audio], sampling_rate=SAMPLING_RATE, return_tensors="pt")
            states = dense.get_encoder()(features.input_features.to(device)).last_hidden_state
            for margin in CONTEXT_CHECK_MARGINS:
                frames = context_frames(len(audio), replace(preset, context_margin_s=margin))
                ids = dense.generate(
                    encoder_outputs=BaseModelOutput(last_hidden_state=states[:, :frames]),
                    language="en", task="transcribe", max_new_tokens=96,
                )
                outputs[margin].append(processor.tokenizer.batch_decode(ids, skip_special_tokens=True)[0].strip())
    english = [row["en"] for row in clips]
    chrf = CHRF(word_order=2)
    result = {
        "clips": len(clips),
        "chrf_vs_source_by_margin_s": {
            str(margin): chrf.corpus_score(outputs[margin], [english]).score for margin in CONTEXT_CHECK_MARGINS
        },
        "preset_margin_s": preset.context_margin_s,
        "samples": [
            {"en": en, **{str(margin): outputs[margin][i] for margin in CONTEXT_CHECK_MARGINS}}
            for i, en in enumerate(english[:5])
        ],
    }
    log(f"context check (English chrF++ by margin): {result['chrf_vs_source_by_margin_s']}")
    return result


def finished_runs(out: Path) -> list[dict]:
    """One row per finished run anywhere under `out` (the main grid, the learning-rate trials, ablations)."""
    rows = []
    for path in sorted(Path(out).rglob("runs/*.json")):
        result = json.loads(path.read_text())
        spec, metrics, timings = result.get("spec", {}), result["metrics"], result.get("timings", {})
        rows.append({
            "folder": str(path.parent.parent.relative_to(out)) if path.parent.parent != Path(out) else ".",
            "method": result["method"], "seed": result["seed"], "learning_rate": result.get("learning_rate"),
            "split": spec.get("eval_split"), "chrf": metrics["chrf"], "bleu": metrics["bleu"],
            "cross_entropy": metrics.get("cross_entropy"), "train_s": timings.get("train_s"),
        })  # fmt: skip
    return rows


def status_table(rows: list[dict]) -> str:
    """`finished_runs` as a markdown table (what `--status` prints)."""
    lines = ["| folder | method | seed | lr | split | chrF++ | BLEU | CE | train s |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ce = "" if row["cross_entropy"] is None else f"{row['cross_entropy']:.3f}"
        lr = "" if row["learning_rate"] is None else f"{row['learning_rate']:g}"
        train = "" if row["train_s"] is None else f"{row['train_s']:.0f}"
        lines.append(f"| {row['folder']} | {row['method']} | {row['seed']} | {lr} | {row['split']} | {row['chrf']:.2f} "
                     f"| {row['bleu']:.2f} | {ce} | {train} |")  # fmt: skip
    return "\n".join(lines)


def _comparable(spec: dict) -> tuple:
    """What two runs must share to be paired: model, data, split and, for trained step-matched runs, the step budget (a
    compute-matched variant's steps differ from the grid's by design: it pairs on model, data and split)."""
    steps = spec.get("budget", {}).get("steps") if spec.get("train") and not spec.get("compute_matched") else None
    return spec.get("model"), spec.get("data"), spec.get("eval_split"), steps


def interim_paired(out: Path, reuse: list[Path] = (), pairs: tuple[tuple[str, str], ...] = ()) -> str:
    """Paired differences over the runs finished so far in `out/runs` (and, for (method, seed) pairs it lacks, in the
    `reuse` folders' runs), as `--status` prints them under its table: an interim reading of a grid in progress. Only
    runs with the model, data, split and step budget of `out`'s own runs are pooled; the summary of a whole-preset run
    is the final word (it also checks every run's full spec). `pairs` (`--pair a,b`) adds rows for comparisons the
    table has no column for, such as a stage-1 variant against spri-stage2only."""
    pooled, reference = {}, None
    for folder in [Path(out), *map(Path, reuse)]:
        for path in sorted(folder.glob("runs/*.json")):
            result = json.loads(path.read_text())
            spec = result.get("spec", {})
            if result.get("sentence_chrf") is None or result["method"] not in METHODS:
                continue
            key = _comparable(spec)
            if reference is None and key[3] is not None:
                reference = key
            pooled.setdefault((result["method"], result["seed"]), (key, result))
    if reference is None:
        return ""
    results = [result for key, result in pooled.values()
               if key[:3] == reference[:3] and (key[3] is None or key[3] == reference[3])]  # fmt: skip
    paired = paired_differences(results, pairs)
    by_method = defaultdict(dict)
    for result in results:
        by_method[result["method"]][result["seed"]] = result["metrics"]["chrf"]
    best = paired["best_baseline"]
    title = (f"Interim paired sentence chrF++ differences (95% CI over the seeds both methods have; best baseline "
             f"{best}; an interval that includes 0 is no difference):")
    lines = ["", title, "", f"| method | seeds | chrF++ mean ± std | vs dense | vs {best} | vs spri (ablations) |",
             "|---|---|---|---|---|---|"]

    def cell(stat):
        if not stat:
            return ""
        return (f"{stat['mean']:+.2f} [{stat['low']:+.2f}, {stat['high']:+.2f}] ({stat['seeds']} seeds)"
                + ("" if stat["significant"] else " n.s."))

    for name in [name for name in METHODS if name in by_method]:
        scores = [by_method[name][seed] for seed in sorted(by_method[name])]
        spread = f" ± {statistics.stdev(scores):.2f}" if len(scores) > 1 else ""
        entry = paired["methods"].get(name, {})
        lines.append(f"| {name} | {' '.join(map(str, sorted(by_method[name])))} | {statistics.fmean(scores):.2f}{spread} | "
                     f"{cell(entry.get('vs_dense'))} | {cell(entry.get(f'vs_{best}'))} | {cell(entry.get('vs_spri'))} |")
    if pairs:
        lines += ["", "| pair (a - b) | sentence ΔchrF++ [95% CI] |", "|---|---|"]
        for a, b in pairs:
            lines.append(f"| {a} vs {b} | {cell(paired['pairs'].get(f'{a} vs {b}')) or 'no runs of both'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    package_doc = sys.modules[__package__].__doc__
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=package_doc.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-xx-en")
    parser.add_argument("--data", type=Path, default=ROOT / "benchmarks" / "data" / "covost_mini")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/<preset>")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the preset's)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    parser.add_argument("--learning-rate", type=float, default=None, help="override the preset's learning rate")
    parser.add_argument(
        "--context-margin", type=float, default=None,
        help="seconds of encoder states kept after each clip (presets: 4 on CPU, 30 = Whisper's full window)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--amp", action=argparse.BooleanOptionalAction, default=None,
        help="bfloat16 autocast (default: the preset's); --no-amp on CPUs without AVX512-BF16/AMX, where it is slower",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--eval-split", choices=("test", "dev"), default="test")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument(
        "--reuse", type=Path, action="append", default=[],
        help="results folder to take finished runs with the same spec from (repeatable)",
    )
    parser.add_argument(
        "--context-check", action="store_true",
        help="also transcribe the evaluation clips in English with the encoder states trimmed at several margins",
    )
    parser.add_argument("--test-pairs", type=Path, default=None,
                        help="also score the trained models on this pairs file (the builder's row format; its speech "
                        "is synthesised with espeak-ng)")  # fmt: skip
    parser.add_argument("--keep-models", action="store_true", help="save every trained model under OUT/models/")
    parser.add_argument("--select-lr", default=None,
                        help="comma-separated learning rates: pick each method's on dev (seed 0), write "
                        "OUT/lr-selection.json, then run the preset with them")  # fmt: skip
    parser.add_argument("--learning-rates", type=Path, default=None,
                        help="an lr-selection.json: use its chosen per-method learning rates")
    parser.add_argument("--langs", default=None, help="comma-separated subset of the data's languages")
    parser.add_argument("--stage1-fraction", type=float, default=None)
    parser.add_argument("--stage1-lr-multiplier", type=float, default=None)
    parser.add_argument("--status", action="store_true",
                        help="print every finished run under OUT (main grid, learning-rate trials) and exit")
    parser.add_argument("--pair", action="append", default=[], metavar="A,B",
                        help="with --status: also the paired difference of method A against method B (repeatable)")
    args = parser.parse_args(argv)

    pairs = tuple(tuple(pair.split(",")) for pair in args.pair)
    for pair in pairs:
        unknown = [name for name in pair if name not in METHODS]
        if len(pair) != 2 or unknown:
            parser.error(f"--pair {','.join(pair)}: give two methods as A,B, each one of {list(METHODS)}")
    if pairs and not args.status:
        parser.error("--pair goes with --status (the summary of a run pairs every method with dense, the best "
                     "baseline and, for the ablations, spri)")
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    subset = bool(args.methods or args.seeds)
    if args.methods:
        unknown = [name for name in args.methods.split(",") if name not in METHODS]
        if unknown:
            parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
        preset = replace(preset, methods=tuple(args.methods.split(",")))
    if args.seeds:
        preset = replace(preset, seeds=tuple(int(seed) for seed in args.seeds.split(",")))
    orphans = [name for name in preset.methods if METHODS[name].two_stage and name != "spri"]
    if args.select_lr and orphans and "spri" not in preset.methods:
        parser.error(f"--select-lr chooses spri's stage 1 only when spri is among the methods, so {orphans} would "
                     "train with the default stage 1 instead of spri's choice: add spri to --methods, or pass "
                     "--learning-rates OUT/lr-selection/lr-selection.json from a selection that included spri")
    if args.steps is not None:
        preset = replace(preset, steps=args.steps)
    if args.learning_rate is not None:
        preset = replace(preset, learning_rate=args.learning_rate)
    if args.context_margin is not None:
        preset = replace(preset, context_margin_s=args.context_margin)
    if args.amp is not None:
        preset = replace(preset, amp=args.amp)
    if args.langs:
        preset = replace(preset, langs=tuple(sorted(lang for lang in args.langs.split(",") if lang.strip())))
    if args.stage1_fraction is not None:
        preset = replace(preset, stage1_fraction=args.stage1_fraction)
    if args.stage1_lr_multiplier is not None:
        preset = replace(preset, stage1_lr_multiplier=args.stage1_lr_multiplier)
    out = args.out or ROOT / "benchmarks" / "results" / preset.name
    if args.status:
        rows = finished_runs(out) if out.is_dir() else []
        print(status_table(rows) if rows else f"no finished runs under {out}")
        if rows:
            print(interim_paired(out, args.reuse, pairs))
        return 0
    device = torch.device(args.device)
    if args.select_lr:
        grid = [float(value) for value in args.select_lr.split(",")]
        selection = select_learning_rates(preset, grid, args.data, out / "lr-selection", device, args.cache)
    elif args.learning_rates:
        selection = json.loads(args.learning_rates.read_text())
    if args.select_lr or args.learning_rates:
        preset = replace(preset, learning_rates=tuple(sorted(selection["chosen"].items())),
                         stage1_choice=tuple(sorted((selection.get("stage1") or {}).get("chosen", {}).items())))
    # a subset's summary also reads back the preset's other finished runs (other processes', earlier seeds')
    whole = replace(preset, methods=PRESETS[args.preset].methods, seeds=PRESETS[args.preset].seeds) if subset else None
    run_benchmark(preset, args.data, out, device, args.cache, args.reuse, args.eval_split, args.context_check,
                  test_pairs=args.test_pairs, keep_models=args.keep_models, summary_preset=whole)
    return 0


def run_benchmark(preset: Preset, data_dir: Path, out: Path, device=CPU, cache: Path = DEFAULT_CACHE,
                  reuse: list[Path] = (), eval_split: str = "test", check_context: bool = False,
                  log=lambda message: print(message, flush=True), test_pairs: Path | None = None,
                  keep_models: bool = False, summary_preset: Preset | None = None) -> dict:
    """Run every (method, seed) of `preset` that `out` does not hold yet; write the summary, tables and plots.

    `summary_preset` (default `preset`) is what the summary covers: the finished runs of its other methods and seeds
    (in `out` or `reuse`, with the spec they would be trained with) join this invocation's, so a process given a
    subset (`--methods`, `--seeds`) does not overwrite a wider summary with its own runs only."""
    started = time.perf_counter()
    data_dir, out = Path(data_dir), Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    direction = data_direction(data_dir)
    train_rows = load_split(data_dir, "train", preset.max_train_sources)
    eval_rows = load_split(data_dir, eval_split, preset.max_eval_sources)
    dev_rows = load_split(data_dir, "dev", preset.max_eval_sources) if preset.eval_every else []
    if preset.langs is not None:
        missing = sorted(set(preset.langs) - {row["lang"] for row in train_rows})
        if missing:
            raise ValueError(f"--langs names {missing}, which {data_dir} has no training pairs of")
        train_rows, eval_rows, dev_rows = ([row for row in rows if row["lang"] in preset.langs]
                                           for rows in (train_rows, eval_rows, dev_rows))  # fmt: skip
    extra_rows, extra_dir = [], None
    if test_pairs is not None:
        extra_dir = cache / f"test-pairs-{fingerprint(Path(test_pairs).read_bytes(), direction)}"
        if not (extra_dir / "test.jsonl").is_file():
            builder.synthesise_pairs(test_pairs, extra_dir, direction=direction)
        extra_rows = load_split(extra_dir, "test")
    langs = sorted({group_of(row["lang"], row.get("task")) for row in eval_rows})  # languages (x tasks)
    log(f"[{preset.name}] {direction}: {len(train_rows)} training pairs, {len(eval_rows)} {eval_split} pairs, "
        f"languages {langs}")

    all_rows = train_rows + eval_rows + dev_rows
    dense, processor, model_id = load_dense(preset, sorted({row["lang"] for row in all_rows + extra_rows}), cache)
    dense = dense.to(device)
    tokenizer = processor.tokenizer
    for lang in sorted({row["lang"] for row in eval_rows}):
        language_token_id(tokenizer, lang)
    clock = time.perf_counter()
    data_id = data_fingerprint(data_dir)
    frames = note_context_frames(data_dir, all_rows, preset)
    if extra_rows:
        frames = max(frames, note_context_frames(extra_dir, extra_rows, preset))
    states_dir = cache / f"encoder-states-{fingerprint(model_id)}"
    states = encoder_states(dense, processor, data_dir, all_rows, frames, states_dir, device, log)
    if extra_rows:
        extra_states = encoder_states(dense, processor, extra_dir, extra_rows, frames, states_dir, device, log)
        states.update({f"pairs:{name}": state for name, state in extra_states.items()})
        extra_rows = [dict(row, audio=f"pairs:{row['audio']}") for row in extra_rows]
    encoder_seconds = time.perf_counter() - clock
    log(f"encoder states: {len(states)} clips, {frames} frames cached each (batches keep their longest clip's own "
        f"need), {encoder_seconds:.0f} s")
    vocabulary = None
    if preset.restrict_vocab:
        texts = [row["target"] for row in all_rows + extra_rows]
        dense, vocabulary = restrict_vocabulary(dense, tokenizer, texts, sorted({r["lang"] for r in all_rows + extra_rows}))
        dense = dense.to(device)
        model_id = f"{model_id}:vocab{fingerprint(vocabulary.kept)}"
        log(f"output vocabulary restricted to {len(vocabulary.kept)} tokens (target side + prompt specials)")

    def examples(rows):
        return make_examples(rows, tokenizer, preset, direction, vocabulary)

    train_examples = examples(train_rows)
    eval_examples = examples(eval_rows)
    lengths = defaultdict(list)
    for example in train_examples:
        lengths[example.group].append(len(example.labels) - 3)
    all_langs = sorted({group_of(row["lang"], row.get("task")) for row in eval_rows + extra_rows + dev_rows})
    max_new_tokens = {
        lang: (math.ceil(np.percentile(lengths[lang], preset.generation_percentile)) if lengths[lang]
               else preset.max_target_tokens) + preset.generation_slack
        for lang in all_langs
    }
    ctx = dict(preset=preset, device=device, dense=dense, tokenizer=tokenizer, states=states, direction=direction,
               train_examples=train_examples, eval_examples=eval_examples, max_new_tokens=max_new_tokens,
               dev_examples=examples(dev_rows), extra_examples=examples(extra_rows), keep_models=keep_models,
               out=out, vocabulary=vocabulary)  # fmt: skip

    def planned(of: Preset) -> list[tuple[Method, int]]:
        # seed by seed (every method of seed 0 first): an interrupted grid leaves complete seeds, which pair
        return [(METHODS[name], seed if METHODS[name].train else 0) for seed in of.seeds for name in of.methods
                if (METHODS[name].train or seed == of.seeds[0]) and not same_run_as_spri(of, METHODS[name])]

    def prepare(method: Method, seed: int) -> tuple[dict, dict, Path]:
        run_ctx = ctx
        if method.compute_matched_from:
            matched = compute_matched_steps(grid, method, out)
            run_ctx = dict(ctx, preset=replace(preset, steps=matched["steps"]))
        spec = run_spec(method, seed, run_ctx["preset"], model_id, data_id, eval_split)
        if method.compute_matched_from:
            spec["compute_matched"] = matched
        if test_pairs is not None:
            spec["test_pairs"] = fingerprint(Path(test_pairs).read_bytes())
        return run_ctx, spec, out / "runs" / f"{method.name}-seed{seed}.json"

    # a compute-matched budget comes from the grid's first seed, also in a process given later seeds (`--seeds 1,2`)
    grid = summary_preset or preset
    results = []
    runs = planned(preset)
    for name in preset.methods:
        if same_run_as_spri(preset, METHODS[name]):
            schedule = stage1_schedule(preset, METHODS[name])
            log(f"{name}: stage 1 {schedule} is spri's own schedule; spri's run is its row")
    for method, seed in runs:
        run_ctx, spec, path = prepare(method, seed)
        result = find_finished(spec, path, [Path(folder) for folder in reuse])
        if result is not None:
            log(f"{method.name} seed {seed}: finished before, chrF++ {result['metrics']['chrf']:.2f}")
            if not path.is_file() or json.loads(path.read_text()).get("spec") != spec:
                write_json(path, result)
        else:
            log(f"{method.name} seed {seed}: {method.description or method.settings}")
            clock = time.perf_counter()
            result = run_one(method, seed, run_ctx, log) | {"spec": spec}
            result["timings"]["total_s"] = time.perf_counter() - clock
            write_json(path, result)
            log(f"    chrF++ {result['metrics']['chrf']:.2f} BLEU {result['metrics']['bleu']:.2f} "
                f"CE {result['metrics'].get('cross_entropy', float('nan')):.3f} ({result['timings']['total_s']:.0f} s)")
        if result["routing"]:
            plot_routing(result, out / "plots" / f"routing-{method.name}-seed{seed}.png")
        results.append(result)
    if summary_preset is not None:
        order = planned(summary_preset)
        for method, seed in [(method, seed) for method, seed in order if (method, seed) not in runs]:
            if method.compute_matched_from and not all(
                (out / "runs" / f"{name}-seed{grid.seeds[0]}.json").is_file()
                for name in ("dense", method.compute_matched_from)
            ):
                continue  # its step budget is not fixed before those runs exist, so it cannot have run yet
            _, spec, path = prepare(method, seed)
            result = find_finished(spec, path, [Path(folder) for folder in reuse])
            if result is not None:
                results.append(result)
        position = {(method.name, seed): i for i, (method, seed) in enumerate(order)}
        results.sort(key=lambda result: position.get((result["method"], result["seed"]), len(position)))
        log(f"summary: {len(results)} finished runs of preset {summary_preset.name} ({len(runs)} of this invocation)")

    summary = {
        "preset": preset.name,
        "direction": direction,
        "model": model_id,
        "budget": {key: value for key, value in asdict(preset).items() if key not in ("name", "methods", "seeds")},
        "seeds": sorted({result["seed"] for result in results}) or list(preset.seeds),
        "eval_split": eval_split,
        "languages": langs,
        "bleu_tokenize": {lang: bleu_tokenizer(lang) for lang in langs},
        "max_new_tokens": max_new_tokens,
        "data": {
            "path": str(data_dir),
            "fingerprint": data_id,
            "train_pairs": len(train_rows),
            "eval_pairs": len(eval_rows),
            "context_frames": frames,
            "test_pairs_file": str(test_pairs) if test_pairs else None,
        },
        "environment": {
            "device": str(device) if device.type != "cpu"
            else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "spri_hf": spri_hf.__version__,
            "sacrebleu": __import__("sacrebleu").__version__,
        },
        "methods": summarise(results, all_langs if extra_rows else langs),
        "paired": paired_differences(results),
        "paired_per_task": paired_by_task(results, [example.task for example in eval_examples]),
        "encoder_seconds": encoder_seconds,
    }
    if check_context:
        summary["context_check"] = context_check(dense, processor, data_dir, eval_rows, preset, device, log)
    summary["wall_seconds"] = time.perf_counter() - started
    plot_summary(summary, out / "plots")
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(markdown(summary), encoding="utf-8")
    log(f"wrote {out / 'summary.md'} ({summary['wall_seconds'] / 60:.1f} min)")
    return summary


def select_learning_rates(preset: Preset, grid: list[float], data_dir: Path, out: Path, device, cache: Path,
                          log=print) -> dict:
    """Seed 0 of every trained method at every rate of `grid` on the dev split; the best chrF++ per method."""
    choice, table = {}, {}
    for lr in grid:
        trial = replace(preset, name=f"{preset.name}-lr{lr:g}", learning_rate=lr, learning_rates=(), seeds=(0,),
                        methods=tuple(name for name in preset.methods  # compute-matched: their base method's rate
                                      if METHODS[name].train and not METHODS[name].compute_matched_from))  # fmt: skip
        summary = run_benchmark(trial, data_dir, out / f"lr{lr:g}", device, cache, eval_split="dev", log=log)
        for name, row in summary["methods"].items():
            table.setdefault(name, {})[f"{lr:g}"] = row["chrf"]["mean"]
    for name, scores in table.items():
        choice[name] = float(max(scores, key=scores.get))
    result = {"grid": grid, "dev_chrf": table, "chosen": choice}
    if "spri" in choice:
        result["stage1"] = select_stage1(preset, choice["spri"], table["spri"][f"{choice['spri']:g}"], data_dir, out,
                                         device, cache, log)  # fmt: skip
    write_json(out / "lr-selection.json", result)
    log(f"learning rates chosen on dev: {choice}" + (f"; spri's stage 1: {result['stage1']['chosen'] or 'defaults'}"
                                                     if "stage1" in result else ""))
    return result


def select_stage1(preset: Preset, spri_lr: float, spri_chrf: float, data_dir: Path, out: Path, device, cache: Path,
                  log=print) -> dict:
    """spri's stage-1 length and rate on dev (seed 0, at spri's chosen learning rate), one setting at a time from the
    preset's: the best length of {STAGE1_CANDIDATES' lengths, the preset's} and the best rate likewise. Returns the
    dev scores and `chosen`, the settings that differ from the preset's (empty: keep them)."""
    trial = replace(preset, name=f"{preset.name}-stage1", learning_rates=(("spri", spri_lr),), seeds=(0,),
                    methods=STAGE1_CANDIDATES, stage1_choice=())
    summary = run_benchmark(trial, data_dir, out / "stage1", device, cache, eval_split="dev", log=log)
    defaults = {"stage1_fraction": preset.stage1_fraction, "stage1_lr_multiplier": preset.stage1_lr_multiplier}
    scores, chosen = {key: {"default": spri_chrf} for key in defaults}, {}
    for name in STAGE1_CANDIDATES:
        ((key, value),) = METHODS[name].stage1.items()
        scores[key][f"{value:g}"] = summary["methods"][name]["chrf"]["mean"]
    for key, row in scores.items():
        best = max(row, key=row.get)
        if best != "default":
            chosen[key] = float(best)
    return {"learning_rate": spri_lr, "dev_chrf": scores, "chosen": chosen}


if __name__ == "__main__":
    sys.exit(main())
