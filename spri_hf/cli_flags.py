"""The command line's flags, without importing torch or transformers (`spri-hf --help` answers at once).

The upcycling flags are `SpriConfig`'s own fields: their defaults, types and help are read from the source of
`configuration_spri.py` (its class body and its "Args:" docstring), not from the imported class, so no default is
written twice and parsing the arguments needs nothing but the standard library. `tests/test_cli.py` checks that what
is read here equals the live dataclass's fields (`training_cli.upcycling_fields`).
"""

import ast
import builtins
import os
import re
import types
from typing import Optional


# The SpriConfig fields `spri-hf upcycle` and `spri-hf train` take as flags (in this order).
UPCYCLING_FLAGS = (
    "num_experts", "num_experts_per_tok", "init", "principal_ratio", "principal_energy", "partition", "spri_mode",
    "diversity", "residual_scale", "noise_std", "drop_ratio", "moe_layers", "shared_expert", "router_aux_loss_coef",
    "router_z_loss_coef", "norm_topk_prob", "stage", "seed",
)  # fmt: skip

MOE_LAYERS_HELP = "Comma-separated FFN layer indices to upcycle, e.g. 0,2,4 (default: every layer)."

# --task: which SPRI class wraps the dense checkpoint (`spri-hf upcycle`; `spri-hf train` takes the first two)
TASKS = {
    "causal-lm": "SpriForCausalLM",
    "seq2seq-lm": "SpriForSeq2SeqLM",
    "speech-seq2seq": "SpriForSpeechSeq2Seq",
    "sequence-classification": "SpriForSequenceClassification",
    "masked-lm": "SpriForMaskedLM",
    "base": "SpriModel",
}


def config_help(docstring: str) -> dict[str, str]:
    """Each field's description from SpriConfig's "Args:" docstring, on one line."""
    helps = {}
    pattern = re.compile(r"^ {8}(\w+) \(.*?\):\n((?: {12}.*\n?)+)", re.MULTILINE)
    for name, text in pattern.findall(docstring):
        helps[name] = " ".join(line.strip() for line in text.splitlines())
    return helps


def flag_type(annotation):
    """The one type a flag parses: `float | int` -> float, `X | None` -> Optional[X]."""
    members = set(annotation.__args__) if isinstance(annotation, types.UnionType) else {annotation}
    optional = type(None) in members
    members.discard(type(None))
    for candidate in (float, int, bool, str):
        if candidate in members:
            return Optional[candidate] if optional else candidate
    return Optional[str]  # lists and dicts (moe_layers): a comma-separated string


def parse_layers(text: str | None) -> list[int] | None:
    if text is None or isinstance(text, list):
        return text
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--moe_layers {text!r} must be comma-separated layer indices, e.g. 0,2,4") from None


def upcycling_flag_specs() -> list[tuple[str, type, object, str]]:
    """`(name, type, default, help)` of every upcycling flag, read from `configuration_spri.py`'s source."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configuration_spri.py")
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    config = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "SpriConfig")
    fields = {
        node.target.id: node
        for node in config.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None
    }
    helps = config_help(ast.get_docstring(config, clean=False) or "")
    specs = []
    for name in UPCYCLING_FLAGS:
        node = fields[name]
        # annotations are builtin types and unions of them (`float | int`, `list[int] | None`)
        annotation = eval(compile(ast.Expression(node.annotation), path, "eval"), {"__builtins__": builtins})  # noqa: S307
        help_text = MOE_LAYERS_HELP if name == "moe_layers" else helps.get(name, "")
        specs.append((name, flag_type(annotation), ast.literal_eval(node.value), help_text))
    return specs
