"""Issue 26: bundled data resolves wherever kdflow runs and however it is installed.

The SmolLM2 presets named their data `kd/corpus/...`, relative to the current folder: run from any other
folder, preflight exited 2 "data.source 'kd/corpus/english': no such file or folder". They now name it
`bundled:NAME`, resolved inside the installed kd package (kd/bundled.py).
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

import pytest

from kd.bundled import CORPUS, source_path
from flows.cli import main
from kd.errors import DataError

REPO = Path(__file__).resolve().parent.parent
PRESETS = sorted((REPO / "configs").glob("*.yaml"))
SWEEPS = sorted((REPO / "configs" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_preflights_from_another_folder(preset, tmp_path, monkeypatch, capsys):
    """The real CLI (`kdflow run PRESET --dry-run`: config, then preflight) from an empty temp folder."""
    monkeypatch.chdir(tmp_path)
    code = main(["run", str(preset), "--dry-run"])
    out, err = capsys.readouterr()
    # data.source and the lm-eval task data are the preset's relative inputs; neither may depend on cwd
    assert "data.source" not in err and "no such file" not in err, err
    assert code == 0, err
    assert "[ok] data-files" in out, out  # preflight really looked at the data, and found it


@pytest.mark.parametrize("spec", SWEEPS, ids=lambda p: p.stem)
def test_every_sweep_spec_finds_its_base_from_another_folder(spec, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["sweep", str(spec), "--dry-run"])
    assert code == 0, capsys.readouterr().err


def test_bundled_names_resolve_inside_the_package_and_nowhere_else(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert source_path("bundled:english") == CORPUS / "english"
    assert source_path("bundled:chat/genesis-chat.jsonl").is_file()
    assert source_path("smoke") == CORPUS / "smoke.txt"
    assert source_path("mine.txt") == Path("mine.txt")  # a plain path stays relative to the current folder
    with pytest.raises(DataError, match=r"data.source 'bundled:nope': no bundled data 'nope'; kdflow ships .*bundled:english"):
        source_path("bundled:nope")
    with pytest.raises(DataError, match="data.source 'bundled:../../pyproject.toml'"):  # no way out of kd/corpus
        source_path("bundled:../../pyproject.toml")


def test_every_bundled_file_is_package_data():
    """A wheel (not only this checkout) carries every file a `bundled:` source or a bundled lm-eval task reads:
    kd/corpus/english and kd/corpus/chat were missing from package-data before."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["kd"]
    kd_dir = CORPUS.parent
    files = [p.relative_to(kd_dir).as_posix() for p in CORPUS.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    # setuptools globs package-data like glob(): `*` never crosses a `/`
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns)]
    assert files and missing == []
