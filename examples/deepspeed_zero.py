"""SPRI models under DeepSpeed ZeRO-2 / ZeRO-3, with DeepSpeed's own engine (no Trainer), for CPU processes (gloo).

    DS_ACCELERATOR=cpu torchrun --nproc-per-node 2 examples/deepspeed_zero.py --zero 3 --output out/z3
    python examples/deepspeed_zero.py --zero 0 --output out/single     # the reference: plain AdamW, one process

Why not through `Trainer`: on a machine without GPUs accelerate 1.15 does not set DeepSpeed up for several processes
(with `use_cpu=True` it never selects DeepSpeed; without it, its process state counts one process while DeepSpeed's
engine sees all of them, and the batch-size check fails), so this script drives `deepspeed.initialize` itself.

A tiny random Llama upcycled to 8 experts with top-1 routing, in SPRI stage `--spri-stage` (1: frozen shared bases and
trainable residual factors, mixed trainability in every layer; 2: full experts); each rank trains on its own 8-token
sequence per step (experts routinely get no token on a rank). Under ZeRO-3 the MoE blocks are leaf modules
(`set_z3_leaf_modules(model, [SpriMoeBlock])`: gathered whole before the block runs, so the data-dependent expert
loop runs on full weights, the same collectives on every rank). `--zero 0` runs one process on both ranks' sequences
(the same global batch). Rank 0 writes `{output}/result.json`: the per-step losses (mean over the global batch), the
tokens each expert got per rank and step, and `{output}/weights.safetensors` (the final weights, gathered).
"""

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging

from spri_hf import SpriForCausalLM, SpriMoeBlock


def tiny_model(spri_stage: int) -> SpriForCausalLM:
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, bos_token_id=1, eos_token_id=2, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = SpriForCausalLM.from_dense(
        AutoModelForCausalLM.from_config(config), num_experts=8, num_experts_per_tok=1, diversity=0.3,
        router_aux_loss_coef=0.0,
    )  # fmt: skip
    if spri_stage == 2:
        model.set_stage(2)
    model.set_experts_implementation("eager")
    return model.train()


def batch(step: int, rank: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(3, 97, (1, 8), generator=generator)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--zero", type=int, default=3, choices=(0, 2, 3), help="ZeRO stage; 0: one process, no DeepSpeed"
    )
    parser.add_argument("--spri-stage", type=int, default=2, choices=(1, 2))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "sgd"))
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--output", required=True)
    parser.add_argument("--no-leaf", dest="leaf", action="store_false", help="ZeRO-3 without leaf MoE blocks")
    args = parser.parse_args(argv)
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    model = tiny_model(args.spri_stage)
    counts = []
    for block in model.moe_blocks().values():
        block.router.register_forward_hook(
            lambda module, inputs, output: counts.append(torch.bincount(output[2].reshape(-1), minlength=8).tolist())
        )
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "sgd":  # a linear update: the runs differ by float rounding only
        optimizer = torch.optim.SGD(params, lr=args.lr)
    else:  # AdamW's first steps are sign-like: rounding differences in tiny gradients move weights by up to 2 lr
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    losses = []
    if args.zero == 0:  # the reference: both ranks' sequences in one batch
        for step in range(args.steps):
            ids = torch.cat([batch(step, 0), batch(step, 1)])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        state, rank = model.state_dict(), 0
    else:
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        deepspeed.init_distributed(dist_backend="gloo")
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        if args.zero == 3 and args.leaf:
            set_z3_leaf_modules(model, [SpriMoeBlock])
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": args.zero},
            "zero_force_ds_cpu_optimizer": False,  # torch's optimizer, not DeepSpeed's compiled CPU Adam
            "zero_allow_untested_optimizer": True,
            "gradient_clipping": 0.0,  # no clipping, as in the reference (DeepSpeed 0.19.8 clips at 1.0 otherwise)
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        for step in range(args.steps):
            ids = batch(step, rank)
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            mean = loss.detach().clone()
            torch.distributed.all_reduce(mean)
            losses.append(mean.item() / world)
        if args.zero == 3:  # gather the partitioned parameters
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state = model.state_dict()
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, counts)
        counts = gathered
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
        with open(os.path.join(args.output, "result.json"), "w") as handle:
            json.dump({"zero": args.zero, "spri_stage": args.spri_stage, "losses": losses, "counts": counts}, handle)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(args.output, "weights.safetensors"))
    print(f"rank {rank}: zero={args.zero} spri_stage={args.spri_stage} losses={losses}")


if __name__ == "__main__":
    main()
