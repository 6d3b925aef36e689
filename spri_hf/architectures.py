"""Where each supported dense family keeps its feed-forward blocks.

A family has one stack of blocks (decoder-only models: "decoder"; BERT-like encoders: "encoder") or two
(encoder-decoder models). Adding an architecture is adding one entry to `FFN_LAYOUTS`: an `FfnLayout` per stack, or
a function of the config when the layout depends on it (T5 v1.0 vs gated v1.1). This module is shipped to the Hub
with the modeling code, so it imports nothing but the standard library.
"""

from dataclasses import dataclass, replace


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


_LLAMA_LIKE = FfnLayout(layers_attr="layers")


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
    if model_type not in FFN_LAYOUTS:
        raise ValueError(
            f"Architecture {model_type!r} is not supported by SPRI upcycling. Supported model types: "
            f"{', '.join(sorted(FFN_LAYOUTS))}. Adding one is a single entry in spri_hf/architectures.py."
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
