"""FFN layouts for decoder families without a table entry: inferred from the model, accepted only when exact.

`spri_hf/architectures.py` lists the families whose FFNs were checked by hand. For any other decoder-only model with a
causal-LM head, `detect_ffn_layout(config)`:

1. builds the model on the meta device (nothing allocated) and finds its stack of blocks (the `nn.ModuleList` with
   one entry per `num_hidden_layers`) and, in every block, the one module that holds the FFN projections (or, when the
   block calls `fc1` / `fc2` itself, those projections);
2. reads the projections' shapes: gated gate/up/down (two `hidden -> I` projections and one `I -> hidden`), a fused
   `[gate; up]` (`hidden -> 2I`), or plain up/down, as `nn.Linear` or GPT-2 `Conv1D`, with or without biases, and the
   config attributes that hold the activation and the width `I`;
3. refuses what it cannot express: a block that is already a mixture of experts, an FFN whose `forward` takes more
   than the hidden states (BLOOM's takes the residual), parameters inside the FFN that are not projections (a learned
   activation), projections it cannot place;
4. builds a random 2-block probe of the same config (128 tokens, the FFN narrowed to 40 when the config names its
   width and narrowing changes nothing else detection sees), upcycles it with `init="copy"` through the ordinary pipeline, and
   accepts a candidate layout only when the MoE model's logits equal the dense ones (float32, atol 1e-5). Ambiguities
   (which of two `hidden -> I` projections is the gate, which config attribute names the activation) are settled by
   the probe: every candidate is tried.

A refusal is an `FfnDetectionError` (a `ValueError`) that names what was found and what is missing; it is raised while
the settings are validated, before any weight is read or anything written. An accepted layout is stored in the dense
config (`architectures.DETECTED_LAYOUT_ATTR`), so the SPRI checkpoint and its remote code read it back.
"""

import contextvars
import copy
import inspect
import itertools
import logging
from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM
from transformers.activations import ACT2CLS
from transformers.pytorch_utils import Conv1D

from ..architectures import DETECTED_LAYOUT_ATTR, FFN_LAYOUTS, FfnLayout
from ..configuration_spri import SpriConfig


PROBE_LAYERS = 2
PROBE_VOCAB = 128
PROBE_WIDTH = 40  # the FFN width of the probe, when the config names it
PROBE_ATOL = 1e-5  # float32 logits of the copy upcycle against the dense probe
_ATTENTION_WORDS = ("attn", "attention")
_MIXTURE_WORDS = ("expert", "router")
_WIDTH_WORDS = ("inter", "ffn", "inner", "d_ff", "mlp")
_BIAS_ATTRS = ("mlp_bias", "use_bias", "bias", "enable_bias", "add_bias_linear", "ffn_bias")

# set while the probe is upcycled: its config already carries the candidate layout, which must not be re-detected
_PROBING = contextvars.ContextVar("spri_detection_probing", default=False)
_VERIFIED: dict[str, "Detection"] = {}


class FfnDetectionError(ValueError):
    """No FFN layout that SPRI expresses exactly was found; the message says what was found and what is missing."""


@dataclass(frozen=True)
class Projection:
    path: str  # from the FFN module (or from the block, for FFNs the block calls itself)
    in_features: int
    out_features: int
    bias: bool
    conv1d: bool

    def __str__(self):
        kind = "Conv1D" if self.conv1d else "Linear"
        return f"{self.path} ({kind} {self.in_features}->{self.out_features}{', bias' if self.bias else ''})"


@dataclass
class Detection:
    """What detection found and the layout it verified."""

    model_type: str
    layout: FfnLayout
    found: str
    max_difference: float
    notes: list[str] = field(default_factory=list)

    def table_entry(self) -> str:
        """The layout as a line for `FFN_LAYOUTS` in spri_hf/architectures.py (fields that differ from the defaults)."""
        defaults = FfnLayout(layers_attr=self.layout.layers_attr)
        shown = [f"layers_attr={self.layout.layers_attr!r}"]
        for item in fields(FfnLayout):
            value = getattr(self.layout, item.name)
            if item.name != "layers_attr" and value != getattr(defaults, item.name):
                shown.append(f"{item.name}={value!r}")
        return f'"{self.model_type}": FfnLayout({", ".join(shown)}),'

    def report(self) -> str:
        lines = [
            f"model_type {self.model_type!r}: no table entry; FFN layout detected and verified.",
            f"  found: {self.found}",
            f"  check: copy upcycle of a {PROBE_LAYERS}-block random probe, max |logit difference| "
            f"{self.max_difference:.2g} (accepted at <= {PROBE_ATOL:g})",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        lines += ["  table entry (spri_hf/architectures.py, FFN_LAYOUTS):", f"    {self.table_entry()}"]
        return "\n".join(lines)


def _refuse(model_type: str, found: str, missing: str):
    raise FfnDetectionError(
        f"Cannot upcycle {model_type!r}: it has no entry in spri_hf/architectures.py and its FFN cannot be detected "
        f"exactly. Found: {found}. Missing: {missing}. Nothing was written."
    )


def _projection(path: str, module: nn.Module) -> Projection | None:
    if isinstance(module, Conv1D):  # weight stored (in, out)
        return Projection(path, module.weight.shape[0], module.weight.shape[1], module.bias is not None, True)
    if isinstance(module, nn.Linear):
        return Projection(path, module.in_features, module.out_features, module.bias is not None, False)
    return None


def _projections(module: nn.Module) -> list[Projection]:
    found = [_projection(name, sub) for name, sub in module.named_modules()]
    return [proj for proj in found if proj is not None]


def _is_activation(module: nn.Module) -> bool:
    return type(module).__module__ in ("transformers.activations", "torch.nn.modules.activation")


def _find_layers(model_type: str, base: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    for name, module in base.named_modules():
        if name and isinstance(module, nn.ModuleList) and len(module) == num_layers and _projections(module[0]):
            return name, module
    _refuse(model_type, f"no nn.ModuleList of {num_layers} blocks (num_hidden_layers) in {type(base).__name__}",
            "a stack of decoder blocks holding linear projections")


def _ffn_of_block(model_type: str, idx: int, block: nn.Module) -> tuple[str | None, nn.Module, list[Projection]]:
    """`(mlp path or None for FFNs the block calls itself, owner module, projections of the FFN)`."""
    for name, sub in block.named_modules():
        fused_experts = any(param.ndim == 3 for param in sub.parameters(recurse=False))
        if fused_experts or any(word in name.lower() for word in _MIXTURE_WORDS):
            _refuse(model_type, f"block {idx} is already a mixture of experts ({name}: {type(sub).__name__})",
                    "a dense FFN (SPRI upcycles dense FFNs; a mixture's experts are not one FFN to decompose)")
    children = [
        (name, child) for name, child in block.named_children() if not any(w in name.lower() for w in _ATTENTION_WORDS)
    ]
    containers = [(name, child) for name, child in children if _projection(name, child) is None and _projections(child)]
    direct = [_projection(name, child) for name, child in children if _projection(name, child) is not None]
    if len(containers) > 1:
        _refuse(model_type, f"several modules with projections in block {idx}: {[name for name, _ in containers]}",
                "a single FFN module")
    if containers:
        name, module = containers[0]
        return name, module, _projections(module)
    if direct:
        return None, block, direct
    _refuse(model_type, f"no projections outside attention in block {idx} ({type(block).__name__})", "an FFN")


def _check_ffn_module(model_type: str, name: str, module: nn.Module, projections: list[Projection]):
    owned = {f"{p.path}.{suffix}" for p in projections for suffix in ("weight", "bias")}
    extra = [param for param, _ in module.named_parameters() if param not in owned]
    if extra:
        _refuse(model_type, f"{name} ({type(module).__name__}) holds parameters besides its projections: {extra}",
                "an FFN made of projections and a parameter-free activation (the experts would not carry these)")
    params = list(inspect.signature(module.forward).parameters.values())[1:]
    named = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    required = [p.name for p in params if p.default is inspect.Parameter.empty and p.kind in named]
    if required:
        _refuse(model_type, f"{name}.forward ({type(module).__name__}) takes extra inputs {required}",
                "an FFN that is a function of the hidden states alone")


def _config_candidates(config, hidden: int, inter: int, has_bias: bool) -> tuple[list, str | None, str | bool]:
    values = config.to_dict()
    acts = [k for k, v in values.items() if isinstance(v, str) and v in ACT2CLS]
    acts.sort(key=lambda k: ("act" not in k.lower(), k))
    widths = [k for k, v in values.items() if isinstance(v, int) and not isinstance(v, bool) and v == inter]
    widths.sort(key=lambda k: (not any(w in k.lower() for w in _WIDTH_WORDS), k))
    if widths:
        width = widths[0]
    elif inter == 4 * hidden:  # the usual "None means 4 * hidden"
        width = next((k for k, v in values.items() if v is None and any(w in k.lower() for w in _WIDTH_WORDS)), None)
    else:
        width = False
    bias = next((k for k in _BIAS_ATTRS if isinstance(values.get(k), bool) and values[k] == has_bias), has_bias)
    return acts, width, bias


def _candidates(model_type: str, config) -> tuple[list[FfnLayout], str, list[str]]:
    """Every layout consistent with the module tree, the description of what was found, notes."""
    num_layers = getattr(config, "num_hidden_layers", None)
    hidden = getattr(config, "hidden_size", None)
    if not isinstance(num_layers, int) or not isinstance(hidden, int):
        _refuse(model_type, f"num_hidden_layers={num_layers!r}, hidden_size={hidden!r}", "both, as integers, in the config")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    base = model.base_model
    layers_attr, layers = _find_layers(model_type, base, num_layers)
    shapes = set()
    for idx, block in enumerate(layers):
        mlp_attr, owner, projections = _ffn_of_block(model_type, idx, block)
        shapes.add((mlp_attr, tuple(projections)))
    if len(shapes) > 1:
        _refuse(model_type, f"blocks whose FFNs differ: {sorted(str(s) for s in shapes)}", "the same FFN in every block")
    mlp_attr, owner, projections = _ffn_of_block(model_type, 0, layers[0])
    where = f"{layers_attr}[i].{mlp_attr}" if mlp_attr else f"{layers_attr}[i] (the block calls its projections itself)"
    found = f"{where} with {', '.join(map(str, projections))}"
    if mlp_attr is not None:
        _check_ffn_module(model_type, f"{layers_attr}[0].{mlp_attr}", owner, projections)

    downs = [p for p in projections if p.out_features == hidden and p.in_features != hidden]
    if len(downs) != 1:
        _refuse(model_type, found, f"exactly one projection from the FFN width back to hidden_size={hidden}")
    down = downs[0]
    inter = down.in_features
    ups = [p for p in projections if p.in_features == hidden and p.out_features == inter]
    fused = [p for p in projections if p.in_features == hidden and p.out_features == 2 * inter]
    unplaced = [str(p) for p in projections if p is not down and p not in ups and p not in fused]
    if unplaced:
        _refuse(model_type, found, f"a role for {unplaced} (FFNs are gate/up/down, a fused [gate; up] or up/down)")
    if len({p.conv1d for p in projections}) > 1 or len({p.bias for p in projections}) > 1:
        _refuse(model_type, found, "one kind of projection (all Linear or all Conv1D, all with or all without biases)")
    has_bias, conv1d = projections[0].bias, projections[0].conv1d
    acts, width, bias = _config_candidates(config, hidden, inter, has_bias)
    if not acts:
        _refuse(model_type, found, "a config attribute naming an activation of transformers.activations (ACT2FN)")
    if width is False:
        _refuse(model_type, found, f"a config attribute holding the FFN width {inter}")

    split: tuple[str, ...] = ()
    if mlp_attr is None:  # OPT-like: the MoE block sits at the up projection, down and activation become Identity
        if fused or len(ups) != 1:
            _refuse(model_type, found, "one up and one down projection (gated FFNs called by the block are not handled)")
        activation = [name for name, child in layers[0].named_children() if _is_activation(child)]
        split = (down.path, *activation)
        mlp_attr = ups[0].path
    common = dict(
        layers_attr=layers_attr, mlp_attr=mlp_attr, down=down.path, split=split, conv1d=conv1d,
        intermediate_attr=width, bias=bias,
    )
    if fused and not ups:
        shapes = [dict(gated=True, gate=None, up=None, fused_gate_up=fused[0].path)]
    elif len(ups) == 2 and not fused:
        named_gate = [p for p in ups if "gate" in p.path.lower()]
        if len(named_gate) == 1:  # the one named "gate" is the gate; otherwise the probe tries both orders
            orders = [(named_gate[0], next(p for p in ups if p is not named_gate[0]))]
        else:
            orders = list(itertools.permutations(ups))
        shapes = [dict(gated=True, gate=gate.path, up=up.path) for gate, up in orders]
    elif len(ups) == 1 and not fused:
        shapes = [dict(gated=False, gate=None, up=ups[0].path)]
    else:
        _refuse(model_type, found,
                "two hidden->I projections (gate, up), one hidden->2I ([gate; up]) or one hidden->I (up)")

    notes = []
    dropouts = [m.p for m in owner.modules() if isinstance(m, nn.Dropout)] if split == () else []
    dropout_attr = None
    if dropouts:
        values = config.to_dict()
        keys = [k for k, v in values.items() if "drop" in k.lower() and isinstance(v, float) and v == dropouts[-1]]
        keys.sort(key=lambda k: ("resid" not in k.lower(), k))
        dropout_attr = keys[0] if keys else None
        notes.append(
            f"the FFN has a dropout (p={dropouts[-1]}); taken as its output dropout from config.{dropout_attr}"
            if dropout_attr else f"the FFN's dropout (p={dropouts[-1]}) matches no config attribute and is not kept"
        )
    layouts = [FfnLayout(**common, **shape, act_attr=act, dropout_attr=dropout_attr) for shape in shapes for act in acts]
    return layouts, found, notes


def probe_config(config):
    """The config of the probe: `PROBE_LAYERS` blocks (per-layer lists cut to match), at most `PROBE_VOCAB` tokens."""
    probe = copy.deepcopy(config)
    num_layers = config.num_hidden_layers
    keep = min(num_layers, PROBE_LAYERS)
    for key, value in list(vars(probe).items()):
        if isinstance(value, (list, tuple)) and len(value) == num_layers and num_layers > keep:
            setattr(probe, key, type(value)(value[:keep]))
    probe.num_hidden_layers = keep
    vocab = getattr(probe, "vocab_size", None)
    if isinstance(vocab, int) and vocab > PROBE_VOCAB:
        probe.vocab_size = PROBE_VOCAB
        for key, value in list(vars(probe).items()):
            if key.endswith("token_id") and isinstance(value, int) and value >= PROBE_VOCAB:
                setattr(probe, key, None)
    if hasattr(probe, DETECTED_LAYOUT_ATTR):
        delattr(probe, DETECTED_LAYOUT_ATTR)
    return probe


def _narrowed(model_type: str, probe, layouts: list[FfnLayout]):
    """The probe with a narrow FFN (its width attribute set to `PROBE_WIDTH`) when that changes nothing else the
    detection sees: the FFN's width is what dominates the probe's memory and time (2 GB and 20 s at a 1B model's width
    on 2 cores otherwise). Falls back to the model's own width when narrowing alters the detected structure."""
    width_attr, hidden = layouts[0].intermediate_attr, probe.hidden_size
    if not width_attr or not isinstance(getattr(probe, width_attr, None), int):
        return probe, layouts
    width = next(w for w in (PROBE_WIDTH, PROBE_WIDTH + 8, PROBE_WIDTH + 16) if hidden not in (w, 2 * w, 4 * w))
    if getattr(probe, width_attr) <= width:
        return probe, layouts
    narrow = copy.deepcopy(probe)
    setattr(narrow, width_attr, width)
    try:
        narrowed, _, _ = _candidates(model_type, narrow)
    except (FfnDetectionError, ValueError, TypeError, RuntimeError):
        return probe, layouts
    return (narrow, narrowed) if narrowed == layouts else (probe, layouts)


def _dense_probe(config) -> nn.Module:
    """A random dense model whose FFNs matter: projections at unit gain, norms and biases moved off 1 and 0."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim >= 2:
                param.copy_(noise / param.shape[-1] ** 0.5)
            else:
                param.add_(0.1 * noise)
    return model


def _copy_difference(dense: nn.Module, layout: FfnLayout, input_ids: torch.Tensor, reference: torch.Tensor) -> float:
    """Max |logit difference| of the copy upcycle of `dense` with `layout` (inf when the layout does not even build)."""
    spri_class = MODEL_FOR_CAUSAL_LM_MAPPING[SpriConfig]
    setattr(dense.config, DETECTED_LAYOUT_ATTR, {layout.stack: layout.to_dict()})
    token = _PROBING.set(True)
    quiet = logging.getLogger("spri_hf")  # the probe's own memory estimate is not the user's run
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        moe = spri_class.from_dense(dense, init="copy", num_experts=2, num_experts_per_tok=1, check_resources=False)
        with torch.no_grad():
            return (moe(input_ids).logits - reference).abs().max().item()
    # a wrong candidate may not even fit the model (shapes, paths): that candidate is rejected
    except (ValueError, TypeError, RuntimeError, AttributeError, KeyError, IndexError):
        return float("inf")
    finally:
        quiet.setLevel(level)
        _PROBING.reset(token)
        delattr(dense.config, DETECTED_LAYOUT_ATTR)


def _cache_key(config) -> str | None:
    try:
        values = config.to_dict()
        values.pop(DETECTED_LAYOUT_ATTR, None)
        return repr(sorted((k, repr(v)) for k, v in values.items()))
    except Exception:
        return None


def detect_ffn_layout(config) -> Detection:
    """Infer the FFN layout of `config`'s family and verify it on a probe (see the module docstring).

    Raises:
        FfnDetectionError: with what was found and what is missing, when no layout is exact.
    """
    model_type = getattr(config, "model_type", None)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        _refuse(model_type, f"a {type(config).__name__} with no causal-LM model in transformers",
                "a decoder-only model (detection covers AutoModelForCausalLM families; encoder and encoder-decoder "
                "families need a table entry)")
    key = _cache_key(config)
    if key is not None and key in _VERIFIED:
        return _VERIFIED[key]
    probe = probe_config(config)
    layouts, found, notes = _candidates(model_type, probe)
    probe, layouts = _narrowed(model_type, probe, layouts)
    tried = []
    with torch.random.fork_rng(devices=[]):  # the probe's seeding leaves the caller's random state alone
        dense = _dense_probe(probe)
        input_ids = torch.randint(0, probe.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            reference = dense(input_ids).logits
        differences = []
        for layout in layouts:
            differences.append(_copy_difference(dense, layout, input_ids, reference))
            if differences[-1] <= PROBE_ATOL:
                break
    for layout, difference in zip(layouts, differences):
        if difference <= PROBE_ATOL:
            detection = Detection(model_type, layout, found, difference, notes)
            if key is not None:
                _VERIFIED[key] = detection
            return detection
        projections = f"{layout.gate or layout.fused_gate_up or ''}/{layout.up or ''}/{layout.down}"
        tried.append(f"{'gated' if layout.gated else 'plain'} {projections} with config.{layout.act_attr}: {difference:.3g}")
    _refuse(model_type, f"{found}; the copy upcycle of each candidate layout differs from the dense probe's logits "
            f"(max |difference|: {'; '.join(tried)})",
            "an FFN that computes down(act(gate(x)) * up(x)) or down(act(up(x))) on the hidden states alone")


def attach_ffn_layout(base_config):
    """Give a dense config of a family without a table entry its verified layout (`DETECTED_LAYOUT_ATTR`); a listed
    family is left alone. Returns the config (the same object)."""
    if getattr(base_config, "model_type", None) in FFN_LAYOUTS or _PROBING.get():
        return base_config
    detection = detect_ffn_layout(base_config)
    setattr(base_config, DETECTED_LAYOUT_ATTR, {detection.layout.stack: detection.layout.to_dict()})
    return base_config


def describe(config) -> str:
    """What `spri-hf inspect --dense` prints: the table entry of a listed family, or what detection finds."""
    model_type = config.model_type
    if model_type in FFN_LAYOUTS:
        entry = FFN_LAYOUTS[model_type]
        entry = entry(config) if callable(entry) else entry
        layouts = entry if isinstance(entry, tuple) else (entry,)
        lines = [f"model_type {model_type!r}: listed in spri_hf/architectures.py."]
        lines += [f"  {layout.stack}: {Detection(model_type, layout, '', 0.0).table_entry()}" for layout in layouts]
        return "\n".join(lines)
    return detect_ffn_layout(config).report()


__all__ = ["Detection", "FfnDetectionError", "attach_ffn_layout", "describe", "detect_ffn_layout", "probe_config"]
