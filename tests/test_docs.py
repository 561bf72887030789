"""The documentation (issue 28): the README is a front page, the rest a docs site that builds strict.

`make docs` runs `mkdocs build --strict`; here the same build goes into tmp_path, so a broken link or anchor
between pages fails the suite (mkdocs.yml turns every link check into a warning, --strict makes it an error).
The README is read by GitHub, not mkdocs: its links and anchors are checked here with the slugs the site uses.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
README_MAX_CHARS = 15_000
# Every heading of the README before issue 28 (a 62k-character page): links to them elsewhere must still land
OLD_ANCHORS = [
    "the-dag", "config", "data", "loss-normalization-a-token-counts-the-same-wherever-it-lands",
    "offline-teacher-a-top-k-teacher-logits-cache", "on-policy-distillation-the-student-learns-on-its-own-samples",
    "sweeps-many-distillations-from-one-teacher-pass-compared-on-one-page",
    "real-models-gguf-teachers-pruned-students-sample-generations", "downstream-benchmarks-lm-evaluation-harness",
    "cli", "preflight-bad-inputs-stop-before-anything-runs", "evidence",
    "two-verdicts-the-pipeline-passed-and-is-the-student-worth-shipping",
    "the-fine-tuning-control-did-distillation-beat-fine-tuning", "layout", "benchmarks",
]


def _mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, env=env, timeout=300)


def _slug(heading: str) -> str:
    """The anchor a heading gets: GitHub's, which mkdocs.yml gives the site too (pymdownx.slugs)."""
    from pymdownx.slugs import slugify

    return slugify(case="lower")(heading, "-")


def _anchors(markdown: str) -> set[str]:
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)  # a `# comment` in a code block is no heading
    return {_slug(m.group(1).strip()) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def test_the_docs_site_builds_strict_with_no_warning(tmp_path):
    proc = _mkdocs(REPO / "mkdocs.yml", tmp_path / "site")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "WARNING" not in out, out
    built = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {"index.html", "install/index.html", "evidence/index.html", "prefect/index.html"} <= built


def test_a_broken_link_or_anchor_fails_the_build(tmp_path):
    """The check itself: the repository's mkdocs.yml on two pages, one linking to an anchor that is not there
    and to a page that does not exist."""
    config = (REPO / "mkdocs.yml").read_text()
    config = config[: config.index("\nnav:")] + "\n"  # the settings, validation included; pages found, not listed
    (tmp_path / "mkdocs.yml").write_text(config)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[ok](other.md#a-heading)\n")
    (tmp_path / "docs" / "other.md").write_text("# Other\n\n## A heading\n")
    assert _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site").returncode == 0
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[gone](other.md#no-such-heading)\n")
    proc = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0 and "no-such-heading" in proc.stdout + proc.stderr
    (tmp_path / "docs" / "index.md").write_text("# Home\n\n[gone](missing.md)\n")
    proc = _mkdocs(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert proc.returncode != 0 and "missing.md" in proc.stdout + proc.stderr


def test_the_readme_is_a_front_page_whose_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text) <= README_MAX_CHARS, len(text)
    commands = re.findall(r"^make (\w+)", text, re.M)
    assert commands == ["smoke", "test"]  # the two set-up commands, in one code block
    own = _anchors(text)
    assert [a for a in OLD_ANCHORS if a not in own] == []
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = README.parent / path if path else README
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(file.read_text(encoding="utf-8")):
            broken.append(f"{target}: no such heading")
    assert broken == []
