"""Small helpers shared by the command line, the export and the demo (importing this module imports no torch: the
command line checks its paths with it before it imports anything heavy)."""

import os
import shutil
import tempfile


def is_occupied(path: str) -> bool:
    """Whether writing a checkpoint to `path` would replace something: a file, or a folder that is not empty (an
    empty folder, e.g. a fresh `tempfile.TemporaryDirectory()`, is taken as `save_pretrained` takes it)."""
    return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))


def atomic_save(model, out_dir: str, overwrite: bool = False, **save_kwargs):
    """`save_pretrained` into a temporary sibling folder, then rename: `out_dir` is never half written."""
    out_dir = os.path.abspath(out_dir)
    if is_occupied(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite on the command line) to replace it, or choose another folder.")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        model.save_pretrained(staging, **save_kwargs)
        from .persistence import replace_folder  # torch, safetensors: only once something is written

        replace_folder(staging, out_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
