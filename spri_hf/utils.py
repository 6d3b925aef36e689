"""Path checks shared by the command line, the export and the checkpoint writers (importing this module imports no
torch: the command line checks its paths with it before it imports anything heavy). Shipped with checkpoints."""

import os


def is_occupied(path: str) -> bool:
    """Whether writing a checkpoint to `path` would replace something: a file, or a folder that is not empty (an
    empty folder, e.g. a fresh `tempfile.TemporaryDirectory()`, is taken as `save_pretrained` takes it)."""
    return os.path.isfile(path) or (os.path.isdir(path) and bool(os.listdir(path)))
