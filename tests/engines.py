"""Virtual environments for the engines tier (vLLM, llama.cpp, lm-eval, older transformers), built on first use and
kept between runs.

Each environment lives in `$SPRI_HF_ENGINES` (default `~/.cache/spri_hf/engines`) under a folder named by the engine
and a hash of its install commands, so changing a pin builds a new one and an unchanged one is reused. A `.ready`
file marks an environment whose every install step succeeded; a folder without it (a killed build) is removed and
built again. Failures name the engine and the command that failed, with the tail of its output.
"""

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


ENGINES = Path(os.environ.get("SPRI_HF_ENGINES", Path.home() / ".cache" / "spri_hf" / "engines"))
ROOT = Path(__file__).resolve().parents[1]
# the CPU torch wheel the project tests with (a plain `torch` requirement pulls the CUDA wheels)
TORCH_CPU = ["torch==2.13.0"]


class EngineError(AssertionError):
    """An engine's environment could not be built, or a command run in it failed."""


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def engine_env(name: str, steps: list[list[str]], timeout: float = 3600) -> Path:
    """The virtual environment `name` after `steps` (each a `pip install ...` argument list, run with the venv's
    python -m pip, or a full command whose first element is "!" followed by the executable, run with the venv's
    bin first on PATH); built once, reused while `steps` do not change. Returns the venv folder."""
    key = hashlib.sha256(json.dumps([sys.version_info[:2], steps]).encode()).hexdigest()[:12]
    venv = ENGINES / f"{name}-{key}"
    ENGINES.mkdir(parents=True, exist_ok=True)
    with open(ENGINES / f".{name}-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two sessions building the same environment take turns
        if (venv / ".ready").is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        started = time.perf_counter()
        _check(name, [sys.executable, "-m", "venv", str(venv)], timeout=600)
        python = str(venv / "bin" / "python")
        env = dict(os.environ, PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(venv))
        env.pop("PYTHONPATH", None)
        for step in steps:
            command = step[1:] if step[0] == "!" else [python, "-m", "pip", "install", "-q", *step]
            _check(name, command, timeout=timeout, env=env)
        (venv / ".ready").write_text(json.dumps({"steps": steps, "build_s": round(time.perf_counter() - started)}))
    return venv


def _check(
    name: str, command: list[str], timeout: float, env=None, cwd=None, check=True
) -> subprocess.CompletedProcess:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as error:
        raise EngineError(f"[{name}] {' '.join(command)} ran past {timeout:.0f} s") from error
    if check and done.returncode != 0:
        raise EngineError(f"[{name}] {' '.join(command)} exited {done.returncode}:\n{_tail(done.stdout + done.stderr)}")
    return done


def run_in(venv: Path, name: str, args: list[str], timeout: float = 1800, env: dict | None = None,
           cwd=None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `python args...` in `venv` (tests never reach the network: HF_HUB_OFFLINE=1); raises EngineError naming
    the engine (with its version, when the caller puts it in `name`) and the output tail on failure, unless
    `check=False` (a test that expects the failure reads the whole output)."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VIRTUAL_ENV=str(venv),
                    PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")  # fmt: skip
    full_env.pop("PYTHONPATH", None)
    full_env.update(env or {})
    return _check(name, [str(venv / "bin" / "python"), *args], timeout=timeout, env=full_env, cwd=cwd, check=check)


def installed_version(venv: Path, distribution: str) -> str:
    done = run_in(venv, distribution, ["-c", f"import importlib.metadata as m; print(m.version({distribution!r}))"])
    return done.stdout.strip()


def greedy_continuations(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """transformers' greedy continuation of each prompt (token ids), exactly `new_tokens` long (no early stop at EOS),
    the reference the engines' outputs are compared with."""
    import torch

    runs = []
    for ids in prompts:
        ids = torch.tensor([ids])
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        runs.append(out[0, ids.shape[1]:].tolist())
    return runs
