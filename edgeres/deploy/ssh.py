"""Deploy a bundle to a fleet over SSH (asyncssh): copy what changed, run the device runtime, fetch its JSON.

Per host: verify the host key against known_hosts (new keys only with accept_new_host_keys, and then
recorded there; a changed key is always refused) -> ask the device for the sha256 of the bundle files it
already has -> send only the others over SFTP (written as NAME.part, then renamed) -> run
`python3 device_runtime.py` in the bundle folder -> read its result.json. Hosts run in parallel with bounded
concurrency; one failing host never stops the others. Every remote command is built with shlex.quote.
"""
from __future__ import annotations

import asyncio
import getpass
import json
import re
import shlex
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeres.errors import ConfigError
from edgeres.io import sha256_file

EXECUTABLE = ("device_runtime.py", "edgeres-device")
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


@dataclass(frozen=True)
class HostSpec:
    user: str
    host: str
    port: int = 22

    @property
    def label(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")


def parse_host(spec: str, *, default_port: int = 22) -> HostSpec:
    """'user@host', 'user@host:2222', 'host', 'user@[::1]:2222' -> HostSpec."""
    m = re.fullmatch(r"(?:([A-Za-z0-9._][A-Za-z0-9._-]*)@)?(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_][A-Za-z0-9._-]*)"
                     r"(?::(\d{1,5}))?", spec.strip())
    if not m:   # ASCII names only, never starting with '-' (ssh would read '-oProxyCommand=...' as an option)
        raise ConfigError(f"bad host {spec!r}: expected USER@HOST[:PORT] (letters, digits, '.', '_', '-')")
    port = int(m.group(3)) if m.group(3) else default_port
    if not 0 < port < 65536:
        raise ConfigError(f"bad port in {spec!r}")
    return HostSpec(m.group(1) or getpass.getuser(), m.group(2).strip("[]"), port)


@dataclass
class HostResult:
    host: str
    ok: bool = False
    stage: str = "connect"          # where it stopped: connect, copy, run, done
    message: str = ""
    sent: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    exit_status: int | None = None
    result: dict[str, Any] | None = None
    host_key_added: str | None = None   # fingerprint recorded in known_hosts under --accept-new-host-keys
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Options:
    known_hosts: Path
    accept_new: bool
    identity: Path | None
    remote_dir: str
    remote_python: str
    runtime_args: tuple[str, ...]
    connect_timeout: float
    run_timeout: float


def _known_hosts_line(spec: HostSpec, key) -> str:
    name = spec.host if spec.port == 22 else f"[{spec.host}]:{spec.port}"
    return f"{name} {key.export_public_key().decode().strip()}\n"


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def read_known_hosts(path: Path):
    """known_hosts as asyncssh reads it (hashed entries included), or one clear error for a file it cannot read."""
    import asyncssh

    if not path.is_file():
        return asyncssh.import_known_hosts("")
    try:
        return asyncssh.import_known_hosts(path.read_text(encoding="utf-8"))
    except (ValueError, asyncssh.KeyImportError) as e:   # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{path} is not a readable known_hosts file ({str(e).splitlines()[0][:120]})") from None


async def _connect(spec: HostSpec, opts: _Options, res: HostResult):
    import asyncssh

    kh_path = opts.known_hosts
    known = read_known_hosts(kh_path)
    keys, ca_keys = known.match(spec.host, spec.host if _is_ip(spec.host) else "", spec.port)[:2]
    if not keys and not ca_keys:
        if not opts.accept_new:
            raise ConfigError(f"host key of {spec.label} is not in {kh_path}; add it (ssh-keyscan) or pass "
                              f"--accept-new-host-keys")
        key = await asyncio.wait_for(asyncssh.get_server_host_key(spec.host, spec.port), opts.connect_timeout)
        if key is None:
            raise ConfigError(f"{spec.label} offered no host key")
        kh_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(kh_path, "a") as f:
            f.write(_known_hosts_line(spec, key))
        res.host_key_added = key.get_fingerprint()
        known = read_known_hosts(kh_path)
    kwargs: dict[str, Any] = dict(port=spec.port, username=spec.user, known_hosts=known,
                                  connect_timeout=opts.connect_timeout)
    if opts.identity is not None:
        kwargs.update(client_keys=[str(opts.identity)], agent_path=None)
    try:
        return await asyncssh.connect(spec.host, **kwargs)
    except asyncssh.HostKeyNotVerifiable:
        raise ConfigError(f"host key of {spec.label} does not match {kh_path}: refused (possible "
                          f"man-in-the-middle; if the device was reflashed, remove its old entry with "
                          f"ssh-keygen -R)") from None


async def _deploy_host(spec: HostSpec, bundle: Path, manifest: dict, opts: _Options,
                       sem: asyncio.Semaphore) -> HostResult:
    import asyncssh

    q = shlex.quote
    res = HostResult(spec.label)
    t0 = time.monotonic()
    async with sem:
        try:
            conn = await _connect(spec, opts, res)
        except (OSError, asyncssh.Error, asyncio.TimeoutError, ConfigError) as e:
            res.message = _describe(e)
            res.duration_s = round(time.monotonic() - t0, 3)
            return res
        try:
            async with conn:
                names = [*sorted(manifest["files"]), "manifest.json"]  # manifest last: it commits the copy
                rdir, py = opts.remote_dir, opts.remote_python
                res.stage = "copy"
                probe = await conn.run(f"mkdir -p -- {q(rdir)} && cd -- {q(rdir)} && {q(py)} -c "
                                       f"{q(REMOTE_SHA256)} " + " ".join(q(n) for n in names),
                                       check=False, timeout=opts.connect_timeout * 4)
                if probe.exit_status != 0:
                    raise _Failure(f"cannot read the device's bundle folder {rdir!r} with {py} "
                                   f"(exit {probe.exit_status}): {str(probe.stderr).strip()[-300:]}")
                remote = json.loads(str(probe.stdout).strip().splitlines()[-1])
                local = {n: manifest["files"][n]["sha256"] for n in names[:-1]}
                local["manifest.json"] = sha256_file(bundle / "manifest.json")
                async with conn.start_sftp_client() as sftp:
                    for name in names:
                        if remote.get(name) == local[name]:
                            res.skipped.append(name)
                            continue
                        dst, part = f"{rdir}/{name}", f"{rdir}/{name}.part"
                        await sftp.put(str(bundle / name), part)
                        await sftp.chmod(part, 0o755 if name in EXECUTABLE else 0o644)
                        await sftp.posix_rename(part, dst)
                        res.sent.append(name)
                    res.stage = "run"
                    cmd = (f"cd -- {q(rdir)} && rm -f result.json && "
                           f"{q(py)} device_runtime.py --bundle . --out result.json "
                           f"--expect-manifest-sha256 {q(local['manifest.json'])} "
                           + " ".join(q(a) for a in opts.runtime_args))
                    run = await conn.run(cmd, check=False, timeout=opts.run_timeout)
                    res.exit_status = run.exit_status
                    res.result = await _fetch_result(sftp, f"{rdir}/result.json", str(run.stdout))
            status = (res.result or {}).get("status")
            res.ok = run.exit_status == 0 and status == "passed"
            res.stage = "done" if res.ok else "run"
            if not res.ok:
                res.message = ((res.result or {}).get("error") or _gate_message(res.result)
                               or f"device runtime exit {run.exit_status}: {str(run.stderr).strip()[-300:]}")
        except _Failure as e:
            res.message = str(e)
        except (OSError, asyncssh.Error, asyncio.TimeoutError, ValueError) as e:
            res.message = f"{res.stage}: {_describe(e)}"
    res.duration_s = round(time.monotonic() - t0, 3)
    return res


class _Failure(Exception):
    pass


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return f"connection refused ({e})"
    return str(e) or type(e).__name__


async def _fetch_result(sftp, path: str, stdout: str) -> dict | None:
    import asyncssh

    try:
        async with sftp.open(path, "r") as f:
            return json.loads(await f.read())
    except (OSError, ValueError, asyncssh.SFTPError):  # fall back to the JSON line the runtime printed
        pass
    for line in reversed(stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _gate_message(result: dict | None) -> str:
    gates = ((result or {}).get("verification") or {}).get("gates") or []
    failed = [f"{g['name']} {g['value']:.4g} < {g['limit']:.4g}" for g in gates if not g.get("passed")]
    return "gate failed: " + "; ".join(failed) if failed else ""


async def _deploy_all(specs: list[HostSpec], bundle: Path, manifest: dict, opts: _Options,
                      concurrency: int) -> list[HostResult]:
    sem = asyncio.Semaphore(concurrency)
    outs = await asyncio.gather(*(_deploy_host(s, bundle, manifest, opts, sem) for s in specs),
                                return_exceptions=True)
    results = []
    for spec, out in zip(specs, outs):
        if isinstance(out, BaseException):  # a bug for one host must not hide the others' results
            out = HostResult(spec.label, message=f"internal error: {type(out).__name__}: {out}")
        results.append(out)
    return results


def deploy(bundle_dir: str | Path, hosts: list[str], *, concurrency: int = 4, accept_new_host_keys: bool = False,
           known_hosts: str | Path | None = None, remote_dir: str | None = None, identity: str | Path | None = None,
           port: int = 22, remote_python: str = "python3", precision: str = "int8", iterations: int = 200,
           connect_timeout: float = 30.0, run_timeout: float = 3600.0) -> list[HostResult]:
    """Deploy and verify on every host; returns one HostResult per host, in the order given."""
    from edgeres.deploy.bundle import opened_bundle, verify_bundle

    if concurrency < 1:
        raise ConfigError("concurrency must be >= 1")
    if precision not in ("int8", "fp16", "fp32"):
        raise ConfigError(f"precision must be int8, fp16 or fp32, got {precision!r}")
    specs = [parse_host(h, default_port=port) for h in hosts]
    if not specs:
        raise ConfigError("no hosts given")
    if identity is not None and not Path(identity).is_file():
        raise ConfigError(f"identity file not found: {identity}")
    kh = Path(known_hosts).expanduser() if known_hosts else Path("~/.ssh/known_hosts").expanduser()
    read_known_hosts(kh)   # a broken file is one error up front, not one per host
    with opened_bundle(bundle_dir) as bundle:
        manifest = verify_bundle(bundle)   # a bundle altered on this side is refused before any copy
        rdir = remote_dir or f"edgeres/{Path(bundle_dir).name.removesuffix('.tar.gz')}"
        opts = _Options(known_hosts=kh, accept_new=accept_new_host_keys,
                        identity=Path(identity) if identity else None, remote_dir=rdir,
                        remote_python=remote_python,
                        runtime_args=("--precision", precision, "--iterations", str(iterations)),
                        connect_timeout=connect_timeout, run_timeout=run_timeout)
        return asyncio.run(_deploy_all(specs, bundle, manifest, opts, concurrency))


def format_table(results: list[HostResult]) -> str:
    head = ("host", "status", "backend", "tensorrt", "prec", "agree", "acc", "median_ms", "p99_ms", "sent/skip")
    rows = [head]
    for r in results:
        out = r.result or {}
        ver, bench = out.get("verification") or {}, out.get("benchmark") or {}
        fmt = lambda v, spec: "-" if v is None else format(v, spec)
        rows.append((r.host, "ok" if r.ok else f"FAIL({r.stage})", out.get("backend") or "-",
                     (out.get("device") or {}).get("tensorrt") or "-", out.get("precision") or "-",
                     fmt(ver.get("top1_agreement"), ".3f"), fmt(ver.get("accuracy"), ".3f"),
                     fmt(bench.get("median_ms"), ".3f"), fmt(bench.get("p99_ms"), ".3f"),
                     f"{len(r.sent)}/{len(r.skipped)}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    for r in results:
        notes = [r.message] if r.message else []
        if r.host_key_added:
            notes.append(f"new host key recorded: {r.host_key_added}")
        if r.result and r.result.get("note"):
            notes.append(r.result["note"])
        notes += [f"warning: {w}" for w in ((r.result or {}).get("device") or {}).get("warnings", [])]
        lines += [f"{r.host}: {n}" for n in notes]
    return "\n".join(lines)
