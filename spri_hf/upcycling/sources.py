"""Where the dense tensors come from: a safetensors folder read tensor by tensor, or a dense model in memory.

Both sources have one interface, so the pipeline and the sinks never ask which one they have: `root` (the part of
the dense model the SPRI class wraps, on the meta device for a checkpoint), `key` / `read` (one tensor by its name in
`root`), `load_module` / `unload_module` (give one FFN its real tensors, then drop them again), `device`, `dtype`,
`fill_non_persistent_buffers` and `generation_config`.

A checkpoint's keys are mapped to the model's names through transformers' own load-time renamings; a checkpoint whose
tensors would have to be merged or split on load raises `NotStreamable`, and the entry point loads it whole instead.
"""

import copy
import os
import re

import torch
import transformers
from transformers import MODEL_MAPPING, GenerationConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from ..torch_tools import module_name
from .safetensors_io import SafetensorsReader


TASK_NAMES = {
    "AutoModelForCausalLM": "causal LM",
    "AutoModelForSeq2SeqLM": "seq2seq LM",
    "AutoModelForSpeechSeq2Seq": "speech seq2seq model",
    "AutoModelForSequenceClassification": "sequence classifier",
    "AutoModelForMaskedLM": "masked LM",
}


def dense_root_of(spri_class: type, dense: PreTrainedModel) -> PreTrainedModel:
    """The part of `dense` that `spri_class` wraps: the model itself, or its backbone for `SpriModel`."""
    mapping = spri_class._dense_mapping
    expected = mapping[type(dense.config)] if type(dense.config) in mapping else None
    if expected is not None and isinstance(dense, expected):
        return dense
    if mapping is MODEL_MAPPING:
        return dense.base_model
    task = TASK_NAMES.get(spri_class._dense_auto_class, spri_class._dense_auto_class)
    raise TypeError(
        f"{spri_class.__name__}.from_dense needs a {task}"
        f"{f' ({expected.__name__})' if expected is not None else ''}, got {type(dense).__name__}; load it with "
        f"{spri_class._dense_auto_class}, or use the Spri class of its task (SpriModel for a bare backbone)."
    )


def resolve_dense_folder(src: str | os.PathLike) -> str:
    """A local folder, or a Hub id downloaded (config, safetensors and tokenizer files only)."""
    src = os.fspath(src)
    if os.path.isdir(src):
        return src
    from huggingface_hub import snapshot_download

    return snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.spm"])


def can_stream(src: str | os.PathLike) -> bool:
    """Whether `src` is a local folder with a safetensors checkpoint the streaming upcycler reads."""
    src = os.fspath(src)
    return os.path.isfile(os.path.join(src, "config.json")) and (
        os.path.isfile(os.path.join(src, "model.safetensors"))
        or os.path.isfile(os.path.join(src, "model.safetensors.index.json"))
    )


class NotStreamable(ValueError):
    """The checkpoint's tensors need more than renaming to fit the model (merged or split on load)."""


def checkpoint_names(dense, checkpoint_keys) -> dict[str, str]:
    """Model state-dict name -> checkpoint key, through transformers' own load-time renamings (legacy names such as
    GPT-NeoX's `embed_out`, the base-model prefix). Raises `NotStreamable` when a key needs a tensor conversion."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    meta_state = dense.state_dict()
    if set(checkpoint_keys) <= set(meta_state):
        # every key already names a tensor of the model (what save_pretrained writes): nothing to rename, and
        # building transformers' conversion mapping (a thousand regexes) is skipped
        return {key: key for key in checkpoint_keys}
    transforms = get_model_conversion_mapping(dense)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    names = {}
    for key in checkpoint_keys:
        name, converted = rename_source_key(key, renamings, converters, dense.base_model_prefix, meta_state)
        if converted is not None:
            raise NotStreamable(f"checkpoint tensor {key!r} is converted on load ({converted})")
        names.setdefault(name, key)
    return names


class CheckpointSource:
    """A dense safetensors folder as a tensor source: the dense architecture on the meta device, its tensors read from
    disk on demand (one FFN at a time is loaded, then dropped again)."""

    device = torch.device("cpu")
    resident = False  # a loaded FFN goes back to meta after use: keep a copy of what is read
    # with principal_energy, {stack: {layer: {projection: principal rank}}}, measured by `skeleton`
    principal_ranks: dict = {}

    def __init__(self, spri_class: type, folder: str, config):
        self.folder = folder
        self.config = config
        self.reader = SafetensorsReader(folder)
        auto_class = getattr(transformers, spri_class._dense_auto_class)
        with torch.device("meta"), no_init_weights():
            dense = auto_class.from_config(config)
        self.dense = dense
        self.root = dense_root_of(spri_class, dense)
        self.root_prefix = "" if self.root is dense else module_name(dense, self.root)
        self.names = checkpoint_names(dense, self.reader.entries)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the checkpoint is stored in: its config's, else the most common floating dtype of its tensors
        (a config without one leaves the safetensors headers to say)."""
        if isinstance(getattr(self.config, "dtype", None), torch.dtype):
            return self.config.dtype
        floating = [entry.dtype for entry in self.reader.entries.values() if entry.dtype.is_floating_point]
        return max(set(floating), key=floating.count) if floating else torch.float32

    def key(self, root_name: str) -> str | None:
        """The checkpoint key of a tensor of the dense root, `None` when the checkpoint lacks it."""
        return self.names.get(f"{self.root_prefix}.{root_name}" if self.root_prefix else root_name)

    def _computed(self, root_name: str) -> torch.Tensor | None:
        """A tensor the dense class leaves out of its checkpoints and computes on load (sinusoidal positions)."""
        name = f"{self.root_prefix}.{root_name}" if self.root_prefix else root_name
        patterns = getattr(self.dense, "_keys_to_ignore_on_load_missing", None) or []
        if not any(re.search(pattern, name) for pattern in patterns):
            return None
        owner_name, _, attr = name.rpartition(".")
        owner = self.dense.get_submodule(owner_name)
        owner.to_empty(device="cpu", recurse=False)
        try:
            self.dense._init_weights(owner)
            return getattr(owner, attr).detach().clone()
        finally:
            owner.to("meta")

    def read(self, root_name: str, expected: torch.Tensor) -> torch.Tensor:
        key = self.key(root_name)
        if key is None:
            computed = self._computed(root_name)
            if computed is not None:
                return computed
            raise ValueError(
                f"The dense checkpoint {self.reader.folder} has no tensor for {root_name!r}, which its config.json "
                "requires: the weights do not belong to this config (or use names spri_hf does not know). Load the "
                "model with from_pretrained and pass the model object to from_dense instead."
            )
        tensor = self.reader.get(key)
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(
                f"The dense tensor {key!r} has shape {tuple(tensor.shape)} but config.json implies "
                f"{tuple(expected.shape)}: the weights and the config do not belong together."
            )
        return tensor

    def load_module(self, module: torch.nn.Module, prefix: str, dtype: torch.dtype | None):
        """Give `module` (a meta submodule of the root at `prefix`) its real tensors from the checkpoint."""
        for name, param in list(module.named_parameters()):
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            tensor = self.read(f"{prefix}.{name}", param)
            tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
            owner._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)

    @staticmethod
    def unload_module(module: torch.nn.Module):
        module.to("meta")

    def fill_non_persistent_buffers(self, spri_inner):
        """Rotary tables, position ids: in no file, so computed as transformers' from_pretrained does (the dense
        class's init)."""
        for module in spri_inner.modules():
            if getattr(module, "_non_persistent_buffers_set", None):
                spri_inner._init_weights(module)

    def generation_config(self):
        path = os.path.join(self.folder, "generation_config.json")
        return GenerationConfig.from_pretrained(self.folder) if os.path.isfile(path) else None


class ModuleSource:
    """A dense model in memory as a tensor source, with `CheckpointSource`'s interface (nothing to load or drop)."""

    resident = True  # its tensors stay where they are: read them without copying
    principal_ranks: dict = {}  # as CheckpointSource's

    def __init__(self, spri_class: type, dense):
        self.dense = dense
        self.root = dense_root_of(spri_class, dense)
        self.root_prefix = "" if self.root is dense else module_name(dense, self.root)
        self.device = dense.device
        self.dtype = dense.dtype  # the SPRI model keeps it
        self.tensors = dict(self.root.named_parameters(remove_duplicate=False))
        self.tensors.update(self.root.named_buffers(remove_duplicate=False))

    def check_finite(self):
        """Refuse weights with NaN or infinite values (no SVD decomposes them) before any work is done."""
        for name, param in self.root.named_parameters():
            if param.is_floating_point() and not torch.isfinite(param).all():
                raise ValueError(
                    f"The dense weight {name!r} contains NaN or infinite values; SPRI cannot decompose it. "
                    "Check the checkpoint (or the dtype it was loaded in) before upcycling."
                )

    def key(self, root_name: str) -> str | None:
        return root_name if root_name in self.tensors else None

    def read(self, root_name: str, expected: torch.Tensor) -> torch.Tensor:
        return self.tensors[root_name].detach()

    def load_module(self, module, prefix, dtype):
        pass

    def unload_module(self, module):
        pass

    def fill_non_persistent_buffers(self, spri_inner):
        """Copied from the dense model, as they are (a cast dense model has cast tables)."""
        persistent = set(self.root.state_dict(keep_vars=True))
        sources = {name: buffer for name, buffer in self.tensors.items() if name not in persistent}
        targets = dict(spri_inner.named_buffers(remove_duplicate=False))
        for name, buffer in sources.items():
            if name in targets:
                targets[name].copy_(buffer)

    def generation_config(self):
        config = getattr(self.dense, "generation_config", None)
        return copy.deepcopy(config) if config is not None else None


