"""Where each supported dense family keeps its feed-forward blocks.

A family has one stack of blocks (decoder-only models: "decoder"; BERT-like encoders: "encoder") or two
(encoder-decoder models). Adding an architecture is adding one entry to `FFN_LAYOUTS`: an `FfnLayout` per stack, or
a function of the config when the layout depends on it (T5 v1.0 vs gated v1.1). This module is shipped to the Hub
with the modeling code, so it imports nothing but the standard library.
"""

from dataclasses import asdict, dataclass, fields, replace


# A family without a table entry is upcycled with a layout inferred and verified by `spri_hf.detection`; the verified
# layout travels in the dense config under this attribute, so a saved checkpoint (and its remote code) reads it back.
DETECTED_LAYOUT_ATTR = "spri_ffn_layout"


@dataclass(frozen=True)
class FfnLayout:
    """How one stack of a dense family lays out its FFN.

    Args:
        layers_attr: dotted path, from the backbone (`model.base_model`), of the `nn.ModuleList` of blocks.
        mlp_attr: dotted path, from one block, of the module the MoE block replaces.
        gated: `down(act(gate(x)) * up(x))` if True, `down(act(up(x)))` if False.
        gate / up / down: dotted paths of the projections, from the FFN module; from the block when `split` is set.
            `fused_gate_up` names a single projection that holds `[gate; up]` stacked on its output dim (Phi-3).
        split: for FFNs that are not one module (BART-like `fc1`/`fc2` called by the block, BERT's
            `intermediate`/`output.dense`): paths, from the block, that become `nn.Identity` once `mlp_attr` holds
            the whole MoE (the down projection, the activation).
        zero_attrs: block attributes set to 0 after the swap (BART-like `activation_dropout`, which the block
            would otherwise apply to the MoE output instead of the intermediate activations).
        conv1d: the projections are GPT-2 `Conv1D` modules whose weight is stored as (in, out).
        act_attr: config attribute naming the activation.
        intermediate_attr: config attribute holding the FFN width; `None` falls back to 4 * hidden.
        num_layers_attr: config attribute holding the number of blocks of this stack.
        bias: config attribute that switches FFN biases on, or a constant.
        dropout_attr: config attribute of the dropout applied on the FFN output, if any.
        stack: "decoder" or "encoder".
    """

    layers_attr: str
    mlp_attr: str = "mlp"
    gated: bool = True
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    down: str = "down_proj"
    fused_gate_up: str | None = None
    split: tuple[str, ...] = ()
    zero_attrs: tuple[str, ...] = ()
    conv1d: bool = False
    act_attr: str = "hidden_act"
    intermediate_attr: str | None = "intermediate_size"
    num_layers_attr: str = "num_hidden_layers"
    bias: str | bool = False
    dropout_attr: str | None = None
    stack: str = "decoder"

    def hidden_size(self, config) -> int:
        return config.hidden_size

    def intermediate_size(self, config) -> int:
        value = getattr(config, self.intermediate_attr, None) if self.intermediate_attr else None
        return value if value is not None else 4 * config.hidden_size

    def num_layers(self, config) -> int:
        return getattr(config, self.num_layers_attr)

    def activation(self, config) -> str:
        return getattr(config, self.act_attr)

    def has_bias(self, config) -> bool:
        return bool(getattr(config, self.bias, False)) if isinstance(self.bias, str) else self.bias

    def dropout(self, config) -> float:
        return float(getattr(config, self.dropout_attr, 0.0) or 0.0) if self.dropout_attr else 0.0

    def projection_names(self) -> tuple[str, ...]:
        """Names of the FFN weight matrices in the order (gate, up, down) / (up, down)."""
        return ("gate", "up", "down") if self.gated else ("up", "down")

    # ---- navigation of a dense (or SPRI-wrapped) model: the one place that knows where things are ----------------
    def layers(self, model):
        """The `nn.ModuleList` of this stack's blocks, from a model or its backbone."""
        return getattr(model, "base_model", model).get_submodule(self.layers_attr)

    def ffn_owner(self, layer):
        """What the projection paths start from: the FFN module, or the block itself for split FFNs."""
        return layer if self.split else layer.get_submodule(self.mlp_attr)

    def ffn_paths(self) -> tuple[str, ...]:
        """Paths, from a block, of every module that belongs to the FFN (the MoE block and what becomes Identity)."""
        return (self.mlp_attr, *self.split)

    def ffn_weights(self, owner) -> tuple[dict, dict]:
        """The FFN's matrices as `(out, in)` tensors and its biases, keyed by "gate" / "up" / "down" (views: writing
        them writes the model). `owner` is what `ffn_owner` returns."""
        matrices, biases = {}, {}
        if self.fused_gate_up is not None:
            fused = owner.get_submodule(self.fused_gate_up)
            matrices["gate"], matrices["up"] = fused.weight.chunk(2, dim=0)
            if fused.bias is not None:
                biases["gate"], biases["up"] = fused.bias.chunk(2, dim=0)
            modules = {"down": owner.get_submodule(self.down)}
        else:
            modules = {proj: owner.get_submodule(getattr(self, proj)) for proj in self.projection_names()}
        for proj, module in modules.items():
            matrices[proj] = module.weight.t() if self.conv1d else module.weight
            if getattr(module, "bias", None) is not None:
                biases[proj] = module.bias
        return matrices, biases

    def layer_ffn_weights(self, model, idx: int) -> tuple[dict, dict]:
        """`ffn_weights` of block `idx` of this stack of `model`."""
        return self.ffn_weights(self.ffn_owner(self.layers(model)[idx]))

    # ---- a layout as JSON (how a detected layout is stored in the dense config) -------------------------------------
    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "FfnLayout":
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"Unknown FfnLayout field(s) {unknown} in {DETECTED_LAYOUT_ATTR!r}; the fields are {sorted(known)}."
            )
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


_LLAMA_LIKE = FfnLayout(layers_attr="layers")

# GPT-J and CodeGen: `fc_in` / `fc_out` with biases, width `n_inner` (None: 4 * hidden), dropout on the FFN output
_GPTJ_LIKE = FfnLayout(
    layers_attr="h", gated=False, gate=None, up="fc_in", down="fc_out", act_attr="activation_function",
    intermediate_attr="n_inner", bias=True, dropout_attr="resid_pdrop",
)


def _bart_like(stack: str) -> FfnLayout:
    """BART, mBART, Marian, M2M100/NLLB, Whisper, Speech2Text: `fc1` / `fc2` called by the block itself."""
    return FfnLayout(
        layers_attr=f"{stack}.layers",
        mlp_attr="fc1",
        gated=False,
        gate=None,
        up="fc1",
        down="fc2",
        split=("fc2", "activation_fn"),
        zero_attrs=("activation_dropout",),
        act_attr="activation_function",
        intermediate_attr=f"{stack}_ffn_dim",
        num_layers_attr=f"{stack}_layers",
        bias=True,
        stack=stack,
    )


_BART_LIKE = (_bart_like("encoder"), _bart_like("decoder"))

_BERT_LIKE = FfnLayout(
    layers_attr="encoder.layer",
    mlp_attr="intermediate",
    gated=False,
    gate=None,
    up="intermediate.dense",
    down="output.dense",
    split=("output.dense",),
    bias=True,
    stack="encoder",
)


def _t5_layouts(config) -> tuple[FfnLayout, ...]:
    """T5 v1.0 has `wi` / `wo`; gated variants (T5 v1.1, mT5) have `wi_0` (gate), `wi_1` (up) / `wo`."""
    gated = bool(getattr(config, "is_gated_act", False))
    common = dict(
        mlp_attr="layer.1.DenseReluDense",
        gated=gated,
        gate="wi_0" if gated else None,
        up="wi_1" if gated else "wi",
        down="wo",
        act_attr="dense_act_fn",
        intermediate_attr="d_ff",
    )
    encoder = FfnLayout(layers_attr="encoder.block", num_layers_attr="num_layers", stack="encoder", **common)
    # decoder blocks have cross-attention at layer.1, so their FFN is layer.2
    decoder = replace(
        encoder, layers_attr="decoder.block", mlp_attr="layer.2.DenseReluDense", num_layers_attr="num_decoder_layers",
        stack="decoder",
    )
    return encoder, decoder


FFN_LAYOUTS: dict = {
    "llama": FfnLayout(layers_attr="layers", bias="mlp_bias"),
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": FfnLayout(layers_attr="layers", act_attr="hidden_activation"),
    "gemma3_text": FfnLayout(layers_attr="layers", act_attr="hidden_activation"),
    "phi3": FfnLayout(layers_attr="layers", gate=None, up=None, fused_gate_up="gate_up_proj"),
    "gpt2": FfnLayout(
        layers_attr="h",
        gated=False,
        gate=None,
        up="c_fc",
        down="c_proj",
        conv1d=True,
        act_attr="activation_function",
        intermediate_attr="n_inner",
        bias=True,
        dropout_attr="resid_pdrop",
    ),
    "gpt_neox": FfnLayout(
        layers_attr="layers", gated=False, gate=None, up="dense_h_to_4h", down="dense_4h_to_h", bias=True
    ),
    # gated gate/up/down like Llama (each checked in transformers 5.24's modeling file; the block only calls mlp(x))
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "cohere": _LLAMA_LIKE,  # parallel attention + FFN in the block: the FFN itself is Llama's
    "cohere2": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "ministral": _LLAMA_LIKE,
    "granite": FfnLayout(layers_attr="layers", bias="mlp_bias"),  # residual_multiplier is applied by the block
    "smollm3": FfnLayout(layers_attr="layers", bias="mlp_bias"),
    "helium": FfnLayout(layers_attr="layers", bias="mlp_bias"),
    "seed_oss": FfnLayout(layers_attr="layers", bias="mlp_bias", dropout_attr="residual_dropout"),
    "ernie4_5": FfnLayout(layers_attr="layers", bias="use_bias"),
    "glm": FfnLayout(layers_attr="layers", gate=None, up=None, fused_gate_up="gate_up_proj"),  # [gate; up]
    # plain up/down
    "nemotron": FfnLayout(layers_attr="layers", gated=False, gate=None, bias="mlp_bias"),  # relu2
    "starcoder2": FfnLayout(
        layers_attr="layers", gated=False, gate=None, up="c_fc", down="c_proj", bias="use_bias",
        dropout_attr="residual_dropout",
    ),
    "phi": FfnLayout(layers_attr="layers", gated=False, gate=None, up="fc1", down="fc2", bias=True),
    "gptj": _GPTJ_LIKE,
    "codegen": _GPTJ_LIKE,
    "gpt_neo": FfnLayout(
        layers_attr="h", gated=False, gate=None, up="c_fc", down="c_proj", act_attr="activation_function", bias=True,
        dropout_attr="resid_dropout",
    ),
    "falcon": FfnLayout(
        layers_attr="h", gated=False, gate=None, up="dense_h_to_4h", down="dense_4h_to_h", act_attr="activation",
        intermediate_attr="ffn_hidden_size", bias="bias",
    ),
    # OPT's block calls fc1 / activation_fn / fc2 itself (on tokens flattened to 2D)
    "opt": FfnLayout(
        layers_attr="decoder.layers", mlp_attr="fc1", gated=False, gate=None, up="fc1", down="fc2",
        split=("fc2", "activation_fn"), act_attr="activation_function", intermediate_attr="ffn_dim", bias="enable_bias",
    ),
    # encoder-decoder
    "whisper": _BART_LIKE,
    "speech_to_text": _BART_LIKE,
    "bart": _BART_LIKE,
    "mbart": _BART_LIKE,
    "marian": _BART_LIKE,
    "m2m_100": _BART_LIKE,
    "t5": _t5_layouts,
    "mt5": _t5_layouts,
    # encoder-only
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
}


def get_ffn_layouts(config) -> dict[str, FfnLayout]:
    """The FFN layout of every stack of `config`'s family, by stack name; a `ValueError` lists the supported ones."""
    model_type = config if isinstance(config, str) else config.model_type
    detected = None if isinstance(config, str) else getattr(config, DETECTED_LAYOUT_ATTR, None)
    if model_type not in FFN_LAYOUTS and detected:
        layouts = (FfnLayout.from_dict(values) for values in detected.values())
        return {layout.stack: layout for layout in layouts}
    if model_type not in FFN_LAYOUTS:
        raise ValueError(
            f"Architecture {model_type!r} has no FFN layout: it has no entry in spri_hf/architectures.py (whose model "
            f"types are {', '.join(sorted(FFN_LAYOUTS))}) and no layout detected by spri_hf (upcycling detects one "
            "for decoder-only models; `spri-hf inspect --dense SRC` shows what it finds)."
        )
    entry = FFN_LAYOUTS[model_type]
    if callable(entry):
        if isinstance(config, str):
            raise TypeError(f"The layout of {model_type!r} depends on its config; pass the config, not its name.")
        entry = entry(config)
    layouts = entry if isinstance(entry, tuple) else (entry,)
    return {layout.stack: layout for layout in layouts}


def get_ffn_layout(config, stack: str | None = None) -> FfnLayout:
    """The FFN layout of one stack (`stack=None`: the family's only stack, or its decoder)."""
    layouts = get_ffn_layouts(config)
    if stack is None:
        stack = "decoder" if "decoder" in layouts else next(iter(layouts))
    if stack not in layouts:
        raise ValueError(f"{sorted(layouts)} are the FFN stacks of this family; there is no {stack!r} stack.")
    return layouts[stack]
