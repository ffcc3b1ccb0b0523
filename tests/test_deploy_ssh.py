"""`edgeres deploy` against a real SSH server on 127.0.0.1 (asyncssh in-process, real shell, real SFTP)
that plays the device: the device runtime runs there with ONNX Runtime and must pass its own checks."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

asyncssh = pytest.importorskip("asyncssh")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bundle import make_run  # noqa: E402 - the shared run-folder fixture builder

VENV_BIN = str(Path(sys.executable).parent)


class Device:
    """An SSH server on 127.0.0.1:<free port>: commands run in a real shell (cwd = its home folder, the venv's
    python3 first on PATH), SFTP chrooted to that home. Counts the files written over SFTP."""

    def __init__(self, home: Path, client_pub, *, corrupt: str | None = None) -> None:
        self.home, self.writes, self.corrupt = home, [], corrupt
        self.host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(client_pub, ready), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, client_pub, ready) -> None:
        asyncio.set_event_loop(self.loop)
        device = self

        class SFTP(asyncssh.SFTPServer):
            def __init__(self, chan):
                super().__init__(chan, chroot=str(device.home).encode())

            def open(self, path, pflags, attrs):
                if pflags & asyncssh.FXF_WRITE:
                    device.writes.append(path.decode())
                return super().open(path, pflags, attrs)

            def write(self, file_obj, offset, data):
                if device.corrupt and file_obj.name.endswith(f"{device.corrupt}.part".encode()) and offset == 0:
                    data = bytes([data[0] ^ 0xFF]) + data[1:]  # a file damaged in transit
                return super().write(file_obj, offset, data)

        async def handle(process):
            env = {**os.environ, "PATH": VENV_BIN + os.pathsep + os.environ.get("PATH", ""), "HOME": str(device.home)}
            proc = await asyncio.create_subprocess_shell(
                process.command, cwd=device.home, env=env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            out, err = await proc.communicate()
            process.stdout.write(out.decode())
            process.stderr.write(err.decode())
            process.exit(proc.returncode)

        async def start():
            return await asyncssh.create_server(
                asyncssh.SSHServer, "127.0.0.1", 0, server_host_keys=[self.host_key],
                authorized_client_keys=asyncssh.import_authorized_keys(client_pub), process_factory=handle,
                sftp_factory=SFTP)

        self.server = self.loop.run_until_complete(start())
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def known_hosts_line(self, key=None) -> str:
        key = key or self.host_key
        return f"[127.0.0.1]:{self.port} {key.export_public_key().decode().strip()}\n"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    from edgeres.deploy.bundle import make_bundle

    root = tmp_path_factory.mktemp("run")
    return make_bundle(make_run(root, n_probe=8), root / "bundle", probe_size=8)


@pytest.fixture(scope="module")
def client_key(tmp_path_factory) -> tuple[Path, str]:
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = tmp_path_factory.mktemp("keys") / "id_ed25519"
    key.write_private_key(str(path))
    path.chmod(0o600)
    return path, key.export_public_key().decode()


@pytest.fixture
def device(tmp_path, client_key):
    home = tmp_path / "device-home"
    home.mkdir()
    d = Device(home, client_key[1])
    yield d
    d.close()


def known_hosts(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "known_hosts"
    path.write_text("".join(lines))
    return path


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_deploy_verifies_on_device_and_resends_only_changes(bundle, device, client_key, tmp_path):
    from edgeres.deploy.ssh import deploy, format_table
    from edgeres.io import sha256_file

    kh = known_hosts(tmp_path, device.known_hosts_line())
    rdir = "fleet dir/b $(touch PWNED); x"  # quoting: must arrive as one literal folder name
    opts = dict(known_hosts=kh, identity=client_key[0], remote_dir=rdir, iterations=5)
    [r] = deploy(bundle, [f"jetson@127.0.0.1:{device.port}"], **opts)
    assert r.ok, r.message
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(r.sent) == sorted([*manifest["files"], "manifest.json"]) and r.skipped == []
    assert r.result["status"] == "passed" and r.result["backend"] == "onnxruntime" and r.result["tensorrt"] is None
    assert r.result["verification"]["top1_agreement"] == 1.0
    remote = device.home / rdir
    for name, entry in manifest["files"].items():
        assert sha256_file(remote / name) == entry["sha256"]
    assert os.access(remote / "device_runtime.py", os.X_OK)
    assert json.loads((remote / "result.json").read_text())["status"] == "passed"
    assert not list(device.home.rglob("PWNED")) and not list(device.home.rglob("*.part"))
    assert f"jetson@127.0.0.1:{device.port}" in format_table([r])

    writes = len(device.writes)
    [again] = deploy(bundle, [f"jetson@127.0.0.1:{device.port}"], **opts)
    assert again.ok and again.sent == [] and len(again.skipped) == len(manifest["files"]) + 1
    assert len(device.writes) == writes  # nothing re-sent

    (remote / "calib.cache").write_text("changed on the device\n")
    [third] = deploy(bundle, [f"jetson@127.0.0.1:{device.port}"], **opts)
    assert third.ok and third.sent == ["calib.cache"]
    assert len(device.writes) == writes + 1


def test_host_key_mismatch_refused(bundle, device, client_key, tmp_path):
    from edgeres.deploy.ssh import deploy

    other = asyncssh.generate_private_key("ssh-ed25519")
    kh = known_hosts(tmp_path, device.known_hosts_line(other))
    for accept in (False, True):  # --accept-new-host-keys never overrides a changed key
        [r] = deploy(bundle, [f"jetson@127.0.0.1:{device.port}"], known_hosts=kh, identity=client_key[0],
                     accept_new_host_keys=accept, iterations=5)
        assert not r.ok and r.stage == "connect"
        assert "does not match" in r.message and "refused" in r.message
    assert device.writes == [] and not any(device.home.iterdir())
    assert kh.read_text() == device.known_hosts_line(other)


def test_unknown_host_needs_explicit_accept(bundle, device, client_key, tmp_path):
    from edgeres.deploy.ssh import deploy

    kh = tmp_path / "ssh" / "known_hosts"  # does not exist yet
    [r] = deploy(bundle, [f"jetson@127.0.0.1:{device.port}"], known_hosts=kh, identity=client_key[0], iterations=5)
    assert not r.ok and "not in" in r.message and "--accept-new-host-keys" in r.message and device.writes == []
    [r] = deploy(bundle, [f"jetson@127.0.0.1:{device.port}"], known_hosts=kh, identity=client_key[0],
                 accept_new_host_keys=True, iterations=5)
    assert r.ok, r.message
    assert r.host_key_added == device.host_key.get_fingerprint()
    assert kh.read_text() == device.known_hosts_line()


def test_unreachable_host_fails_alone_cli(bundle, device, client_key, tmp_path):
    from edgeres.cli import main

    kh = known_hosts(tmp_path, device.known_hosts_line())
    dead = closed_port()
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(f"# fleet\njetson@127.0.0.1:{dead}\n\n")
    args = ["deploy", str(bundle), "--host", f"jetson@127.0.0.1:{device.port}", "--hosts-file", str(hosts),
            "--known-hosts", str(kh), "--accept-new-host-keys", "--identity", str(client_key[0]),
            "--iterations", "5", "--concurrency", "2", "--timeout", "5"]
    r = CliRunner().invoke(main, [*args, "--json"])
    assert r.exit_code == 1
    rows = json.loads(r.stdout)
    assert [row["ok"] for row in rows] == [True, False]
    assert rows[1]["host"] == f"jetson@127.0.0.1:{dead}" and rows[1]["stage"] == "connect"
    assert "refused" in rows[1]["message"] or "Connect" in rows[1]["message"]
    assert "1 of 2 hosts failed" in r.stderr
    r = CliRunner().invoke(main, args)  # the human table
    assert r.exit_code == 1 and "FAIL(connect)" in r.stdout and "ok" in r.stdout


def test_file_damaged_in_transit_refused_on_device(bundle, client_key, tmp_path):
    from edgeres.deploy.ssh import deploy

    home = tmp_path / "home"
    home.mkdir()
    d = Device(home, client_key[1], corrupt="model_int8.onnx")
    try:
        [r] = deploy(bundle, [f"jetson@127.0.0.1:{d.port}"], known_hosts=known_hosts(tmp_path, d.known_hosts_line()),
                     identity=client_key[0], iterations=5)
    finally:
        d.close()
    assert not r.ok and r.stage == "run" and r.exit_status == 2
    assert "model_int8.onnx: sha256 mismatch" in r.message and "refusing to run" in r.message
    assert r.result["status"] == "error"


def test_locally_tampered_bundle_refused_before_copy(bundle, device, client_key, tmp_path):
    from edgeres.cli import main

    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    (bad / "probe.npz").write_bytes(b"not the probe")
    kh = known_hosts(tmp_path, device.known_hosts_line())
    r = CliRunner().invoke(main, ["deploy", str(bad), "--host", f"jetson@127.0.0.1:{device.port}",
                                  "--known-hosts", str(kh), "--identity", str(client_key[0])])
    assert r.exit_code == 1 and "probe.npz: sha256 mismatch" in r.output and device.writes == []


def test_parse_host():
    from edgeres.deploy.ssh import parse_host
    from edgeres.errors import ConfigError

    assert parse_host("nv@10.0.0.5:2222") == parse_host("nv@10.0.0.5", default_port=2222)
    assert parse_host("nv@[::1]:22").host == "::1"
    for bad in ("nv@host:99999", "a b@c", "nv@host;rm -rf /", ""):
        with pytest.raises(ConfigError):
            parse_host(bad)
