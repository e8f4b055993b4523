"""Ed25519 signatures over bundle manifests.

The manifest's SHA-256 of every file stops accidents, not attackers: whoever can rewrite a
file can rewrite the manifest too. A signature over the manifest's exact bytes, checked against
a public key the operator supplies, closes that gap:

    sdns-monitor keygen --out keys/                     # keys/sdns-signing.key (0600) + .pub
    sdns-monitor sign --model cam1.sdns --key keys/sdns-signing.key
    sdns-monitor run --model cam1.sdns --public-key keys/sdns-signing.pub

The signature lives in `manifest.sig` inside the bundle. It is not listed in the manifest (it
cannot be), so signing does not change the bundle's identity (`Bundle.hash`). It is checked
before the manifest is parsed and before any other file is read.

A configured public key makes signatures mandatory: an unsigned bundle is refused, since
otherwise deleting `manifest.sig` would let an edited bundle through. `--require-signed` says
the same explicitly (and still needs the key). Without a key nothing is checked.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sdns_monitor.errors import BundleError, ConfigError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

SIGNATURE = "manifest.sig"
ALGORITHM = "ed25519"
PRIVATE_NAME = "sdns-signing.key"
PUBLIC_NAME = "sdns-signing.pub"


def key_id(public: Ed25519PublicKey) -> str:
    """Short fingerprint of a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(out: Path) -> tuple[Path, Path]:
    """Write a new key pair into directory `out` (private key readable by the owner only).

    Refuses to overwrite existing keys: losing a signing key silently is worse than an error.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    out = Path(out)
    private_path, public_path = out / PRIVATE_NAME, out / PUBLIC_NAME
    for p in (private_path, public_path):
        if p.exists():
            raise ConfigError(f"{p} already exists; choose another --out or move it away")
    out.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as exc:
        raise ConfigError(f"cannot read signing key {path}: {exc.strerror}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{path} is not an unencrypted PEM private key ({exc}); make one with "
            "`sdns-monitor keygen`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path} is not an Ed25519 key; make one with `sdns-monitor keygen`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read public key {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(
            f"{path} is not a PEM public key ({exc}); give the .pub file `sdns-monitor keygen` "
            "wrote"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} is not an Ed25519 public key")
    return key


def sign_bundle(path: Path, private_key: Path) -> str:
    """Sign `path/manifest.json` with `private_key`; writes `path/manifest.sig` atomically.

    Re-signing replaces an earlier signature. Returns the key id.
    """
    from sdns_monitor.bundle import read_manifest_bytes

    path = Path(path)
    raw = read_manifest_bytes(path)
    key = load_private_key(private_key)
    kid = key_id(key.public_key())
    record = {
        "algorithm": ALGORITHM,
        "key_id": kid,
        "signature": base64.b64encode(key.sign(raw)).decode("ascii"),
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE}.", dir=path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path / SIGNATURE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return kid


def check_signature(
    path: Path, manifest_bytes: bytes, public_key: Path | None, require_signed: bool = False
) -> str | None:
    """Check `path/manifest.sig` over `manifest_bytes`; returns the signer's key id, or None
    without `public_key` (nothing is checked then).

    With `public_key` the bundle must be signed by it: raises BundleError for a missing, bad or
    foreign signature. `require_signed` changes nothing beyond that, except that without a key
    it is a ConfigError (there is nothing to check against).
    """
    if public_key is None:
        if require_signed:
            raise ConfigError("--require-signed needs --public-key: the key to check against")
        return None
    key = load_public_key(public_key)
    expected = key_id(key)
    sig_path = Path(path) / SIGNATURE
    if not sig_path.is_file():
        raise BundleError(
            f"{path} is not signed, and a public key is set ({public_key}): sign it with "
            f"`sdns-monitor sign --model {path} --key PRIVATE_KEY`, or give no public key to "
            "accept unsigned bundles"
        )
    try:
        record = json.loads(sig_path.read_bytes())
        if record.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm {record.get('algorithm')!r} is not {ALGORITHM}")
        signature = base64.b64decode(record["signature"], validate=True)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{sig_path} is not a valid signature file ({exc}); re-sign") from None
    from cryptography.exceptions import InvalidSignature

    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        signer = record.get("key_id")
        why = (
            f"it was signed by key {signer}, not {expected}"
            if signer != expected
            else "the manifest was changed after signing"
        )
        raise BundleError(
            f"{path}: the signature does not verify with {public_key} ({why}); do not use "
            "this bundle"
        ) from None
    return expected
