"""Small helpers shared by the command line, the export and the demo."""

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


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def refuse_pickle_only(folder, use_safetensors, fix: str = "pass use_safetensors=False"):
    """Raise `OSError` when `folder` is a local checkpoint with pickle weights but no safetensors and pickle was not
    allowed: unpickling can run arbitrary code."""
    folder = os.fspath(folder)
    if use_safetensors is False or not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    pickled = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if pickled and not any(name.endswith(".safetensors") for name in names):
        raise OSError(
            f"{folder} holds only pickle weights ({', '.join(pickled)}); spri_hf reads safetensors only, since "
            f"unpickling can run arbitrary code. If you trust the files, {fix}."
        )
