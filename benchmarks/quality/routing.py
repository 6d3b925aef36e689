"""Routing diagnostics of the MoE models (load, entropy, language-expert mutual information)."""

import math
import statistics

import torch

from spri_hf.inspection import inspect_model

from .data import collate
from .methods import Preset
from .training import eval_batches


# ----------------------------------------------------------------------------------------------------------------
# routing diagnostics
# ----------------------------------------------------------------------------------------------------------------


def pairwise_distances(model) -> list[float]:
    """Mean pairwise relative Frobenius distance between the experts of each MoE layer (`spri-hf inspect`)."""
    return [row["pairwise_distance"] for row in inspect_model(model)]


# the per-layer statistics averaged over layers (a key absent from a run, e.g. the task's on one-task data, is left out)
ROUTING_MEANS = ("cv", "max_share", "router_entropy", "language_expert_mi_bits", "task_expert_mi_bits",
                 "target_language_expert_mi_bits")  # fmt: skip


def mutual_information_bits(counts: torch.Tensor) -> float:
    """I(label; expert) in bits from a (labels x experts) table of assignment counts."""
    joint = counts / counts.sum()
    independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
    mask = joint > 0
    return (joint[mask] * (joint[mask] / independent[mask]).log2()).sum().item()


def _per_token(labels: list, values: list, valid: torch.Tensor) -> torch.Tensor:
    """The label of every target token: `values` (one per example) as indices into `labels`, repeated over each
    example's positions where `valid` (batch, positions) is true, flattened."""
    return torch.tensor([labels.index(value) for value in values])[:, None].expand_as(valid)[valid]


@torch.no_grad()
def routing_diagnostics(model, examples, states, preset: Preset, device) -> dict:
    """Teacher-forced routing on the evaluation set: per-language expert load per layer and balance statistics.

    Load = share of the (token, top-k slot) assignments that go to each expert, over the target positions (the
    tokens that carry loss), so every (language, layer) row sums to 1.
    """
    layers = [index for _, index, _ in model.moe_sites()]
    num_experts, top_k = model.config.num_experts, model.config.num_experts_per_tok
    langs = sorted({example.lang for example in examples})
    # counts[layer, language, expert]: top-k assignments of the target tokens
    counts = torch.zeros(len(layers), len(langs), num_experts, dtype=torch.float64)
    # two-task data: the same by task, and by the language written (English when translating)
    tasks = sorted({example.task for example in examples if example.task})
    written = sorted({example.target_language for example in examples})
    task_counts = torch.zeros(len(layers), max(len(tasks), 1), num_experts, dtype=torch.float64)
    written_counts = torch.zeros(len(layers), len(written), num_experts, dtype=torch.float64)
    entropy_sum = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    for indices in eval_batches(examples, preset.eval_batch_size):
        batch = collate([examples[i] for i in indices], states, model.config.pad_token_id, device, torch.float32)
        # the decoder alone: routing needs no logits over the 51k-token vocabulary
        with model.collect_router_logits() as router_logits:
            model.get_decoder()(
                input_ids=batch["decoder_input_ids"],
                encoder_hidden_states=batch["encoder_outputs"].last_hidden_state,
                use_cache=False,
            )
        valid = (batch["labels"] != -100).cpu()
        token_langs = _per_token(langs, [examples[i].lang for i in indices], valid)
        token_tasks = _per_token(tasks or [None], [examples[i].task for i in indices], valid)
        token_written = _per_token(written, [examples[i].target_language for i in indices], valid)
        valid = valid.reshape(-1)
        for layer, logits in enumerate(router_logits):
            logits = logits.float().cpu()[valid]
            chosen = logits.topk(top_k, dim=-1).indices  # (tokens, k)
            for table, labels in ((counts, token_langs), (task_counts, token_tasks), (written_counts, token_written)):
                cells = labels[:, None] * num_experts + chosen
                table[layer] += torch.bincount(cells.reshape(-1), minlength=table.shape[1] * num_experts).view(
                    table.shape[1], num_experts
                ).double()
            probs = logits.softmax(-1)
            entropy_sum[layer] += -(probs * probs.clamp_min(1e-12).log()).sum().double()
        tokens += int(valid.sum())
    shares = counts / counts.sum(-1, keepdim=True)
    load = {lang: shares[:, index].tolist() for index, lang in enumerate(langs)}
    overall = counts.sum(1) / counts.sum((1, 2))[:, None]
    per_layer = []
    for layer in range(len(layers)):
        share = overall[layer]
        # mutual information between the row's language and the chosen expert (bits): language specialisation
        row = {
            "layer": layers[layer],
            "load": share.tolist(),
            "cv": (share.std(unbiased=False) / share.mean()).item(),
            "max_share": share.max().item(),
            "router_entropy": (entropy_sum[layer] / max(tokens, 1)).item(),
            "language_expert_mi_bits": mutual_information_bits(counts[layer]),
        }
        if tasks:  # and between the task / the language written and the expert
            row["task_expert_mi_bits"] = mutual_information_bits(task_counts[layer])
            row["target_language_expert_mi_bits"] = mutual_information_bits(written_counts[layer])
        per_layer.append(row)
    return {
        "layers": layers,
        "num_experts": num_experts,
        "top_k": model.config.num_experts_per_tok,
        "tokens": tokens,
        "languages": langs,
        "load": load,
        "per_layer": per_layer,
        "mean": {key: statistics.fmean(row[key] for row in per_layer) for key in ROUTING_MEANS if key in per_layer[0]},
        "tasks": tasks,
        "max_router_entropy": math.log(num_experts),
    }
