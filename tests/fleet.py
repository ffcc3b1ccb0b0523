"""A fleet of real OpenSSH servers on 127.0.0.1 for deploy tests and the deploy benchmark.

Each "device" is its own sshd (Debian's openssh-server) on its own port, reached by an ssh_config alias
(`jetson1` -> HostName localhost, Port, User, IdentityFile): deploy addresses hosts by name, as users do. Every
device logs in as the current user with its own HOME (authorized_keys `environment=`, PermitUserEnvironment), so
each has its own releases, results and staging folders on this one machine. Host keys go into a known_hosts file,
some entries hashed (as `ssh-keygen -H` writes them).
"""
from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
SFTP_SERVER = next((p for p in ("/usr/lib/openssh/sftp-server", "/usr/libexec/openssh/sftp-server")
                    if Path(p).exists()), None)
MISSING = None if SSHD and SFTP_SERVER and shutil.which("ssh-keygen") else \
    "needs OpenSSH's sshd, sftp-server and ssh-keygen (Debian: openssh-server; .ci/run installs it)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Device:
    alias: str
    port: int
    home: Path
    folder: Path
    proc: subprocess.Popen | None = None

    @property
    def root(self) -> Path:
        return self.home / "opt" / "edgeres"

    @property
    def state(self) -> Path:
        return self.home / "var" / "lib" / "edgeres"

    @property
    def units(self) -> Path:
        """The device's systemd unit folder (exists: deploy installs the verify-on-boot units there)."""
        return self.home / "etc" / "systemd" / "system"

    @property
    def trusted_keys(self) -> Path:
        """The device's allowed_signers (absent: unsigned bundles are accepted)."""
        return self.home / "etc" / "edgeres" / "allowed_signers"


class Fleet:
    """N devices; `ssh` kwargs for edgeres.deploy.ssh; start/stop/restart one device's sshd."""

    def __init__(self, base: Path, n: int, *, aliases: list[str] | None = None):
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        self.key = base / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self.known_hosts = base / "known_hosts"
        self.config = base / "ssh_config"
        self.devices: list[Device] = []
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)   # sshd's privilege separation folder
        names = aliases or [f"jetson{i + 1}" for i in range(n)]
        for name in names:
            folder = base / name
            home = folder / "home"
            home.mkdir(parents=True)
            (home / "etc" / "systemd" / "system").mkdir(parents=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host_key")], check=True)
            pub = self.key.with_suffix(".pub").read_text().strip()
            (folder / "authorized_keys").write_text(f'environment="HOME={home}" {pub}\n')
            (folder / "authorized_keys").chmod(0o600)
            self.devices.append(Device(name, free_port(), home, folder))
        self._write_client_files()
        for d in self.devices:
            self.start(d)

    def _write_client_files(self) -> None:
        lines, known = [], []
        for d in self.devices:
            lines += [f"Host {d.alias}", "  HostName localhost", f"  Port {d.port}", f"  User {getpass.getuser()}",
                      f"  IdentityFile {self.key}", ""]
            key = (d.folder / "host_key.pub").read_text().split()
            known.append(f"[localhost]:{d.port} {key[0]} {key[1]}")
        self.config.write_text("\n".join(lines))
        self.known_hosts.write_text("\n".join(known) + "\n")
        # half the entries hashed, as `ssh-keygen -H` leaves a known_hosts file
        half = [ln for i, ln in enumerate(known) if i % 2 == 0]
        if half:
            hashed = self.base / "kh_hash"
            hashed.write_text("\n".join(half) + "\n")
            subprocess.run(["ssh-keygen", "-q", "-H", "-f", str(hashed)], check=True, capture_output=True)
            rest = [ln for i, ln in enumerate(known) if i % 2 == 1]
            self.known_hosts.write_text(hashed.read_text() + "".join(ln + "\n" for ln in rest))

    def _sshd_config(self, d: Device, *, sftp_file_limit_blocks: int | None = None) -> Path:
        sftp = SFTP_SERVER
        if sftp_file_limit_blocks is not None:   # a copy that dies mid-file (SIGXFSZ), deterministically
            wrapper = d.folder / "sftp-limited"
            wrapper.write_text(f"#!/bin/sh\nulimit -f {sftp_file_limit_blocks}\nexec {SFTP_SERVER}\n")
            wrapper.chmod(0o755)
            sftp = str(wrapper)
        cfg = d.folder / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {d.port}", "ListenAddress 127.0.0.1", f"HostKey {d.folder / 'host_key'}",
            f"PidFile {d.folder / 'sshd.pid'}", f"AuthorizedKeysFile {d.folder / 'authorized_keys'}",
            "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes", "PermitUserEnvironment HOME", "StrictModes no", "UsePAM no",
            f"Subsystem sftp {sftp}", "LogLevel ERROR", "MaxStartups 64", "MaxSessions 64", ""]))
        return cfg

    def start(self, d: Device, **cfg) -> None:
        conf = self._sshd_config(d, **cfg)
        d.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=open(d.folder / "sshd.log", "a"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", d.port)) == 0:
                    return
            if d.proc.poll() is not None:
                raise RuntimeError(f"sshd for {d.alias} exited: {(d.folder / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.05)
        raise RuntimeError(f"sshd for {d.alias} did not listen on {d.port}")

    def stop(self, d: Device) -> None:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.send_signal(signal.SIGTERM)
            try:
                d.proc.wait(5)
            except subprocess.TimeoutExpired:
                d.proc.kill()
                d.proc.wait()
        d.proc = None

    def restart(self, d: Device, **cfg) -> None:
        self.stop(d)
        self.start(d, **cfg)

    def close(self) -> None:
        for d in self.devices:
            self.stop(d)

    def ssh(self, **extra) -> dict:
        """kwargs for edgeres.deploy.ssh.deploy/status/rollback: each device's own HOME holds its install."""
        import sys

        return {"known_hosts": self.known_hosts, "ssh_config": self.config, "remote_root": "~/opt/edgeres",
                "state_dir": "~/var/lib/edgeres", "remote_python": sys.executable, "connect_timeout": 10.0,
                "retries": 0, "journal": self.base / "activations.json", **extra}

    def deploy_kwargs(self, **extra) -> dict:
        """ssh() plus where each device keeps its trusted keys and systemd units (in its own HOME)."""
        return self.ssh(trusted_keys="~/etc/edgeres/allowed_signers", units_dir="~/etc/systemd/system", **extra)

    def deploy(self, bundle, hosts: list[str], *, host_timeout: float = 300, **kw):
        """edgeres.deploy.ssh.deploy with this fleet's settings and 3 timed iterations (KW: deploy_kwargs)."""
        from edgeres.deploy.ssh import deploy

        return deploy(bundle, hosts, iterations=3, host_timeout=host_timeout, **self.deploy_kwargs(**kw))

    def cli_args(self) -> list[str]:
        import sys

        return ["--known-hosts", str(self.known_hosts), "--ssh-config", str(self.config), "--remote-root",
                "~/opt/edgeres", "--state-dir", "~/var/lib/edgeres", "--remote-python", sys.executable,
                "--timeout", "10", "--retries", "0"]

    def deploy_cli_args(self) -> list[str]:
        return [*self.cli_args(), "--trusted-keys", "~/etc/edgeres/allowed_signers", "--units-dir",
                "~/etc/systemd/system"]


def current_release(d: Device) -> str | None:
    link = d.root / "current"
    return Path(os.readlink(link)).name if link.is_symlink() else None


def slow_python(folder: Path, seconds: float) -> Path:
    """A python3 for the device side that takes `seconds` longer to start the device runtime (a slow device: an
    engine build, a busy CPU); releases.py itself starts at once. Its pid file shows whether it is still running."""
    import sys

    script = folder / f"python-slow-{seconds:g}"
    script.write_text(f"""#!/bin/sh
for a in "$@"; do
  case "$a" in */device_runtime.py) echo $$ > "{folder}/slow.pid"; sleep {seconds};; esac
done
exec {sys.executable} "$@"
""")
    script.chmod(0o755)
    return script


def lock_held(state: Path) -> bool:
    """Whether a device-side transaction holds STATE/lock right now."""
    import fcntl

    path = state / "lock"
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def wait_lock_free(state: Path, timeout: float = 30.0) -> float:
    """Seconds until no transaction holds the device's lock (raises after `timeout`)."""
    t0 = time.monotonic()
    while lock_held(state):
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{state / 'lock'} still held after {timeout:g} s")
        time.sleep(0.1)
    return time.monotonic() - t0


def held_python(folder: Path, *, hold_lock: Path | None = None, action: str = "activate") -> Path:
    """A python3 for the device side that, asked for ACTION (releases.py's activate), is held until FOLDER/go exists
    (at most 120 s; FOLDER/waiting says it got there): with HOLD_LOCK (a device's STATE), another process holds the
    device's transaction lock meanwhile (a stuck transaction, a second controller) and the action starts at once and
    meets it; without, the action itself starts only then (a device too slow to answer). Anything else runs at once.
    FOLDER/holder.pid: the lock holder (flock -o: only it holds the lock, so killing it frees the lock)."""
    import shlex
    import sys

    q = {k: shlex.quote(str(v)) for k, v in (("go", folder / "go"), ("waiting", folder / "waiting"),
                                               ("pid", folder / "holder.pid"), ("py", sys.executable))}
    fresh = f"rm -f {q['go']} {q['waiting']}; "
    wait = f"n=0; while [ ! -e {q['go']} ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done"
    if hold_lock is not None:
        lock = shlex.quote(str(hold_lock / "lock"))
        touch_and_wait = f"touch {q['waiting']}; {wait}"
        hold = (f"{fresh}mkdir -p {shlex.quote(str(hold_lock))}; flock -o {lock} sh -c "
                f"{shlex.quote(touch_and_wait)} "
                f"</dev/null >/dev/null 2>&1 & echo $! > {q['pid']}\n"
                f"  while [ ! -e {q['waiting']} ]; do sleep 0.05; done")
    else:
        hold = f"{fresh}touch {q['waiting']}; {wait}"
    script = folder / f"python-held-{action}{'-lock' if hold_lock else ''}"
    script.write_text(f"""#!/bin/sh
for a in "$@"; do
  if [ "$a" = {shlex.quote(action)} ]; then
  {hold}
  break
  fi
done
exec {q['py']} "$@"
""")
    script.chmod(0o755)
    return script


def private_python(folder: Path, binds: dict[Path, str], *, read_only: tuple[str, ...] = ()) -> Path:
    """A python3 for the device side that runs in its own mount namespace where each BINDS key (a path on this
    machine) shows the folder its value names, a shell word the device's login expands ("$HOME/x": each device its
    own): one install-root path every device sees as its own folder (two devices flashed from one image), or one
    machine id per device. READ_ONLY folders (shell words too) are mounted read-only there (a read-only disk).
    Needs unshare(1) and CAP_SYS_ADMIN."""
    import shlex
    import sys

    mounts = " && ".join([*(f'mount --bind "{src}" {shlex.quote(str(dst))}' for dst, src in binds.items()),
                          *(f'mount --bind "{ro}" "{ro}" && mount -o remount,ro,bind "{ro}"' for ro in read_only)])
    inner = f'{mounts} && exec {shlex.quote(sys.executable)} "$@"'
    script = folder / "python-private"
    script.write_text(f'#!/bin/sh\nexec unshare --mount -- sh -c {shlex.quote(inner)} python3 "$@"\n')
    script.chmod(0o755)
    return script


def can_unshare() -> bool:
    p = subprocess.run(["unshare", "--mount", "true"], capture_output=True) if shutil.which("unshare") else None
    return p is not None and p.returncode == 0
