"""One deployment per preset in `configs/`: `distill/smoke`, `distill/qwen2.5-1.5b-to-0.5b`, ...

In the UI, *Deployments -> distill/<preset> -> Run -> Custom run* opens the form with the preset's
values filled in, so a run starts from a preset without pasting JSON. The deployments are generated
from the YAML files into a marked block of prefect.yaml; tests/test_prefect_deploy.py fails when the
block is stale.

    python -m flows.presets            # exit 1 if prefect.yaml's preset block differs from configs/
    python -m flows.presets --write    # regenerate it (after adding or editing a preset)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PREFECT_YAML = ROOT / "prefect.yaml"
BEGIN = "  # --- presets: generated from configs/*.yaml by `python -m flows.presets --write`; do not edit ---\n"
END = "  # --- end of presets ---\n"


def _description(path: Path) -> str:
    """The preset's leading comment, as one paragraph."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(t for t in lines if t)
    return f"Preset {path.relative_to(ROOT).as_posix()}: {text}" if text else f"Preset {path.name}."


def preset_deployments(configs: Path = ROOT / "configs") -> list[dict]:
    out = []
    for path in sorted(configs.glob("*.yaml")):
        out.append({
            "name": path.stem,
            "entrypoint": "flows/distill.py:distill",
            "description": _description(path),
            "tags": ["kdflow", "preset"],
            "enforce_parameter_schema": True,
            "work_pool": {"name": "cpu", "work_queue_name": "default"},
            "parameters": {"config": yaml.safe_load(path.read_text())},
        })
    return out


def render_block() -> str:
    body = yaml.safe_dump(preset_deployments(), sort_keys=False, width=110, allow_unicode=True)
    return BEGIN + "".join(f"  {line}\n" if line else "\n" for line in body.splitlines()) + END


def current_block(text: str) -> str | None:
    if BEGIN not in text or END not in text:
        return None
    return text[text.index(BEGIN): text.index(END) + len(END)]


def write(path: Path = PREFECT_YAML) -> bool:
    """Put the generated block in prefect.yaml (at the end of `deployments:` the first time); True if changed."""
    text = path.read_text()
    old, new = current_block(text), render_block()
    if old == new:
        return False
    text = text.replace(old, new) if old else text.rstrip("\n") + "\n\n" + new
    path.write_text(text)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.presets", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help="regenerate the preset block of prefect.yaml")
    args = p.parse_args(argv)
    if args.write:
        print("prefect.yaml " + ("updated" if write() else "already current"))
        return 0
    if current_block(PREFECT_YAML.read_text()) != render_block():
        print("prefect.yaml's preset deployments differ from configs/*.yaml: run `python -m flows.presets --write`")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
