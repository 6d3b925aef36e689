"""Routers initialised from data (or orthogonally) after upcycling: `init_routers`.

An upcycled model's routers start random, so at first every expert sees every kind of token. `init_routers` gives
each MoE layer's router rows that already tell tokens apart:

- `"kmeans"`: the centroids of a spherical k-means (one cluster per expert) of the hidden states that enter the layer's
  MoE block, over a calibration set of texts;
- `"prompts"`: each expert's row is the mean hidden state of its own prompts (`texts` maps expert index -> prompts);
- `"orthogonal"`: orthonormal rows (data-free);
- `"random"`: normal rows, as the upcycler draws them (data-free).

The layers are initialised in order, and each layer's hidden states come from the model as initialised so far (the
routers below it already changed). Rows are unit vectors times one scale per layer, chosen by bisection so that the
mean routing entropy over the calibration tokens is `target_entropy` x log(num_experts): neither uniform (every
expert alike, entropy 1) nor one-hot (entropy 0). Without calibration texts the data-free methods keep the norm of the
random init (`initializer_range` x sqrt(hidden size)).

With fine-grained experts (`expert_granularity` G > 1) the router chooses among virtual groups: one row per group
(`num_experts / G` of them, which k-means clusters and `texts` keys for "prompts" count) is set and repeated for the
G experts of the group, as the upcycler does, so that top-k still picks whole groups.
"""

import json
import math
import os
from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .integrations import is_spri_model


ROUTER_INITS = ("random", "kmeans", "prompts", "orthogonal")


class _Captured(Exception):
    """Raised by the capture hook: the rest of the forward pass is not needed."""


def read_calibration(path: str, method: str):
    """Calibration texts from a file: `.txt` one text per line; `.jsonl` one `{"text": ...}` per line, with
    `"expert": e` on every line for `method="prompts"` (returned as {expert: [prompts]})."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--calibration_data {path!r} is not a file: give a .txt (one text per line) or .jsonl.")
    with open(path, encoding="utf-8") as handle:
        lines = [line.rstrip("\n") for line in handle if line.strip()]
    if not path.endswith(".jsonl"):
        if method == "prompts":
            raise ValueError(f"--router_init prompts needs a .jsonl file with an \"expert\" on each line, got {path!r}.")
        return lines
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}, line {number}: not JSON ({err.msg}).") from None
        if not isinstance(row, dict) or "text" not in row or (method == "prompts" and "expert" not in row):
            need = '"text" and "expert"' if method == "prompts" else '"text"'
            raise ValueError(f"{path}, line {number}: each line needs {need}, got {line[:80]!r}.")
        rows.append(row)
    if method != "prompts":
        return [row["text"] for row in rows]
    prompts = {}
    for row in rows:
        prompts.setdefault(row["expert"], []).append(row["text"])
    return prompts


def check_router_init(
    model, method: str, texts, num_experts: int | None = None, granularity: int = 1, batches=None
) -> None:
    """Refuse bad input before any weight changes, naming the value and the fix (`num_experts` and `granularity`
    where no model is given)."""
    if method not in ROUTER_INITS:
        raise ValueError(f"router init method={method!r} is not one of {ROUTER_INITS}.")
    if batches is not None:
        if texts is not None:
            raise ValueError("init_routers takes calibration texts or model input batches, not both.")
        if method == "prompts":
            raise ValueError("method='prompts' needs texts per expert ({expert: [prompts]}), not batches.")
        if isinstance(batches, Mapping) or not isinstance(batches, Sequence) or not batches:
            raise ValueError("batches must be a non-empty list of model input dicts (what the model's forward takes).")
        if not all(isinstance(batch, Mapping) for batch in batches):
            raise ValueError("every item of batches must be a dict of model inputs (input_ids=..., ...).")
    if model is not None:
        if not is_spri_model(model):
            raise TypeError(f"init_routers needs a SPRI model (from_dense or from_pretrained), got {type(model).__name__}.")
        if model.config.is_encoder_decoder and batches is None and texts is not None:
            raise ValueError(
                "init_routers runs calibration texts through a decoder-only or encoder-only model; "
                f"{model.config.base_config.model_type} is an encoder-decoder: pass batches=[model input dicts] "
                "(input_features or input_ids, decoder_input_ids, ...) instead of texts."
            )
        num_experts, granularity = model.config.num_experts, model.config.expert_granularity
    num_experts //= granularity  # the router's choices: virtual groups of G experts
    if num_experts < 2:
        raise ValueError(f"{_choices(num_experts, granularity)}: a router with one choice has nothing to choose.")
    if batches is not None:  # checked above; k-means counts the tokens once they are captured
        return
    if method == "kmeans":
        if not isinstance(texts, Sequence) or isinstance(texts, str) or not texts:
            raise ValueError("method='kmeans' needs a non-empty list of calibration texts.")
        if len(texts) < num_experts:
            raise ValueError(
                f"method='kmeans' got {len(texts)} calibration texts for {_choices(num_experts, granularity)}: give "
                "at least one text per expert (a few hundred are better)."
            )
        _check_strings(texts, "texts")
    elif method == "prompts":
        if not isinstance(texts, Mapping) or not texts:
            raise ValueError("method='prompts' needs texts as a mapping {expert index: [prompts]}.")
        unknown = sorted(key for key in texts if not (isinstance(key, int) and 0 <= key < num_experts))
        if unknown:
            raise ValueError(
                f"method='prompts' got prompts for experts {unknown}, but the model has "
                f"{_choices(num_experts, granularity)} (keys 0..{num_experts - 1})."
            )
        missing = sorted(set(range(num_experts)) - set(texts))
        if missing:
            raise ValueError(f"method='prompts' needs prompts for every expert; experts {missing} have none.")
        for expert, prompts in texts.items():
            if isinstance(prompts, str) or not prompts:
                raise ValueError(f"expert {expert}'s prompts must be a non-empty list of strings.")
            _check_strings(prompts, f"expert {expert}'s prompts")
    elif texts is not None:
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise ValueError(f"method={method!r} takes no texts, or a non-empty list of texts to calibrate the scale.")
        _check_strings(texts, "texts")


def _choices(count: int, granularity: int) -> str:
    if granularity == 1:
        return f"{count} experts"
    return f"{count} virtual groups of {granularity} fine-grained experts (expert_granularity={granularity})"


def _check_strings(texts, what: str) -> None:
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{what}[{index}] is {text!r}: every calibration text must be a non-empty string.")


@torch.no_grad()
def init_routers(
    model,
    tokenizer=None,
    texts=None,
    method: str = "kmeans",
    *,
    target_entropy: float = 0.5,
    batch_size: int = 8,
    max_length: int = 128,
    max_tokens: int = 8192,
    seed: int = 0,
    show_progress: bool = True,
    batches: list[dict] | None = None,
) -> list[dict]:
    """Set every MoE layer's router of `model` by `method` (see the module docstring); returns one report per layer
    (`site`, `scale`, `entropy` as a fraction of log(num_experts), `top_share`: the busiest expert's share of the top-k
    assignments over the calibration tokens, None without calibration data).

    Instead of `texts`, `batches` gives the calibration data as the model's own input dicts (any model, encoder-decoder
    and speech models included): a layer's tokens are those of its stack, less the padding that the stack's mask
    (`attention_mask`, or `decoder_attention_mask` for the decoder of an encoder-decoder model) marks."""
    check_router_init(model, method, texts, batches=batches)
    if not 0.0 < target_entropy < 1.0:
        raise ValueError(f"target_entropy={target_entropy} must lie strictly between 0 (one-hot) and 1 (uniform).")
    if texts is not None and tokenizer is None:
        raise ValueError("init_routers needs the model's tokenizer to run the calibration texts.")
    granularity = model.config.expert_granularity
    groups = model.config.num_experts // granularity
    sites = model.moe_sites()
    originals = [block.router.weight.detach().clone() for _, _, block in sites]
    generator = torch.Generator().manual_seed(seed)
    if batches is not None:
        batches = [(dict(batch), None) for batch in batches]
    else:
        batches = _batches(tokenizer, texts, batch_size, max_length) if texts is not None else []
    was_training = model.training
    model.eval()
    reports = []
    try:
        with tqdm(total=len(sites) * len(batches), desc="router init", disable=not show_progress or not batches) as bar:
            for stack, index, block in sites:
                mask_name = "decoder_attention_mask" if stack == "decoder" and model.config.is_encoder_decoder else (
                    "attention_mask")  # fmt: skip
                states, owners = _capture(model, block, batches, bar, mask_name) if batches else (None, None)
                if states is not None and len(states) > max_tokens:
                    keep = torch.randperm(len(states), generator=generator)[:max_tokens]
                    states, owners = states[keep], owners[keep]
                directions = _directions(method, groups, block.router.weight.shape[1], states, owners, generator)
                scale, entropy, top_share = _calibrate(directions, states, block.router.top_k // granularity,
                                                       target_entropy, model)
                rows = (scale * directions).repeat_interleave(granularity, dim=0)
                block.router.weight.copy_(rows.to(block.router.weight.dtype))
                reports.append({"site": f"{stack}.{index}", "scale": scale, "entropy": entropy, "top_share": top_share})
    except BaseException:
        for (_, _, block), weight in zip(sites, originals):
            block.router.weight.copy_(weight)
        raise
    finally:
        model.train(was_training)
    return reports


def _batches(tokenizer, texts, batch_size: int, max_length: int) -> list[tuple[dict, list[int]]]:
    """Tokenised batches and, per text, its expert (prompts) or -1."""
    if isinstance(texts, Mapping):
        items = [(text, expert) for expert in sorted(texts) for text in texts[expert]]
    else:
        items = [(text, -1) for text in texts]
    size = batch_size if tokenizer.pad_token_id is not None else 1  # no padding token: one text per batch
    batches = []
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        encoded = tokenizer(
            [text for text, _ in chunk], return_tensors="pt", padding=size > 1, truncation=True, max_length=max_length
        )
        batches.append((dict(encoded), [expert for _, expert in chunk]))
    return batches


def _capture(model, block, batches, bar, mask_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states entering `block` (non-padding tokens by the batch's `mask_name`, float32) and each token's
    expert label (-1 without prompts)."""
    captured = []

    def hook(module, args):
        captured.append(args[0])
        raise _Captured

    handle = block.register_forward_pre_hook(hook)
    states, owners = [], []
    device = next(model.parameters()).device
    try:
        for encoded, experts in batches:
            inputs = {name: value.to(device) if torch.is_tensor(value) else value for name, value in encoded.items()}
            try:
                model(**inputs)
            except _Captured:
                pass
            hidden = captured.pop().float()  # (batch, sequence, hidden): the block's input before it flattens
            hidden = hidden if hidden.dim() == 3 else hidden[None]
            mask = inputs.get(mask_name)
            if mask is None or tuple(mask.shape) != tuple(hidden.shape[:2]):
                mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            mask = mask.bool().to(hidden.device)
            labels = torch.tensor(experts if experts is not None else [-1] * hidden.shape[0], device=hidden.device)
            labels = labels[:, None].expand_as(mask)
            states.append(hidden[mask].cpu())
            owners.append(labels[mask].cpu())
            bar.update()
    finally:
        handle.remove()
    return torch.cat(states), torch.cat(owners)


def _directions(method: str, num_experts: int, hidden: int, states, owners, generator) -> torch.Tensor:
    """Unit rows (num_experts, hidden), float32 (one per virtual group with fine-grained experts)."""
    if method == "random":
        rows = torch.randn(num_experts, hidden, generator=generator)
    elif method == "orthogonal":
        if num_experts > hidden:
            raise ValueError(f"method='orthogonal' needs num_experts <= hidden size ({num_experts} > {hidden}).")
        rows = torch.linalg.qr(torch.randn(hidden, num_experts, generator=generator)).Q.T
    elif method == "prompts":
        rows = torch.stack([states[owners == expert].mean(dim=0) for expert in range(num_experts)])
    else:
        rows = spherical_kmeans(states, num_experts, generator)
    return torch.nn.functional.normalize(rows.float(), dim=-1)


def spherical_kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 30) -> torch.Tensor:
    """`k` unit centroids of the directions of `points` (k-means++ seeding on cosine distance, then Lloyd steps; an
    emptied cluster takes the point farthest from its centroid)."""
    unit = torch.nn.functional.normalize(points.float(), dim=-1)
    if len(unit) < k:
        raise ValueError(f"k-means needs at least {k} tokens, got {len(unit)}; give more calibration text.")
    centroids = unit[torch.randint(len(unit), (1,), generator=generator)]
    for _ in range(1, k):
        distance = (1 - unit @ centroids.T).min(dim=1).values.clamp_min(0)
        weights = distance if distance.sum() > 0 else torch.ones_like(distance)
        centroids = torch.cat([centroids, unit[torch.multinomial(weights, 1, generator=generator)]])
    for _ in range(iterations):
        similarity = unit @ centroids.T
        assignment = similarity.argmax(dim=1)
        updated = torch.zeros_like(centroids).index_add_(0, assignment, unit)
        empty = torch.bincount(assignment, minlength=k) == 0
        if empty.any():
            farthest = similarity.max(dim=1).values.argsort()[: int(empty.sum())]
            updated[empty] = unit[farthest]
        updated = torch.nn.functional.normalize(updated, dim=-1)
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids


def _calibrate(directions, states, top_k: int, target: float, model) -> tuple[float, float | None, float | None]:
    """The scale of the rows: mean routing entropy = `target` x log(E) over `states` (bisection on the log scale);
    without states, the random init's row norm."""
    num_experts, hidden = directions.shape
    if states is None:
        return model.config.initializer_range * math.sqrt(hidden), None, None
    logits = states @ directions.T

    def entropy(scale: float) -> float:
        probs = torch.softmax(scale * logits, dim=-1)
        return (torch.special.entr(probs).sum(dim=-1).mean() / math.log(num_experts)).item()

    low, high = -12.0, 12.0  # log scales: uniform far below, one-hot far above
    for _ in range(60):
        middle = (low + high) / 2
        if entropy(math.exp(middle)) > target:
            low = middle
        else:
            high = middle
    scale = math.exp((low + high) / 2)
    chosen = torch.topk(scale * logits, top_k, dim=-1).indices
    top_share = torch.bincount(chosen.flatten(), minlength=num_experts).max().item() / chosen.numel()
    return scale, entropy(scale), top_share


__all__ = ["ROUTER_INITS", "check_router_init", "init_routers", "read_calibration", "spherical_kmeans"]
