"""Two small helpers on torch modules that the upcycler and the exporter share.

They know nothing of SPRI: they live here rather than in the upcycling recipe (pure tensor code) so that `export.py`
does not import the upcycler to find a submodule's name.
"""

from contextlib import contextmanager

import torch


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules under `dtype` as torch's default (a non-floating `dtype` leaves the default alone): a model built
    on the meta device gets the dtype it will be filled in, without a cast afterwards."""
    previous = torch.get_default_dtype()
    if dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def module_name(root: torch.nn.Module, target: torch.nn.Module) -> str:
    """The dotted name of `target` inside `root` (found by identity, so a module reached by navigation, such as a
    layout's layer stack, is named as `state_dict` names its tensors)."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise RuntimeError("module not found in its model")
