"""Signed bundles (host side): `edgeres bundle --sign KEY` signs the manifest's sha256 and the signing time with an
OpenSSH ed25519 key (`ssh-keygen -Y sign`, namespace edgeres-bundle) into signature.json beside the manifest.

Devices check it with `ssh-keygen -Y verify` against their allowed_signers file (releases.check_signature): where
that file lists keys, an unsigned bundle, a bundle signed by another key, a manifest altered after signing and a
bundle signed earlier than the newest one installed (a replay) are all refused before anything is staged. The
signature is not part of the manifest, so a signed and an unsigned copy of one bundle are the same release."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from edgeres.deploy.releases import MANIFEST, SIGN_NAMESPACE, SIGNATURE, signed_message
from edgeres.errors import ConfigError
from edgeres.io import atomic_write_text, sha256_file


def check_key(key: str | Path) -> Path:
    """An OpenSSH ed25519 private key ssh-keygen can read without a passphrase, or one ConfigError."""
    key = Path(key).expanduser()
    if shutil.which("ssh-keygen") is None:
        raise ConfigError("--sign needs OpenSSH's ssh-keygen (Debian: openssh-client)")
    if not key.is_file():
        raise ConfigError(f"--sign {key}: no such key file")
    kind = _key_type(key)
    if kind != "ssh-ed25519":
        raise ConfigError(f"--sign {key}: an ed25519 key is required, this one is {kind}")
    return key


def _key_type(key: Path) -> str:
    out = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True, text=True, timeout=30,
                         stdin=subprocess.DEVNULL)
    if out.returncode != 0:
        raise ConfigError(f"--sign {key}: not a readable OpenSSH private key without a passphrase "
                          f"({out.stderr.strip()[-160:] or 'ssh-keygen -y failed'})")
    kind = out.stdout.split()[0] if out.stdout.split() else "?"
    return kind


def sign_bundle(folder: Path, key: str | Path, *, signed_at: int | None = None) -> dict:
    """Write FOLDER/signature.json for FOLDER/manifest.json. Returns its content."""
    key = check_key(key)
    manifest_sha = sha256_file(folder / MANIFEST)
    signed_at = int(time.time()) if signed_at is None else int(signed_at)
    with tempfile.TemporaryDirectory(prefix="edgeres-sign-") as tmp:
        msg = Path(tmp) / "message"
        msg.write_bytes(signed_message(manifest_sha, signed_at))
        out = subprocess.run(["ssh-keygen", "-q", "-Y", "sign", "-f", str(key), "-n", SIGN_NAMESPACE, str(msg)],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise ConfigError(f"--sign {key}: ssh-keygen -Y sign failed: {out.stderr.strip()[-200:]}")
        armored = (Path(tmp) / "message.sig").read_text()
    sig = {"format": "edgeres-signature/1", "manifest_sha256": manifest_sha, "signed_at": signed_at,
           "namespace": SIGN_NAMESPACE, "key_type": "ssh-ed25519", "signature": armored}
    atomic_write_text(folder / SIGNATURE, json.dumps(sig, indent=2, sort_keys=True) + "\n")
    (folder / SIGNATURE).chmod(0o644)
    return sig
