"""Writes or checks a lock file: the exact version of every distribution installed in this Python.

    python scripts/check_lock.py --write requirements.lock   # what `make lock` runs in a fresh virtualenv
    python scripts/check_lock.py requirements-test.lock       # exit 1 unless this venv holds exactly the lock
    python scripts/check_lock.py --diff requirements-test.lock  # print how this venv differs (exit 0)

The project itself (installed editable) is left out of the lock.
"""

import argparse
import re
import sys
from importlib.metadata import distributions
from pathlib import Path

PROJECT = "lqseg-jax"
HEADER = """\
# Exact versions of everything installed, transitive dependencies included; written by `make lock`.
# Installed with `pip install --no-deps -r` by the Makefile, then checked by scripts/check_lock.py.
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, str]:
    pins = {_norm(d.metadata["Name"]): d.version for d in distributions()}
    pins.pop(PROJECT, None)
    return pins


def read_lock(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise SystemExit(f"{path}: no such lock file (expected the output of `make lock`)")
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version:
            raise SystemExit(f"{path}:{number}: {line!r} is not a 'name==version' pin")
        pins[_norm(name)] = version.strip()
    return pins


def differences(lock: dict[str, str], have: dict[str, str]) -> list[str]:
    lines = []
    for name in sorted(lock.keys() | have.keys()):
        want, got = lock.get(name), have.get(name)
        if want != got:
            lines.append(f"  {name}: lock {want or '-'}, installed {got or '-'}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("lock", type=Path)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the lock from this Python's distributions")
    mode.add_argument("--diff", action="store_true", help="print the differences without failing")
    args = parser.parse_args(argv)
    have = installed()
    if args.write:
        args.lock.write_text(HEADER + "".join(f"{name}=={have[name]}\n" for name in sorted(have)))
        print(f"wrote {args.lock}: {len(have)} pins")
        return
    diff = differences(read_lock(args.lock), have)
    if args.diff:
        print(f"{len(diff)} differences from {args.lock}" + "".join(f"\n{line}" for line in diff))
    elif diff:
        sys.exit(
            f"{sys.prefix} does not hold exactly {args.lock}:\n" + "\n".join(diff) + "\n(run `make clean`)"
        )


if __name__ == "__main__":
    main()
