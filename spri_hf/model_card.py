"""The model card of an SPRI checkpoint: what it was upcycled from, how, its size, its license, how to load it.

Shipped to the Hub with the modeling code (so a model loaded with `trust_remote_code=True` still writes its card on
`save_pretrained`); the card's metadata and file handling are huggingface_hub's `ModelCard` / `ModelCardData`.
"""

import os
import re

from huggingface_hub import ModelCard, ModelCardData

from .configuration_spri import UPCYCLING_SETTINGS


CARD_NAME = "README.md"
SECTION_START = "<!-- spri_hf model card: start -->"
SECTION_END = "<!-- spri_hf model card: end -->"
# A Hub repo id ("org/name"); local folders are not valid `base_model` metadata.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def parameter_counts(model) -> tuple[int, int]:
    """`(total, active per token)`: routed expert tensors (leading dim = num_experts) count `top_k / num_experts`."""
    config = model.config
    total, active = 0, 0.0
    for name, param in model.named_parameters():
        total += param.numel()
        routed = ".experts." in name and param.dim() >= 2 and param.shape[0] == config.num_experts
        active += param.numel() * (config.num_experts_per_tok / config.num_experts if routed else 1)
    return total, int(round(active))


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and _HUB_ID.match(name) is not None and not os.path.exists(name)


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(count)


TAGS = ["spri", "mixture-of-experts", "upcycling", "custom_code"]


def card_data(model) -> ModelCardData:
    """The card's metadata: the base model's license, the base model (a Hub id only), library and tags."""
    config = model.config
    return ModelCardData(
        license=config.base_model_license or "other",
        base_model=config.base_model if _is_hub_id(config.base_model) else None,
        library_name="transformers",
        tags=list(TAGS),
    )


def render_section(model, repo_id: str | None = None) -> str:
    """The SPRI part of the card (between the section markers), as Markdown."""
    config = model.config
    base = f"`{config.base_model}`" if config.base_model else "a dense model"
    total, active = parameter_counts(model)
    repo = repo_id or "path/to/this/checkpoint"
    auto = getattr(type(model), "_dense_auto_class", "AutoModelForCausalLM")
    from .architectures import get_ffn_layouts  # noqa: PLC0415 (sibling module, shipped too)

    layouts = get_ffn_layouts(config.base_config)
    stacks = config.upcycled_stacks()
    upcycled = sum(len(config.upcycled_layers(stack)) for stack in stacks)
    total_layers = sum(layouts[stack].num_layers(config.base_config) for stack in stacks)
    settings = "\n".join(f"| `{name}` | `{getattr(config, name, None)}` |" for name in UPCYCLING_SETTINGS + ("residual_rank",))
    if config.base_model_license:
        license_text = f"`{config.base_model_license}`, carried over from the base model {base}."
    else:
        license_text = (
            f"The base model's license could not be read when this model was upcycled; this model is a derivative "
            f"of {base} and its license applies."
        )
    stage = (
        "1 (residual factors: a shared frozen base per projection plus trainable low-rank factors per expert)"
        if config.stage == 1
        else "2 (full experts)"
    )
    return f"""{SECTION_START}
# SPRI mixture of experts upcycled from {base}

This model was made by upcycling {base} ({config.base_config.model_type}) into a sparse mixture of experts
with SPRI (SVD-Partitioned Residual Initialization, arXiv 2606.16456) using
[`spri_hf`](https://pypi.org/project/spri_hf/): each FFN matrix's SVD is split into a principal part shared by all
experts and a residual tail partitioned across the routed experts.

- Upcycled FFN layers ({" and ".join(stacks)}): {upcycled} of {total_layers}; {config.num_experts} experts each, top-{config.num_experts_per_tok} routing
- Training stage: {stage}
- Parameters: {total:,} total ({_human(total)}), {active:,} active per token ({_human(active)})

## SPRI settings

| setting | value |
|---|---|
{settings}

## How to load

With `spri_hf` installed (no flag needed):

```python
import spri_hf
from transformers import {auto}

model = {auto}.from_pretrained("{repo}")
```

Without `spri_hf` (the modeling code in this repository imports only torch and transformers):

```python
from transformers import {auto}

model = {auto}.from_pretrained("{repo}", trust_remote_code=True)
```

`spri_hf.export_native(model, out_dir)` turns Llama, Mistral, Ministral, SmolLM3, Seed-OSS, Qwen2 and Qwen3 based
checkpoints into plain Mixtral, Qwen2-MoE and Qwen3-MoE checkpoints that need no custom code, where that format
computes the same function (it says why when it does not).

## License

{license_text}
{SECTION_END}
"""


def write_model_card(model, save_directory: str | os.PathLike, repo_id: str | None = None) -> str:
    """Create `README.md` in `save_directory`, or update the SPRI section of an existing one (other text is kept; a
    card that states no license gets the base model's). Returns the path of the card."""
    path = os.path.join(save_directory, CARD_NAME)
    section = render_section(model, repo_id)
    if not os.path.isfile(path):
        metadata = card_data(model).to_yaml(original_order=["license", "base_model", "library_name", "tags"])
        card = ModelCard(f"---\n{metadata}\n---\n\n{section}")
    else:
        card = ModelCard.load(path, ignore_metadata_errors=True)
        text = card.text
        if SECTION_START in text and SECTION_END in text:
            before, rest = text.split(SECTION_START, 1)
            text = before + section.rstrip("\n") + rest.split(SECTION_END, 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + section
        # the front matter is kept as written (key order included); only a missing license is added, first
        raw = str(card)
        front = raw[: len(raw) - len(card.text)] if card.data.to_dict() else ""
        if front and model.config.base_model_license and not card.data.license:
            front = f"---\nlicense: {model.config.base_model_license}\n" + front.removeprefix("---\n")
        card = ModelCard(front + text)
    tmp_path = path + ".tmp"
    with open(tmp_path, "w", encoding="utf-8") as handle:
        handle.write(str(card))
    os.replace(tmp_path, path)
    return path
