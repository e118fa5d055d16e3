"""The public API at the top level and `aligntok --version`."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

import aligntok
from aligntok.cli import main

SRC = Path(__file__).resolve().parents[1] / "src"


def test_version_option_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"aligntok {aligntok.__version__}"
    assert aligntok.__version__.count(".") == 2


def test_every_public_name_imports_from_the_top_level_with_a_docstring():
    for name in aligntok.__all__:
        value = getattr(aligntok, name)
        if name != "__version__":
            assert len(inspect.getdoc(value) or "") > 20, f"aligntok.{name} lacks a docstring"
    assert {"AlignTokTokenizer", "LightningDiT", "LatentTokenizer", "DiffusersVAETokenizer"} <= set(dir(aligntok))
    from aligntok.models.lightningdit import LightningDiT

    assert aligntok.LightningDiT is LightningDiT
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        aligntok.NoSuchThing  # noqa: B018


def test_importing_the_package_does_not_import_torch():
    script = "import sys, aligntok; aligntok.__all__; assert 'torch' not in sys.modules, 'torch was imported'"
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=120)
