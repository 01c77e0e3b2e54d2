"""Every package folder is listed in pyproject.toml (a non-editable install would silently lack it)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_installed():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in ("tests", "benchmarks", ".venv") or rel.parts[0].startswith("."):
            continue
        top = folders.get(rel.parts[0])
        if top is None:
            continue
        found.add(".".join([top, *rel.parts[1:]]))
    assert found and found == set(cfg["packages"]), found ^ set(cfg["packages"])


def test_base_install_has_no_torch():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("torch") for d in deps["dependencies"])     # a device install stays light
    assert "torch==2.13.0" in deps["optional-dependencies"]["host"]
    assert not any(d.startswith("torch") for d in deps["optional-dependencies"]["agent"])
