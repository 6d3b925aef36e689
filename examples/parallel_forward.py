"""Load a stage-2 SPRI checkpoint sharded by transformers (tensor and/or expert parallel), run one forward and
backward, and write what came out, for comparison with a single process.

Two processes on CPU (gloo)::

    torchrun --nproc-per-node 2 examples/parallel_forward.py CHECKPOINT --mode tp --output out/tp
    torchrun --nproc-per-node 2 examples/parallel_forward.py CHECKPOINT --mode tp+ep --output out/tp_ep

One process (the reference; no launcher)::

    python examples/parallel_forward.py CHECKPOINT --mode single --output out/single

Modes: `tp` = `DistributedConfig(tp_plan="auto")` (the model's tensor-parallel plan over all ranks; the same as the
older `from_pretrained(..., tp_plan="auto")`), `ep` = `DistributedConfig(fsdp_size=N, ep_size=N)` (experts
split across the ranks by expert, tokens dispatched all-to-all; `tp_size=N, ep_size=N, tp_plan={}` raises in
transformers 5.24, see docs/DISTRIBUTED.md), `tp+ep` = `DistributedConfig(tp_size=N, ep_size=N)` (attention
tensor-parallel, experts expert-parallel). `--ep-implementation` picks how tokens reach their experts ("auto":
all-reduce at inference, all-to-all under autograd; "all_to_all"; "all_reduce").

Rank 0 writes `{output}/result.safetensors`: the logits of an inference forward (`logits_eval`, no autograd) and of
a training forward (`logits_train`), the loss, and the full gradient of every parameter (`grad.<name>`, sharded
gradients gathered); and `{output}/rank{RANK}.json` on every rank: the loss, how many (token, slot) pairs each MoE
layer routed to each expert (global ids), and which experts this rank holds. `--save-to FOLDER` first saves the
sharded model with `save_pretrained` (called on every rank; the shards are gathered, rank 0 writes).
"""

import argparse
import json
import os
from datetime import timedelta

import torch
from safetensors.torch import save_file
from transformers.distributed import DistributedConfig
from transformers.utils import logging

import spri_hf  # noqa: F401  (registers model_type="spri")
from spri_hf import SpriForCausalLM


def distributed_config(mode: str, world_size: int, ep_implementation: str) -> DistributedConfig | None:
    if mode == "single":
        return None
    if mode == "tp":
        return DistributedConfig(tp_plan="auto")
    if mode == "ep":
        return DistributedConfig(fsdp_size=world_size, ep_size=world_size, ep_implementation=ep_implementation)
    if mode == "tp+ep":
        return DistributedConfig(tp_size=world_size, ep_size=world_size, ep_implementation=ep_implementation)
    raise ValueError(f"--mode {mode!r}: use single, tp, ep or tp+ep.")


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a DTensor is gathered: collective, every rank must call it)."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", torch.float32).contiguous()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--mode", default="single", choices=("single", "tp", "ep", "tp+ep"))
    parser.add_argument("--output", required=True)
    parser.add_argument("--ep-implementation", default="auto")
    parser.add_argument("--experts-implementation", default="eager", choices=("eager", "batched_mm", "grouped_mm"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--save-to", default=None, help="save_pretrained() the loaded (sharded) model there first")
    args = parser.parse_args(argv)
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.mode != "single" and not torch.distributed.is_initialized():
        # transformers would init the group itself (default timeout 10 min); a short one turns a hang into an error
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=120))

    model = SpriForCausalLM.from_pretrained(
        args.checkpoint,
        distributed_config=distributed_config(args.mode, world_size, args.ep_implementation),
        experts_implementation=args.experts_implementation,
        dtype=torch.float32,
    )
    if args.save_to:  # every rank gathers its shards; rank 0 writes the folder
        model.save_pretrained(args.save_to)
    counts = {}

    def count(name):
        def hook(module, inputs, output):
            index = output[2].reshape(-1)
            counts.setdefault(name, []).append(torch.bincount(index, minlength=module.num_experts).tolist())

        return hook

    for stack, idx, block in model.moe_sites():
        block.router.register_forward_hook(count(f"{stack}.{idx}"))
    held = {}
    for stack, idx, block in model.moe_sites():
        experts = block.experts
        shapes = {
            name: list(getattr(param, "_local_tensor", param).shape) for name, param in experts.named_parameters()
        }
        held[f"{stack}.{idx}"] = {
            "local_experts": experts.num_experts, "expert_parallel": experts._is_expert_parallel, "local_shapes": shapes,
        }  # fmt: skip

    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(3, model.config.base_config.vocab_size, (args.batch, args.seq_len), generator=generator)
    model.eval()
    with torch.no_grad():
        logits_eval = model(input_ids).logits
    model.train()  # dropout is 0 in these configs; train mode routes through the autograd paths
    output = model(input_ids, labels=input_ids)
    output.loss.backward()
    result = {"logits_eval": full(logits_eval), "logits_train": full(output.logits), "loss": full(output.loss)}
    for name, param in model.named_parameters():
        if param.grad is not None:
            result[f"grad.{name}"] = full(param.grad)
    if rank == 0:
        os.makedirs(args.output, exist_ok=True)
        save_file(result, os.path.join(args.output, "result.safetensors"))
    report = {
        "rank": rank, "world_size": world_size, "mode": args.mode, "loss": output.loss.item(),
        "tp_size": model.tp_size, "expert_token_counts": counts, "experts": held,
    }  # fmt: skip
    os.makedirs(args.output, exist_ok=True)
    with open(os.path.join(args.output, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    print(f"rank {rank}/{world_size} mode={args.mode}: loss={report['loss']:.6f}")


if __name__ == "__main__":
    main()
