"""Ed25519 bundle signatures: keygen, sign, verify; every way a signature can be wrong."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdns_monitor.bundle import FEATURES, MANIFEST, load_bundle
from sdns_monitor.detector import Detector
from sdns_monitor.errors import BundleError, ConfigError
from sdns_monitor.settings import load_settings
from sdns_monitor.signing import (
    PRIVATE_NAME,
    PUBLIC_NAME,
    SIGNATURE,
    generate_keypair,
    key_id,
    load_public_key,
    sign_bundle,
)


@pytest.fixture
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b.sdns"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_keypair(tmp_path_factory.mktemp("other"))


def test_keygen_writes_an_owner_only_private_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    private, public = generate_keypair(tmp_path)
    assert (private.name, public.name) == (PRIVATE_NAME, PUBLIC_NAME)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"PRIVATE KEY" in private.read_bytes() and b"PUBLIC KEY" in public.read_bytes()
    before = private.read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        generate_keypair(tmp_path)
    assert private.read_bytes() == before


def test_signed_bundle_verifies_and_keeps_its_hash(bundle: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    before = load_bundle(bundle).hash
    kid = sign_bundle(bundle, private)
    assert kid == key_id(load_public_key(public))
    loaded = load_bundle(bundle, public_key=public, require_signed=True)
    assert loaded.signed_by == kid
    assert loaded.hash == before
    det = Detector.load(bundle, public_key=public, require_signed=True, device="cpu")
    assert det.bundle.signed_by == kid


def test_with_a_public_key_an_unsigned_bundle_is_refused(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    _, public = keys
    assert load_bundle(bundle).signed_by is None  # no key: signatures are not checked
    for require_signed in (False, True):
        with pytest.raises(BundleError, match="is not signed, and a public key is set") as info:
            load_bundle(bundle, public_key=public, require_signed=require_signed)
        assert "\n" not in str(info.value) and "sdns-monitor sign --model" in str(info.value)
    with pytest.raises(BundleError, match="is not signed"):
        Detector.load(bundle, public_key=public, device="cpu")


def test_deleting_the_signature_of_an_edited_bundle_does_not_get_it_through(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    """The attack: edit a signed bundle consistently, then remove the signature it breaks."""
    private, public = keys
    sign_bundle(bundle, private)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["calibration"]["default_alarm_rate"] = 0.5
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    (bundle / SIGNATURE).unlink()
    assert load_bundle(bundle).manifest.calibration.default_alarm_rate == 0.5
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(bundle, public_key=public)


def test_rolling_back_a_symlink_to_an_older_signed_bundle_loads_it(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    old = bundle
    new = Path(shutil.copytree(old, tmp_path / "b-v2.sdns"))
    manifest = json.loads((new / MANIFEST).read_text())
    manifest["name"] = "v2"
    (new / MANIFEST).write_text(json.dumps(manifest))
    for b in (old, new):
        sign_bundle(b, private)
    current = tmp_path / "current"

    def point_at(target: Path) -> None:  # the atomic swap of docs/operations.md
        (tmp_path / "current.new").symlink_to(target.name)
        (tmp_path / "current.new").replace(current)

    hashes = []
    for target in (old, new, old):
        point_at(target)
        loaded = load_bundle(current, public_key=public)
        assert loaded.signed_by == key_id(load_public_key(public))
        hashes.append(loaded.hash)
    assert hashes[0] == hashes[2] != hashes[1]
    unsigned = Path(shutil.copytree(old, tmp_path / "b-unsigned.sdns"))
    (unsigned / SIGNATURE).unlink()
    point_at(unsigned)
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(current, public_key=public)


def test_require_signed_without_a_key_is_a_config_error(bundle: Path) -> None:
    with pytest.raises(ConfigError, match="needs --public-key"):
        load_bundle(bundle, require_signed=True)


def test_manifest_changed_after_signing_is_refused_before_parsing(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    sign_bundle(bundle, private)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["calibration"]["default_alarm_rate"] = 0.5
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    load_bundle(bundle)  # still a consistent bundle: only the signature can tell
    with pytest.raises(BundleError, match="changed after signing"):
        load_bundle(bundle, public_key=public)


def test_rewritten_file_and_rehashed_manifest_are_caught_by_the_signature(
    bundle: Path, keys: tuple[Path, Path]
) -> None:
    """The attack hashes alone cannot stop: change a file and its hash in the manifest."""
    private, public = keys
    sign_bundle(bundle, private)
    features = np.load(bundle / FEATURES)
    np.save(bundle / FEATURES, np.roll(features, 1, axis=0))
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"][FEATURES] = hashlib.sha256((bundle / FEATURES).read_bytes()).hexdigest()
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    load_bundle(bundle)
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(bundle, public_key=public, require_signed=True)


def test_signature_by_another_key_names_both_keys(
    bundle: Path, keys: tuple[Path, Path], other_keys: tuple[Path, Path]
) -> None:
    sign_bundle(bundle, other_keys[0])
    theirs = key_id(load_public_key(other_keys[1]))
    ours = key_id(load_public_key(keys[1]))
    with pytest.raises(BundleError, match=f"signed by key {theirs}, not {ours}"):
        load_bundle(bundle, public_key=keys[1])


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"not json",
        b'{"algorithm": "rsa", "signature": "AAAA"}',
        b'{"algorithm": "ed25519"}',
        b'{"algorithm": "ed25519", "signature": "***"}',
        b"[1, 2]",
    ],
)
def test_damaged_signature_file_is_refused(
    bundle: Path, keys: tuple[Path, Path], content: bytes
) -> None:
    (bundle / SIGNATURE).write_bytes(content)
    with pytest.raises(BundleError, match="signature"):
        load_bundle(bundle, public_key=keys[1])


def test_resigning_replaces_the_signature(
    bundle: Path, keys: tuple[Path, Path], other_keys: tuple[Path, Path]
) -> None:
    sign_bundle(bundle, other_keys[0])
    sign_bundle(bundle, keys[0])
    assert load_bundle(bundle, public_key=keys[1]).signed_by == key_id(load_public_key(keys[1]))
    assert [p.name for p in bundle.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("which", ["private-as-public", "garbage", "missing"])
def test_unusable_public_key_is_a_config_error(
    bundle: Path, keys: tuple[Path, Path], tmp_path: Path, which: str
) -> None:
    path = {"private-as-public": keys[0], "missing": tmp_path / "nope.pub"}.get(which)
    if path is None:
        path = tmp_path / "garbage.pub"
        path.write_text("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ConfigError, match=str(path)):
        load_bundle(bundle, public_key=path)


def test_run_settings_check_the_signing_options(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    base = {"topic": ["frames"], "model": tmp_path / "m.sdns"}
    with pytest.raises(ConfigError, match="require-signed needs --public-key"):
        load_settings({**base, "require_signed": True}, {})
    with pytest.raises(ConfigError, match="not a readable file"):
        load_settings({**base, "public_key": tmp_path / "missing.pub"}, {})
    env = {"SDNS_REQUIRE_SIGNED": "true", "SDNS_PUBLIC_KEY": str(keys[1])}
    settings = load_settings(base, env)
    assert settings.require_signed and settings.public_key == keys[1]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdns_monitor.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_keygen_sign_info_round_trip(bundle: Path, tmp_path: Path) -> None:
    keydir = tmp_path / "k"
    out = _cli("keygen", "--out", str(keydir))
    assert out.returncode == 0, out.stderr
    assert "key id" in out.stdout
    public = keydir / PUBLIC_NAME
    info = json.loads(_cli("info", "--model", str(bundle)).stdout)
    assert info["signature"] == "unsigned"
    for extra in ((), ("--require-signed",)):
        refused = _cli("info", "--model", str(bundle), "--public-key", str(public), *extra)
        assert refused.returncode == 1
        assert len(refused.stderr.strip().splitlines()) == 1 and "not signed" in refused.stderr
    signed = _cli("sign", "--model", str(bundle), "--key", str(keydir / PRIVATE_NAME))
    assert signed.returncode == 0, signed.stderr
    info = json.loads(_cli("info", "--model", str(bundle), "--public-key", str(public)).stdout)
    assert info["signature"] == f"verified: key {key_id(load_public_key(public))}"
    unchecked = json.loads(_cli("info", "--model", str(bundle)).stdout)
    assert unchecked["signature"].startswith("present, not checked")


def test_cli_require_signed_without_key_exits_2(bundle: Path) -> None:
    out = _cli("info", "--model", str(bundle), "--require-signed")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "needs --public-key" in out.stderr
