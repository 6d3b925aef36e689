"""The pipeline between a source and a sink: the SPRI model's skeleton, then its tensors streamed in order.

`skeleton` measures what the config cannot know without the weights (the residual rank, and with `principal_energy`
every matrix's principal rank) and builds the SPRI model on the meta device. `stream_tensors` then yields every
tensor of its inner model: the tensors that are not FFNs read from the source as they are (renamed), then the MoE
blocks layer by layer, each computed by the recipe (`recipe.py`) on a pool of single-threaded workers. Sinks
(`sinks.py`) consume that stream; `plan_order` tells them its names in order before anything is computed.
"""

import collections
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor

import torch
from transformers.initialization import no_init_weights
from transformers.modeling_utils import local_torch_dtype
from transformers.utils import logging

from ..architectures import FfnLayout, get_ffn_layouts
from ..configuration_spri import SpriConfig
from ..torch_tools import module_name, torch_threads
from . import initializers as spri_init
from .recipe import decompose, ffn_slices, generator_key, residual_rank, upcycle_layer
from .settings import WorkOptions


def dense_to_spri_names(config: SpriConfig, dense_root, layouts: dict, targets, sources) -> dict[str, str]:
    """Where each tensor named in `sources` (names in `dense_root`) goes in the SPRI inner model (names in `targets`):
    every non-FFN tensor, and the FFN kept as shared expert.

    Give every name of a tied tensor: which one a deduplicating walk keeps depends on module order (XLM-R's MLM head).
    """
    ffn_prefixes = []
    for stack in config.upcycled_stacks():
        layout = layouts[stack]
        layers_name = module_name(dense_root, layout.layers(dense_root))
        for idx in config.upcycled_layers(stack):
            ffn_prefixes += [f"{layers_name}.{idx}.{path}." for path in layout.ffn_paths()]
    keep_shared = config.shared_expert == "dense"
    names = {}
    for name in sources:
        target = name
        prefix = next((p for p in ffn_prefixes if name.startswith(p)), None)
        if prefix is not None:
            if not keep_shared:
                continue
            target = f"{prefix}shared_expert.{name[len(prefix):]}"
        if target not in targets:
            raise RuntimeError(f"Internal error: dense tensor {name!r} has no counterpart in the SPRI model.")
        names[name] = target
    return names


def dense_groups(model, source, layouts: dict) -> list[tuple[list[str], list[str]]]:
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


def block_names(model) -> list[tuple[str, list[str]]]:
    """`(block name, tensor names)` of every MoE block in the inner model (its parameters, and the routers' bias of
    bias balancing); a kept shared expert is a dense tensor, streamed with the others."""
    inner = model.model
    return [
        (module_name(inner, block), [name for name in block.state_dict() if not name.startswith("shared_expert.")])
        for _, _, block in model.moe_sites()
    ]


def plan_order(model, source, layouts, tied: set) -> list[str]:
    """The names `stream_tensors` yields, in its order, without computing anything (`tied`: the names left out)."""
    order = [name for _, spri_names in dense_groups(model, source, layouts) for name in spri_names]
    order += [f"{block}.{name}" for block, names in block_names(model) for name in names]
    return [name for name in order if name not in tied]


def read_ffn(source, layout: FfnLayout, idx: int) -> tuple[dict, dict]:
    """`(matrices, biases)` of layer `idx`'s FFN, loaded from the source and dropped from it again: the tensors read
    stay alive in what is returned."""
    owner = layout.ffn_owner(layout.layers(source.root)[idx])
    source.load_module(owner, module_name(source.root, owner), None)
    try:
        matrices, biases = layout.ffn_weights(owner)
        return {proj: w.detach() for proj, w in matrices.items()}, {proj: b.detach() for proj, b in biases.items()}
    finally:
        source.unload_module(owner)


def skeleton(spri_class: type, config: SpriConfig, source, dtype: torch.dtype):
    """`(spri_model, layouts)`: the residual rank measured on the source's FFNs (SPRI), then the model built on the
    meta device (nothing is allocated, whatever the size)."""
    layouts = get_ffn_layouts(config.base_config)
    if config.init == "spri":

        def matrices(stack: str, idx: int) -> dict:
            read, _ = read_ffn(source, layouts[stack], idx)
            read = read if source.resident else {proj: weight.clone() for proj, weight in read.items()}
            return ffn_slices(config, read)

        # single-threaded as the upcycling workers are: the same singular values, so the same principal ranks
        with torch_threads(1):
            measured = {
                stack: residual_rank(config, layouts[stack], stack, functools.partial(matrices, stack))
                for stack in config.upcycled_stacks()
            }
        config.residual_rank = max(rank for rank, _ in measured.values())
        # with principal_energy, every matrix's principal rank: the upcycling workers take them from here
        source.principal_ranks = {stack: ranks for stack, (_, ranks) in measured.items() if ranks is not None}
    # on meta the weight initialisation computes nothing but costs a second of decompositions: skipped
    with torch.no_grad(), local_torch_dtype(dtype), torch.device("meta"), no_init_weights():
        model = spri_class(config)
    model.tie_weights()
    return model, layouts


def stream_tensors(
    spri_model, source, layouts: dict, dtype: torch.dtype | None, work: WorkOptions
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name in spri_model.model, tensor)` for every tensor of the SPRI inner model: non-FFN first, then the
    MoE blocks layer by layer. A tied tensor is read once (from whichever of its names the checkpoint has) and
    yielded under each of its SPRI names."""
    targets = spri_model.model.state_dict(keep_vars=True)
    for dense_names, spri_names in dense_groups(spri_model, source, layouts):
        present = next((name for name in dense_names if source.key(name) is not None), dense_names[0])
        tensor = source.read(present, targets[spri_names[0]])
        tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        for spri_name in spri_names:
            yield spri_name, tensor
        del tensor

    blocks = dict(block_names(spri_model))
    for block_name, tensors in _upcycled_layers(spri_model, source, layouts, dtype, work):
        for name in blocks[block_name]:
            yield f"{block_name}.{name}", tensors.pop(name)
        del tensors


def _single_threaded_worker():
    # each worker's LAPACK / BLAS calls use one thread (threaded eigh spins badly on shared cores); with OpenMP this
    # is per thread, so the caller's own thread count is untouched
    torch.set_num_threads(1)


def _upcycled_layers(spri_model, source, layouts, dtype, work: WorkOptions):
    """`(block name, tensors)` of every MoE block, in the model's order, computed on a pool of single-threaded workers.

    Each matrix's SVD and shared base (`recipe.decompose`) is one task, and once a layer's are done its assembly
    (the random draws, factors, casts: `upcycle_layer`) is another, so the SVDs of a layer and of the next layers run
    at once. At most enough layers to keep every worker busy are in flight, plus one (two with two workers and three
    matrices a layer): memory stays a few layers' float64 work. Every task runs single-threaded and the random draws
    of a layer happen in one task in a fixed order, so the tensors are bit-identical whatever the number of workers.
    """
    config = spri_model.config
    sites = list(spri_model.moe_sites())
    workers, svd_method, svd_device = work.workers, work.svd_method, work.svd_device
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

    progress = logging.tqdm(total=len(sites), desc="Upcycling FFN layers", unit="layer", disable=not work.show_progress)
    in_flight = collections.deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="spri-upcycle", initializer=_single_threaded_worker) as pool:
        try:
            for position, (stack, idx, block) in enumerate(sites):
                matrices, biases = read_ffn(source, layouts[stack], idx)
                matrices = ffn_slices(config, matrices)
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
