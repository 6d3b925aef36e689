"""Memory and disk estimates made before any heavy work, and a clear refusal when the target cannot fit."""

import os
import shutil
from dataclasses import dataclass

import psutil
import torch
from tqdm import tqdm
from transformers.utils import logging


logger = logging.get_logger(__name__)


@dataclass
class Estimate:
    """What an upcycling run needs. Bytes throughout."""

    weights: int  # the SPRI model's tensors in the output dtype (memory when held, disk when written)
    layer_work: int  # the float64 work of the largest FFN layer (SVD factors, experts before the cast)
    memory: int  # peak extra memory of this run
    disk: int  # bytes written (0 when nothing is written)

    def describe(self) -> str:
        text = f"SPRI model {_human(self.weights)}, largest layer's float64 work {_human(self.layer_work)}; needs about {_human(self.memory)} of memory"
        return text + (f" and {_human(self.disk)} of disk" if self.disk else "")


def _human(size: float) -> str:
    return tqdm.format_sizeof(size, suffix="B", divisor=1000)


def tensor_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the model's parameters and buffers (each once), in `dtype` for floating tensors when given."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        size = (dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype).itemsize
        total += tensor.numel() * size
    return total


def layer_work_bytes(model) -> int:
    """float64 bytes of the largest FFN layer's upcycling work: the matrices, their SVD and one projection's experts."""
    config, largest = model.config, 0
    for stack in config.upcycled_stacks():
        layout = model.ffn_layouts[stack]
        hidden, inter = layout.hidden_size(config.base_config), layout.intermediate_size(config.base_config)
        matrix = hidden * inter
        projections = 3 if layout.gated else 2
        full_experts = config.stage == 2 or config.init != "spri"
        # the matrices, U/V and the principal part of each, plus the experts of one projection before the cast
        experts = config.num_experts // config.expert_granularity  # each expert is 1/G of the dense width
        work = projections * 4 * matrix + (experts * matrix * 2 if full_experts else 0)
        largest = max(largest, 8 * work)
    return largest


def available_memory() -> int:
    """The memory the system can give without swapping (psutil's `available`)."""
    return psutil.virtual_memory().available


class ResourceShortfall:
    """Mixed into the `MemoryError` / `OSError` of `check_fits`: `override` is the setting in the message that skips
    the check, so a front end (the command line) can name its own flag instead."""

    override = "check_resources=False"

    def with_override(self, override: str) -> str:
        return str(self).replace(self.override, override)


class NotEnoughMemoryError(ResourceShortfall, MemoryError):
    pass


class NotEnoughDiskError(ResourceShortfall, OSError):
    pass


def check_fits(estimate: Estimate, out_dir: str | None = None, check: bool = True):
    """Log the estimate; raise `MemoryError` / `OSError` naming the shortfall when memory or disk is too small."""
    flag = ResourceShortfall.override
    logger.info(f"Upcycling estimate: {estimate.describe()}.")
    if not check:
        return
    memory = available_memory()
    if memory is not None and estimate.memory > memory:
        raise NotEnoughMemoryError(
            f"Upcycling needs about {_human(estimate.memory)} of memory but {_human(memory)} is available "
            f"({estimate.describe()}). Use a smaller dtype, fewer experts or moe_layers, spri-hf upcycle / "
            f"upcycle_checkpoint (streams layer by layer), or pass {flag} to try anyway."
        )
    if out_dir is not None and estimate.disk:
        probe = os.path.dirname(os.path.abspath(out_dir))
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        free = shutil.disk_usage(probe or ".").free
        if estimate.disk > free:
            raise NotEnoughDiskError(
                f"The SPRI checkpoint needs about {_human(estimate.disk)} of disk but {_human(free)} is free at "
                f"{probe}. Free space, write elsewhere, use a smaller dtype, or pass {flag} to try anyway."
            )
