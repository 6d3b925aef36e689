"""Tensor- and expert-parallel plans of SPRI models, for transformers' native distributed loading.

`from_pretrained(..., distributed_config=DistributedConfig(...))` (or the older `tp_plan="auto"`) shards a model by
its plans: `tp_plan` (tensor parallelism), `ep_plan` (expert parallelism), `pp_plan`. A SPRI model wraps the dense
model, so it inherits the dense family's plans from that child (attention colwise/rowwise, embeddings, LM head); this
module adds the entries for what SPRI swapped in, one set per MoE block, modelled on transformers' own Mixtral and
Qwen3-MoE entries:

- tensor parallelism (experts without biases): `experts.gate_up_proj` "packed_colwise" (gate and up halves each split
  on the intermediate dim), `experts.up_proj` "colwise" (plain FFNs), `experts.down_proj` "rowwise", and the module
  `experts` "moe_tp_experts" (each rank runs its slice of every expert, the partial outputs are summed). Experts with
  biases stay whole on every TP rank (a row-split down projection would add its bias once per rank); expert
  parallelism shards them. The router is replicated: each rank routes the same (replicated) hidden states alike.
- expert parallelism: the fused expert tensors (and their biases) "grouped_gemm" (whole experts per rank, split on
  the expert dim) and the module `experts` "ep_dispatch_experts" (tokens reach their experts' rank through
  `DistributedConfig.ep_implementation`). transformers v5.24 has no router style: the dispatch reads the routing
  from the experts' inputs `(hidden_states, top_k_index, top_k_weights)`, which is `SpriExperts`' signature.
- the always-on dense shared expert (`shared_expert="dense"`) takes the dense family's own MLP entries.

Stage-1 models (`SpriResidualExperts`: shared base + per-expert low-rank factors) are refused with a message that
says to switch to stage 2 first; so is pipeline parallelism (transformers' naive split needs `base_model.layers`,
which the wrapper does not have). Shipped to the Hub with the modeling file: imports only torch and transformers.
"""

import re

import torch.distributed as dist


def layer_pattern(name: str) -> str:
    """`model.layers.3.mlp` -> `model.layers.*.mlp`: module-list indices as the wildcards parallel plans use.

    Written here rather than imported: this file is remote code of every checkpoint, and transformers < 5.20 has no
    `transformers.distributed.parallel_utils`.
    """
    return re.sub(r"\.\d+(?=\.|$)", ".*", name)


def moe_block_paths(model) -> dict[str, object]:
    """The wildcard names (`model.model.layers.*.mlp`) of the model's MoE blocks, each with its stack's FFN layout."""
    layouts = {id(block): model.ffn_layouts[stack] for stack, _, block in model.moe_sites()}
    paths = {}
    for name, module in model.named_modules():
        if id(module) in layouts:
            paths.setdefault(layer_pattern(name), layouts[id(module)])
    return paths


def expert_parallel_plans(model, dense_tp_plan: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """`(tp_entries, ep_entries)` for every MoE block of `model` (a SPRI model), in stage-2 parameter names.

    `dense_tp_plan` is the plan inherited from the dense model; its MLP entries are copied onto the shared expert.
    """
    tp_plan, ep_plan = {}, {}
    for path, layout in moe_block_paths(model).items():
        experts = f"{path}.experts"
        if model.config.stage == 1:  # no fused expert tensors yet (and TP/EP refuse stage 1): only the shared expert
            _shared_expert_entries(model, path, dense_tp_plan, tp_plan)
            continue
        up = "gate_up_proj" if layout.gated else "up_proj"
        names = [f"{experts}.{up}", f"{experts}.down_proj"]
        if layout.has_bias(model.config.base_config):
            names += [f"{experts}.{up}_bias", f"{experts}.down_proj_bias"]
        else:
            tp_plan[names[0]] = "packed_colwise" if layout.gated else "colwise"
            tp_plan[names[1]] = "rowwise"
            tp_plan[experts] = "moe_tp_experts"
        ep_plan.update(dict.fromkeys(names, "grouped_gemm"))
        ep_plan[experts] = "ep_dispatch_experts"
        _shared_expert_entries(model, path, dense_tp_plan, tp_plan)
    return tp_plan, ep_plan


def _shared_expert_entries(model, path: str, dense_tp_plan: dict[str, str], tp_plan: dict[str, str]) -> None:
    """The always-on dense shared expert is the dense MLP, kept whole: the dense family's MLP entries, under it."""
    if model.config.shared_expert != "dense":
        return
    for name, style in dense_tp_plan.items():
        if name.startswith(f"{path}.") and not name.startswith(f"{path}.experts."):
            tp_plan[f"{path}.shared_expert.{name[len(path) + 1 :]}"] = style


def add_expert_parallel_plans(model) -> None:
    """Extend `model._tp_plan` / `model._ep_plan` (already holding the dense family's plans) with the SPRI entries,
    keeping only the entries that name a parameter or module of `model`: the dense MLP entries of layers that became
    MoE blocks, and the stage-2 expert entries of a stage-1 model, would match nothing (transformers warns then)."""
    tp_plan, ep_plan = expert_parallel_plans(model, dict(model._tp_plan or {}))
    names = {name for name, _ in model.named_parameters()} | {name for name, _ in model.named_modules()}
    model._tp_plan = matching_entries({**(model._tp_plan or {}), **tp_plan}, names)
    model._ep_plan = matching_entries({**(model._ep_plan or {}), **ep_plan}, names)


def matching_entries(plan: dict[str, str], names: set[str]) -> dict[str, str]:
    """The entries of `plan` whose wildcard name (`*` for a module-list index) matches one of `names`."""
    kept = {}
    for pattern, style in plan.items():
        regex = re.compile(re.escape(pattern).replace(r"\*", r"\d+") + r"$")
        if any(regex.match(name) for name in names):
            kept[pattern] = style
    return kept


def check_distributed_config(model, distributed_config) -> None:
    """Refuse what the plans cannot shard correctly, before any weight is loaded, with the fix in the message."""
    tp_size = getattr(distributed_config, "tp_size", 1) or 1
    ep_size = getattr(distributed_config, "ep_size", 1) or 1
    pp_size = getattr(distributed_config, "pp_size", 1) or 1
    if pp_size > 1:
        raise ValueError(
            f"pp_size={pp_size}: pipeline parallelism is not supported for SPRI models (transformers' pipeline split "
            "works on `base_model.layers`, and a SPRI model wraps the dense model one level deeper). Use tp_size / "
            "ep_size / fsdp_size, or pp_size=1."
        )
    if (tp_size > 1 or ep_size > 1) and model.config.stage == 1:
        raise ValueError(
            f"tp_size={tp_size}, ep_size={ep_size}: this SPRI model is in stage 1 (experts W_i = S + B_i A_i held as "
            "a shared base and low-rank factors), which the tensor- and expert-parallel plans do not shard. Switch it "
            "to stage 2 first: model.set_stage(2) and model.save_pretrained(folder) in one process, then load that "
            "stage-2 checkpoint with the distributed_config. Stage 1 trains with DDP or FSDP (SpriTrainer)."
        )
    if ep_size > 1 and model.config.num_experts % ep_size:
        raise ValueError(
            f"ep_size={ep_size} does not divide num_experts={model.config.num_experts}: expert parallelism gives each "
            "rank the same number of whole experts. Choose an ep_size that divides num_experts."
        )


def writes_on_another_rank(model) -> bool:
    """True on the ranks other than 0 of a model that transformers sharded at load time (tensor/expert parallel):
    `save_pretrained` runs on every rank (the gather is collective) and rank 0 alone writes the folder."""
    if getattr(model, "_device_mesh", None) is None:
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
