"""The SPRI stage switch under FSDP2 (accelerate's `fsdp_version=2`, `TrainingArguments(fsdp=..., fsdp_config=...)`).

Under DDP the switch is `set_stage(2)` on the model plus a new DDP wrapper. FSDP2 instead shards the model in place:
its parameters are `DTensor` shards, its modules FSDP classes holding parameter groups fixed at wrapping time, and
the stage-1 parameters (shared bases, residual factors) that `set_stage(2)` replaces belong to those groups. So the
switch re-wraps a new model:

1. gather the stage-1 weights in full on rank 0, on CPU (`get_model_state_dict(full_state_dict=True,
   cpu_offload=True)`; every rank takes part in the all-gathers, only rank 0 keeps the result);
2. build a plain model of the same class and config: on rank 0 with those weights, then `set_stage(2)` (the
   experts `W_i = S + B_i A_i` are formed there); on the other ranks on the meta device, switched to stage 2 there
   (shapes only) and given empty CPU storage, as accelerate's `cpu_ram_efficient_loading` expects;
3. create the stage-2 optimizer and let accelerate shard the new model (`accelerator.prepare(model, optimizer)`, with
   `cpu_ram_efficient_loading` on for this call: rank 0's weights are broadcast shard by shard), so the new
   parameters, whose trainability changed at the switch (stage 1 freezes the bases, stage 2 trains everything), get
   their own FSDP parameter groups and the optimizer points at the new shards;
4. carry the optimizer state of the parameters that exist in both stages (routers, and whatever `stage1_trainable`
   names) by name: FSDP2 shards both on dim 0 over the same mesh, so the local state shards carry over as they are.

The peak memory of the switch is one full copy of the stage-2 weights in rank 0's CPU memory (as when loading with
`cpu_ram_efficient_loading`). The model object changes: `trainer.model` is a new object after the switch (forward
hooks on the stage-1 model's modules must be registered again).
"""

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .modeling_spri import SpriPreTrainedModel


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class (FSDP2 swaps in a subclass `FSDP<name>` at wrapping)."""
    for cls in type(model).__mro__:
        if issubclass(cls, SpriPreTrainedModel) and not issubclass(cls, FSDPModule):
            return cls
    raise TypeError(f"{type(model).__name__} is not a SPRI model.")


def non_persistent_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are not in the state dict (rotary `inv_freq`, ...): FSDP leaves them whole on every rank."""
    persistent = set(model.state_dict().keys())
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers() if name not in persistent}


def rebuild_in_stage2(
    model: torch.nn.Module, is_main_process: bool, activation_checkpointing_kwargs: dict | None = None
) -> torch.nn.Module:
    """A new, unsharded model of `model`'s class and config in stage 2, from `model`'s (FSDP-sharded) stage-1 weights:
    real weights on the main process, empty CPU storage elsewhere (filled by the broadcast when it is sharded)."""
    # collective: every rank all-gathers each parameter, only rank 0 keeps the (CPU) result
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    buffers = non_persistent_buffers(model)
    experts_implementation = model.config._experts_implementation
    with torch.device("meta"):
        new = unsharded_class(model)(model.config)
    if is_main_process:
        new.load_state_dict(state, strict=True, assign=True)
    del state
    for name, buffer in buffers.items():
        owner, _, attribute = name.rpartition(".")
        new.get_submodule(owner).register_buffer(attribute, buffer.cpu(), persistent=False)
    if is_main_process:
        new.tie_weights()
        new.set_stage(2)  # forms W_i = S + B_i A_i from the gathered weights
    else:
        new.set_stage(2)  # shapes only (meta), then uninitialised storage for the broadcast to fill
        new.to_empty(device="cpu")
        for name, buffer in buffers.items():  # to_empty dropped their values
            owner, _, attribute = name.rpartition(".")
            new.get_submodule(owner).register_buffer(attribute, buffer.cpu(), persistent=False)
        new.tie_weights()
    if new.config._experts_implementation != experts_implementation:
        new.set_experts_implementation(experts_implementation)
    new.generation_config = model.generation_config
    new.train(model.training)
    if model.is_activation_checkpointing:  # as Trainer enabled it on the stage-1 model
        kwargs = dict(activation_checkpointing_kwargs or {})
        every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
        new.activation_checkpointing_enable(kwargs or None, every_n_layers=every_n_layers, offload=offload)
    return new


def optimizer_state_by_name(model: torch.nn.Module, optimizer) -> dict[str, dict]:
    """The optimizer's per-parameter state, keyed by the parameter's name in `model`."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    names = {id(param): name for name, param in model.named_parameters()}
    return {names[id(p)]: optimizer.state[p] for p in optimizer.state if id(p) in names and optimizer.state[p]}


def carry_optimizer_state(model: torch.nn.Module, optimizer, carried: dict[str, dict]) -> int:
    """Put `carried` (from `optimizer_state_by_name`) onto the same-named parameters of `model` whose shards have the
    same shape; returns how many tensors kept their state."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    kept = 0
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        old = carried.get(name)
        if old is None or id(param) not in in_optimizer:
            continue
        state = {}
        for key, value in old.items():
            if isinstance(value, DTensor) and isinstance(param, DTensor):
                if value.shape != param.shape or value.to_local().shape != param.to_local().shape:
                    break
                value = DTensor.from_local(value.to_local(), param.device_mesh, param.placements, run_check=False)
            state[key] = value
        else:
            optimizer.state[param] = state
            kept += 1
    return kept


def prepare_rebuilt(accelerator, model: torch.nn.Module, optimizer):
    """`accelerator.prepare(model, optimizer)` for a model whose full weights only the main process holds."""
    plugin = accelerator.state.fsdp_plugin
    efficient = plugin.cpu_ram_efficient_loading
    plugin.cpu_ram_efficient_loading = True  # rank 0's weights are broadcast; the other ranks hold empty storage
    try:
        return accelerator.prepare(model, optimizer)
    finally:
        plugin.cpu_ram_efficient_loading = efficient


@torch.no_grad()
def initialize_missing_state(optimizer) -> int:
    """Give every trainable parameter without optimizer state a fresh-equivalent one; returns how many got one.

    torch's distributed optimizer state dict (what accelerate saves and loads under FSDP2) loads strictly: a trainable
    parameter without state in the checkpoint is an error, and the switch checkpoint is written before the new experts
    took a step. One step at learning rate 0 and weight decay 0 on zero gradients, over those parameters only, creates
    their state without moving them (for AdamW: zero moments); the step counters are then reset to 0, so their first
    real step is that of a fresh optimizer.
    """
    optimizer = getattr(optimizer, "optimizer", optimizer)
    missing = [
        p
        for group in optimizer.param_groups
        for p in group["params"]
        if p.requires_grad and not optimizer.state.get(p)
    ]
    if not missing:
        return 0
    ids = {id(p) for p in missing}
    saved = [(group["params"], group.get("lr"), group.get("weight_decay")) for group in optimizer.param_groups]
    grads = [p.grad for p in missing]
    try:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in ids]
            group["lr"] = 0.0
            if "weight_decay" in group:
                group["weight_decay"] = 0.0
        for param in missing:
            param.grad = torch.zeros_like(param)
        optimizer.step()
    finally:
        for group, (params, lr, weight_decay) in zip(optimizer.param_groups, saved):
            group["params"], group["lr"] = params, lr
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
        for param, grad in zip(missing, grads):
            param.grad = grad
    for param in missing:
        state = optimizer.state[param]
        if "step" in state:
            state["step"] = state["step"].zero_() if torch.is_tensor(state["step"]) else 0
    return len(missing)
