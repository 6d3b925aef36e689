"""Where each supported dense family keeps its feed-forward block.

Adding an architecture is adding one `FfnLayout` entry to `FFN_LAYOUTS`. This module is shipped to the
Hub with the modeling code, so it imports nothing but the standard library.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class FfnLayout:
    """How a dense decoder family lays out its FFN.

    Args:
        layers_attr: attribute of the backbone (`model.base_model`) holding the `nn.ModuleList` of blocks.
        mlp_attr: attribute of one block holding the FFN module.
        gated: `down(act(gate(x)) * up(x))` if True, `down(act(up(x)))` if False.
        gate / up / down: attribute names of the projections in the FFN module. `fused_gate_up` names a
            single projection that holds `[gate; up]` stacked on its output dimension (Phi-3).
        conv1d: the projections are GPT-2 `Conv1D` modules whose weight is stored as (in, out).
        act_attr: config attribute naming the activation.
        intermediate_attr: config attribute holding the FFN width; `None` falls back to 4 * hidden.
        bias: config attribute that switches FFN biases on, or a constant.
        dropout_attr: config attribute of the dropout applied on the FFN output, if any.
    """

    layers_attr: str
    mlp_attr: str = "mlp"
    gated: bool = True
    gate: str | None = "gate_proj"
    up: str | None = "up_proj"
    down: str = "down_proj"
    fused_gate_up: str | None = None
    conv1d: bool = False
    act_attr: str = "hidden_act"
    intermediate_attr: str | None = "intermediate_size"
    bias: str | bool = False
    dropout_attr: str | None = None

    def hidden_size(self, config) -> int:
        return config.hidden_size

    def intermediate_size(self, config) -> int:
        value = getattr(config, self.intermediate_attr, None) if self.intermediate_attr else None
        return value if value is not None else 4 * config.hidden_size

    def activation(self, config) -> str:
        return getattr(config, self.act_attr)

    def has_bias(self, config) -> bool:
        return bool(getattr(config, self.bias, False)) if isinstance(self.bias, str) else self.bias

    def dropout(self, config) -> float:
        return float(getattr(config, self.dropout_attr, 0.0) or 0.0) if self.dropout_attr else 0.0

    def projection_names(self) -> tuple[str, ...]:
        """Names of the FFN weight matrices in the order (gate, up, down) / (up, down)."""
        return ("gate", "up", "down") if self.gated else ("up", "down")


_LLAMA_LIKE = FfnLayout(layers_attr="layers")

FFN_LAYOUTS: dict[str, FfnLayout] = {
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
}


def get_ffn_layout(model_type: str) -> FfnLayout:
    """Return the FFN layout of `model_type`, or raise a `ValueError` listing the supported families."""
    if model_type not in FFN_LAYOUTS:
        raise ValueError(
            f"Architecture {model_type!r} is not supported by SPRI upcycling. Supported model types: "
            f"{', '.join(sorted(FFN_LAYOUTS))}. Adding one is a single `FfnLayout` entry in spri_hf/architectures.py."
        )
    return FFN_LAYOUTS[model_type]
