"""Atomic writes and hashing: an artifact is either complete on disk or absent."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeres.errors import ConfigError, EdgeresError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; an artifact gets the mode any new file would
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_writable_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Create `path` if needed and prove a file can be written there, before any work starts (not after an epoch)."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".edgeres-write-test.", dir=p)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"cannot write to {what} {p}: {e.strerror or e}") from None
    return p


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def refuse_overwrite(path: str | os.PathLike, force: bool = False) -> None:
    """Before any work: raise unless `path` is absent or (with `force`) a regular file (check_replaceable: never a
    folder, link, FIFO, device or socket), or if its folder cannot be written."""
    p = check_replaceable(path, force)
    ensure_writable_dir(p.parent if str(p.parent) else Path("."))


# ------------------------------------------------------------------------------------------------ ownership
# edgeres writes, replaces or deletes only paths it created and can recognise as its own (git will not overwrite
# untracked files; pip removes only the files in RECORD). A folder edgeres creates carries MARKER; a bundle folder
# is recognised by its manifest. Every `--out` goes through one of the checks below before any work starts.

MARKER = ".edgeres"
MAX_TEXT_BYTES = 16 << 20   # recipes, plans, records, manifests: text files a user can read


def _kind(mode: int) -> str | None:
    """'a FIFO', 'a device'... for what is not a regular file or a folder (None for those)."""
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return None


def special_file(path: str | os.PathLike) -> str | None:
    """What `path` is when it exists but is neither a regular file nor a folder (links followed), else None."""
    try:
        return _kind(os.stat(path).st_mode)
    except OSError:
        return None


def require_regular_file(path: str | os.PathLike, what: str = "file", error: type | None = None) -> Path:
    """`path` must be an existing regular file: a FIFO would block forever, a device read without end."""
    err = error or ConfigError
    p = Path(path)
    kind = special_file(p)
    if kind:
        raise err(f"{what} {p} is {kind}, not a regular file; refused")
    if p.is_dir():
        raise err(f"{what} {p} is a folder, not a file")
    if not p.is_file():
        raise err(f"{what} not found: {p}")
    return p


def read_small_bytes(path: str | os.PathLike, what: str = "file", limit: int = MAX_TEXT_BYTES,
                     error: type | None = None) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (never a FIFO, a device or a huge file)."""
    p = require_regular_file(path, what, error)
    if p.stat().st_size > limit:
        raise (error or ConfigError)(f"{what} {p} is {p.stat().st_size} bytes; more than the {limit} a "
                                     f"{what} may have")
    return p.read_bytes()


def check_replaceable(path: str | os.PathLike, force: bool = False, what: str = "--out") -> Path:
    """A file edgeres may write at `path`: absent, or (with `force`) a regular file. Never a folder, a link, a
    FIFO, a device or a socket, whatever `force` says."""
    p = Path(path)
    mode = _lstat_mode(p, what)
    if mode is None:
        return p
    if stat.S_ISDIR(mode):
        raise ConfigError(f"{what} {p} is a folder; give a file path")
    kind = _kind(mode)
    if kind:
        raise ConfigError(f"{what} {p} is {kind}; edgeres replaces only regular files it wrote, even with --force")
    if not force:
        raise ConfigError(f"{p} already exists; pass --force to replace it")
    return p


def _lstat_mode(p: Path, what: str) -> int | None:
    """The path's own mode (links not followed), None when nothing is there; any other OSError is one line."""
    try:
        return os.lstat(p).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"{what} {p}: {e.strerror or e}") from None


def check_owned_dir(path: str | os.PathLike, *, what: str = "--out", legacy: tuple[str, ...] = (),
                    owner_parent: bool = False) -> bool:
    """May edgeres write into folder `path`? True when it exists as edgeres's own (it carries MARKER, or one of the
    `legacy` files an older edgeres left there, or with `owner_parent` its parent carries MARKER), False when it does
    not exist or is empty (edgeres will create/claim it). Anything else is refused: a file, a link, a special file,
    or a folder with someone else's files. Writes nothing."""
    p = Path(path)
    mode = _lstat_mode(p, what)
    if mode is None:
        return False
    if not stat.S_ISDIR(mode):
        kind = _kind(mode) or "a file"
        raise ConfigError(f"{what} {p} is {kind}, not a folder edgeres made; choose a new folder")
    if (p / MARKER).is_file() or (owner_parent and (p.parent / MARKER).is_file()):
        return True
    if any((p / name).is_file() for name in legacy):
        return True
    try:
        if next(p.iterdir(), None) is None:
            return False
    except OSError as e:
        raise ConfigError(f"{what} {p}: {e.strerror or e}") from None
    raise ConfigError(f"{what} {p} is a folder edgeres did not create (no {MARKER} marker) and is not empty; "
                      f"edgeres writes only into folders it made: choose a new or empty folder")


def claim_dir(path: str | os.PathLike, *, what: str = "output folder", kind: str = "run",
              legacy: tuple[str, ...] = (), owner_parent: bool = False) -> Path:
    """Check `path` as check_owned_dir does, then create it if needed and mark it as edgeres's own."""
    p = Path(path)
    check_owned_dir(p, what=what, legacy=legacy, owner_parent=owner_parent)
    ensure_writable_dir(p, what)
    if not (p / MARKER).is_file():
        atomic_write_json(p / MARKER, {"created_by": "edgeres", "kind": kind})
    return p


# A folder edgeres made records, in its MARKER, the files it wrote there with their sha256 (pip's RECORD): only those,
# unchanged since, are ever replaced or deleted; a file the user added or edited there is theirs.

def _marker(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_small_bytes(folder / MARKER, "edgeres marker"))
    except (EdgeresError, ValueError, OSError):
        return {}
    return data if isinstance(data, dict) else {}


def recorded_files(folder: str | os.PathLike) -> dict[str, str] | None:
    """The files edgeres recorded writing into `folder` (relative path -> sha256), None when its marker records none
    (a folder an older edgeres made, or none at all)."""
    files = _marker(Path(folder)).get("files")
    if not isinstance(files, dict):
        return None
    return {str(k): str(v) for k, v in files.items()}


def record_files(folder: str | os.PathLike, names: list[str] | tuple[str, ...], *, kind: str = "run",
                 forget: tuple[str, ...] = ()) -> None:
    """After edgeres wrote `names` (paths relative to `folder`): record each with its sha256 in the folder's MARKER
    (created if needed), dropping `forget` (files it deleted)."""
    folder = Path(folder)
    data = _marker(folder) or {"created_by": "edgeres", "kind": kind}
    files = {k: v for k, v in (recorded_files(folder) or {}).items() if k not in forget}
    files.update({name: sha256_file(folder / name) for name in names})
    atomic_write_json(folder / MARKER, {**data, "files": dict(sorted(files.items()))})


def check_own_files(folder: str | os.PathLike, names: list[str] | tuple[str, ...], *, force: bool,
                    fallback: tuple[str, ...] = (), what: str = "--out") -> list[str]:
    """Before edgeres writes (or deletes) `names` in its folder: the ones that exist, each checked to be a regular
    file edgeres wrote and nobody changed since: recorded in the folder's MARKER with the same sha256, or, in a
    folder that records nothing, one of `fallback` (what an older edgeres wrote). A user's file (unrecorded or
    edited) is refused whatever `force` says, so is a link, a folder or a FIFO; any other existing file without
    `force`."""
    folder = Path(folder)
    record = recorded_files(folder)
    held = []
    for name in names:
        path = folder / name
        if _lstat_mode(path, what) is None:
            continue
        check_replaceable(path, True, what=f"{what} file")   # a regular file, never a link, folder or FIFO
        ours = name in fallback if record is None else record.get(name) == sha256_file(path)
        if not ours:
            raise ConfigError(f"{path} is not a file edgeres wrote (or it was changed since); edgeres will not "
                              f"replace or delete it, even with --force: move it away or choose another {what}")
        held.append(name)
    if held and not force:
        raise ConfigError(f"{folder / held[0]} already exists; pass --force to replace it")
    return held


def check_bundle_out(path: str | os.PathLike, force: bool, *, manifest: str = "manifest.json",
                     fmt_prefix: str = "edgeres-bundle/", unlisted: tuple[str, ...] = ("signature.json",)) -> Path:
    """A bundle `--out`: absent, or (with `force`) a bundle edgeres made: a folder holding only the files its
    manifest lists (and `unlisted`: the signature beside the manifest), or a regular .tar.gz file. Anything else
    (the user's folder, a run, a folder of runs) is refused, so `--force` can never delete it."""
    p = Path(path)
    if p.name.endswith(".tar.gz"):
        return check_replaceable(p, force)
    try:
        mode = os.lstat(p).st_mode
    except FileNotFoundError:
        return p
    if not stat.S_ISDIR(mode):
        raise ConfigError(f"--out {p} is {_kind(mode) or 'a file'}, not a bundle folder; refused")
    try:
        data = json.loads(read_small_bytes(p / manifest, "bundle manifest"))
        ok = isinstance(data, dict) and str(data.get("format", "")).startswith(fmt_prefix) and \
            isinstance(data.get("files"), dict)
    except (EdgeresError, ValueError, OSError):
        ok = False
    if not ok:
        raise ConfigError(f"--out {p} exists and is not a bundle edgeres made (no readable {manifest}); "
                          f"edgeres will not replace or delete it, even with --force")
    extra = sorted(c.name for c in p.iterdir() if c.name not in data["files"] and c.name not in (manifest, *unlisted))
    if extra:
        raise ConfigError(f"--out {p} holds files the bundle did not make ({', '.join(extra[:5])}); edgeres will "
                          f"not delete them: move them away or choose another --out")
    for name, entry in sorted(data["files"].items()):   # what sits at a listed name must be the file the bundle wrote
        member = p / name
        mode = _lstat_mode(member, "bundle member")
        if mode is None:
            continue
        want = entry.get("sha256") if isinstance(entry, dict) else None
        if not stat.S_ISREG(mode) or (want and sha256_file(member) != want):
            what = _kind(mode) or ("a folder" if stat.S_ISDIR(mode) else "changed since the bundle wrote it")
            raise ConfigError(f"--out {p}: {name} is {what}, not the file the bundle wrote; edgeres will not "
                              f"delete it, even with --force: move it away or choose another --out")
    if not force:
        raise ConfigError(f"{p} already exists; pass --force to replace it")
    return p


def rejected_path(path: str | os.PathLike) -> Path:
    """Where a stage keeps the artifact its gate rejected: beside the output, <name>.rejected<suffix>
    (model_int8.onnx -> model_int8.rejected.onnx), so the output path keeps what was there."""
    path = Path(path)
    return path.with_name(f"{path.stem}.rejected{path.suffix}")
