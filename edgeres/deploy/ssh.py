"""Deploy a bundle to a fleet over SSH (asyncssh), roll back, read status.

Hosts are resolved as `ssh` resolves them: `~/.ssh/config` (aliases, HostName, Port, User, ProxyJump,
IdentityFile), then what the spec says (USER@HOST:PORT wins). Host keys are checked against known_hosts (hashed
entries too); a new key is accepted only with accept_new_host_keys (then recorded), a changed key never.

Per host: send the bundle files whose sha256 differs into a staging folder in the login's home
(`.cache/edgeres/staging/<bundle>`, each file written as NAME.part, then renamed), then run edgeres/deploy/
releases.py on the device (its source is sent with the command, so it is always the host's version): it copies the
staged bundle into ROOT/releases/<id>, verifies it there with the device runtime and switches ROOT/current only when
it passed. A failed copy, a failed verification or a reboot leaves the running release and its result untouched.
Hosts run in parallel with bounded concurrency; every remote command is built with shlex.quote.
"""
from __future__ import annotations

import asyncio
import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeres.deploy.releases import EXECUTABLE, ROOT, STATE
from edgeres.errors import ConfigError
from edgeres.io import sha256_file

STAGING = ".cache/edgeres/staging"
# Runs on the device with its python3: prints {name: sha256 or null} for the bundle files it already has.
REMOTE_SHA256 = """import hashlib, json, os, sys
out = {}
for name in sys.argv[1:]:
    h = hashlib.sha256()
    try:
        if os.path.islink(name) or not os.path.isfile(name):
            raise OSError
        with open(name, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                h.update(block)
        out[name] = h.hexdigest()
    except OSError:
        out[name] = None
print(json.dumps(out))
"""
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


def unique_hosts(hosts: list[str]) -> list[HostSpec]:
    """Parsed, in order, each once: the same device listed twice would race with itself."""
    seen: dict[str, HostSpec] = {}
    for h in hosts:
        spec = parse_host(h)
        seen.setdefault(spec.label, spec)
    return list(seen.values())


@dataclass
class HostResult:
    host: str
    ok: bool = False
    stage: str = "connect"          # where it stopped: connect, copy, install, done, skipped
    message: str = ""
    release: str | None = None
    activated: bool = False
    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    exit_status: int | None = None
    result: dict[str, Any] | None = None
    host_key_added: str | None = None   # fingerprint recorded in known_hosts under --accept-new-host-keys
    attempts: int = 0
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SSHOptions:
    known_hosts: Path = Path("~/.ssh/known_hosts").expanduser()
    accept_new: bool = False
    identity: Path | None = None
    ssh_config: Path | None = Path("~/.ssh/config").expanduser()
    remote_root: str = ROOT
    state_dir: str = STATE
    sudo: bool = False
    remote_python: tuple[str, ...] = ("python3",)
    connect_timeout: float = 30.0
    retries: int = 2                 # connection errors only, with 1 s, 2 s ... between tries

    def wrap(self, args: list[str]) -> str:
        """A remote command line: every word quoted; `sudo -n` in front when asked (never prompts)."""
        return " ".join(shlex.quote(a) for a in ((["sudo", "-n"] if self.sudo else []) + args))


def read_known_hosts(path: Path):
    """known_hosts as asyncssh reads it (hashed entries included), or one clear error for a file it cannot read."""
    import asyncssh

    if not path.is_file():
        return asyncssh.import_known_hosts("")
    try:
        return asyncssh.import_known_hosts(path.read_text(encoding="utf-8"))
    except (ValueError, asyncssh.KeyImportError) as e:   # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{path} is not a readable known_hosts file ({str(e).splitlines()[0][:120]})") from None


def _client_factory(opts: SSHOptions, res: HostResult):
    """Host keys known_hosts does not trust: a host with no entry at all is accepted (and recorded) only under
    accept_new; a host whose entry holds another key is refused (asyncssh then raises HostKeyNotVerifiable)."""
    import asyncssh

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
    import asyncssh

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
        except asyncssh.HostKeyNotVerifiable:
            raise ConfigError(f"host key of {spec.label} is not trusted by {opts.known_hosts}: unknown (add it with "
                              f"ssh-keyscan, or pass --accept-new-host-keys) or changed (possible man-in-the-middle; "
                              f"if the device was reflashed, remove its old entry with ssh-keygen -R)") from None
        except (OSError, asyncio.TimeoutError):   # connection errors only: retried
            if attempt == opts.retries:
                raise
            await asyncio.sleep(1.0 * (attempt + 1))
    raise AssertionError("unreachable")


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
    """The login's home: relative paths (the staging folder, '~/x' roots) are resolved against it, for SFTP too."""
    run = await conn.run('printf "%s" "$HOME"', check=False, timeout=30)
    home = str(run.stdout).strip()
    if run.exit_status != 0 or not home.startswith("/"):
        raise _Failure(f"cannot read the login's home on the device (exit {run.exit_status})")
    return home


def _under(home: str, path: str) -> str:
    return path if path.startswith("/") else f"{home}/{path}"


async def _releases(conn, opts: SSHOptions, action: str, *extra: str, timeout: float,
                    home: str | None = None) -> tuple[int | None, dict]:
    """Run releases.py's ACTION on the device (its source travels with the command); (exit status, its JSON).
    `home`: the login's home when the caller already read it."""
    home = home or await _home(conn)
    cmd = opts.wrap([*opts.remote_python, "-c", _releases_source(), action, "--root", _under(home, opts.remote_root),
                     "--state", _under(home, opts.state_dir), *extra])
    run = await conn.run(cmd, check=False, timeout=timeout)
    out = _last_json(str(run.stdout))
    if out is None:
        raise _Failure(f"releases.py {action} printed no result (exit {run.exit_status}): "
                       f"{str(run.stderr).strip()[-300:]}")
    return run.exit_status, out


def _gate_message(result: dict | None) -> str:
    gates = ((result or {}).get("verification") or {}).get("gates") or []
    failed = [f"{g['name']} {g['value']:.4g} < {g['limit']:.4g}" for g in gates if not g.get("passed")]
    return "gate failed: " + "; ".join(failed) if failed else ""


async def _deploy_host(spec: HostSpec, bundle: Path, manifest: dict, opts: SSHOptions, runtime_args: list[str],
                       res: HostResult, run_timeout: float) -> None:
    q = shlex.quote
    conn = await _connect(spec, opts, res)
    async with conn:
        names = [*sorted(manifest["files"]), "manifest.json"]  # manifest last: it commits the copy
        home = await _home(conn)
        stage_dir = f"{home}/{STAGING}/{bundle.name.removesuffix('.tar.gz')}"
        py = " ".join(q(p) for p in opts.remote_python)
        res.stage = "copy"
        probe = await conn.run(f"mkdir -p -- {q(stage_dir)} && cd -- {q(stage_dir)} && {py} -c "
                               f"{q(REMOTE_SHA256)} " + " ".join(q(n) for n in names),
                               check=False, timeout=opts.connect_timeout * 4)
        if probe.exit_status != 0:
            raise _Failure(f"cannot prepare the staging folder {stage_dir} with {py} (exit {probe.exit_status}): "
                           f"{str(probe.stderr).strip()[-300:]}")
        remote = _last_json(str(probe.stdout)) or {}
        local = {n: manifest["files"][n]["sha256"] for n in names[:-1]}
        local["manifest.json"] = sha256_file(bundle / "manifest.json")
        async with conn.start_sftp_client() as sftp:
            for name in names:
                if remote.get(name) == local[name]:
                    res.skipped.append(name)
                    continue
                dst, part = f"{stage_dir}/{name}", f"{stage_dir}/{name}.part"
                await sftp.put(str(bundle / name), part)
                await sftp.chmod(part, 0o755 if name in EXECUTABLE else 0o644)
                await sftp.posix_rename(part, dst)
                res.sent.append(name)
                res.bytes_sent += (bundle / name).stat().st_size
        res.stage = "install"
        status, out = await _releases(conn, opts, "install", "--from", stage_dir, "--python", *opts.remote_python[:1],
                                      "--", "--expect-manifest-sha256", local["manifest.json"], *runtime_args,
                                      timeout=run_timeout, home=home)
    res.exit_status, res.result = status, out.get("result")
    res.release, res.activated = out.get("release"), bool(out.get("activated"))
    res.ok = status == 0 and res.activated
    res.stage = "done" if res.ok else "install"
    if not res.ok:
        res.message = (out.get("error") or (res.result or {}).get("error") or _gate_message(res.result)
                       or f"exit {status}") + "; the running release was left as it was"


async def _fleet(specs: list[HostSpec], work, *, concurrency: int, host_timeout: float, canary: int = 0,
                 max_failures: int | None = None) -> list[HostResult]:
    """Run `work(spec, res)` on every host: canaries first (any failure stops the rest), then the others with
    bounded concurrency, stopping new hosts once more than max_failures failed. One host's bug never hides the
    others' results."""
    results = {s.label: HostResult(s.label) for s in specs}
    sem = asyncio.Semaphore(concurrency)
    failures = 0

    async def one(spec: HostSpec) -> None:
        nonlocal failures
        res = results[spec.label]
        async with sem:
            if max_failures is not None and failures > max_failures:
                res.stage, res.message = "skipped", f"not attempted: more than {max_failures} host(s) failed"
                return
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(work(spec, res), host_timeout)
            except asyncio.TimeoutError:
                res.message = f"{res.stage}: no answer within --host-timeout {host_timeout:g} s"
            except _Failure as e:
                res.message = str(e)
            except ConfigError as e:
                res.message = str(e)
            except Exception as e:  # noqa: BLE001 - asyncssh/OS errors; one host's failure stays its own
                res.message = f"{res.stage}: {_describe(e)}"
            res.duration_s = round(time.monotonic() - t0, 3)
            if not res.ok:
                failures += 1

    first, rest = specs[:canary], specs[canary:]
    await asyncio.gather(*(one(s) for s in first))
    if canary and any(not results[s.label].ok for s in first):
        for s in rest:
            results[s.label].stage, results[s.label].message = "skipped", "not attempted: a canary host failed"
    else:
        await asyncio.gather(*(one(s) for s in rest))
    return [results[s.label] for s in specs]


def _options(known_hosts, identity, ssh_config, remote_root, state_dir, sudo, remote_python, accept_new,
             connect_timeout, retries) -> SSHOptions:
    if identity is not None and not Path(identity).is_file():
        raise ConfigError(f"identity file not found: {identity}")
    kh = Path(known_hosts).expanduser() if known_hosts else Path("~/.ssh/known_hosts").expanduser()
    read_known_hosts(kh)   # a broken file is one error up front, not one per host
    python = tuple(shlex.split(remote_python)) if isinstance(remote_python, str) else tuple(remote_python)
    if not python:
        raise ConfigError("--remote-python is empty")
    return SSHOptions(known_hosts=kh, accept_new=accept_new, identity=Path(identity) if identity else None,
                      ssh_config=Path(ssh_config).expanduser() if ssh_config else
                      Path("~/.ssh/config").expanduser(), remote_root=_remote_path(remote_root),
                      state_dir=_remote_path(state_dir), sudo=sudo, remote_python=python,
                      connect_timeout=connect_timeout, retries=retries)


def _remote_path(p: str) -> str:
    """'~/x' means x in the login's home (remote commands start there), never a folder named '~'."""
    if p.startswith("~/"):
        return p[2:] or "."
    if p == "~":
        return "."
    return p


def deploy(bundle_dir: str | Path, hosts: list[str], *, concurrency: int = 4, canary: int = 0,
           max_failures: int | None = None, host_timeout: float = 3600.0, precision: str = "int8",
           iterations: int = 200, require_backend: str | None = None, **ssh: Any) -> list[HostResult]:
    """Deploy and verify on every host; returns one HostResult per distinct host, in the order given."""
    from edgeres.deploy.bundle import opened_bundle, verify_bundle

    if concurrency < 1:
        raise ConfigError("concurrency must be >= 1")
    if precision not in ("int8", "fp16", "fp32"):
        raise ConfigError(f"precision must be int8, fp16 or fp32, got {precision!r}")
    specs = unique_hosts(hosts)
    if not specs:
        raise ConfigError("no hosts given")
    if canary < 0 or (max_failures is not None and max_failures < 0):
        raise ConfigError("--canary and --max-failures must be >= 0")
    opts = _ssh_options(ssh)
    runtime_args = ["--precision", precision, "--iterations", str(iterations), "--quiet"]
    if require_backend:
        runtime_args += ["--require-backend", require_backend]
    with opened_bundle(bundle_dir) as bundle:
        manifest = verify_bundle(bundle)   # a bundle altered on this side is refused before any copy

        async def work(spec: HostSpec, res: HostResult) -> None:
            await _deploy_host(spec, bundle, manifest, opts, runtime_args, res, run_timeout=host_timeout)

        return asyncio.run(_fleet(specs, work, concurrency=concurrency, host_timeout=host_timeout, canary=canary,
                                  max_failures=max_failures))


def _ssh_options(ssh: dict[str, Any]) -> SSHOptions:
    return _options(ssh.get("known_hosts"), ssh.get("identity"), ssh.get("ssh_config"),
                    ssh.get("remote_root", ROOT), ssh.get("state_dir", STATE), ssh.get("sudo", False),
                    ssh.get("remote_python", "python3"), ssh.get("accept_new_host_keys", False),
                    ssh.get("connect_timeout", 30.0), ssh.get("retries", 2))


def _on_each(hosts: list[str], action: str, *, concurrency: int, host_timeout: float,
             **ssh: Any) -> list[HostResult]:
    """releases.py ACTION (status, rollback) on every host."""
    specs = unique_hosts(hosts)
    if not specs:
        raise ConfigError("no hosts given")
    opts = _ssh_options(ssh)

    async def work(spec: HostSpec, res: HostResult) -> None:
        conn = await _connect(spec, opts, res)
        async with conn:
            res.stage = action
            status, out = await _releases(conn, opts, action, timeout=host_timeout)
        res.exit_status, res.result = status, out
        res.ok = status == 0
        res.release = out.get("current")
        res.stage = "done" if res.ok else action
        if not res.ok:
            res.message = out.get("error") or f"exit {status}"

    return asyncio.run(_fleet(specs, work, concurrency=concurrency, host_timeout=host_timeout))


def status(hosts: list[str], *, concurrency: int = 8, host_timeout: float = 60.0, **ssh: Any) -> list[HostResult]:
    """What every device runs, read from the devices without running anything."""
    return _on_each(hosts, "status", concurrency=concurrency, host_timeout=host_timeout, **ssh)


def rollback(hosts: list[str], *, concurrency: int = 4, host_timeout: float = 120.0, **ssh: Any) -> list[HostResult]:
    """Switch every device back to its previous release (and that release's last result)."""
    return _on_each(hosts, "rollback", concurrency=concurrency, host_timeout=host_timeout, **ssh)


def _table(head: tuple[str, ...], rows: list[tuple], results: list[HostResult]) -> str:
    rows = [head, *rows]
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    for r in results:
        notes = [r.message] if r.message else []
        if r.host_key_added:
            notes.append(f"new host key recorded: {r.host_key_added}")
        result = r.result or {}
        if result.get("note"):
            notes.append(result["note"])
        notes += [f"warning: {w}" for w in (result.get("device") or {}).get("warnings", [])]
        lines += [f"{r.host}: {n}" for n in notes]
    return "\n".join(lines)


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_table(results: list[HostResult]) -> str:
    head = ("host", "status", "release", "backend", "tensorrt", "prec", "agree %", "acc %", "median_ms", "sent/skip")
    rows = []
    for r in results:
        out = r.result or {}
        ver, bench = out.get("verification") or {}, out.get("benchmark") or {}
        rows.append((r.host, "ok" if r.ok else f"FAIL({r.stage})", r.release or "-", out.get("backend") or "-",
                     (out.get("device") or {}).get("tensorrt") or "-", out.get("precision") or "-",
                     _fmt(ver.get("top1_agreement_pct"), ".2f"), _fmt(ver.get("accuracy_pct"), ".2f"),
                     _fmt(bench.get("median_ms"), ".3f"), f"{len(r.sent)}/{len(r.skipped)}"))
    return _table(head, rows, results)


def format_status(results: list[HostResult]) -> str:
    head = ("host", "release", "bundle sha", "tensorrt", "backend", "engine", "verdict", "median_ms", "when")
    rows = []
    for r in results:
        st = r.result or {}
        res = st.get("result") or {}
        engine = res.get("engine")
        built = "-" if not engine else ("cached" if engine.get("cached") else "built")
        verdict = (res.get("status") or "-") if st.get("installed") else "not installed"
        if st.get("installed") and res and not st.get("result_is_current"):
            verdict += " (older release)"
        rows.append((r.host, st.get("current") or "-", (st.get("manifest_sha256") or "-")[:12],
                     (res.get("device") or {}).get("tensorrt") or "-", res.get("backend") or "-", built,
                     verdict if r.ok else f"UNREACHABLE({r.stage})", _fmt((res.get("benchmark") or {})
                                                                         .get("median_ms"), ".3f"),
                     res.get("finished_at") or "-"))
    return _table(head, rows, [r for r in results if not r.ok])
