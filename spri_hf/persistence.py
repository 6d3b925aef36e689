"""How SPRI checkpoints are read and written: safetensors only, atomic saves, clear errors.

`SpriPreTrainedModel` delegates its `from_pretrained` / `save_pretrained` / `push_to_hub` policy here, so the modeling
file holds model code only. Shipped to the Hub with the modeling file (it is one of its relative imports): it imports
only torch, transformers and transformers' own hard dependencies (safetensors, huggingface_hub).
"""

import glob
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import torch
from huggingface_hub.errors import HfHubHTTPError
from safetensors import SafetensorError, safe_open

from .configuration_spri import SpriConfig


# Weights files of any earlier save: never carried into a new one (stale shards would be read as current).
WEIGHTS_FILE = re.compile(r"^(model|pytorch_model|adapter_model)([-.].*)?\.(safetensors|bin)(\.index\.json)?$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def refuse_pickle_only(folder, fix: str = "pass use_safetensors=False, then save_pretrained() to convert them") -> None:
    """Raise a clear `OSError` if a local `folder` holds pickle weights and no safetensors file (unpickling can run
    arbitrary code); `fix` says how to opt in."""
    if folder is None:  # from_pretrained(None, config=..., state_dict=...): nothing on disk to check
        return
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    pickled = sorted(name for name in names if name.endswith(PICKLE_SUFFIXES))
    if pickled and not any(name.endswith(".safetensors") for name in names):
        raise OSError(
            f"{folder} holds only pickle weights ({', '.join(pickled)}); spri_hf reads safetensors only, since "
            f"unpickling can run arbitrary code. If you trust the files, {fix}."
        )


def load_checkpoint(model_class, load: Callable, pretrained_model_name_or_path, *args, **kwargs):
    """`load(pretrained_model_name_or_path, *args, **kwargs)` (the parent `from_pretrained`), reading safetensors only
    unless `use_safetensors=False` is passed, and turning corrupt files and config/weights mismatches into errors that
    say what to do."""
    if kwargs.get("gguf_file") is None:
        kwargs.setdefault("use_safetensors", True)
    if kwargs.get("use_safetensors"):
        refuse_pickle_only(pretrained_model_name_or_path)
    try:
        return load(pretrained_model_name_or_path, *args, **kwargs)
    except SafetensorError as err:
        raise OSError(
            f"Could not read the weights of {pretrained_model_name_or_path}: a safetensors file is corrupt or "
            f"truncated ({err}). Save or download the checkpoint again."
        ) from err
    except RuntimeError as err:
        mismatch = first_shape_mismatch(model_class, pretrained_model_name_or_path)
        if mismatch is None:
            raise
        raise ValueError(
            f"{pretrained_model_name_or_path}: {mismatch}. The config.json and the weights do not belong "
            "together (e.g. num_experts, residual_rank or stage changed); restore the matching config."
        ) from err


def first_shape_mismatch(model_class, folder) -> str | None:
    """Describe the first tensor of a local checkpoint whose shape differs from what its config builds."""
    if not os.path.isdir(str(folder)):
        return None
    with torch.device("meta"):
        expected = model_class(SpriConfig.from_pretrained(folder)).state_dict()
    for path in sorted(glob.glob(os.path.join(str(folder), "*.safetensors"))):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle, not a dict)
                shape = list(handle.get_slice(name).get_shape())
                if name in expected and list(expected[name].shape) != shape:
                    return (
                        f"tensor {name!r} has shape {shape} in {os.path.basename(path)} but the config expects "
                        f"{list(expected[name].shape)}"
                    )
    return None


def save_atomically(save: Callable[[str], None], save_directory) -> None:
    """Run `save(folder)` into a sibling staging folder, then swap it in for `save_directory` by renames.

    An interrupted save leaves either no folder or the previous one, never a half checkpoint. Files of the previous
    folder other than weights (tokenizer, training state, the card's own text) are carried over.
    """
    save_directory = os.path.abspath(os.fspath(save_directory))
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory={save_directory!r} is a file; save_pretrained needs a folder path.")
    parent, name = os.path.split(save_directory)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    try:
        if os.path.isdir(save_directory):
            carry_other_files(save_directory, staging)
        save(staging)
        replace_folder(staging, save_directory)
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def carry_other_files(folder: str, staging: str):
    """Link (or copy) into `staging` what `folder` holds besides weights, so a save keeps the folder's other files."""
    for entry in os.listdir(folder):
        if WEIGHTS_FILE.match(entry):
            continue
        source, target = os.path.join(folder, entry), os.path.join(staging, entry)
        if os.path.isdir(source):
            shutil.copytree(source, target, copy_function=link_or_copy)
        else:
            link_or_copy(source, target)


def link_or_copy(source: str, target: str):
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def replace_folder(staging: str, destination: str):
    """Move `staging` to `destination`; an existing `destination` is moved aside first and deleted last.

    `staging` comes from `tempfile.mkdtemp` (mode 0700): it first gets the mode `os.makedirs` gives, the one a plain
    `save_pretrained` folder has (0777 less the umask), so other users and serving containers can read the folder.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    if not os.path.exists(destination):
        os.rename(staging, destination)
        return
    parent, name = os.path.split(destination)
    aside = tempfile.mkdtemp(prefix=f".{name}.replaced-", dir=parent)
    os.rename(destination, os.path.join(aside, name))
    os.rename(staging, destination)
    shutil.rmtree(aside, ignore_errors=True)


def push_with_clear_errors(push: Callable, repo_id: str, *args, **kwargs):
    """`push(repo_id, ...)` (the parent `push_to_hub`); a failed upload raises an `OSError` that says what failed."""
    try:
        return push(repo_id, *args, **kwargs)
    except HfHubHTTPError as err:
        raise OSError(
            f"Pushing the model to the Hub repo {repo_id!r} failed: {err}. Nothing local was changed and no "
            "partial commit was made. Check the endpoint and token (HF_ENDPOINT, HF_TOKEN), then push again; "
            "or save_pretrained() locally and upload the folder later."
        ) from err
