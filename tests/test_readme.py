"""The README's two set-up commands stay the ones CI runs, and CI installs the tested set of dependencies,
which pyproject.toml's bounds admit."""

from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = "constraints/tested.txt"
# The dependencies whose releases change what nf4tune does: each is bounded from above in pyproject.toml.
BOUNDED = {"torch", "transformers", "tokenizers", "safetensors", "peft", "trl", "accelerate", "bitsandbytes",
           "gguf", "lm-eval", "datasets", "triton"}


def _bash_blocks(text: str) -> list[str]:
    return [block.split("```", 1)[0].strip() for block in text.split("```bash\n")[1:]]


def test_ci_runs_the_readme_test_command():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2
    main_job, tests = blocks[0], blocks[1]
    assert "nf4tune " in main_job and "pytest" in tests
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci_lines
    installs = [part for part in tests.split("&&") if "pip install" in part]
    assert installs and all(f"-c {CONSTRAINTS}" in part for part in installs), installs


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / CONSTRAINTS).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and not any(c in version for c in "<>=!~*, "), f"{line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    return pins


def _declared() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + extras["dev"] + extras["gguf"]]


def test_the_tested_set_is_pinned_and_within_pyprojects_bounds():
    pins, declared = _pins(), _declared()
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is a dependency but {CONSTRAINTS} does not pin the version tested"
        assert requirement.specifier.contains(pins[name]), (
            f"{CONSTRAINTS} pins {name}=={pins[name]}, outside pyproject.toml's {requirement}")
    for requirement in declared:
        if canonicalize_name(requirement.name) in BOUNDED:
            operators = {spec.operator for spec in requirement.specifier}
            assert ">=" in operators and "<" in operators, f"{requirement} needs a tested lower and an upper bound"
    assert BOUNDED <= {canonicalize_name(r.name) for r in declared}
