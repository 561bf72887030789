"""A pruned student on another tokenizer, built once: `student.init.tokenizer` (issue 30 item 4).

    folder, info = ensure_transplanted(pruned_dir, "gpt2")    # cached under $KDFLOW_HOME/transplanted/

The donor (the pruned student, kd/prune.py, which speaks the teacher's tokenizer) gets the named tokenizer
(kd/cross_tokenizer/vocab_files.py) through transplant.py; the folder holds the resized weights, the new
tokenizer's files and TRANSPLANT_INFO (the report). Content-addressed on the donor folder (itself content-
addressed on the teacher and the layer choice), the tokenizer folder and TRANSPLANT_FORMAT.

Chat template: the named tokenizer's own when it ships one (qwen2, phi3); otherwise (gpt2, llama3's vocabulary
files) the donor's, i.e. the teacher's template text, which the new tokenizer then reads as plain text (its markup
becomes ordinary tokens). TRANSPLANT_INFO["chat_template"] says which: "own", "teacher" or None (neither has one).
"""

from __future__ import annotations

import json
from pathlib import Path

from kd.build_once import build_once
from kd.hashing import digest_of

TRANSPLANT_INFO = "kdflow-transplant.json"
TRANSPLANT_FORMAT = 2  # bump when the transplant changes, so cached students are rebuilt


def ensure_transplanted(donor_dir: str | Path, tokenizer: str) -> tuple[Path, dict]:
    """The donor model with `tokenizer` (a vocab_files name), made once; (folder, its TRANSPLANT_INFO)."""
    from kd.cross_tokenizer.vocab_files import tokenizer_folder
    from kd.gguf import kdflow_home

    donor_dir, tok_dir = Path(donor_dir).resolve(), tokenizer_folder(tokenizer)
    key = digest_of({"donor": donor_dir.name, "tokenizer": tok_dir.name, "format": str(TRANSPLANT_FORMAT)})
    out = kdflow_home() / "transplanted" / f"{key[:20]}-{tokenizer}"

    def build(tmp: Path) -> None:
        import dataclasses

        from transformers import AutoTokenizer

        from backends import get_backend
        from kd.cross_tokenizer.transplant import transplant_tokenizer

        model = get_backend("hf").load(donor_dir, dtype=None)
        new_tok = AutoTokenizer.from_pretrained(tok_dir)
        report = transplant_tokenizer(model, AutoTokenizer.from_pretrained(donor_dir), new_tok)
        model.save_pretrained(tmp, safe_serialization=True)
        new_tok.save_pretrained(tmp)
        chat = adopt_chat_template(tmp, donor_dir)
        info = {"tokenizer": tokenizer, "tokenizer_folder": tok_dir.name, "donor": donor_dir.name,
                **dataclasses.asdict(report), "chat_template": chat,
                "format": TRANSPLANT_FORMAT}
        (tmp / TRANSPLANT_INFO).write_text(json.dumps(info, indent=2) + "\n")

    build_once(out, TRANSPLANT_INFO, build)
    return out, json.loads((out / TRANSPLANT_INFO).read_text())


def adopt_chat_template(tokenizer_dir: str | Path, donor_dir: str | Path) -> str | None:
    """Give the tokenizer folder the donor's chat template when it has none (module docstring): "own", "teacher"
    (copied) or None."""
    from kd.data.encode import chat_template_of

    if chat_template_of(tokenizer_dir) is not None:
        return "own"
    template = chat_template_of(donor_dir)
    if template is None:
        return None
    (Path(tokenizer_dir) / "chat_template.jinja").write_text(template, encoding="utf-8")
    return "teacher"
