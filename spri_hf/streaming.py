"""Streaming upcycling: from a dense safetensors checkpoint to an SPRI one, one tensor and one FFN layer at a time.

Neither the dense model nor the MoE model is ever whole in memory. Both architectures are built on the meta device
(names and shapes only); dense tensors are read from the safetensors files with plain reads (no memory map, so pages
do not stay resident), and each output tensor is written to its shard as soon as it is made. Peak memory is about one
FFN layer's worth of float64 work, whatever the model size.

The output is exactly what `from_dense` + `save_pretrained` would give (same tensors, same config, code files and
model card); `tests/test_streaming.py` checks that bit for bit.
"""

import collections
import contextlib
import copy
import functools
import json
import os
import re
import shutil
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import NamedTuple

import torch
import transformers
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError, safe_open
from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, GenerationConfig
from transformers.dynamic_module_utils import custom_object_save
from transformers.initialization import no_init_weights
from transformers.utils import logging
from transformers.utils.hub import convert_file_size_to_int

from . import initializers as spri_init
from .architectures import get_ffn_layouts
from .configuration_spri import SpriConfig, record_base_model_class
from .model_card import write_model_card
from .persistence import PICKLE_SUFFIXES, replace_folder
from .recipe import (
    default_dtype,
    dense_root_of,
    dense_to_spri_names,
    decompose,
    dequantized_config,
    generator_key,
    make_config,
    module_name,
    read_license,
    residual_rank,
    upcycle_layer,
)
from .resources import Estimate, check_fits, layer_work_bytes, tensor_bytes

logger = logging.get_logger(__name__)

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# Files of the dense folder that describe how to use the model rather than its weights: carried over as they are.
_CARRIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "source.spm",
    "target.spm",
    "vocab.txt",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
)


class TensorEntry(NamedTuple):
    file: str
    shape: tuple
    dtype: torch.dtype


class SafetensorsReader:
    """Single tensors of a safetensors checkpoint (one file or an index of shards), read with `safe_open`.

    Each read opens its file, takes the one tensor and closes the file again, so only that tensor's pages stay mapped.
    Measured here (a 1 GB file of 16 tensors of 64 MB, each read and summed, warm page cache, 2 shared cores):
    `safe_open` per tensor 0.13 s and 288 MB peak RSS; the hand-written reader it replaced (seek + readinto a new
    tensor) 4.1 s and 499 MB; one `safe_open` handle kept open for every tensor 0.13 s but 1248 MB (every page read
    stays mapped until the handle closes).
    """

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as handle:
                weight_map = json.load(handle)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(folder, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            pickled = [name for name in os.listdir(folder) if name.endswith(PICKLE_SUFFIXES)]
            hint = (
                f" It holds only pickle files ({', '.join(sorted(pickled))}), which can run code when read; spri_hf "
                "reads safetensors only. Convert it first (load it yourself with from_pretrained(..., "
                "use_safetensors=False) if you trust it, then save_pretrained)."
                if pickled
                else ""
            )
            raise OSError(f"No safetensors weights (model.safetensors or model.safetensors.index.json) in {folder}.{hint}")
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            path = os.path.join(folder, file)
            with self._open(path) as handle:
                for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                    piece = handle.get_slice(name)
                    dtype = _DTYPES.get(piece.get_dtype())
                    if dtype is None:
                        raise OSError(f"{path}: tensor {name!r} has dtype {piece.get_dtype()}, which spri_hf cannot upcycle.")
                    self.entries[name] = TensorEntry(file, tuple(piece.get_shape()), dtype)

    @staticmethod
    @contextlib.contextmanager
    def _open(path: str):
        try:
            handle = safe_open(path, framework="pt")
        except SafetensorError as err:
            raise OSError(
                f"{path} is not a readable safetensors file (corrupt or truncated: {err}). Download or save it again."
            ) from err
        with handle:
            yield handle

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def get(self, name: str) -> torch.Tensor:
        with self._open(os.path.join(self.folder, self.entries[name].file)) as handle:
            return handle.get_tensor(name)


class ShardWriter:
    """Write tensors, in a fixed plan's order, straight into safetensors shards (header first, then the data).

    The shards are planned by `huggingface_hub.split_torch_state_dict_into_shards` (what `save_pretrained` uses) on
    meta tensors of the plan; within a file the tensors lie in the order they are written. A shard's file is opened at
    its first tensor and closed after its last, so a plan whose shards interleave keeps a few files open at once.
    """

    def __init__(self, folder: str, plan: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int):
        self.folder = folder
        planned = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape, dtype in plan}
        split = split_torch_state_dict_into_shards(planned, max_shard_size=max_shard_bytes)
        self.sharded = split.is_sharded
        self.file_of = dict(split.tensor_to_filename)
        self.order = [name for name, _, _ in plan]
        self.planned = {name: (tuple(shape), dtype) for name, shape, dtype in plan}
        # each file's tensors in the order they will be written
        self.files: dict[str, list[str]] = {}
        for name in self.order:
            self.files.setdefault(self.file_of[name], []).append(name)
        self.total_size = sum(_numel(shape) * dtype.itemsize for _, shape, dtype in plan)
        self.position = 0
        self.handles, self.left = {}, {file: len(names) for file, names in self.files.items()}

    def _open(self, file: str):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in self.files[file]:
            shape, dtype = self.planned[name]
            nbytes = _numel(shape) * dtype.itemsize
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        handle = open(os.path.join(self.folder, file), "wb")  # noqa: SIM115 (open until its last tensor; closed in write/close)
        handle.write(struct.pack("<Q", len(raw)) + raw)
        self.handles[file] = handle

    def write(self, name: str, tensor: torch.Tensor):
        expected = self.order[self.position]
        if name != expected:
            raise RuntimeError(f"Internal error: wrote {name!r} where the plan has {expected!r}; please report it.")
        shape, dtype = self.planned[name]
        if tuple(tensor.shape) != shape:
            raise RuntimeError(f"Internal error: {name!r} has shape {tuple(tensor.shape)}, planned {shape}.")
        file = self.file_of[name]
        if file not in self.handles:
            self._open(file)
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        self.handles[file].write(data.reshape(-1).view(torch.uint8).numpy().data)
        self.position += 1
        self.left[file] -= 1
        if self.left[file] == 0:
            self.handles.pop(file).close()

    def close(self):
        for handle in self.handles.values():
            handle.close()
        self.handles = {}
        if self.position != len(self.order):
            raise RuntimeError(f"Internal error: {len(self.order) - self.position} planned tensors were not written.")
        if self.sharded:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.file_of}
            with open(os.path.join(self.folder, "model.safetensors.index.json"), "w") as handle:
                json.dump(index, handle, indent=2, sort_keys=True)


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


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


def _checkpoint_names(dense, checkpoint_keys) -> dict[str, str]:
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
        self.reader = SafetensorsReader(folder)
        auto_class = getattr(transformers, spri_class._dense_auto_class)
        with torch.device("meta"), no_init_weights():
            dense = auto_class.from_config(config)
        self.dense = dense
        self.root = dense_root_of(spri_class, dense)
        self.root_prefix = "" if self.root is dense else module_name(dense, self.root)
        self.names = _checkpoint_names(dense, self.reader.entries)

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
        self.tensors = dict(self.root.named_parameters(remove_duplicate=False))
        self.tensors.update(self.root.named_buffers(remove_duplicate=False))

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


def _dense_groups(model, source, layouts: dict) -> list[tuple[list[str], list[str]]]:
    """`(dense names, SPRI names)` per dense tensor (tied tensors have several names), in the model's order."""
    dense_state = source.root.state_dict(keep_vars=True)
    names = dense_to_spri_names(model.config, source.root, layouts, model.model.state_dict(keep_vars=True), dense_state)
    # tied names (`lm_head.weight` -> `model.embed_tokens.weight`) share one group, keyed by the tie's source
    prefix = f"{source.root_prefix}." if source.root_prefix else ""
    ties = {
        target.removeprefix(prefix): origin.removeprefix(prefix)
        for target, origin in (getattr(source.dense, "all_tied_weights_keys", None) or {}).items()
    }
    groups = {}
    for dense_name, spri_name in names.items():
        dense_names, spri_names = groups.setdefault(ties.get(dense_name, dense_name), ([], []))
        dense_names.append(dense_name)
        spri_names.append(spri_name)
    return list(groups.values())


def _block_names(model) -> list[tuple[str, list[str]]]:
    inner = model.model
    return [
        (module_name(inner, block), [name for name, _ in block.named_parameters() if not name.startswith("shared_expert.")])
        for _, _, block in model.moe_sites()
    ]


def stream_tensors(
    spri_model,
    source,
    layouts: dict,
    dtype: torch.dtype | None,
    *,
    show_progress: bool = False,
    svd_method: str = "auto",
    svd_device=None,
    svd_workers: int | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name in spri_model.model, tensor)` for every tensor of the SPRI inner model: non-FFN first, then the
    MoE blocks layer by layer. A tied tensor is read once (from whichever of its names the checkpoint has) and
    yielded under each of its SPRI names."""
    targets = spri_model.model.state_dict(keep_vars=True)
    for dense_names, spri_names in _dense_groups(spri_model, source, layouts):
        present = next((name for name in dense_names if source.key(name) is not None), dense_names[0])
        tensor = source.read(present, targets[spri_names[0]])
        tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        for spri_name in spri_names:
            yield spri_name, tensor
        del tensor

    blocks = dict(_block_names(spri_model))
    for block_name, tensors in _upcycled_layers(
        spri_model, source, layouts, dtype, show_progress=show_progress, svd_method=svd_method, svd_device=svd_device,
        svd_workers=svd_workers,
    ):  # fmt: skip
        for name in blocks[block_name]:
            yield f"{block_name}.{name}", tensors.pop(name)
        del tensors


def svd_worker_count(svd_device=None) -> int:
    """Worker threads for the FFN layers' SVDs: the cores this process may run on (one accelerator needs one)."""
    if svd_device is not None and torch.device(svd_device).type != "cpu":
        return 1
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def _threads(count: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _single_threaded_worker():
    # each worker's LAPACK / BLAS calls use one thread (threaded eigh spins badly on shared cores); with OpenMP this
    # is per thread, so the caller's own thread count is untouched
    torch.set_num_threads(1)


def _upcycled_layers(spri_model, source, layouts, dtype, *, show_progress, svd_method, svd_device, svd_workers):
    """`(block name, tensors)` of every MoE block, in the model's order, computed on a pool of single-threaded workers.

    Each matrix's SVD and shared base (`recipe.decompose`) is one task, and once a layer's are done its assembly
    (the random draws, factors, casts: `upcycle_layer`) is another, so the SVDs of a layer and of the next layers run
    at once. At most enough layers to keep every worker busy are in flight, plus one (two with two workers and three
    matrices a layer): memory stays a few layers' float64 work. Every task runs single-threaded and the random draws of a layer happen in one task in a
    fixed order, so the tensors are bit-identical whatever the number of workers.
    """
    config = spri_model.config
    sites = list(spri_model.moe_sites())
    workers = svd_workers if svd_workers is not None else svd_worker_count(svd_device)
    if workers < 1:
        raise ValueError(f"svd_workers={workers} must be at least 1.")
    on_accelerator = svd_device is not None and torch.device(svd_device).type != "cpu"
    on_accelerator = on_accelerator or source.device.type != "cpu"
    per_matrix = config.init == "spri" and not on_accelerator  # an accelerator takes a layer's SVDs as one batch

    def principals(stack, idx) -> dict:
        return source.principal_ranks.get(stack, {}).get(idx, {})

    def decompose_one(weight, principal):
        return decompose(config, weight, spri_init.thin_svd(weight, svd_method, svd_device), principal)

    def assemble(stack, idx, matrices, biases, decomposed):
        return upcycle_layer(
            config, layouts[stack], generator_key(stack, idx), matrices, biases, svd_method=svd_method,
            svd_device=svd_device, out_dtype=dtype, decomposed=decomposed, principals=principals(stack, idx),
        )  # fmt: skip

    def read(stack, idx):
        layout = layouts[stack]
        owner = layout.ffn_owner(layout.layers(source.root)[idx])
        source.load_module(owner, module_name(source.root, owner), None)
        try:
            matrices, biases = layout.ffn_weights(owner)
            return {proj: w.detach() for proj, w in matrices.items()}, {proj: b.detach() for proj, b in biases.items()}
        finally:
            source.unload_module(owner)  # the tensors read stay alive in `matrices` / `biases`

    progress = logging.tqdm(total=len(sites), desc="Upcycling FFN layers", unit="layer", disable=not show_progress)
    in_flight = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="spri-upcycle", initializer=_single_threaded_worker) as pool:
        try:
            for position, (stack, idx, block) in enumerate(sites):
                matrices, biases = read(stack, idx)
                if per_matrix:
                    ranks = principals(stack, idx)
                    parts = {proj: pool.submit(decompose_one, w, ranks.get(proj)) for proj, w in matrices.items()}
                    layer = _after(pool, parts, functools.partial(assemble, stack, idx, matrices, biases))
                else:
                    layer = pool.submit(assemble, stack, idx, matrices, biases, None)
                in_flight.append((module_name(spri_model.model, block), layer))
                # enough layers to keep every worker busy, plus the one being assembled and written
                limit = -(-workers // (len(matrices) if per_matrix else 1)) + 1
                del matrices, biases
                while in_flight and (len(in_flight) >= limit or position == len(sites) - 1):
                    block_name, layer = in_flight.popleft()
                    tensors = layer.result()
                    progress.update()
                    yield block_name, tensors
                    del tensors
        finally:  # done, an error, or an abandoned generator: drop what has not started
            pool.shutdown(wait=True, cancel_futures=True)
            progress.close()


def _after(pool: ThreadPoolExecutor, parts: dict[str, Future], assemble: Callable) -> Future:
    """A future of `assemble(decomposed)`, submitted to `pool` when every future in `parts` is done (no worker waits
    on another)."""
    result, lock, left = Future(), threading.Lock(), [len(parts)]

    def forward(done: Future):
        if done.cancelled():
            result.set_exception(CancelledError())
        elif done.exception() is not None:
            result.set_exception(done.exception())
        else:
            result.set_result(done.result())

    def part_done(_):
        with lock:
            left[0] -= 1
            if left[0]:
                return
        failed = next((part for part in parts.values() if part.cancelled() or part.exception() is not None), None)
        decomposed = {proj: part.result() for proj, part in parts.items()} if failed is None else None
        # the parts' callbacks refer to `parts`: emptied, no reference cycle keeps a layer's float64 work alive
        # until the garbage collector happens to run
        parts.clear()
        if failed is not None:
            forward(failed)
            return
        try:
            pool.submit(assemble, decomposed).add_done_callback(forward)
        except RuntimeError as err:  # the pool is shutting down (an error elsewhere)
            result.set_exception(err)
        del decomposed

    result.set_running_or_notify_cancel()
    for part in list(parts.values()):  # a part already done runs `part_done` here, and the last one empties `parts`
        part.add_done_callback(part_done)
    return result


def _ffn_getter(source, layouts: dict) -> Callable:
    def get(stack: str, idx: int):
        layout = layouts[stack]
        owner = layout.ffn_owner(layout.layers(source.root)[idx])
        source.load_module(owner, module_name(source.root, owner), None)
        try:
            matrices, _ = layout.ffn_weights(owner)
            matrices = {proj: weight.detach() for proj, weight in matrices.items()}
            return matrices if source.resident else {proj: weight.clone() for proj, weight in matrices.items()}
        finally:
            source.unload_module(owner)

    return get


def prepare(spri_class: type, folder: str, dtype: torch.dtype | None, settings: dict):
    """`(spri_model on meta, source, layouts, output dtype)` of a dense safetensors folder, every setting validated
    before any weight is read."""
    dense_config = dequantized_config(AutoConfig.from_pretrained(folder))
    settings.setdefault("base_model", folder)
    if "base_model_license" not in settings:
        settings["base_model_license"] = read_license(folder)
    config = make_config(dense_config, **settings)
    _check_shared_expert(config, dense_config)
    source = CheckpointSource(spri_class, folder, dense_config)
    if dtype is None and isinstance(getattr(dense_config, "dtype", None), torch.dtype):
        dtype = dense_config.dtype
    if dtype is None:
        floating = [entry.dtype for entry in source.reader.entries.values() if entry.dtype.is_floating_point]
        dtype = max(set(floating), key=floating.count) if floating else torch.float32
    model, layouts = skeleton(spri_class, config, source, dtype)
    return model, source, layouts, dtype


def prepare_module(spri_class: type, dense, settings: dict, may_fetch_card: bool = False):
    """`(spri_model on meta, source, layouts, dtype)` of a dense model in memory (its dtype and device are kept)."""
    source = ModuleSource(spri_class, dense)
    settings.setdefault("base_model", dense.name_or_path or None)
    if "base_model_license" not in settings:
        settings["base_model_license"] = read_license(settings["base_model"], may_fetch_card)
    config = make_config(dequantized_config(dense.config), **settings)
    _check_shared_expert(config, dense.config)
    for name, param in source.root.named_parameters():
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise ValueError(
                f"The dense weight {name!r} contains NaN or infinite values; SPRI cannot decompose it. "
                "Check the checkpoint (or the dtype it was loaded in) before upcycling."
            )
    model, layouts = skeleton(spri_class, config, source, dense.dtype)
    return model, source, layouts, dense.dtype


def _check_shared_expert(config: SpriConfig, dense_config):
    layouts = get_ffn_layouts(config.base_config)  # carries the detected layout of a family without a table entry
    if config.shared_expert is not None and any(layouts[stack].split for stack in config.upcycled_stacks()):
        raise ValueError(
            f"shared_expert={config.shared_expert!r} needs an FFN that is one module; a {dense_config.model_type} "
            "block calls its FFN projections itself. Use shared_expert=None."
        )


def skeleton(spri_class: type, config: SpriConfig, source, dtype: torch.dtype):
    """`(spri_model, layouts)`: the residual rank measured on the source's FFNs (SPRI), then the model built on the
    meta device (nothing is allocated, whatever the size)."""
    layouts = get_ffn_layouts(config.base_config)
    if config.init == "spri":
        getter = _ffn_getter(source, layouts)
        # single-threaded as the upcycling workers are: the same singular values, so the same principal ranks
        with _threads(1):
            measured = {
                stack: residual_rank(config, layouts[stack], stack, lambda idx, stack=stack: getter(stack, idx))
                for stack in config.upcycled_stacks()
            }
        config.residual_rank = max(rank for rank, _ in measured.values())
        # with principal_energy, every matrix's principal rank: the upcycling workers take them from here
        source.principal_ranks = {stack: ranks for stack, (_, ranks) in measured.items() if ranks is not None}
    # on meta the weight initialisation computes nothing but costs a second of decompositions: skipped
    with torch.no_grad(), default_dtype(dtype), torch.device("meta"), no_init_weights():
        model = spri_class(config)
    model.tie_weights()
    return model, layouts


def upcycle_checkpoint(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    spri_class: type | None = None,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    show_progress: bool = False,
    svd_method: str = "auto",
    svd_device: torch.device | str | None = None,
    svd_workers: int | None = None,
    check_resources: bool = True,
    **settings,
) -> str:
    """Upcycle the dense safetensors checkpoint `src` into an SPRI checkpoint folder `out_dir`, streaming.

    Peak memory stays near one FFN layer's worth. The folder is written next to `out_dir` and renamed into place, so
    an interrupted run never leaves a half checkpoint at `out_dir` nor damages one already there. Tokenizer and
    processor files of `src` are carried over. Returns `out_dir`.

    Args:
        spri_class: the SPRI class to build (default `SpriForCausalLM`; `SpriForSeq2SeqLM`, ... for other heads).
        dtype: of the written tensors (default: the dense checkpoint's); the SVD itself runs in float64.
        max_shard_size: largest weights file, e.g. "2GB" (an index file is written when there are several).
        svd_device: compute the SVDs there, a layer's as one batch (e.g. "cuda"; default: the CPU).
        svd_workers: threads computing SVDs at once, each single-threaded (default: the cores this process may use);
            the checkpoint is bit-identical whatever the number.
        check_resources: print (log at INFO) the memory and disk the run needs and raise `MemoryError` / `OSError`
            before writing anything when they are not available; `False` tries anyway.
        **settings: any `SpriConfig` field, as for `from_dense`.
    """
    if spri_class is None:  # the SPRI causal LM that `import spri_hf` registered with AutoModelForCausalLM
        spri_class = MODEL_FOR_CAUSAL_LM_MAPPING[SpriConfig]
    if svd_method not in spri_init.SVD_METHODS:
        raise ValueError(f"svd_method={svd_method!r} is not supported; choose one of {spri_init.SVD_METHODS}.")
    svd_device = spri_init.check_device(svd_device)
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype) or not getattr(torch, dtype).is_floating_point:
            raise ValueError(f"dtype={dtype!r} is not a floating-point torch dtype; use float32, bfloat16 or float16.")
        dtype = getattr(torch, dtype)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite) to replace it, or choose another folder.")
    max_bytes = convert_file_size_to_int(max_shard_size)  # what save_pretrained accepts
    folder = resolve_dense_folder(src)
    try:
        model, source, layouts, dtype = prepare(spri_class, folder, dtype, dict(settings))
    except NotStreamable as reason:
        logger.warning(f"{folder} cannot be streamed ({reason}); loading the dense model whole instead.")
        from .utils import atomic_save

        svd = {"svd_method": svd_method, "svd_device": svd_device, "svd_workers": svd_workers, "show_progress": show_progress}
        dense = getattr(transformers, spri_class._dense_auto_class).from_pretrained(folder, dtype=dtype or "auto")
        model = spri_class.from_dense(dense, check_resources=check_resources, **svd, **settings)
        atomic_save(model, out_dir, overwrite=overwrite, max_shard_size=max_shard_size)
        return out_dir

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        with torch.no_grad():
            tied = {name.removeprefix("model.") for name in model.all_tied_weights_keys}
            inner_params = model.model.state_dict(keep_vars=True)
            produced = stream_tensors(
                model, source, layouts, dtype, show_progress=show_progress, svd_method=svd_method, svd_device=svd_device,
                svd_workers=svd_workers,
            )
            first = _plan_order(model, source, layouts, tied)
            plan = [(f"model.{name}", tuple(inner_params[name].shape), _out_dtype(inner_params[name], dtype)) for name in first]
            writer = ShardWriter(staging, plan, max_bytes)
            largest = max((_numel(shape) * dtype_.itemsize for _, shape, dtype_ in plan), default=0)
            work = layer_work_bytes(model)
            check_fits(Estimate(tensor_bytes(model, dtype), work, work + largest, writer.total_size), out_dir, check_resources)
            for name, tensor in produced:
                if name in tied:
                    continue
                writer.write(f"model.{name}", tensor)
            writer.close()
        _write_metadata(model, folder, staging, dtype)
        replace_folder(staging, out_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def _out_dtype(param: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if param.dtype.is_floating_point else param.dtype


def _plan_order(model, source, layouts, tied: set) -> list[str]:
    """The names `stream_tensors` yields, in its order, without computing anything."""
    order = [name for _, spri_names in _dense_groups(model, source, layouts) for name in spri_names]
    order += [f"{block}.{name}" for block, names in _block_names(model) for name in names]
    return [name for name in order if name not in tied]


def _write_metadata(model, folder: str, staging: str, dtype: torch.dtype):
    """config.json (with auto_map), the code files, generation config, tokenizer files and the model card."""
    config = model.config
    config.dtype = str(dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    record_base_model_class(config)  # AutoModel -> SpriModel, as save_pretrained writes it
    custom_object_save(model, staging, config=config)
    config.save_pretrained(staging)
    if model.can_generate() and os.path.isfile(os.path.join(folder, "generation_config.json")):
        GenerationConfig.from_pretrained(folder).save_pretrained(staging)
    for name in _CARRIED_FILES:
        if os.path.isfile(os.path.join(folder, name)):
            shutil.copy2(os.path.join(folder, name), os.path.join(staging, name))
    write_model_card(model, staging)


def upcycle_in_memory(
    spri_class: type, src: str, dtype: torch.dtype | None, settings: dict, check_resources: bool = True, **kwargs
):
    """`from_dense` on a local safetensors folder without loading the dense model: the SPRI model is filled in place,
    so peak memory is the SPRI model plus one FFN layer's work."""
    model, source, layouts, dtype = prepare(spri_class, src, dtype, settings)
    return fill_model(model, source, layouts, dtype, check_resources=check_resources, **kwargs)


def fill_model(model, source, layouts: dict, dtype: torch.dtype, *, check_resources: bool = True, **kwargs):
    """The in-memory sink: allocate `model` (built on meta) on the source's device and fill it from `stream_tensors`."""
    weights, work = tensor_bytes(model, dtype), layer_work_bytes(model)
    check_fits(Estimate(weights, work, weights + work, 0), check=check_resources and source.device.type == "cpu")
    model.to_empty(device=source.device)
    targets = model.model.state_dict(keep_vars=True)
    filled = set()
    with torch.no_grad():
        source.fill_non_persistent_buffers(model.model)
        for name, tensor in stream_tensors(model, source, layouts, dtype, **kwargs):
            targets[name].copy_(tensor)
            filled.add(name)
    unset = set(targets) - filled - {name.removeprefix("model.") for name in model.all_tied_weights_keys}
    if unset:
        raise RuntimeError(f"Internal error: upcycling left {sorted(unset)[:5]} unset; please report it.")
    model.tie_weights()
    generation_config = source.generation_config()
    if generation_config is not None and model.can_generate():
        model.generation_config = generation_config
    model.apply_stage_trainability()
    return model.eval()
