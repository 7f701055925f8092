"""From the repository root, the top-level kernels/ and data_pipelines/ folders never hide installed packages
of the same names (transformers imports Hugging Face's `kernels`), however Python is started."""

import subprocess
import sys
import textwrap

import pytest

NAMES = ("kernels", "data_pipelines")


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """A folder of installed-looking packages named like our top-level folders."""
    site = tmp_path_factory.mktemp("site")
    for name in NAMES:
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"STAND_IN = {name!r}\n")
        (site / name / "extra.py").write_text("VALUE = 7\n")
    return site


PROBE = textwrap.dedent(
    """
    import kernels, data_pipelines, kernels.extra
    assert kernels.STAND_IN == "kernels", kernels.__file__
    assert data_pipelines.STAND_IN == "data_pipelines", data_pipelines.__file__
    assert kernels.extra.VALUE == 7
    import lqseg_jax.kernels.ms_deform_attn, lqseg_jax.data_pipelines.records
    assert lqseg_jax.kernels.ms_deform_attn.__file__.startswith({root!r})
    print("ok")
    """
)


def _run(args, repo, env_path):
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(env_path), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *args], cwd=repo, env=env, capture_output=True, text=True)


def test_installed_packages_win_over_the_repository_folders(repo, stand_ins):
    """`python -c` and `python -m` both put the repository root first on sys.path, before PYTHONPATH."""
    probe = PROBE.format(root=str(repo / "kernels"))
    (stand_ins / "layout_probe.py").write_text(probe)
    for args in (["-c", probe], ["-m", "layout_probe"]):
        result = _run(args, repo, stand_ins)
        assert result.returncode == 0 and result.stdout.strip() == "ok", (args[0], result.stderr[-2000:])


def test_without_an_installed_package_the_bare_name_is_missing(repo, tmp_path):
    """-S leaves site-packages (and its `kernels`) off the path: the folder must not stand in for it."""
    result = _run(["-S", "-c", "import kernels"], repo, tmp_path)
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr
