"""Published ImageNet weights by name: `--init-from torchvision:resnet18`.

torchvision publishes its ImageNet-1k weights as `<arch>-<first 8 hex digits of the file's sha256>.pth` (that prefix
is what torchvision itself checks on download). edgeres's models use torchvision's state_dict names, so those files
load unchanged. The file is fetched into the cache when the network allows and checked against its published
sha256 prefix; offline, one line says which file and URL to fetch and where to put it. `edgeres weights` lists,
fetches (from a mirror too: --url or $EDGERES_WEIGHTS_URL) and imports them; every file enters the cache through a
temporary file renamed into place only after its hash matched, so the cache never holds a half-written file.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from edgeres.errors import ConfigError
from edgeres.io import atomic_path, require_regular_file, sha256_file
from edgeres.suggest import unknown_name

SCHEME = "torchvision:"
BASE_URL = "https://download.pytorch.org/models/"
URL_ENV = "EDGERES_WEIGHTS_URL"   # a mirror holding the published files under their published names
# torchvision's IMAGENET1K_V1 weights (the file names of torchvision.models)
PUBLISHED = {
    "resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth", "resnet50": "resnet50-0676ba61.pth",
    "resnet101": "resnet101-63fe2227.pth", "resnet152": "resnet152-394f9c45.pth",
    "densenet121": "densenet121-a639ec97.pth", "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth", "densenet161": "densenet161-8d451a50.pth",
}


def cache_dir() -> Path:
    """$EDGERES_WEIGHTS, else ~/.cache/edgeres/weights."""
    if os.environ.get("EDGERES_WEIGHTS"):
        return Path(os.environ["EDGERES_WEIGHTS"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeres" / "weights"


def _prefix(name: str) -> str:
    return name.rsplit("-", 1)[1].split(".")[0]


def base_url() -> str:
    """$EDGERES_WEIGHTS_URL (a mirror), else torchvision's own download folder."""
    return os.environ.get(URL_ENV) or BASE_URL


def file_url(name: str, url: str | None = None) -> str:
    """Where to download published file `name`: `url` (or base_url()) as a folder the name is appended to, or, when
    it already ends with the name, the file's own URL."""
    url = url or base_url()
    return url if url.rstrip("/").endswith("/" + name) else url.rstrip("/") + "/" + name


def published_arch(path: str | Path) -> str | None:
    """The architecture a file's name says it is, when it is named as a published file (resnet50-0676ba61.pth)."""
    name = Path(path).name
    return next((arch for arch, published in PUBLISHED.items() if published == name), None)


def _known(arch: str, what: str) -> str:
    if arch not in PUBLISHED:
        raise ConfigError(f"{what}: " + unknown_name("architecture with published weights", arch, PUBLISHED,
                                                      list_all="`edgeres weights list` lists them"))
    return PUBLISHED[arch]


def locations(name: str) -> list[Path]:
    """Where a published file is looked for, in order: the cache (cache_dir()), then torchvision's own cache."""
    return [cache_dir() / name, Path.home() / ".cache" / "torch" / "hub" / "checkpoints" / name]


def available_offline(arch: str, *, verify: bool = False) -> Path | None:
    """The published weights of `arch` on this machine (the cache or $EDGERES_WEIGHTS, or torchvision's cache), None
    when there are none (or no published weights for `arch`): a build may fine-tune from them without a download.
    `verify`: also check the file's sha256 against its published name (reads the whole file)."""
    name = PUBLISHED.get(arch)
    found = next((p for p in locations(name) if p.is_file()), None) if name else None
    if found is not None and verify and not sha256_file(found).startswith(_prefix(name)):
        return None
    return found


def listing() -> list[dict]:
    """Every published file edgeres knows: arch, file, sha256 prefix, URL and where it is cached (None: not)."""
    rows = []
    for arch, name in PUBLISHED.items():
        cached = available_offline(arch)
        rows.append({"arch": arch, "file": name, "sha256_prefix": _prefix(name), "url": file_url(name),
                     "cached": str(cached) if cached else None})
    return rows


def fetch(arch: str, *, url: str | None = None, timeout_s: float = 60.0, say=None) -> Path:
    """Download `arch`'s published file into the cache (from `url`: a mirror folder or the file's URL), checked
    against its published sha256 prefix; a cached file that fails the check is replaced. Returns its path."""
    name = _known(arch, "weights fetch")
    dest = cache_dir() / name
    if dest.is_file() and sha256_file(dest).startswith(_prefix(name)):
        (say or (lambda m: None))(f"{dest} is in the cache already (sha256 checked)")
        return dest
    _fetch(file_url(name, url), dest, name, timeout_s, say, what=f"weights fetch {arch}")
    return dest


def import_file(src: str | Path, *, arch: str | None = None) -> Path:
    """Copy a local file into the cache under its published name, after checking its sha256: against `arch`'s
    published file, or else against every published file (the hash says which one it is, whatever its name)."""
    src = require_regular_file(src, "weights file")
    got = sha256_file(src)
    names = [_known(arch, "weights import")] if arch else list(PUBLISHED.values())
    name = next((n for n in names if got.startswith(_prefix(n))), None)
    if name is None:
        expected = f"{_prefix(names[0])} ({names[0]})" if arch else "that of a published file (`edgeres weights list`)"
        raise ConfigError(f"weights import {src}: its sha256 starts with {got[:8]}, not {expected}: a different or "
                          f"damaged file; nothing was copied")
    dest = cache_dir() / name
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        _verify(tmp, name, str(src), fresh=f"the copy of {src}")   # what enters the cache is what was checked
    return dest


def resolve(spec: str, *, timeout_s: float = 60.0, say=None) -> str:
    """`torchvision:<arch>` -> the path of the verified published file (fetched once into the cache); any other
    value is returned as it is (a path)."""
    if not spec.startswith(SCHEME):
        return spec
    arch = spec[len(SCHEME):]
    if arch not in PUBLISHED:
        raise ConfigError(f"--init-from {spec}: no published weights for {arch!r}; valid: "
                          f"{', '.join(SCHEME + a for a in PUBLISHED)}")
    name = PUBLISHED[arch]
    url, dest = file_url(name), cache_dir() / name
    for cand in locations(name):
        if cand.is_file():
            _verify(cand, name, url)
            return str(cand)
    _fetch(url, dest, name, timeout_s, say, what=f"--init-from {SCHEME}{arch}")
    return str(dest)


def _verify(path: Path, name: str, url: str, *, fresh: str | None = None) -> None:
    """`path`'s sha256 must start with the prefix in published name `name`. `fresh`: what the file is, when it is a
    temporary copy that will not be kept (a download, an import) rather than a file in the cache."""
    got = sha256_file(path)
    if not got.startswith(_prefix(name)):
        advice = "it was not kept" if fresh else "delete it and fetch it again"
        raise ConfigError(f"{fresh or path}: sha256 {got[:16]}... does not start with {_prefix(name)}, the hash {url} "
                          f"is published with: a different or damaged file; {advice}")


def _fetch(url: str, dest: Path, name: str, timeout_s: float, say, *, what: str) -> None:
    import http.client
    import urllib.error
    import urllib.request

    offline = (f"fetch {url} (its sha256 starts with {_prefix(name)}) on a machine with network access and put it "
               f"at {dest} (or set EDGERES_WEIGHTS to its folder; `edgeres weights import --from FILE` checks and "
               f"copies it there), or pass --init-from PATH")
    (say or (lambda m: None))(f"downloading {url} -> {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout_s) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            _verify(Path(tmp), name, url, fresh=f"the file downloaded from {url}")
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) or str(e) or type(e).__name__
        raise ConfigError(f"{what}: cannot download ({reason}); {offline}") from None
