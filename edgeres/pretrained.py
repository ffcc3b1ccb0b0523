"""Published ImageNet weights by name: `--init-from torchvision:resnet18`.

torchvision publishes its ImageNet-1k weights as `<arch>-<first 8 hex digits of the file's sha256>.pth` (that prefix
is what torchvision itself checks on download). edgeres's models use torchvision's state_dict names, so those files
load unchanged. The file is fetched into the cache when the network allows and checked against its published
sha256 prefix; offline, one line says which file and URL to fetch and where to put it.
"""
from __future__ import annotations

import os
from pathlib import Path

from edgeres.errors import ConfigError
from edgeres.io import atomic_path, sha256_file

SCHEME = "torchvision:"
BASE_URL = "https://download.pytorch.org/models/"
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
    url, dest = BASE_URL + name, cache_dir() / name
    for cand in (dest, Path.home() / ".cache" / "torch" / "hub" / "checkpoints" / name):   # torchvision's own cache
        if cand.is_file():
            _verify(cand, name, url)
            return str(cand)
    _fetch(url, dest, name, timeout_s, say)
    return str(dest)


def _verify(path: Path, name: str, url: str) -> None:
    got = sha256_file(path)
    if not got.startswith(_prefix(name)):
        raise ConfigError(f"{path}: sha256 {got[:16]}... does not start with {_prefix(name)}, the hash {url} is "
                          f"published with: a different or damaged file; delete it and fetch it again")


def _fetch(url: str, dest: Path, name: str, timeout_s: float, say) -> None:
    import urllib.error
    import urllib.request

    offline = (f"fetch {url} (its sha256 starts with {_prefix(name)}) on a machine with network access and put it "
               f"at {dest} (or set EDGERES_WEIGHTS to its folder), or pass --init-from PATH")
    (say or (lambda m: None))(f"downloading {url} -> {dest}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(dest) as tmp:
            with urllib.request.urlopen(url, timeout=timeout_s) as r, open(tmp, "wb") as f:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
            _verify(Path(tmp), name, url)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or e
        raise ConfigError(f"--init-from {SCHEME}{name.split('-')[0]}: cannot download ({reason}); {offline}") from None
