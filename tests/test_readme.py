"""README promises exactly two set-up commands, and CI runs the test one verbatim."""

import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up and run")[1].split("\n## ")[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_has_exactly_two_setup_commands_one_for_the_demo_one_for_the_tests():
    commands = _commands()
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("spri-hf demo") and "pytest" in tests
    for command in commands:
        assert "pip install torch==2.13.0" in command  # the local CPU wheel, never CUDA wheels


def test_ci_runs_the_readme_test_command():
    assert _commands()[1] in (ROOT / ".ci" / "run").read_text()
