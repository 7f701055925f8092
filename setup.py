"""Installs the three top-level folders as one package: lqseg_jax, lqseg_jax.kernels, lqseg_jax.data_pipelines.

`kernels` and `data_pipelines` live at the top level as the design card asks, but their import names
would collide with unrelated PyPI packages, so setuptools maps them under `lqseg_jax`.
"""

from setuptools import find_packages, setup

ROOTS = {
    "lqseg_jax": "lqseg_jax",
    "lqseg_jax.kernels": "kernels",
    "lqseg_jax.data_pipelines": "data_pipelines",
}

packages = []
for name, path in ROOTS.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(path)]

setup(packages=packages, package_dir=ROOTS)
