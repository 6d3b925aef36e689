"""Both SPRI stages in one `SpriSFTTrainer` run (TRL's SFT), single- or multi-process (DDP through accelerate).

2 processes on CPU (gloo)::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port 29512 examples/train_sft_distributed.py --output-dir out/sft-dist

A tiny random Llama (same seed on every rank) is upcycled with `init="spri"` and trained on prompt/completion rows
(completion-only loss) for `--steps` steps, the first half in stage 1. Every rank then writes
`{output_dir}/rank{RANK}.json` with a sha256 of its final state_dict, its stage and the logged stages: the ranks of a
DDP run must end bit-identical (tests/test_trl.py).
"""

import argparse
import hashlib
import json
import os

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from spri_hf import SpriForCausalLM
from spri_hf.trl import SpriSFTConfig, SpriSFTTrainer


ROWS = [{"prompt": f"count from {i}", "completion": " " + " ".join(str(i + j) for j in range(1, 5))} for i in range(32)]


def word_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [row["prompt"] + row["completion"] for row in ROWS]
    backend.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def state_sha256(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    tokenizer = word_tokenizer()
    config = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = SpriForCausalLM.from_dense(AutoModelForCausalLM.from_config(config), num_experts=4, num_experts_per_tok=2)
    training = SpriSFTConfig(
        output_dir=args.output_dir, max_steps=args.steps, stage1_steps=args.steps // 2, learning_rate=1e-3,
        per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, seed=0,
        ddp_find_unused_parameters=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = SpriSFTTrainer(model=model, args=training, train_dataset=Dataset.from_list(ROWS),
                             processing_class=tokenizer)
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    record = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "sha256": state_sha256(trainer.model),
        "stage": trainer.model.config.stage,
        "stages": [entry.get("stage") for entry in trainer.state.log_history if "loss" in entry],
        "switch_step": trainer.switch_step,
    }
    with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
