"""The command line's flags, without importing torch or transformers (`spri-hf --help` answers at once).

The upcycling flags are `SpriConfig`'s own fields: their types and defaults come from `defaults.py` (standard library
only, where SpriConfig takes them from too), their help from SpriConfig's "Args:" docstring, read as text from
`configuration_spri.py` (importing it would import transformers).
"""

import ast
import dataclasses
import os
import re
import types

from .defaults import DEFAULTS, UPCYCLING_FLAGS, UpcyclingDefaults


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
        helps[name] = " ".join(line.strip() for line in text.splitlines()).replace("%", "%%")  # argparse formats help
    return helps


def flag_type(annotation):
    """The one type a flag parses: `float | int` -> float, `X | None` -> `X | None`."""
    members = set(annotation.__args__) if isinstance(annotation, types.UnionType) else {annotation}
    optional = type(None) in members
    members.discard(type(None))
    for candidate in (float, int, bool, str):
        if candidate in members:
            return candidate | None if optional else candidate
    return str | None  # lists and dicts (moe_layers): a comma-separated string


def parse_layers(text: str | None) -> list[int] | None:
    if text is None or isinstance(text, list):
        return text
    try:
        return [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--moe_layers {text!r} must be comma-separated layer indices, e.g. 0,2,4") from None


def upcycling_flag_specs() -> list[tuple[str, type, object, str]]:
    """`(name, type, default, help)` of every upcycling flag."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configuration_spri.py")
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    config = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "SpriConfig")
    helps = config_help(ast.get_docstring(config, clean=False) or "")
    field_types = {field.name: field.type for field in dataclasses.fields(UpcyclingDefaults)}
    return [
        (name, flag_type(field_types[name]), getattr(DEFAULTS, name),
         MOE_LAYERS_HELP if name == "moe_layers" else helps.get(name, ""))
        for name in UPCYCLING_FLAGS
    ]  # fmt: skip
