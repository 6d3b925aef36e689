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
        row_langs = torch.tensor([langs.index(examples[i].lang) for i in indices])
        token_langs = row_langs[:, None].expand_as(valid)[valid]  # language of every target token
        valid = valid.reshape(-1)
        for layer, logits in enumerate(router_logits):
            logits = logits.float().cpu()[valid]
            chosen = logits.topk(top_k, dim=-1).indices  # (tokens, k)
            cells = token_langs[:, None] * num_experts + chosen
            counts[layer] += torch.bincount(cells.reshape(-1), minlength=len(langs) * num_experts).view(
                len(langs), num_experts
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
        # mutual information between the target language and the chosen expert (bits): language specialisation
        joint = counts[layer] / counts[layer].sum()
        independent = joint.sum(1, keepdim=True) * joint.sum(0, keepdim=True)
        mask = joint > 0
        mutual_information = (joint[mask] * (joint[mask] / independent[mask]).log2()).sum().item()
        per_layer.append(
            {
                "layer": layers[layer],
                "load": share.tolist(),
                "cv": (share.std(unbiased=False) / share.mean()).item(),
                "max_share": share.max().item(),
                "router_entropy": (entropy_sum[layer] / max(tokens, 1)).item(),
                "language_expert_mi_bits": mutual_information,
            }
        )
    return {
        "layers": layers,
        "num_experts": num_experts,
        "top_k": model.config.num_experts_per_tok,
        "tokens": tokens,
        "languages": langs,
        "load": load,
        "per_layer": per_layer,
        "mean": {
            key: statistics.fmean(row[key] for row in per_layer)
            for key in ("cv", "max_share", "router_entropy", "language_expert_mi_bits")
        },
        "max_router_entropy": math.log(num_experts),
    }
