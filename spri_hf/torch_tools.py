"""Two small torch helpers the upcycler and the exporter share; they know nothing of SPRI (here rather than in the
upcycling recipe, pure tensor code, so that `export.py` does not import the upcycler to find a submodule's name)."""

from contextlib import contextmanager

import torch


@contextmanager
def torch_threads(count: int | None):
    """Run the block with `count` intra-op threads (None: unchanged), then restore the previous count. LAPACK's
    threaded solvers spin badly when cores are shared, so the upcycler's small factorisations run on one."""
    previous = torch.get_num_threads()
    if count is not None and count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


def module_name(root: torch.nn.Module, target: torch.nn.Module) -> str:
    """The dotted name of `target` inside `root` (found by identity, so a module reached by navigation, such as a
    layout's layer stack, is named as `state_dict` names its tensors)."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise RuntimeError("module not found in its model")
