"""Two-stage SPRI training with the stock `Trainer`, single- or multi-process (DDP or FSDP2 through accelerate).

Multi-process on CPU (gloo), 2 processes::

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port 29511 examples/train_distributed.py --output-dir out/dist

FSDP2 (`TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})`, one unit per decoder layer, full-state-dict
checkpoints), 2 processes::

    torchrun --nproc-per-node 2 examples/train_distributed.py --fsdp --save-final --output-dir out/fsdp

Single process::

    python examples/train_distributed.py --output-dir out/single

`--multi_gpu` is accelerate's name for "spawn N processes with torchrun"; it also works without GPUs. Do NOT use
`accelerate launch --cpu --num_processes 2`: in accelerate 1.15 `--cpu` selects the simple launcher, which starts a
single process (multi-process CPU launching with `--cpu` needs MPI and `--mpirun_hostfile`). On a machine without a GPU
the script sets `use_cpu=True`, which makes accelerate pick `MULTI_CPU` with the gloo backend; without it every
process would silently train on its own (`DistributedType.NO`).

What it does: build a tiny random dense Llama (same seed on every rank) or load `--dense PATH`, upcycle it with
`init="spri"`, and run one `SpriTrainer.train()`: stage 1 (routers + residual factors) for `--steps` steps at
`--lr-stage1`, the switch (`set_stage(2)`, a checkpoint, the DDP wrapper and optimizer rebuilt over the new expert
parameters), and stage 2 (everything) for `--steps` steps at `--lr-stage2` after a re-warm-up. Every rank then writes
`{output_dir}/rank{RANK}.json` with a sha256 of its final state_dict, the per-expert token counts its routers saw in
every training forward pass and the logged losses of both stages, and `rank{RANK}.safetensors` with its weights.
Under FSDP the weights are gathered from the shards onto rank 0, which alone writes the sha256 and the safetensors
file; each rank's json records how many parameter elements it held (`sharding`, per stage). On CPU, `--fsdp` goes
through `CpuFsdpTrainer` (below): accelerate 1.15 enables FSDP for accelerator devices only.
"""

import argparse
import hashlib
import json
import os

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback
from transformers.utils import logging

import spri_hf  # noqa: F401  (registers model_type="spri" with the auto classes)
from spri_hf import SpriForCausalLM, SpriTrainer, SpriTrainingArguments


VOCAB = 97


class ProgressionDataset(Dataset):
    """Arithmetic progressions with a random start: a small learnable causal-LM task, identical on every rank."""

    def __init__(self, size: int, length: int, vocab: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(size):
            start = int(torch.randint(3, 20, (1,), generator=generator))
            step = int(torch.randint(1, 7, (1,), generator=generator))
            seq = [3 + (start + step * j) % (vocab - 3) for j in range(length)]
            self.rows.append({"input_ids": seq, "labels": seq})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class ExpertTokenCounter(TrainerCallback):
    """Counts, per training forward pass, how many (token, slot) pairs each MoE layer's router sent to each expert.

    A forward hook on every `SpriMoeBlock.router` reads the router's `top_k_index` output. Routers are kept by
    `set_stage(2)` (only the experts are replaced), so under DDP the same hooks cover both stages; under FSDP the
    switch builds a new model object, and the callback hooks its routers at the next step.
    """

    def __init__(self, model: SpriForCausalLM):
        self.num_experts = model.config.num_experts
        self.layers = sorted(model.moe_blocks())
        self.steps: dict[str, list[list[list[int]]]] = {}  # stage -> [forward][layer][expert]
        self._pending: list[list[int]] = []
        self._handles = []
        self.sharding: dict[str, dict[str, int]] = {}  # stage -> element counts at its first step
        self.attach(model)

    def attach(self, model):
        self.remove()
        self.model = model
        self._handles = [
            block.router.register_forward_hook(self._hook) for _, block in sorted(model.moe_blocks().items())
        ]

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and model is not self.model:
            self.attach(model)
        stage = str(self.model.config.stage)
        if stage not in self.sharding:  # what this rank holds of the parameters: local vs whole element counts
            params = list(self.model.parameters())
            local = sum(getattr(p, "_local_tensor", p).numel() for p in params)
            self.sharding[stage] = {"local_numel": local, "numel": sum(p.numel() for p in params),
                                    "dtensor_params": sum(type(p).__name__ == "DTensor" for p in params)}  # fmt: skip

    def _hook(self, module, inputs, output):
        if not module.training:
            return
        top_k_index = output[2]
        counts = torch.bincount(top_k_index.reshape(-1), minlength=self.num_experts)
        self._pending.append(counts.tolist())
        if len(self._pending) == len(self.layers):  # one full forward pass seen: record it as one step
            self.steps.setdefault(str(self.model.config.stage), []).append(self._pending)
            self._pending = []

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def tiny_dense_llama(seed: int):
    """A tiny random dense Llama; the explicit seed makes it bit-identical on every rank."""
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the state_dict in sorted-name order: each name, then the tensor's float32 bytes."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def training_args(args, world_size: int) -> SpriTrainingArguments:
    """Both stages in one run: stage 1 for `--steps`, then stage 2 for `--steps` after a re-warm-up."""
    return SpriTrainingArguments(
        output_dir=args.output_dir,
        max_steps=2 * args.steps,
        stage1_steps=args.steps,
        stage1_learning_rate=args.lr_stage1,
        learning_rate=args.lr_stage2,
        stage2_warmup_steps=args.stage2_warmup_steps,
        per_device_train_batch_size=args.batch_size,
        logging_steps=1,
        save_strategy="no",  # SpriTrainer still writes the checkpoint at the switch: stage 2 starts from it
        report_to=[],
        # Without a GPU, use_cpu=True is what makes accelerate choose MULTI_CPU (gloo) under a multi-process launch.
        use_cpu=not torch.cuda.is_available(),
        # Every trainable tensor gets a gradient each step, even with idle experts: experts are fused (E, ...)
        # parameters indexed per expert, so idle rows get zeros and the reducer never waits on an unused parameter.
        ddp_find_unused_parameters=False,
        seed=args.seed,
        data_seed=args.seed,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **(fsdp_settings(args) if args.fsdp else {}),
    )


def fsdp_settings(args) -> dict:
    """FSDP2 through accelerate: one unit per decoder layer, full (save_pretrained-compatible) checkpoints."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": args.fsdp_wrap.split(","),
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


class CpuFsdpTrainer(SpriTrainer):
    """SpriTrainer with FSDP on CPU processes (gloo). accelerate 1.15 turns FSDP on only for accelerator devices
    (`DistributedType.MULTI_GPU` and its kin): on CPU it keeps `MULTI_CPU` and trains plain DDP, without a word,
    although `TrainingArguments(fsdp=...)` built the plugin. torch's FSDP2 itself runs on CPU with gloo, so this
    trainer makes the switch accelerate makes on GPUs (`distributed_type = FSDP` in the shared accelerate state, the
    plugin set);
    from there on every step is accelerate's and transformers' own FSDP2 code. Not needed (not used) on GPUs."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is not None and not self.is_fsdp_enabled:
            from accelerate.state import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            # both shared states, as AcceleratorState.__init__ does (a later AcceleratorState() re-reads PartialState's)
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True


def full_state_dict(trainer) -> dict[str, torch.Tensor]:
    """The model's whole state dict on rank 0 (`{}` on the others): gathered from the shards under FSDP."""
    model = trainer.model
    if trainer.is_fsdp_enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--dense", default=None, help="local dense checkpoint folder (default: a tiny random Llama)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per stage")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=1, help="per device; tiny so that some experts idle")
    parser.add_argument("--seq-len", type=int, default=8)
    parser.add_argument("--lr-stage1", type=float, default=3e-2)
    parser.add_argument("--lr-stage2", type=float, default=3e-3)
    parser.add_argument("--stage2-warmup-steps", type=float, default=1)
    parser.add_argument(
        "--router-aux-loss-coef", type=float, default=0.01,
        help="0 makes the loss a plain token mean, so N processes equal one process with the same global batch",
    )
    parser.add_argument(
        "--experts-implementation", default=None, choices=("eager", "batched_mm", "grouped_mm"),
        help="experts kernel of both stages (default: the model's, grouped_mm)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (accelerate) instead of DDP")
    parser.add_argument("--fsdp-wrap", default="LlamaDecoderLayer", help="classes that get their own FSDP unit")
    parser.add_argument("--save-final", action="store_true", help="trainer.save_model() into {output_dir}/final")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    logging.set_verbosity_error()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    os.makedirs(args.output_dir, exist_ok=True)

    if args.dense is None:
        dense = tiny_dense_llama(args.seed)
        vocab = VOCAB
    else:
        dense = AutoModelForCausalLM.from_pretrained(args.dense)
        vocab = dense.config.vocab_size
    model = SpriForCausalLM.from_dense(
        dense, init="spri", num_experts=args.num_experts, num_experts_per_tok=args.top_k, diversity=0.3, seed=args.seed,
        router_aux_loss_coef=args.router_aux_loss_coef,
    ).train()
    if args.experts_implementation is not None:
        model.set_experts_implementation(args.experts_implementation)
    del dense
    dataset = ProgressionDataset(size=64, length=args.seq_len, vocab=vocab, seed=args.seed)
    counter = ExpertTokenCounter(model)

    train_args = training_args(args, world_size)
    if train_args.world_size != world_size:  # fail loudly instead of training N independent copies
        raise RuntimeError(f"launched {world_size} processes but Trainer sees world_size={train_args.world_size}")
    # One train(): stage 1, set_stage(2) with the stage-2 optimizer (and DDP wrapper) rebuilt, stage 2.
    trainer_class = CpuFsdpTrainer if args.fsdp and not torch.cuda.is_available() else SpriTrainer
    trainer = trainer_class(model=model, args=train_args, train_dataset=dataset, callbacks=[counter])
    trainer.train()
    counter.remove()
    if args.save_final:  # under FSDP every rank takes part in the gather; rank 0 writes
        trainer.save_model(os.path.join(args.output_dir, "final"))
    state = full_state_dict(trainer)
    model = trainer.model  # under FSDP the switch replaced the model object
    losses = {"1": [], "2": []}
    for entry in trainer.state.log_history:
        if "loss" in entry:
            losses[str(entry["stage"])].append(entry["loss"])

    idle = sum(count == 0 for steps in counter.steps.values() for step in steps for layer in step for count in layer)
    report = {
        "rank": rank,
        "world_size": world_size,
        "distributed_type": str(train_args.distributed_state.distributed_type),
        "backend": train_args.distributed_state.backend,
        "final_stage": model.config.stage,
        "switch_step": trainer.switch_step,
        "num_experts": args.num_experts,
        "top_k": args.top_k,
        "moe_layers": counter.layers,
        "fsdp": trainer.is_fsdp_enabled,
        "state_dict_sha256": state_dict_sha256(state) if state else None,
        "losses": losses,
        "expert_token_counts": counter.steps,  # stage -> [step][layer][expert]
        "sharding": counter.sharding,
        "idle_expert_slots": int(idle),  # (step, layer, expert) triples that received no token on this rank
    }
    with open(os.path.join(args.output_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    if state:  # every rank (DDP), or rank 0 (FSDP, which gathered the shards there)
        save_file({k: v.detach().contiguous() for k, v in state.items()},
                  os.path.join(args.output_dir, f"rank{rank}.safetensors"))  # fmt: skip
    print(f"rank {rank}/{world_size}: sha256={(report['state_dict_sha256'] or '-')[:16]} idle_expert_slots={idle}")


if __name__ == "__main__":
    main()
