"""Keeps the top-level `kernels/` and `data_pipelines/` folders from hiding installed packages of those names.

The design card puts `kernels/` and `data_pipelines/` at the repository root, and setup.py installs them as
`lqseg_jax.kernels` and `lqseg_jax.data_pipelines`. But Python puts the current folder first on `sys.path`
(`python -c`, `python -m`, pytest's rootdir insertion), so from the repository root a bare `import kernels`
would find our folder before an installed package of that name: transformers >= 5.25 imports Hugging Face's
`kernels` package, and every transformers model failed to import from the root.

Why a hand-over rather than another layout: a folder without `__init__.py` would never win over an installed
package (it is only a namespace portion), but setuptools' editable finder then cannot map
`lqseg_jax.kernels` to it; renaming or moving the folders breaks the design card's layout. So each folder keeps
its `__init__.py`, which calls `defer_to_installed` first: imported under its installed name it does nothing;
imported under the bare top-level name, it loads the installed package of that name from `sys.path` without
the repository root and puts it in `sys.modules`, or, when none is installed, fails as a missing module would.
`tests/test_import_layout.py` checks this from the repository root with a stand-in installed package.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def defer_to_installed(name: str, init_file: str) -> None:
    """Replace the module being imported as `name` by the installed package of that name.

    Does nothing when the folder is imported under its lqseg_jax name; otherwise the caller's import ends
    with the installed package in `sys.modules[name]`.
    """
    if "." in name:
        return
    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(init_file))))
    search = [p for p in sys.path if os.path.realpath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, search)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named {name!r} (the repository's {name}/ folder is lqseg_jax.{name})", name=name
        )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the import system returns sys.modules[name] after our __init__ finishes
    spec.loader.exec_module(module)
