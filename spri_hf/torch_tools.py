"""A small helper on torch modules that the upcycler and the exporter share.

It knows nothing of SPRI: it lives here rather than in the upcycling recipe (pure tensor code) so that `export.py`
does not import the upcycler to find a submodule's name.
"""

import torch


def module_name(root: torch.nn.Module, target: torch.nn.Module) -> str:
    """The dotted name of `target` inside `root` (found by identity, so a module reached by navigation, such as a
    layout's layer stack, is named as `state_dict` names its tensors)."""
    for name, module in root.named_modules():
        if module is target:
            return name
    raise RuntimeError("module not found in its model")
