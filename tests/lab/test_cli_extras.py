"""The CLI names the ``lab`` extra when a harness-only package is missing, and the packaging facts behind it."""

from __future__ import annotations

import sys
from pathlib import Path

from layerwise.lab import cli

ROOT = Path(__file__).resolve().parents[2]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_missing_tokenizers_names_the_lab_extra(monkeypatch, corpus_file, capsys):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ModuleNotFoundError
    rc = cli.main(["data", "prepare", "--corpus", str(corpus_file), "--vocab-size", "300", "--force"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'tokenizers' is missing" in err and "layerwise[lab]" in err


def test_other_import_errors_are_not_disguised():
    assert cli.missing_lab_extra(ModuleNotFoundError("No module named 'foo'", name="foo")) is None
    assert "layerwise[lab]" in cli.missing_lab_extra(ModuleNotFoundError("x", name="matplotlib.pyplot"))
    assert cli.missing_lab_extra(ValueError("tqdm")) is None


def test_lab_extra_holds_the_harness_packages_and_the_makefile_installs_it():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(meta["dependencies"])
    lab = " ".join(meta["optional-dependencies"]["lab"])
    for pkg in cli.LAB_EXTRA_MODULES:
        assert pkg in lab and pkg not in core, pkg
    install = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if "pip install" in ln and "-e" in ln]
    assert len(install) == 1 and "lab" in install[0].split("[", 1)[1].split("]", 1)[0].split(",")


def test_version_is_defined_once():
    import layerwise

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "layerwise.__version__"}
    assert layerwise.__version__.count(".") == 2


def test_license_file_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"
