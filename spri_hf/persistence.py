"""How SPRI checkpoints are read and written: safetensors only, atomic saves, clear errors.

`SpriCheckpointMixin` gives `SpriPreTrainedModel` its `from_pretrained` / `save_pretrained` / `push_to_hub`, so the
modeling file holds model code only; `staged_folder` is the one way anything in spri_hf writes a folder atomically.
Shipped to the Hub with the modeling file (it is one of its relative imports): it imports only torch, transformers
and transformers' own hard dependencies (safetensors, huggingface_hub).
"""

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager

from huggingface_hub.errors import HfHubHTTPError
from safetensors import SafetensorError

from .configuration_spri import record_base_model_class
from .model_card import write_model_card
from .parallel import writes_on_another_rank
from .utils import is_occupied


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
    # transformers' loading report names the tensors whose shapes differ (it raises only after logging them), so the
    # report is asked for and a mismatch raised here, with the fix
    wants_info = kwargs.pop("output_loading_info", False)
    checks_shapes = not kwargs.get("ignore_mismatched_sizes", False)
    kwargs["ignore_mismatched_sizes"] = True
    try:
        model, info = load(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
    except SafetensorError as err:
        raise OSError(
            f"Could not read the weights of {pretrained_model_name_or_path}: a safetensors file is corrupt or "
            f"truncated ({err}). Save or download the checkpoint again."
        ) from err
    mismatched = sorted(info.get("mismatched_keys") or [])
    if checks_shapes and mismatched:
        name, stored, expected = mismatched[0]
        raise ValueError(
            f"{pretrained_model_name_or_path}: tensor {name!r} has shape {list(stored)} in the checkpoint but the "
            f"config expects {list(expected)} ({len(mismatched)} such tensors). The config.json and the weights do "
            "not belong together (e.g. num_experts, residual_rank or stage changed); restore the matching config."
        )
    return (model, info) if wants_info else model


# staging folders being written by `staged_folder`: a save into one of them writes straight into it
_STAGING: set[str] = set()


@contextmanager
def staged_folder(destination, keep_other_files: bool = False):
    """Yield a sibling staging folder to write into; when the block ends without error, it replaces `destination` by
    renames. An interrupted write leaves either no folder or the previous one, never a half checkpoint.

    `keep_other_files`: files of the previous folder other than weights (tokenizer, training state, the card's own
    text) are carried over. Inside another `staged_folder` (a SPRI model saved by `atomic_save`), the outer staging
    folder is written directly: each save is staged once.
    """
    destination = os.path.abspath(os.fspath(destination))
    if destination in _STAGING:
        yield destination
        return
    if os.path.isfile(destination):
        raise ValueError(f"{destination!r} is a file; a checkpoint needs a folder path.")
    parent, name = os.path.split(destination)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.saving-", dir=parent)
    _STAGING.add(staging)
    try:
        if keep_other_files and os.path.isdir(destination):
            carry_other_files(destination, staging)
        yield staging
        replace_folder(staging, destination)
    finally:
        _STAGING.discard(staging)
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def save_atomically(save: Callable[[str], None], save_directory) -> None:
    """Run `save(folder)` in a `staged_folder` of `save_directory` that keeps the folder's other files."""
    with staged_folder(save_directory, keep_other_files=True) as folder:
        save(folder)


def atomic_save(model, out_dir: str, overwrite: bool = False, **save_kwargs):
    """`model.save_pretrained` into a `staged_folder`: `out_dir` is never half written, and with `overwrite` it is
    replaced as a whole (nothing of the previous folder is kept)."""
    out_dir = os.path.abspath(out_dir)
    if is_occupied(out_dir) and not overwrite:
        raise FileExistsError(
            f"{out_dir} already exists; pass overwrite=True (--overwrite on the command line) to replace it, or "
            "choose another folder."
        )
    with staged_folder(out_dir) as folder:
        model.save_pretrained(folder, **save_kwargs)


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


class SpriCheckpointMixin:
    """How a SPRI model is read, written and pushed (mixed into `SpriPreTrainedModel`, before `PreTrainedModel`):
    safetensors only, atomic saves, the model card's SPRI section, clear errors."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, reading safetensors only unless `use_safetensors=False` is passed
        (pickle files can run code when read), with clear errors for corrupt files and config/weights mismatches."""
        load = super().from_pretrained
        loaded = load_checkpoint(cls, load, pretrained_model_name_or_path, *args, **kwargs)
        # Loading may replace parameters; trainability follows the stage recorded in the config.
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        model.apply_stage_trainability()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, atomic, plus the model card (`README.md`, SPRI section created or updated).

        The modeling and configuration code is saved next to the weights and `config.json` gets an `auto_map`, so the
        folder loads with `trust_remote_code=True` where spri_hf is not installed.
        """
        record_base_model_class(self.config)
        if writes_on_another_rank(self):  # sharded by from_pretrained(distributed_config=...): every rank gathers
            kwargs["is_main_process"] = False
        if not kwargs.get("is_main_process", True) or kwargs.get("push_to_hub", False):
            super().save_pretrained(save_directory, *args, **kwargs)
            if kwargs.get("is_main_process", True):
                self.create_or_update_model_card(save_directory)
            return

        parent_save = super().save_pretrained

        def save(folder: str):
            parent_save(folder, *args, **kwargs)
            self.create_or_update_model_card(folder)

        save_atomically(save, save_directory)

    def create_or_update_model_card(self, output_dir, repo_id: str | None = None) -> str:
        """Write this model's card into `output_dir/README.md`, keeping any text already there."""
        return write_model_card(self, output_dir, repo_id=repo_id)

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        """`PreTrainedModel.push_to_hub` (weights, config with `auto_map`, code files, model card).

        A failed upload raises an `OSError` that says what failed; nothing local is touched (the upload is made from
        a temporary folder) and the Hub keeps its previous revision, since a commit is all-or-nothing.
        """
        return push_with_clear_errors(super().push_to_hub, repo_id, *args, **kwargs)

    def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
        # push_to_hub has just replaced README.md with the Hub's (or a blank) card: put the SPRI section back in.
        self.create_or_update_model_card(working_dir, repo_id=repo_id)
        return super()._upload_modified_files(working_dir, repo_id, *args, **kwargs)
