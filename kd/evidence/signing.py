"""Ed25519 signatures over evidence manifests: tamper-evident even against someone who edits the numbers.

    kdflow evidence keygen keys/kdflow.pem              # keys/kdflow.pem (private) + keys/kdflow.pub.pem
    kdflow evidence sign evidence/run-1 --key keys/kdflow.pem
    kdflow evidence verify evidence/run-1 --pubkey keys/kdflow.pub.pem

What is signed: manifest.json as canonical JSON (keys sorted, no whitespace, UTF-8), so
re-indenting the file changes nothing and any changed value breaks the signature. The manifest
holds the sha256 of every other file, so the signature covers the whole run folder. The signature
goes to `manifest.sig` (JSON: algorithm, the signer's public key and its fingerprint, signature),
the one file `files` does not list (it is written after the manifest). A new manifest written
into the folder removes the old signature. Without `--pubkey`, verify still checks the signature
against the public key it carries (catches edits, not a forger who re-signs with their own key).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from kd.errors import InputError

MANIFEST = "manifest.json"
SIG_FILE = "manifest.sig"
FORMAT = "kdflow-signature/1"


class SigningKeyError(InputError):
    """A key file that is missing or not an Ed25519 PEM key (exit 2)."""


def canonical_manifest_bytes(run_dir: Path) -> bytes:
    """manifest.json re-serialised canonically: sorted keys, no whitespace, UTF-8."""
    doc = json.loads((Path(run_dir) / MANIFEST).read_text(encoding="utf-8"))
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    """sha256 of the raw public key, hex: names a key in messages and in manifest.sig."""
    return hashlib.sha256(_raw_public(key)).hexdigest()


def generate_keypair(private_path: Path, public_path: Path | None = None) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair (private PEM, mode 0600; public PEM). Refuses to overwrite."""
    private_path = Path(private_path)
    public_path = Path(public_path) if public_path else private_path.with_name(private_path.stem + ".pub.pem")
    for p in (private_path, public_path):
        if p.exists():
            raise SigningKeyError(f"{p}: already exists (not overwritten)")
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def _read_pem(pem: bytes | str | Path, what: str) -> tuple[bytes, str]:
    if isinstance(pem, Path):
        try:
            return pem.read_bytes(), str(pem)
        except OSError as err:
            raise SigningKeyError(f"{pem}: cannot read the {what} key ({err.strerror})") from None
    return (pem.encode() if isinstance(pem, str) else pem), f"the given {what} key"


def load_private_key(pem: bytes | str | Path) -> Ed25519PrivateKey:
    data, where = _read_pem(pem, "private")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SigningKeyError(f"{where}: not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{where}: not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_key(pem: bytes | str | Path) -> Ed25519PublicKey:
    data, where = _read_pem(pem, "public")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise SigningKeyError(f"{where}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{where}: not an Ed25519 key ({type(key).__name__})")
    return key


def sign_run(run_dir: Path, private_key: bytes | str | Path) -> Path:
    """Sign the run folder's manifest; returns the path of manifest.sig. The caller checks first
    that the folder verifies (a signature attests intact evidence)."""
    run_dir = Path(run_dir)
    key = load_private_key(private_key)
    payload = canonical_manifest_bytes(run_dir)
    doc = {"format": FORMAT, "algorithm": "Ed25519", "signed_file": MANIFEST,
           "canonical_form": "JSON, keys sorted, separators (',', ':'), UTF-8",
           "manifest_sha256": hashlib.sha256(payload).hexdigest(),
           "public_key": base64.b64encode(_raw_public(key.public_key())).decode(),
           "public_key_sha256": fingerprint(key.public_key()),
           "signature": base64.b64encode(key.sign(payload)).decode()}
    out = run_dir / SIG_FILE
    tmp = out.with_name(f".{SIG_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, out)
    return out


def check_signature(run_dir: Path, public_key: bytes | str | Path | None = None) -> list[str]:
    """Problems with the run's signature, [] when it holds. With `public_key`, the run must be
    signed by that key; without one, an existing signature is checked against the key it carries."""
    run_dir = Path(run_dir)
    sig_path = run_dir / SIG_FILE
    expected = load_public_key(public_key) if public_key is not None else None
    if not sig_path.is_file():
        return [f"{SIG_FILE}: missing (the run is not signed)"] if expected is not None else []
    try:
        doc = json.loads(sig_path.read_text(encoding="utf-8"))
        carried = Ed25519PublicKey.from_public_bytes(base64.b64decode(doc["public_key"], validate=True))
        signature = base64.b64decode(doc["signature"], validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return [f"{SIG_FILE}: unreadable (not a {FORMAT} file)"]
    if expected is not None and fingerprint(carried) != fingerprint(expected):
        return [f"{SIG_FILE}: signed by key {fingerprint(carried)[:16]}…, not by the given key "
                f"{fingerprint(expected)[:16]}…"]
    try:
        payload = canonical_manifest_bytes(run_dir)
    except (OSError, ValueError) as err:
        return [f"{SIG_FILE}: {MANIFEST} cannot be read to check the signature ({type(err).__name__})"]
    try:
        (expected or carried).verify(signature, payload)
    except InvalidSignature:
        return [f"{SIG_FILE}: signature does not match {MANIFEST} (edited after signing)"]
    return []
