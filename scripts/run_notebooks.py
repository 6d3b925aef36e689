"""Execute the notebooks under notebooks/ and store their outputs in the files, so that GitHub and the Hub show them.

    python scripts/run_notebooks.py              # execute every notebook in place (minutes on CPU)
    python scripts/run_notebooks.py --check      # execute nothing: exit 1 if a stored notebook is out of date

Each notebook runs top to bottom in a fresh `python3` kernel of this interpreter, offline (`HF_HUB_OFFLINE=1`), from
its own folder. What would change on every run without the code changing is left out of the file: execution
timestamps, the kernel's Python version, widget state. The file records a digest of its code cells
(`metadata.spri_hf.code_sha256`), so `--check` and tests/test_notebooks.py can tell when a code cell was edited
without the outputs being regenerated.
"""

import argparse
import base64
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import nbformat


ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# cell metadata nbclient or Jupyter write that changes from run to run
VOLATILE_CELL_METADATA = ("execution", "collapsed", "scrolled", "ExecuteTime")


def code_sources(notebook) -> list[str]:
    return [cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
            for cell in notebook["cells"] if cell["cell_type"] == "code"]


def code_digest(notebook) -> str:
    """sha256 of the notebook's code cells, in order (markdown edits do not change it)."""
    return hashlib.sha256(json.dumps(code_sources(notebook)).encode("utf-8")).hexdigest()


def output_text(output) -> str:
    """The text an output shows: a stream's text, or the text/plain part of a result or display."""
    if output.get("output_type") == "stream":
        text = output.get("text", "")
    else:
        text = output.get("data", {}).get("text/plain", "")
    return text if isinstance(text, str) else "".join(text)


def png_images(notebook) -> list[bytes]:
    """Every PNG image stored in the notebook's outputs, decoded."""
    images = []
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {}).get("image/png")
            if data is not None:
                images.append(base64.b64decode(data if isinstance(data, str) else "".join(data)))
    return images


def strip_volatile(notebook):
    """Drop what changes on every run: timing metadata, the kernel's version details, widget state."""
    for cell in notebook["cells"]:
        for key in VOLATILE_CELL_METADATA:
            cell["metadata"].pop(key, None)
    metadata = notebook["metadata"]
    for key in [key for key in metadata if key not in ("kernelspec", "language_info", "spri_hf")]:
        del metadata[key]
    metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    metadata["language_info"] = {"name": "python", "pygments_lexer": "ipython3"}
    return notebook


def problems(notebook) -> list[str]:
    """Why a stored notebook is not what `run_notebooks.py` would store now; empty when it is."""
    found = []
    stored = notebook["metadata"].get("spri_hf", {}).get("code_sha256")
    if stored != code_digest(notebook):
        found.append("its code cells changed since the outputs were stored (code_sha256 differs): regenerate it")
    code_cells = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    for number, cell in enumerate(code_cells, start=1):
        first_line = (code_sources({"cells": [cell]})[0].splitlines() or [""])[0]
        if not cell.get("outputs"):
            found.append(f"code cell {number} ({first_line!r}) has no stored output")
        if cell.get("execution_count") != number:
            found.append(f"code cell {number} has execution_count {cell.get('execution_count')}: not one run in order")
        if any(output.get("output_type") == "error" for output in cell.get("outputs", [])):
            found.append(f"code cell {number} stored an error")
        volatile = [key for key in VOLATILE_CELL_METADATA if key in cell.get("metadata", {})]
        if volatile:
            found.append(f"code cell {number} keeps volatile metadata {volatile}")
    if not any(image.startswith(PNG_MAGIC) for image in png_images(notebook)):
        found.append("no embedded PNG image among the outputs")
    return found


def kernel_environment() -> dict[str, str]:
    """This process's environment, offline, with matplotlib's inline backend (figures are embedded as PNG) and without
    terminal progress bars, which would store every redraw as text (tqdm reads TQDM_DISABLE when it is imported; the
    warning filter is tqdm's note that ipywidgets is missing, which only concerns those bars)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "TQDM_DISABLE": "1",
        "PYTHONWARNINGS": "ignore:IProgress not found",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }


def execute(path: Path, timeout: int = 3600):
    """Run `path` top to bottom in a fresh kernel from its own folder; return the executed notebook (not written)."""
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=kernel_environment())
    notebook["metadata"]["spri_hf"] = {"code_sha256": code_digest(notebook)}
    return strip_volatile(notebook)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook under notebooks/")
    parser.add_argument("--check", action="store_true", help="execute nothing; exit 1 if a stored notebook is stale")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run (default 3600)")
    args = parser.parse_args(argv)
    paths = [path.resolve() for path in args.notebooks] or NOTEBOOKS
    failed = False
    for path in paths:
        name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        if args.check:
            found = problems(nbformat.read(path, as_version=4))
            failed |= bool(found)
            print(f"{name}: " + ("up to date" if not found else "\n  ".join(["out of date:", *found])))
            continue
        start = time.perf_counter()
        notebook = execute(path, args.timeout)
        nbformat.write(notebook, path)
        found = problems(notebook)
        failed |= bool(found)
        print(f"{name}: executed in {time.perf_counter() - start:.0f} s and stored" + "".join(f"\n  {p}" for p in found))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
