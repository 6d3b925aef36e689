"""Small helpers shared by the command line, the export and the demo."""

import os
import shutil
import tempfile


def atomic_save(model, out_dir: str, overwrite: bool = False, **save_kwargs):
    """`save_pretrained` into a temporary sibling folder, then rename: `out_dir` is never half written."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass overwrite=True (--overwrite on the command line) to replace it, or choose another folder.")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        model.save_pretrained(staging, **save_kwargs)
        if os.path.exists(out_dir):
            backup = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=parent)
            os.rename(out_dir, os.path.join(backup, "old"))
            os.rename(staging, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
