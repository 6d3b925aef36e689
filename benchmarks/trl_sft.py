"""SPRI inside TRL on the real SmolLM2-135M-Instruct: `SpriSFTTrainer` (both stages, the library defaults) against
`SFTTrainer` on the same SPRI model in stage 2 only and `SFTTrainer` on the dense model.

Data: the shipped En->XX LibreOffice pairs (spri_hf/data) as conversational prompt/completion rows, with
SmolLM2's own chat template; 10 sentences per language held out (their sources never appear in training). Every
method trains the same steps on the same batches (same seed); the held-out loss is the completion tokens' mean
cross-entropy (no router loss), measured the same way for every model, also before training (the trivial baseline).
Wall time is TRL's `train_runtime`, measured in this one process, side by side.

    python -m benchmarks.trl_sft --out docs/results/trl-sft --steps 32 --seeds 0 1 2
"""

import argparse
import json
import math
import os
import platform
import time

import torch
from datasets import Dataset

from spri_hf.demo import chat_rows, load_pairs, split_pairs


HELD_OUT_PER_LANGUAGE = 10
MOE_LAYERS = [0, 5, 10, 15, 20, 25]  # as the demo: every 5th FFN layer


@torch.no_grad()
def completion_loss(model, dataset, batch_size: int = 8) -> float:
    """Mean cross-entropy of the completion tokens of TRL's tokenized `dataset` (no router loss added): each target
    token is scored from the logits at the position before it."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        length = max(len(row["input_ids"]) for row in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        target = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids[i, :n] = torch.tensor(row["input_ids"])
            mask[i, :n] = 1
            if "labels" in row:  # TRL >= 1.16 keeps the completion as labels (-100 elsewhere)
                target[i, :n] = torch.tensor(row["labels"]) != -100
            else:
                target[i, :n] = torch.tensor(row["completion_mask"], dtype=torch.bool)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        labels, chosen = ids[:, 1:], target[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        total += losses[chosen].sum().item()
        count += int(chosen.sum())
    return total / count


def run(method: str, seed: int, steps: int, args, train_set, eval_set, dense, tokenizer) -> dict:
    from trl import SFTConfig, SFTTrainer

    from spri_hf import SpriForCausalLM
    from spri_hf.trl import SpriSFTConfig, SpriSFTTrainer

    torch.manual_seed(seed)
    settings = dict(
        output_dir=os.path.join(args.out, "runs", f"{method}-seed{seed}"), max_steps=steps, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, seed=seed, data_seed=seed, max_length=128, gradient_checkpointing=False,
        disable_tqdm=True,
    )  # fmt: skip
    if method == "dense":
        model = _copy(dense)
        trainer_class, config = SFTTrainer, SFTConfig(**settings)
    else:
        model = SpriForCausalLM.from_dense(_copy(dense), num_experts=8, num_experts_per_tok=2, moe_layers=MOE_LAYERS,
                                           seed=seed)
        if method == "spri-sft-stage2-only":
            model.set_stage(2)
            trainer_class, config = SFTTrainer, SFTConfig(**settings)
        else:
            trainer_class, config = SpriSFTTrainer, SpriSFTConfig(**settings)
    # TRL tokenizes the eval set as the training set (chat template, completion mask); no evaluation runs in training
    trainer = trainer_class(model=model, args=config, train_dataset=train_set, eval_dataset=eval_set,
                            processing_class=tokenizer)
    tokenized_eval = trainer.eval_dataset
    before = completion_loss(trainer.model, tokenized_eval)
    started = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - started
    after = completion_loss(trainer.model, tokenized_eval)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    return {
        "method": method, "seed": seed, "steps": steps, "held_out_before": before, "held_out_after": after,
        "train_runtime": output.metrics.get("train_runtime"), "wall_s": wall,
        "losses": [entry["loss"] for entry in logs], "stages": [entry.get("stage") for entry in logs],
        "learning_rates": [entry.get("learning_rate") for entry in logs],
    }  # fmt: skip


def _copy(model):
    """A plain copy of the dense model (the GGUF-loaded one is marked as quantized, though its weights are
    dequantised, and Trainer refuses to fine-tune those)."""
    fresh = type(model)(model.config)
    fresh.load_state_dict(model.state_dict())
    return fresh


def summarize(results: list[dict]) -> str:
    methods = sorted({r["method"] for r in results}, key=["dense", "spri-sft-stage2-only", "spri-sft-two-stage"].index)
    lines = [
        "| method | held-out loss before | held-out loss after (mean ± std over seeds) | train time s (mean) | seeds |",
        "|---|---|---|---|---|",
    ]
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        after = [r["held_out_after"] for r in rows]
        mean = sum(after) / len(after)
        std = math.sqrt(sum((x - mean) ** 2 for x in after) / max(len(after) - 1, 1))
        before = sum(r["held_out_before"] for r in rows) / len(rows)
        runtime = sum(r["train_runtime"] for r in rows) / len(rows)
        lines.append(f"| {method} | {before:.3f} | {mean:.3f} ± {std:.3f} | {runtime:.0f} | {len(rows)} |")
    lines += ["", "Paired by seed (same data order and upcycling seed): held-out loss after, difference to dense, mean "
              "and 95% t-interval over seeds; an interval that includes 0 is no difference. Time ratio: train time "
              "over dense's, same seed.", "", "| method | Δ loss vs dense [95% CI] | time ratio vs dense |",
              "|---|---|---|"]  # fmt: skip
    dense = {r["seed"]: r for r in results if r["method"] == "dense"}
    for method in methods:
        if method == "dense":
            continue
        rows = [r for r in results if r["method"] == method and r["seed"] in dense]
        diffs = [r["held_out_after"] - dense[r["seed"]]["held_out_after"] for r in rows]
        ratios = [r["train_runtime"] / dense[r["seed"]]["train_runtime"] for r in rows]
        if not diffs:
            continue
        mean = sum(diffs) / len(diffs)
        if len(diffs) > 1:
            half = T_975[len(diffs) - 1] * math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
            interval = f"[{mean - half:+.3f}, {mean + half:+.3f}]"
        else:
            interval = "(one seed)"
        lines.append(f"| {method} | {mean:+.3f} {interval} | {sum(ratios) / len(ratios):.2f} |")
    return "\n".join(lines)


# two-sided 95% quantiles of Student's t by degrees of freedom (few seeds)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def around_the_switch(results: list[dict], width: int = 3) -> str:
    """The training loss step by step around the two-stage runs' switch, next to the other methods at the same steps
    (means over seeds): what the re-warm-up is for."""
    two_stage = [r for r in results if r["method"] == "spri-sft-two-stage"]
    if not two_stage:
        return ""
    switch = min(i for i, stage in enumerate(two_stage[0]["stages"]) if stage == 2)  # first stage-2 step, 0-based
    steps = range(max(switch - width, 0), min(switch + width + 1, len(two_stage[0]["losses"])))
    methods = [m for m in ("dense", "spri-sft-stage2-only", "spri-sft-two-stage") if any(r["method"] == m for r in results)]
    lines = ["| step | " + " | ".join(methods) + " | two-stage: stage |", "|---" * (len(methods) + 2) + "|"]
    for step in steps:
        cells = []
        for method in methods:
            losses = [r["losses"][step] for r in results if r["method"] == method]
            cells.append(f"{sum(losses) / len(losses):.3f}")
        lines.append(f"| {step + 1} | " + " | ".join(cells) + f" | {two_stage[0]['stages'][step]} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trl_sft", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/results/trl-sft")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", nargs="+", default=["dense", "spri-sft-stage2-only", "spri-sft-two-stage"])
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    from spri_hf import assets

    dense, tokenizer = assets.load_smollm2()
    train_pairs, held_out = split_pairs(load_pairs(), per_language=HELD_OUT_PER_LANGUAGE)
    train_set, eval_set = Dataset.from_list(chat_rows(train_pairs)), Dataset.from_list(chat_rows(held_out))
    path = os.path.join(args.out, "results.json")
    results = []
    if os.path.exists(path):  # finished runs are kept: an interrupted benchmark resumes
        with open(path) as handle:
            results = json.load(handle)
    done = {(r["method"], r["seed"], r["steps"]) for r in results}
    for seed in args.seeds:
        for method in args.methods:
            if (method, seed, args.steps) in done:
                continue
            result = run(method, seed, args.steps, args, train_set, eval_set, dense, tokenizer)
            results.append(result)
            with open(path, "w") as handle:
                json.dump(results, handle, indent=1)
            print(json.dumps({k: v for k, v in result.items() if k not in ("losses", "stages", "learning_rates")}))
    table = summarize([r for r in results if r["steps"] == args.steps])
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    with open(os.path.join(args.out, "summary.md"), "w") as handle:
        handle.write(f"# SPRI in TRL on SmolLM2-135M-Instruct ({args.steps} steps, batch {args.batch_size}, lr "
                     f"{args.lr:g})\n\n{machine}\n\n{table}\n")
        switch = around_the_switch([r for r in results if r["steps"] == args.steps])
        if switch:
            handle.write(f"\n## Training loss around the switch (means over seeds)\n\n{switch}\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
