"""Deploy a bundle to a fleet over SSH (asyncssh), roll back, read status.

Hosts are resolved as `ssh` resolves them: `~/.ssh/config` (aliases, HostName, Port, User, ProxyJump,
IdentityFile), then what the spec says (USER@HOST:PORT wins). A device is what `ssh -G` resolves it to (user,
hostname, port): two spellings of one device are merged before anything starts; after connecting, a device is its
machine id + host key + install root (the same machine id behind another host key: a cloned image, two devices,
both warned). Host keys are checked against known_hosts (hashed entries too); a new key is accepted only with
accept_new_host_keys (then recorded), a changed key never.

Per host, edgeres/deploy/releases.py runs on the device (its source travels with each command, so it is always the
host's version):
  1. prepare: the device's identity, whether this login (or sudo -n) may write ROOT and STATE and the disk has room
     (checked before any byte is copied), which files it already has by sha256 (content-checked: a damaged cached
     object is deleted, so it is sent again), and how an activation this controller left unknown ended;
  2. copy: only the missing files, content-addressed, into `.cache/edgeres/objects/<sha256>` in the login's home
     (each written as a .part file, then renamed), so an unchanged file is never sent again;
  3. install: stage and verify under the device's lock with the device's own time limit (the time left of
     --host-timeout), with --abort-on-stdin-eof: when this controller times out, is killed or interrupted, its
     connection closes and the device aborts. install never switches anything;
  4. activate: sent only when the install passed and this controller still wants it, with a window (--deadline-in,
     closing ANSWER_MARGIN_S before --host-timeout, and this connection): the device switches, checks the release as
     it runs (verification, health check) and commits, or switches back by itself; nothing is switched or committed
     once the window is closed. "ok" only on the device's word; no answer in time is "unknown", journalled
     (edgeres/deploy/journal.py) and read back by the next deploy or status.
Hosts run in parallel with bounded concurrency; every remote command is built with shlex.quote.
"""
from __future__ import annotations

import asyncio
import getpass
import json
import logging
import math
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeres.deploy.bundle import check_health_command, opened_bundle, verify_bundle
from edgeres.deploy.journal import Journal, default_path
from edgeres.deploy.journal import key as journal_key
from edgeres.deploy.releases import MANIFEST, PROGRESS_EVERY_S, ROOT, SIGNATURE, STATE, TRUSTED_KEYS, UNITS_DIR
from edgeres.errors import BackendUnavailable, ConfigError
from edgeres.io import sha256_file

OBJECTS = ".cache/edgeres/objects"   # content-addressed staging in the login's home: files by sha256
ACTIVATE_MARGIN_S = 5.0              # activate is sent only with at least this much of --host-timeout left
ANSWER_MARGIN_S = 2.0                # the device's window closes this long before --host-timeout: time to answer
MAX_CONNECT_TIMEOUT_S = 3600.0       # --timeout: an hour for an SSH handshake is already a fault
MAX_HOST_TIMEOUT_S = 7 * 86400.0     # --host-timeout: a week for one device's copy, engine build and verification
_HOST = re.compile(r"(?:([A-Za-z0-9._][A-Za-z0-9._-]*)@)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*)"
                   r"(?::(\d{1,5}))?")


@dataclass(frozen=True)
class HostSpec:
    host: str                   # a name (an ssh_config alias, a DNS name) or an IP literal
    user: str | None = None     # None: ~/.ssh/config's User, else the local user
    port: int | None = None     # None: ~/.ssh/config's Port, else 22

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (f"{self.user}@" if self.user else "") + host + (f":{self.port}" if self.port else "")


def parse_host(spec: str) -> HostSpec:
    """'host', 'user@host', 'user@host:2222', 'user@[::1]:2222', an ssh_config alias -> HostSpec."""
    m = _HOST.fullmatch(spec.strip())
    if not m:   # ASCII names only, never starting with '-' (ssh would read '-oProxyCommand=...' as an option)
        raise ConfigError(f"bad host {spec!r}: expected [USER@]HOST[:PORT] (letters, digits, '.', '_', '-')")
    port = int(m.group(3)) if m.group(3) else None
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"bad port in {spec!r}")
    return HostSpec(m.group(2).strip("[]"), m.group(1), port)


def resolve(spec: HostSpec, ssh_config: Path | None) -> str:
    """user@hostname:port as `ssh -G` resolves the spec through the ssh config (without OpenSSH's client: the
    spec's own fields, defaulted)."""
    exe = shutil.which("ssh")
    fields = {"user": spec.user or getpass.getuser(), "hostname": spec.host, "port": str(spec.port or 22)}
    if exe is not None:
        cmd = [exe, "-G", *(["-F", str(ssh_config)] if ssh_config and ssh_config.is_file() else []),
               *(["-l", spec.user] if spec.user else []), *(["-p", str(spec.port)] if spec.port else []), spec.host]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            for line in out.stdout.splitlines():
                key, _, value = line.partition(" ")
                if key in fields:
                    fields[key] = value.strip()
    return f"{fields['user']}@{fields['hostname']}:{fields['port']}"


def unique_hosts(hosts: list[str], ssh_config: Path | None = None) -> tuple[list[HostSpec], dict[str, str]]:
    """Parsed, in order, each device once: (the specs kept, {merged spec: the spec kept for the same device}).
    The same device listed twice would race with itself."""
    seen: dict[str, HostSpec] = {}
    merged: dict[str, str] = {}
    for h in hosts:
        spec = parse_host(h)
        key = resolve(spec, ssh_config)
        if key in seen:
            if seen[key].label != spec.label:
                merged[spec.label] = seen[key].label
            continue
        seen[key] = spec
    return list(seen.values()), merged


@dataclass
class HostResult:
    host: str
    ok: bool = False
    stage: str = "connect"          # where it stopped: connect, prepare, copy, install, activate, done, skipped,
    message: str = ""               # duplicate
    resolved: str | None = None     # user@hostname:port (ssh -G)
    machine_id: str | None = None
    release: str | None = None
    attempt: str | None = None
    activated: bool = False         # the device confirmed: switched, checked and committed
    activation: str | None = None   # committed, fell back, refused, unknown (no answer: read again next command)
    host_key: str | None = None     # the fingerprint this connection saw (part of the device's identity)
    warnings: list[str] = field(default_factory=list)
    earlier: dict[str, Any] | None = None   # how an activation this controller could not confirm ended
    sent: list[str] = field(default_factory=list)      # sha256 of the objects sent
    skipped: list[str] = field(default_factory=list)   # sha256 the device already had
    bytes_sent: int = 0
    exit_status: int | None = None
    result: dict[str, Any] | None = None
    pruned: list[str] = field(default_factory=list)
    units: dict[str, Any] | None = None
    host_key_added: str | None = None   # fingerprint recorded in known_hosts under --accept-new-host-keys
    attempts: int = 0
    duration_s: float = 0.0

    @property
    def outcome(self) -> str:
        """ok, failed, unknown (the activation's answer never came: read back next time), skipped (never
        attempted), duplicate (the same device as another host)."""
        if self.ok:
            return "ok"
        if self.activation == "unknown":
            return "unknown"
        return self.stage if self.stage in ("skipped", "duplicate") else "failed"

    @property
    def counts_as_failure(self) -> bool:
        """What --max-failures and a canary count: a failure, or an activation whose outcome is not known."""
        return self.outcome in ("failed", "unknown")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "outcome": self.outcome}


def seconds(value: Any, what: str, low: float, high: float) -> float:
    """A timeout: a finite number of seconds in [low, high]. NaN or infinity would wait forever on a port that
    accepts TCP but never speaks SSH (asyncio never fires such a deadline), so none reaches a connection."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number of seconds, got {value!r}") from None
    if not (math.isfinite(number) and low <= number <= high):
        raise ConfigError(f"{what} must be a finite number of seconds in [{low:g}, {high:g}], got {value!r}")
    return number


@dataclass(frozen=True)
class SSHOptions:
    known_hosts: Path = Path("~/.ssh/known_hosts").expanduser()
    accept_new: bool = False
    identity: Path | None = None
    ssh_config: Path | None = Path("~/.ssh/config").expanduser()
    remote_root: str = ROOT
    state_dir: str = STATE
    trusted_keys: str = TRUSTED_KEYS
    units_dir: str = UNITS_DIR
    sudo: bool = False
    remote_python: tuple[str, ...] = ("python3",)
    connect_timeout: float = 30.0
    retries: int = 2                 # connection errors only, with 1 s, 2 s ... between tries
    journal: Path = field(default_factory=default_path)   # activations this controller could not confirm

    def __post_init__(self) -> None:
        object.__setattr__(self, "connect_timeout", seconds(self.connect_timeout, "--timeout", 1.0,
                                                            MAX_CONNECT_TIMEOUT_S))

    def wrap(self, args: list[str]) -> str:
        """A remote command line: every word quoted; `sudo -n` in front when asked (never prompts)."""
        return " ".join(shlex.quote(a) for a in ((["sudo", "-n"] if self.sudo else []) + args))


def _asyncssh():
    """asyncssh (an optional dependency), imported without the 5 DSA deprecation warnings it gives on import."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="DSA is deprecated")
        import asyncssh
    return asyncssh


def read_known_hosts(path: Path):
    """known_hosts as asyncssh reads it (hashed entries included), or one clear error for a file it cannot read."""
    asyncssh = _asyncssh()

    if not path.is_file():
        return asyncssh.import_known_hosts("")
    try:
        return asyncssh.import_known_hosts(path.read_text(encoding="utf-8"))
    except (ValueError, asyncssh.KeyImportError) as e:   # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{path} is not a readable known_hosts file ({str(e).splitlines()[0][:120]})") from None


def _client_factory(opts: SSHOptions, res: HostResult):
    """Host keys known_hosts does not trust: a host with no entry at all is accepted (and recorded) only under
    accept_new; a host whose entry holds another key is refused (asyncssh then raises HostKeyNotVerifiable)."""
    asyncssh = _asyncssh()

    class Client(asyncssh.SSHClient):
        def validate_host_public_key(self, host: str, addr: str, port: int, key) -> bool:
            if not opts.accept_new:
                return False
            known = read_known_hosts(opts.known_hosts)
            if any(known.match(host, addr, port)[:2]):
                return False   # the host is known with another key: a changed key is never accepted
            name = host if port == 22 else f"[{host}]:{port}"
            opts.known_hosts.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(opts.known_hosts, "a") as f:
                f.write(f"{name} {key.export_public_key().decode().strip()}\n")
            res.host_key_added = key.get_fingerprint()
            return True

    return Client


async def _connect(spec: HostSpec, opts: SSHOptions, res: HostResult):
    asyncssh = _asyncssh()

    kwargs: dict[str, Any] = dict(known_hosts=read_known_hosts(opts.known_hosts),
                                  connect_timeout=opts.connect_timeout, client_factory=_client_factory(opts, res))
    kwargs["config"] = [str(opts.ssh_config)] if opts.ssh_config and opts.ssh_config.is_file() else []
    if spec.port:
        kwargs["port"] = spec.port
    if spec.user:
        kwargs["username"] = spec.user
    if opts.identity is not None:
        kwargs.update(client_keys=[str(opts.identity)], agent_path=None)
    for attempt in range(opts.retries + 1):
        res.attempts = attempt + 1
        try:
            return await asyncssh.connect(spec.host, **kwargs)
        except asyncssh.HostKeyNotVerifiable as e:
            raise ConfigError(_host_key_message(spec, opts, res, str(e))) from None
        except (OSError, asyncio.TimeoutError) as e:   # connection errors only: retried
            if attempt == opts.retries:
                if isinstance(e, asyncio.TimeoutError):   # not --host-timeout's: say which limit it was
                    raise _Failure(f"connect: no SSH answer within --timeout {opts.connect_timeout:g} s "
                                   f"({attempt + 1} tries)") from None
                raise
            await asyncio.sleep(1.0 * (attempt + 1))
    raise AssertionError("unreachable")


def _host_key_message(spec: HostSpec, opts: SSHOptions, res: HostResult, error: str) -> str:
    """Which host's key (the device's, or the jump host's on the way) and whether known_hosts has no entry for it
    (unknown) or an entry with another key (changed)."""
    m = re.search(r"for host (\S+)", error)
    host = (m.group(1) if m else spec.host).strip("[]")
    target_host, _, target_port = (res.resolved or "").rpartition("@")[2].rpartition(":")
    is_target = host in (spec.host, target_host)
    port = int(target_port) if is_target and target_port.isdigit() else (spec.port if is_target else None)
    entry = any(read_known_hosts(opts.known_hosts).match(host, "", port or 22)[:2])
    who = f"host key of {spec.label}" if is_target else f"host key of the jump host {host} (on the way to " \
                                                         f"{spec.label}; the device itself was not reached)"
    if entry:
        return (f"{who} CHANGED: {opts.known_hosts} holds another key for it (possible man-in-the-middle; if the "
                f"machine was reflashed, remove its old entry with ssh-keygen -R {host})")
    return (f"{who} is unknown: {opts.known_hosts} has no entry for it (add it with ssh-keyscan, or pass "
            f"--accept-new-host-keys)")


class _Failure(Exception):
    pass


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return f"connection refused ({e})"
    return str(e) or type(e).__name__


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _releases_source() -> str:
    return (Path(__file__).resolve().parent / "releases.py").read_text()


async def _home(conn) -> str:
    """The login's home: relative paths (the objects folder, '~/x' roots) are resolved against it, for SFTP too."""
    run = await conn.run('printf "%s" "$HOME"', check=False, timeout=30)
    home = str(run.stdout).strip()
    if run.exit_status != 0 or not home.startswith("/"):
        raise _Failure(f"cannot read the login's home on the device (exit {run.exit_status})")
    return home


def _under(home: str, path: str) -> str:
    return path if path.startswith("/") else f"{home}/{path}"


def _command(opts: SSHOptions, home: str, action: str, *extra: str) -> str:
    return opts.wrap([*opts.remote_python, "-c", _releases_source(), action, "--root", _under(home, opts.remote_root),
                      "--state", _under(home, opts.state_dir), *extra])


async def _releases(conn, opts: SSHOptions, action: str, *extra: str, timeout: float,
                    home: str | None = None) -> tuple[int | None, dict]:
    """Run releases.py's ACTION on the device; (exit status, its JSON)."""
    home = home or await _home(conn)
    run = await conn.run(_command(opts, home, action, *extra), check=False, timeout=timeout)
    out = _last_json(str(run.stdout))
    if out is None:
        raise _Failure(f"releases.py {action} printed no result (exit {run.exit_status}): "
                       f"{str(run.stderr).strip()[-300:]}")
    return run.exit_status, out


async def _device_run(conn, cmd: str, *, timeout: float | None = None,
                      on_progress: Callable[[dict], None] | None = None) -> tuple[int | None, dict] | None:
    """A device command whose stdin this controller holds open (--abort-on-stdin-eof: when this process or its
    connection goes away, the device sees EOF and stops), its progress lines forwarded as they come. (exit status,
    its JSON); None when it gave no answer within TIMEOUT (its channel is closed then, so the device stops too)."""
    proc = await conn.create_process(cmd)
    errors: list[str] = []

    async def read_stderr() -> None:
        async for line in proc.stderr:
            head, _, body = line.partition(" ")
            if head == "edgeres-progress" and on_progress is not None:
                try:
                    on_progress(json.loads(body))
                except ValueError:
                    pass
            elif head != "edgeres-progress":
                errors.append(line)

    async def finish() -> tuple[str, int | None]:
        out, _ = await asyncio.gather(proc.stdout.read(), read_stderr())
        return out, (await proc.wait(check=False)).exit_status

    try:
        stdout, exit_status = await asyncio.wait_for(finish(), timeout)
    except asyncio.TimeoutError:
        return None
    finally:
        proc.close()
    out = _last_json(str(stdout))
    if out is None:
        raise _Failure(f"releases.py printed no result (exit {exit_status}): {''.join(errors).strip()[-300:]}")
    return exit_status, out


def _gate_message(result: dict | None) -> str:
    gates = ((result or {}).get("verification") or {}).get("gates") or []
    failed = [f"{g['name']} {g['value']:.4g} < {g['limit']:.4g}" for g in gates if not g.get("passed")]
    return "gate failed: " + "; ".join(failed) if failed else ""


@dataclass(frozen=True)
class DeployJob:
    """What every host gets: the bundle's objects and the device-side settings."""
    bundle: Path
    objects: dict[str, Path]          # sha256 -> local file (files, manifest, signature)
    manifest_sha: str
    signature_sha: str | None
    runtime_args: tuple[str, ...]
    keep: int
    health_args: tuple[str, ...] = ()   # --health-check CMD / --health-timeout S for the device's activate

    @property
    def bytes_of(self) -> dict[str, int]:
        return {sha: path.stat().st_size for sha, path in self.objects.items()}


def deploy_job(bundle: Path, manifest: dict, runtime_args: list[str], keep: int,
               health_args: tuple[str, ...] = ()) -> DeployJob:
    objects = {entry["sha256"]: bundle / name for name, entry in sorted(manifest["files"].items())}
    manifest_sha = sha256_file(bundle / MANIFEST)
    objects[manifest_sha] = bundle / MANIFEST
    sig = bundle / SIGNATURE
    signature_sha = sha256_file(sig) if sig.is_file() else None
    if signature_sha:
        objects[signature_sha] = sig
    return DeployJob(bundle, objects, manifest_sha, signature_sha, tuple(runtime_args), keep, health_args)


class _Devices:
    """Which hosts are one device: the same machine id, host key and install root (two names of one device are
    deployed once). The same machine id and root behind another host key are two devices flashed from one image
    (a cloned /etc/machine-id): both are deployed, and both are warned."""

    def __init__(self) -> None:
        self.owners: dict[tuple, HostResult] = {}

    def claim(self, res: HostResult, machine_id: str | None, root: str | None) -> str | None:
        """None for the first host of a device; the first host's name for any later one."""
        key = (machine_id, res.host_key, root)
        owner = self.owners.setdefault(key, res)
        if owner is not res:
            return owner.host
        for (mid, _key, rt), other in self.owners.items():
            if machine_id and mid == machine_id and rt == root and other is not res:
                for a, b in ((res, other), (other, res)):
                    a.warnings.append(f"cloned image: {b.host} has the same machine id ({machine_id[:12]}...) behind "
                                      f"another host key; both deployed as two devices - regenerate /etc/machine-id "
                                      f"on them (rm /etc/machine-id && systemd-machine-id-setup)")
        return None


class _Interrupt:
    """Ctrl-C during a deploy, made impossible to lose: asyncio's own SIGINT handling only cancels the main task,
    and a cancellation that lands inside the SSH library can be swallowed, leaving the controller going on to
    install and activate. This handler records the interrupt, drops every open connection (the device sees EOF and
    aborts its install) and cancels every task; each host checks it again before install and before activate."""

    def __init__(self) -> None:
        self.fired = False
        self.conns: set[Any] = set()

    def fire(self) -> None:
        self.fired = True
        for conn in list(self.conns):
            conn.abort()
        for task in asyncio.all_tasks():
            task.cancel()

    def check(self) -> None:
        if self.fired:
            raise asyncio.CancelledError()

    def install(self) -> None:
        import signal

        try:   # only the main thread of a process can own SIGINT (deploy() called from a thread keeps Python's)
            asyncio.get_running_loop().add_signal_handler(signal.SIGINT, self.fire)
        except (ValueError, RuntimeError, NotImplementedError):
            pass


@dataclass
class _HostRun:
    """One host's deploy: the connection, where things live on the device, how to report."""
    conn: Any
    home: str
    job: DeployJob
    opts: SSHOptions
    res: HostResult
    deadline: float
    on_progress: Callable[[HostResult, dict], None] | None

    @property
    def objdir(self) -> str:
        return f"{self.home}/{OBJECTS}"

    def command(self, action: str, *extra: str) -> str:
        return _command(self.opts, self.home, action, *extra)

    def progress(self, event: dict) -> None:
        if self.on_progress is not None:
            self.on_progress(self.res, event)


async def _prepare(run: _HostRun, earlier: dict | None) -> dict:
    """Identity, permission, space and what the device has; how an earlier unconfirmed activation ended."""
    res, opts = run.res, run.opts
    res.stage = "prepare"
    status, prep = await _releases(run.conn, opts, "prepare", "--objects", run.objdir,
                                   *(["--attempt", earlier["attempt"]] if earlier else []),
                                   timeout=opts.connect_timeout * 4, home=run.home)
    res.machine_id = prep.get("machine_id")
    if earlier:
        res.earlier = {**earlier, "device": prep.get("activation")}
    if status != 0:
        problems = prep.get("problems") or [prep.get("error") or f"exit {status}"]
        read_only = any("Read-only file system" in p for p in problems)
        hint = "" if opts.sudo or read_only or prep.get("uid") == 0 else \
            " (a non-root login: pass --sudo, or a --remote-root it can write)"
        raise _Failure("permission: " + "; ".join(problems) + hint + "; nothing copied")
    if prep.get("repaired"):
        res.warnings.append(f"{len(prep['repaired'])} damaged cached object(s) deleted on the device; sent again")
    return prep


def _check_space(job: DeployJob, prep: dict, missing: list[str]) -> None:
    """Refuse before the copy when the device cannot hold what is sent and the release made of it."""
    free = prep.get("free") or {}
    sizes = job.bytes_of
    send, release = sum(sizes[s] for s in missing), sum(sizes.values())
    need = {"objects": send, "root": release} if not free.get("same_fs") else {"objects": send + release}
    for where, n in need.items():
        if free.get(where) is not None and free[where] < n:
            folder = OBJECTS if where == "objects" else "the install root"
            raise _Failure(f"no space on the device: {free[where]} bytes free for {folder}, this bundle needs {n} "
                           f"(copy {send} + release {release}); nothing copied")


async def _copy(run: _HostRun, missing: list[str]) -> None:
    """Only the missing objects, each as a .part file then renamed; a progress line every PROGRESS_EVERY_S."""
    res, job = run.res, run.job
    total, t0 = sum(job.bytes_of[s] for s in missing), time.monotonic()
    said = [t0]

    def tick(done_before: int):
        def handler(_src, _dst, copied: int, _size: int) -> None:
            now = time.monotonic()
            if now - said[0] >= PROGRESS_EVERY_S:
                said[0] = now
                run.progress({"what": "copy", "bytes": done_before + copied, "of": total, "seconds": now - t0})
        return handler

    async with run.conn.start_sftp_client() as sftp:
        await sftp.makedirs(run.objdir, exist_ok=True)
        for sha in missing:
            part = f"{run.objdir}/{sha}.part-{res.attempt}"
            await sftp.put(str(job.objects[sha]), part, progress_handler=tick(res.bytes_sent))
            await sftp.chmod(part, 0o644)
            await sftp.posix_rename(part, f"{run.objdir}/{sha}")
            res.sent.append(sha)
            res.bytes_sent += job.bytes_of[sha]


async def _install(run: _HostRun) -> bool:
    """Stage and verify on the device (never switches), within the time left; True when it passed."""
    res, job, opts = run.res, run.job, run.opts
    res.stage = "install"
    left = run.deadline - time.monotonic()
    cmd = run.command("install", "--objects", run.objdir, "--manifest", job.manifest_sha,
                      *(["--signature", job.signature_sha] if job.signature_sha else []), "--attempt", res.attempt,
                      "--time-limit", f"{max(left - ACTIVATE_MARGIN_S, 1.0):.0f}", "--abort-on-stdin-eof",
                      "--trusted-keys", _under(run.home, opts.trusted_keys), "--python", opts.remote_python[0],
                      "--", "--expect-manifest-sha256", job.manifest_sha, *job.runtime_args)
    status, out = await _device_run(run.conn, cmd, on_progress=run.progress)
    res.exit_status, res.result = status, out.get("result")
    res.release = out.get("release")
    if status != 0 or not out.get("verified"):
        res.message = (out.get("error") or (res.result or {}).get("error") or _gate_message(res.result)
                       or f"exit {status}") + "; the running release was left as it was"
        return False
    return True


async def _activate(run: _HostRun) -> None:
    """Switch, check and commit on the device inside a window that closes ANSWER_MARGIN_S before --host-timeout
    (and when this connection closes): "committed" only on the device's word; no word in time is "unknown"."""
    res, job, opts = run.res, run.job, run.opts
    res.stage = "activate"
    window = run.deadline - time.monotonic() - ANSWER_MARGIN_S
    cmd = run.command("activate", res.release, "--attempt", res.attempt, "--deadline-in", f"{window:.2f}",
                      "--abort-on-stdin-eof", "--keep", str(job.keep), "--objects", run.objdir,
                      "--units-dir", _under(run.home, opts.units_dir), "--python", opts.remote_python[0],
                      *job.health_args, "--", *job.runtime_args)
    answer = await _device_run(run.conn, cmd, timeout=window + ANSWER_MARGIN_S / 2, on_progress=run.progress)
    if answer is None:
        _unknown(res, f"no answer within {window:.1f} s")
        return
    status, out = answer
    res.exit_status = status
    res.activation = out.get("outcome") or "refused"
    res.activated = status == 0 and bool(out.get("activated"))
    res.pruned, res.units = out.get("pruned") or [], out.get("units")
    if out.get("result"):
        res.result = out["result"]
    res.ok, res.stage = res.activated, "done" if res.activated else "activate"
    if not res.ok:
        res.message = (f"{res.activation}: " + (out.get("reason") or out.get("error") or f"exit {status}") +
                       ("; the device switched back to " + str(out.get("current")) if res.activation == "fell back"
                        else "; nothing switched"))


def _unknown(res: HostResult, why: str) -> None:
    res.activation = "unknown"
    res.message = (f"activate: {why}; whether {res.release} went live is UNKNOWN (the device commits only inside "
                   f"the window and while this connection is open); the next deploy or status reads what it did")


async def _deploy_host(spec: HostSpec, job: DeployJob, opts: SSHOptions, res: HostResult, *, deadline: float,
                       devices: _Devices, stop: _Interrupt, earlier: dict | None,
                       on_progress: Callable[[HostResult, dict], None] | None) -> None:
    stop.check()
    conn = await _connect(spec, opts, res)
    stop.conns.add(conn)
    async with conn:
        res.host_key = conn.get_server_host_key().get_fingerprint()
        run = _HostRun(conn, await _home(conn), job, opts, res, deadline, on_progress)
        prep = await _prepare(run, earlier)
        other = devices.claim(res, prep.get("machine_id"), prep.get("root"))
        if other is not None:
            res.stage = "duplicate"
            res.message = f"same device as {other} (machine id, host key and install root); not deployed twice"
            return
        res.stage = "copy"
        have = set(prep.get("have") or [])
        missing = [sha for sha in job.objects if sha not in have]
        res.skipped = [sha for sha in job.objects if sha in have]
        res.attempt = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:8]
        _check_space(job, prep, missing)
        asyncssh = _asyncssh()

        try:
            await _copy(run, missing)
        except (OSError, asyncssh.SFTPError) as e:   # a full disk is only SFTP's "Failure": said with the space
            raise _Failure(f"copy: {_describe(e)} ({(prep.get('free') or {}).get('objects')} bytes were free for "
                           f"{OBJECTS} before the copy)") from None
        stop.check()
        if not await _install(run):
            return
        if deadline - time.monotonic() < ACTIVATE_MARGIN_S:
            res.message = "verified, but too little of --host-timeout was left to activate; nothing switched"
            return
        stop.check()   # a Ctrl-C the SSH library swallowed still stops here: nothing is switched
        await _activate(run)


async def _fleet(specs: list[HostSpec], work, *, concurrency: int, host_timeout: float, canary: int = 0,
                 max_failures: int | None = None, on_done: Callable[[HostResult], None] | None = None,
                 resolved: dict[str, str] | None = None) -> list[HostResult]:
    """Run `work(spec, res, deadline)` on every host: canaries first (any failure stops the rest), then the others
    with bounded concurrency, starting no new host once more than max_failures failed. `on_done` sees each host's
    result as it finishes. One host's bug never hides the others' results."""
    host_timeout = seconds(host_timeout, "--host-timeout", 0.001, MAX_HOST_TIMEOUT_S)   # before any connection
    results = {s.label: HostResult(s.label, resolved=(resolved or {}).get(s.label)) for s in specs}
    sem = asyncio.Semaphore(concurrency)
    failures = 0

    def done(res: HostResult) -> None:
        if on_done is not None:
            on_done(res)

    async def one(spec: HostSpec) -> None:
        nonlocal failures
        res = results[spec.label]
        async with sem:
            if max_failures is not None and failures > max_failures:
                res.stage, res.message = "skipped", f"not attempted: more than {max_failures} host(s) failed"
                done(res)
                return
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(work(spec, res, t0 + host_timeout), host_timeout)
            except asyncio.TimeoutError:
                if res.stage == "activate":
                    _unknown(res, f"no answer within --host-timeout {host_timeout:g} s")
                else:
                    res.message = f"{res.stage}: no answer within --host-timeout {host_timeout:g} s; the device " \
                                  f"aborts the install and nothing is switched"
            except (_Failure, ConfigError) as e:
                res.message = str(e)
            except Exception as e:  # noqa: BLE001 - asyncssh/OS errors; one host's failure stays its own
                res.message = f"{res.stage}: {_describe(e)}"
            res.duration_s = round(time.monotonic() - t0, 3)
            if res.counts_as_failure:
                failures += 1
            done(res)

    first, rest = specs[:canary], specs[canary:]
    await asyncio.gather(*(one(s) for s in first))
    if canary and any(results[s.label].counts_as_failure for s in first):
        for s in rest:
            results[s.label].stage, results[s.label].message = "skipped", "not attempted: a canary host failed"
            done(results[s.label])
    else:
        await asyncio.gather(*(one(s) for s in rest))
    return [results[s.label] for s in specs]


def _require_asyncssh() -> None:
    """Before any host is read or contacted: the SSH client is an optional dependency (edgeres[deploy])."""
    try:
        _asyncssh()
    except ImportError:
        raise BackendUnavailable("deploying over SSH needs asyncssh: pip install 'edgeres[deploy]' (nothing was "
                                 "sent to any device)") from None


def _options(ssh: dict[str, Any]) -> SSHOptions:
    _require_asyncssh()
    identity = ssh.get("identity")
    if identity is not None and not Path(identity).is_file():
        raise ConfigError(f"identity file not found: {identity}")
    kh = Path(ssh.get("known_hosts") or "~/.ssh/known_hosts").expanduser()
    read_known_hosts(kh)   # a broken file is one error up front, not one per host
    remote_python = ssh.get("remote_python", "python3")
    python = tuple(shlex.split(remote_python)) if isinstance(remote_python, str) else tuple(remote_python)
    if not python:
        raise ConfigError("--remote-python is empty")
    return SSHOptions(known_hosts=kh, accept_new=ssh.get("accept_new_host_keys", False),
                      identity=Path(identity) if identity else None,
                      ssh_config=Path(ssh.get("ssh_config") or "~/.ssh/config").expanduser(),
                      remote_root=_remote_path(ssh.get("remote_root", ROOT)),
                      state_dir=_remote_path(ssh.get("state_dir", STATE)),
                      trusted_keys=_remote_path(ssh.get("trusted_keys", TRUSTED_KEYS)),
                      units_dir=_remote_path(ssh.get("units_dir", UNITS_DIR)), sudo=ssh.get("sudo", False),
                      remote_python=python, connect_timeout=ssh.get("connect_timeout", 30.0),
                      retries=ssh.get("retries", 2),
                      journal=Path(ssh["journal"]).expanduser() if ssh.get("journal") else default_path())


def _remote_path(p: str) -> str:
    """'~/x' means x in the login's home (remote commands start there), never a folder named '~'."""
    if p.startswith("~/"):
        return p[2:] or "."
    if p == "~":
        return "."
    return p


def _specs(hosts: list[str], opts: SSHOptions, on_done) -> tuple[list[HostSpec], list[HostResult], dict]:
    specs, merged = unique_hosts(hosts, opts.ssh_config)
    if not specs:
        raise ConfigError("no hosts given")
    resolved = {s.label: resolve(s, opts.ssh_config) for s in specs}
    dups = [HostResult(label, stage="duplicate", message=f"same device as {kept} ({resolved[kept]}); merged")
            for label, kept in merged.items()]
    for d in dups:
        if on_done is not None:
            on_done(d)
    return specs, dups, resolved


class _DroppedConnectionNoise(logging.Filter):
    """asyncio logs "socket.send() raised exception." for every write to a connection already lost (19 lines for one
    dropped device): the host's own failure line says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("socket.send() raised exception")


def _run_quietly(coro):
    noise = _DroppedConnectionNoise()
    logging.getLogger("asyncio").addFilter(noise)
    try:
        return asyncio.run(coro)
    finally:
        logging.getLogger("asyncio").removeFilter(noise)


def _earlier(journal: Journal, opts: SSHOptions, resolved: dict[str, str]) -> dict[str, dict]:
    """host label -> the activation this controller left unknown on that device, if any."""
    entries = journal.read()
    return {label: entries[k] for label, addr in resolved.items()
            if (k := journal_key(addr, label, opts.remote_root)) in entries}


def _settle_journal(journal: Journal, opts: SSHOptions, results: list[HostResult]) -> None:
    """Unknown activations recorded; those the device has now told about (res.earlier) forgotten."""
    def k(r: HostResult) -> str:
        return journal_key(r.resolved, r.host, opts.remote_root)
    journal.update({k(r): {"host": r.host, "release": r.release, "attempt": r.attempt}
                    for r in results if r.activation == "unknown"},
                   {k(r) for r in results if r.earlier is not None and r.activation != "unknown"})


def health_args(command: str | None, timeout: float | None) -> tuple[str, ...]:
    """The device's activate flags for a health check given at deploy time (else the bundle's is used)."""
    if command is not None:
        check_health_command(command)
    if timeout is not None:
        timeout = seconds(timeout, "--health-timeout", 1.0, MAX_HOST_TIMEOUT_S)
    return (*(["--health-check", command] if command else []),
            *(["--health-timeout", f"{timeout:g}"] if timeout is not None else []))


def deploy(bundle_dir: str | Path, hosts: list[str], *, concurrency: int = 16, canary: int = 0,
           max_failures: int | None = None, host_timeout: float = 3600.0, precision: str = "int8",
           iterations: int = 200, require_backend: str | None = None, keep: int = 3,
           health_check: str | None = None, health_timeout: float | None = None,
           on_done: Callable[[HostResult], None] | None = None,
           on_progress: Callable[[HostResult, dict], None] | None = None, **ssh: Any) -> list[HostResult]:
    """Deploy, verify, activate and check on every host; one HostResult per host given (merged duplicates
    included), distinct hosts first, in the order given."""
    if concurrency < 1:
        raise ConfigError("concurrency must be >= 1")
    if precision not in ("int8", "fp16", "fp32"):
        raise ConfigError(f"precision must be int8, fp16 or fp32, got {precision!r}")
    if canary < 0 or (max_failures is not None and max_failures < 0):
        raise ConfigError("--canary and --max-failures must be >= 0")
    if keep < 1:
        raise ConfigError("--keep must be >= 1 (the running release stays)")
    health = health_args(health_check, health_timeout)
    opts = _options(ssh)
    runtime_args = ["--precision", precision, "--iterations", str(iterations), "--quiet"]
    if require_backend:
        runtime_args += ["--require-backend", require_backend]
    with opened_bundle(bundle_dir) as bundle:
        manifest = verify_bundle(bundle)   # a bundle altered on this side is refused before any copy
        job = deploy_job(bundle, manifest, runtime_args, keep, health)
        specs, dups, resolved = _specs(hosts, opts, on_done)
        journal = Journal(opts.journal)
        earlier = _earlier(journal, opts, resolved)
        devices, stop = _Devices(), _Interrupt()

        async def work(spec: HostSpec, res: HostResult, deadline: float) -> None:
            await _deploy_host(spec, job, opts, res, deadline=deadline, devices=devices, stop=stop,
                               earlier=earlier.get(spec.label), on_progress=on_progress)

        async def main() -> list[HostResult]:
            stop.install()
            return await _fleet(specs, work, concurrency=concurrency, host_timeout=host_timeout, canary=canary,
                                max_failures=max_failures, on_done=on_done, resolved=resolved)

        try:
            out = _run_quietly(main())
        except asyncio.CancelledError:
            if stop.fired:
                raise KeyboardInterrupt from None
            raise
        _settle_journal(journal, opts, out)
        if stop.fired:   # every host ended on its own before the interrupt was seen: still an interrupted run
            raise KeyboardInterrupt
        return out + dups


def _on_each(hosts: list[str], action: str, *extra: str, concurrency: int, host_timeout: float,
             on_done: Callable[[HostResult], None] | None = None, **ssh: Any) -> list[HostResult]:
    """releases.py ACTION (status, rollback) on every host; status also reads back an activation this controller
    left unknown there."""
    opts = _options(ssh)
    specs, dups, resolved = _specs(hosts, opts, on_done)
    journal = Journal(opts.journal)
    earlier = _earlier(journal, opts, resolved) if action == "status" else {}

    async def work(spec: HostSpec, res: HostResult, deadline: float) -> None:
        conn = await _connect(spec, opts, res)
        mine = earlier.get(spec.label)
        async with conn:
            res.stage = action
            status, out = await _releases(conn, opts, action, *extra,
                                          *(["--attempt", mine["attempt"]] if mine else []), timeout=host_timeout)
        res.exit_status, res.result = status, out
        if mine:
            res.earlier = {**mine, "device": out.get("activation")}
        res.ok = status == 0
        res.release = out.get("current")
        res.stage = "done" if res.ok else action
        if not res.ok:
            res.message = out.get("error") or f"exit {status}"

    out = _run_quietly(_fleet(specs, work, concurrency=concurrency, host_timeout=host_timeout, on_done=on_done,
                              resolved=resolved))
    _settle_journal(journal, opts, out)
    return out + dups


def status(hosts: list[str], *, concurrency: int = 16, host_timeout: float = 60.0, **ssh: Any) -> list[HostResult]:
    """What every device runs, read from the devices without running anything."""
    return _on_each(hosts, "status", concurrency=concurrency, host_timeout=host_timeout, **ssh)


def rollback(hosts: list[str], *, to: str | None = None, concurrency: int = 16, host_timeout: float = 120.0,
             **ssh: Any) -> list[HostResult]:
    """Switch every device back to its previous release, or to the kept release TO (and that release's last passed
    result)."""
    return _on_each(hosts, "rollback", *(["--to", to] if to else []), concurrency=concurrency,
                    host_timeout=host_timeout, **ssh)
