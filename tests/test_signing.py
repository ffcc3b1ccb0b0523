"""Signed bundles: `bundle --sign KEY` (ssh-keygen -Y sign, ed25519) and the device's check before staging
(releases.py with an allowed_signers file): unsigned, wrong key, tampered manifest and a replayed older bundle are
refused with nothing staged or switched; a properly signed bundle installs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_bundle import make_run  # noqa: E402
from test_releases import Device  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                                   reason="needs OpenSSH's ssh-keygen (Debian: openssh-client)")]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """Two bundles of one run signed by the release key (v1 at t=1000, v2 at t=2000), the key, a stranger's key."""
    from edgeres.deploy.bundle import make_bundle
    from edgeres.deploy.signing import sign_bundle

    root = tmp_path_factory.mktemp("signed")
    key, stranger = keygen(root / "release"), keygen(root / "stranger")
    run = make_run(root)
    v1 = make_bundle(run, root / "v1" / "tiny", probe_size=8)
    v2 = make_bundle(run, root / "v2" / "tiny", probe_size=6)
    sign_bundle(v1, key, signed_at=1000)
    sign_bundle(v2, key, signed_at=2000)
    trusted = root / "allowed_signers"
    trusted.write_text("release " + key.with_suffix(".pub").read_text())
    return {"v1": v1, "v2": v2, "key": key, "stranger": stranger, "trusted": trusted, "run": run}


def _install(d: Device, bundle: Path, trusted: Path) -> tuple[int, dict]:
    return d.run("install", "--from", str(bundle), "--trusted-keys", str(trusted))


def test_signed_bundle_installs_and_the_signature_travels(signed, tmp_path):
    d = Device(tmp_path)
    code, out = _install(d, signed["v1"], signed["trusted"])
    assert code == 0 and out["verified"] and out["signed"] == {"signed_at": 1000, "principal": "release"}
    assert d.run("activate", out["release"])[0] == 0
    assert (d.root / "current" / "signature.json").is_file() and d.run("status")[1]["signed"]


def test_unsigned_wrong_key_and_tampered_are_refused(signed, tmp_path):
    from edgeres.deploy.signing import sign_bundle

    d = Device(tmp_path / "dev")
    unsigned = tmp_path / "unsigned"
    shutil.copytree(signed["v1"], unsigned)
    (unsigned / "signature.json").unlink()
    code, out = _install(d, unsigned, signed["trusted"])
    assert code == 2 and out["error"].startswith("unsigned bundle refused")
    wrong = tmp_path / "wrong"
    shutil.copytree(unsigned, wrong)
    sign_bundle(wrong, signed["stranger"], signed_at=3000)
    code, out = _install(d, wrong, signed["trusted"])
    assert code == 2 and "not by a key in" in out["error"]
    tampered = tmp_path / "tampered"
    shutil.copytree(signed["v1"], tampered)
    m = json.loads((tampered / "manifest.json").read_text())
    m["gates"]["min_top1_agreement_pct"] = 0.0
    (tampered / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    code, out = _install(d, tampered, signed["trusted"])
    assert code == 2 and "signs another manifest" in out["error"]
    forged = tmp_path / "forged"   # the signature file rewritten to name the new manifest: the signature fails
    shutil.copytree(tampered, forged)
    sig = json.loads((forged / "signature.json").read_text())
    from edgeres.io import sha256_file

    sig["manifest_sha256"] = sha256_file(forged / "manifest.json")
    (forged / "signature.json").write_text(json.dumps(sig))
    code, out = _install(d, forged, signed["trusted"])
    assert code == 2 and out["error"].startswith(("bad bundle signature", "bundle signature is not by a key"))
    assert not (d.root / "releases").exists() or not list((d.root / "releases").iterdir())   # nothing staged
    assert d.current() is None


def test_a_replayed_older_bundle_is_refused(signed, tmp_path):
    d = Device(tmp_path)
    _, two = _install(d, signed["v2"], signed["trusted"])
    assert d.run("activate", two["release"])[0] == 0
    code, out = _install(d, signed["v1"], signed["trusted"])   # signed at 1000, after 2000 went live
    assert code == 2 and out["error"].startswith("replayed bundle refused") and d.current() == two["release"]
    code, again = _install(d, signed["v2"], signed["trusted"])   # the same bundle again is not a replay
    assert code == 0 and again["verified"]


def test_bundle_sign_cli(signed, tmp_path):
    from edgeres.cli import main
    from edgeres.deploy.releases import folder_release_id

    out = tmp_path / "b"
    r = CliRunner().invoke(main, ["bundle", str(signed["run"]), "--out", str(out), "--probe-size", "8", "--sign",
                                  str(signed["key"])])
    assert r.exit_code == 0, r.output
    sig = json.loads((out / "signature.json").read_text())
    assert sig["key_type"] == "ssh-ed25519" and "BEGIN SSH SIGNATURE" in sig["signature"]
    assert folder_release_id(out) == folder_release_id(signed["v1"])   # signing does not change the release
    rsa = keygen(tmp_path / "rsa", "rsa")
    r = CliRunner().invoke(main, ["bundle", str(signed["run"]), "--out", str(tmp_path / "c"), "--sign", str(rsa)])
    assert r.exit_code == 1 and "an ed25519 key is required, this one is ssh-rsa" in r.output
    assert not (tmp_path / "c").exists()
    r = CliRunner().invoke(main, ["bundle", str(signed["run"]), "--out", str(tmp_path / "d"), "--sign",
                                  str(tmp_path / "missing")])
    assert r.exit_code == 1 and "no such key file" in r.output
