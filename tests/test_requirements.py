"""Every third-party package the runtime code imports is in requirements.txt (`make demo` installs only
that file); torch (the converters) and gradio (scripts/app.py, the `app` extra) are the documented
exceptions, imported lazily."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME = ("lqseg_jax", "data_pipelines", "kernels", "configs", "scripts")
OPTIONAL = {
    "torch": "lqseg_jax/convert/",
    "gradio": "scripts/app.py",
}  # module -> its only importer, inside functions


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> set[str]:
    names = set()
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            names.add(_norm(re.split(r"[<>=!~\[; ]", line)[0]))
    return names


def _imports():
    """(top-level module, file, imported at module level) for every absolute import in the runtime code."""
    for root in RUNTIME:
        for path in (REPO / root).rglob("*.py"):
            tree = ast.parse(path.read_text())
            top_level = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    yield name.split(".")[0], path.relative_to(REPO).as_posix(), id(node) in top_level


def test_runtime_imports_are_in_requirements_txt():
    required, dists = _requirements(), packages_distributions()
    missing, misplaced = set(), set()
    for module, file, at_top in _imports():
        if module in sys.stdlib_module_names or module in RUNTIME:
            continue
        if module in OPTIONAL:
            if at_top or not file.startswith(OPTIONAL[module]):
                misplaced.add((module, file))
            continue
        if not {_norm(d) for d in dists.get(module, [module])} & required:
            missing.add((module, file))
    assert not missing, f"imported but not in requirements.txt: {sorted(missing)}"
    assert not misplaced, f"optional packages imported outside their lazy places: {sorted(misplaced)}"


def _pins(lock: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / lock).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = version
    return pins


def test_test_lock_holds_the_runtime_lock():
    """`make demo` (requirements.lock) and `make test` (requirements-test.lock) run the same versions of
    every runtime package (e.g. pillow, which writes the demo's synthetic JPEGs), and gradio is tested."""
    runtime, test = _pins("requirements.lock"), _pins("requirements-test.lock")
    moved = {name: (v, test.get(name)) for name, v in runtime.items() if test.get(name) != v}
    assert not moved, f"runtime lock -> test lock: {moved}"
    assert {"gradio", "gradio-client"} <= test.keys(), (
        "requirements-test.lock lacks gradio (tests/scripts/test_app.py)"
    )
