"""Every image file of a dataset looked at once, before anything trains: `scan_bundle(bundle) -> data_report`.

For each file: does it decode (with `datasets.decode_image`, the decoder training uses, in JPEG draft mode: cheap),
its format, mode and size as stored, its EXIF orientation and the sha256 of its bytes. The report (a JSON-able dict,
for stages.jsonl and report.json) holds
- readable images per split and class (in-memory datasets - digits, MNIST, CIFAR-10 - have no files: counts only);
- every unreadable file with its reason (not an image, empty, truncated, too large, unreadable), all at once;
- classes with fewer than `min_images` images;
- files with the same bytes: in the evaluation split and in train/holdout (the model is scored on images it learnt),
  within one split, and under two class names;
- the modes found (grayscale, CMYK, 16-bit...) and the photos turned upright by their EXIF orientation.
`format_report` says it in a few lines of at most 80 columns; `check_readable` raises one DataError naming every
unreadable file when bad images are not to be skipped. Files are read by a bounded thread pool (PIL and hashlib
release the GIL), `progress(done, total)` called from the calling thread.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import Enum
from typing import Any

from edgeres.data import gpu
from edgeres.data.datasets import MAX_IMAGE_PIXELS, decode_image, exif_orientation, load_imagefolder
from edgeres.data.infer import SPLITS
from edgeres.errors import DataError

REPORT_FORMAT = "edgeres-data-report/1"
MIN_IMAGES = 20       # a class with fewer images (all splits) is named: too few to learn it or to judge it
MAX_WORKERS = 8       # threads reading files, whatever `workers` asks
DRAFT = 64            # JPEG: decode at 1/8 scale (libjpeg still reads every byte: a truncated file still fails)
WIDTH = 80            # format_report's lines
SHOWN = 4             # files named per line of format_report (all of them are in the report)


class Reason(str, Enum):
    NOT_AN_IMAGE = "not an image"
    EMPTY = "empty file"
    TRUNCATED = "truncated"
    TOO_LARGE = "too large"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class FileScan:
    path: str
    label: int
    split: str
    ok: bool
    sha256: str | None = None
    format: str | None = None
    mode: str | None = None
    size: tuple[int, int] | None = None   # width, height as stored
    orientation: int = 1                  # EXIF orientation (1: as stored)
    reason: str | None = None             # Reason value, when not ok
    detail: str | None = None             # the decoder's own words


def scan_file(path: str, label: int = 0, split: str = "train", *, channels: int = 3) -> FileScan:
    """One file: its bytes hashed, its header read, then decoded as training decodes it. Never raises for a bad
    file (the FileScan says why)."""
    from PIL import Image, UnidentifiedImageError

    def bad(reason: Reason, detail: str, **kw) -> FileScan:
        return FileScan(path, label, split, False, reason=reason.value, detail=detail[:200], **kw)

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return bad(Reason.UNREADABLE, f"{type(e).__name__}: {e.strerror or e}")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return bad(Reason.EMPTY, "0 bytes", sha256=digest)
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, mode, size, orient = im.format, im.mode, (int(im.size[0]), int(im.size[1])), exif_orientation(im)
    except (UnidentifiedImageError, Image.DecompressionBombError) as e:
        too_big = isinstance(e, Image.DecompressionBombError)
        return bad(Reason.TOO_LARGE if too_big else Reason.NOT_AN_IMAGE,
                   str(e) if too_big else f"no image format recognised (starts {data[:8]!r})", sha256=digest)
    except (OSError, ValueError, SyntaxError) as e:
        return bad(_reason_of(_first(e)), _first(e), sha256=digest)
    info = dict(sha256=digest, format=fmt, mode=mode, size=size, orientation=orient)
    if size[0] * size[1] > MAX_IMAGE_PIXELS:
        return bad(Reason.TOO_LARGE, f"{size[0]}x{size[1]} pixels, more than {MAX_IMAGE_PIXELS}", **info)
    try:
        decode_image(path, channels, draft=DRAFT)
    except DataError as e:
        words = _decoder_words(str(e))
        return bad(_reason_of(words), words, **info)
    return FileScan(path, label, split, True, **info)


def _reason_of(words: str) -> Reason:
    """PIL's words for a file that ends early (in its header or in its pixel data) -> TRUNCATED."""
    low = words.lower()
    return Reason.TRUNCATED if any(k in low for k in ("truncated", "broken data stream", "premature end")) \
        else Reason.UNREADABLE


def _first(e: BaseException) -> str:
    return ((str(e).strip().splitlines() or [type(e).__name__])[0])[:200]


def _decoder_words(message: str) -> str:
    """decode_image's "corrupt or unreadable image PATH (WORDS); pass ..." -> WORDS."""
    start, end = message.find(" ("), message.rfind(")")
    return message[start + 2:end] if 0 <= start < end else message


def _bounded_map(fn: Callable[[Any], FileScan], items: list, workers: int) -> Iterator[tuple[int, FileScan]]:
    """(index, fn(item)) as they finish, with at most 2 x workers items in flight (a million files are never a
    million futures)."""
    with ThreadPoolExecutor(workers, thread_name_prefix="edgeres-scan") as ex:
        pending: dict[Future, int] = {}
        it = iter(enumerate(items))
        for i, item in it:
            pending[ex.submit(fn, item)] = i
            if len(pending) >= 2 * workers:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield pending.pop(fut), fut.result()
                nxt = next(it, None)
                if nxt is not None:
                    pending[ex.submit(fn, nxt[1])] = nxt[0]


def scan_files(items: Iterable[tuple[str, int, str]], *, class_names: Iterable[str] | None = None,
               root: str | None = None, channels: int = 3, workers: int = 2, min_images: int = MIN_IMAGES,
               progress: Callable[[int, int], None] | None = None, skipped: Iterable[tuple[str, int, str]] = (),
               ) -> dict[str, Any]:
    """The data_report of (path, label, split) files (splits as infer.SPLITS names them). `skipped`: files the
    loader left out (--skip-bad-images), scanned for their reason and counted in no split. Paths in the report are
    relative to `root` when given."""
    start = time.perf_counter()
    items = [(str(p), int(lb), str(s), False) for p, lb, s in items] + \
            [(str(p), int(lb), str(s), True) for p, lb, s in skipped]
    results: list[FileScan | None] = [None] * len(items)
    if progress is not None:
        progress(0, len(items))
    workers = max(1, min(int(workers), MAX_WORKERS, len(items) or 1))
    for done, (i, res) in enumerate(_bounded_map(lambda it: scan_file(it[0], it[1], it[2], channels=channels),
                                                 items, workers), 1):
        results[i] = res
        if progress is not None:
            progress(done, len(items))
    names = list(class_names) if class_names is not None else None

    def rel(p: str) -> str:
        return os.path.relpath(p, root).replace(os.sep, "/") if root else p

    def cname(label: int) -> str:
        return names[label] if names and 0 <= label < len(names) else str(label)

    readable = [r for r, it in zip(results, items) if r.ok and not it[3]]
    report = counts_report([(r.label, r.split) for r in readable], class_names=names, min_images=min_images)
    bad = [r for r in results if not r.ok]
    report["unreadable"] = [{"path": rel(r.path), "split": r.split, "class": cname(r.label), "reason": r.reason,
                             "detail": r.detail, "skipped": it[3]} for r, it in zip(results, items) if not r.ok]
    by_hash: dict[str, list[FileScan]] = defaultdict(list)
    for r in results:
        if r.ok and r.sha256:
            by_hash[r.sha256].append(r)
    groups = []
    for digest, same in sorted(by_hash.items(), key=lambda kv: rel(kv[1][0].path)):
        if len(same) < 2:
            continue
        splits = sorted({r.split for r in same})
        groups.append({"sha256": digest, "files": [{"path": rel(r.path), "split": r.split, "class": cname(r.label)}
                                                   for r in same],
                       "leak": "evaluation" in splits and len(splits) > 1,
                       "classes_differ": len({r.label for r in same}) > 1})
    good = [r for r in results if r.ok]
    report.update({
        "files": len(items),
        "duplicates": groups,
        "evaluation_in_training": sum(1 for g in groups if g["leak"] for f in g["files"] if f["split"] == "evaluation"),
        "modes": dict(sorted(Counter(r.mode for r in good).items(), key=lambda kv: (-kv[1], str(kv[0])))),
        "formats": dict(sorted(Counter(r.format for r in good).items(), key=lambda kv: (-kv[1], str(kv[0])))),
        "rotated": sum(1 for r in good if r.orientation != 1),
        "bad_count": len(bad),
        "seconds": round(time.perf_counter() - start, 3),
    })
    return report


def counts_report(labelled: Iterable[tuple[int, str]], *, class_names: list[str] | None = None,
                  min_images: int = MIN_IMAGES) -> dict[str, Any]:
    """Images per split and class from (label, split) pairs, and the classes under `min_images` in all splits."""
    per: dict[str, Counter] = {s: Counter() for s in SPLITS}
    for label, split in labelled:
        per.setdefault(split, Counter())[int(label)] += 1
    n = len(class_names) if class_names else 1 + max((lb for c in per.values() for lb in c), default=-1)
    names = list(class_names) if class_names else [str(i) for i in range(n)]
    totals = [sum(per[s][i] for s in per) for i in range(n)]
    return {"format": REPORT_FORMAT, "classes": names,
            "counts": {s: [per[s][i] for i in range(n)] for s in per},
            "images": {s: sum(per[s].values()) for s in per},
            "min_images": min_images,
            "small_classes": [{"class": names[i], "images": totals[i],
                               **{s: per[s][i] for s in per}} for i in range(n) if totals[i] < min_images]}


# ---------------------------------------------------------------------------------------------------- a DataBundle

def bundle_files(bundle) -> list[tuple[str, int, str]] | None:
    """(path, label, split) of every file of a DataBundle's train, holdout and evaluation splits; None for an
    in-memory dataset."""
    out = []
    for name, split in zip(SPLITS, (bundle.train, bundle.holdout, bundle.test)):
        if split is None:
            continue
        base, idx = gpu.base_of(split)
        source = getattr(base, "source", None)
        files = getattr(source, "files", ())
        if not files:
            return None
        chosen = range(len(files)) if idx is None else idx
        out += [(files[i], int(source.labels[i]), name) for i in chosen]
    return out


def _skipped_files(bundle, listed: list[tuple[str, int, str]], workers: int) -> list[tuple[str, int, str]]:
    """The files the loader left out with skip_bad_images: the folder listed again without skipping (nothing is
    decoded), minus those in the bundle; each with the split it would have been in."""
    info = bundle.info
    if not info.skipped_images or not info.root:
        return []
    train, evaluation, *_ = load_imagefolder(info.root, channels=info.in_channels, skip_bad_images=False,
                                             workers=workers, val_split=info.val_split or 0.2)
    have = {p for p, _, _ in listed}
    return [(p, int(lb), name) for name, src in (("train", train), ("evaluation", evaluation))
            for p, lb in zip(src.files, src.labels) if p not in have]


def scan_bundle(bundle, *, workers: int = 2, min_images: int = MIN_IMAGES,
                progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """The data_report of a DataBundle (edgeres.data.get_data_for): every file of every split, and the files the
    loader skipped (--skip-bad-images) with their reasons. In-memory datasets: counts per split and class only."""
    import numpy as np

    info = bundle.info
    files = bundle_files(bundle)
    if files is None:
        start = time.perf_counter()
        pairs = []
        for name, split in zip(SPLITS, (bundle.train, bundle.holdout, bundle.test)):
            labels = _labels_of(split)
            pairs += [(int(lb), name) for lb in (labels if labels is not None else np.zeros(0, dtype=np.int64))]
        report = counts_report(pairs, class_names=list(info.class_names), min_images=min_images)
        report.update(files=0, unreadable=[], duplicates=[], evaluation_in_training=0, modes={}, formats={},
                      rotated=0, bad_count=0, in_memory=True, seconds=round(time.perf_counter() - start, 3))
        return report
    skipped = _skipped_files(bundle, files, workers)
    return scan_files(files, class_names=info.class_names, root=info.root, channels=info.in_channels,
                      workers=workers, min_images=min_images, progress=progress, skipped=skipped)


def _labels_of(split):
    import numpy as np

    if split is None:
        return None
    base, idx = gpu.base_of(split)
    labels = getattr(base, "labels", None)
    if labels is None:
        return None
    labels = np.asarray(labels)
    return labels if idx is None else labels[np.asarray(idx, dtype=np.int64)]


# ---------------------------------------------------------------------------------------------------- what to say

def check_readable(report: dict[str, Any], *, skip_bad_images: bool) -> None:
    """DataError naming EVERY unreadable file (one per line, with its reason) unless they are to be skipped."""
    bad = [u for u in report.get("unreadable", []) if not u.get("skipped")]
    if not bad or skip_bad_images:
        return
    lines = [f"{len(bad)} image file(s) cannot be read; fix or remove them, or pass --skip-bad-images to train "
             f"without them:"]
    lines += [f"  {u['path']}: {u['reason']} ({u['detail']})" for u in bad]
    raise DataError("\n".join(lines))


def format_report(report: dict[str, Any], *, width: int = WIDTH) -> list[str]:
    """The report in a few lines of at most `width` columns; the full lists are in the report itself."""
    images = report.get("images", {})
    splits = ", ".join(f"{s} {n}" for s, n in images.items() if n or s != "holdout")
    head = f"scan: {report.get('files', 0)} files in {report.get('seconds', 0):.1f} s: {splits}" \
        if not report.get("in_memory") else f"scan: in-memory data: {splits}"
    lines = _wrap(head, width=width)
    bad = report.get("unreadable", [])
    if bad:
        verb = "skipped" if all(u.get("skipped") for u in bad) else "cannot be read"
        lines += _wrap(f"  {len(bad)} unreadable ({verb}):", [f"{u['path']} ({u['reason']})" for u in bad], width)
    small = report.get("small_classes", [])
    if small:
        lines += _wrap(f"  {len(small)} class(es) under {report.get('min_images')} images:",
                       [f"{c['class']} {c['images']}" for c in small], width)
    dups = report.get("duplicates", [])
    if dups:
        notes = [f"{report.get('evaluation_in_training', 0)} evaluation image(s) in training"] \
            if any(g["leak"] for g in dups) else []
        notes += [f"{sum(g['classes_differ'] for g in dups)} in two classes"] \
            if any(g["classes_differ"] for g in dups) else []
        text = f"  {len(dups)} set(s) of identical files" + (f" ({', '.join(notes)})" if notes else "")
        shown = sorted(dups, key=lambda g: (not g["leak"], not g["classes_differ"]))
        lines += _wrap(text + ":", [" = ".join(f["path"] for f in g["files"][:2]) for g in shown], width)
    modes = {m: n for m, n in report.get("modes", {}).items() if m not in ("RGB", None)}
    if modes or report.get("rotated"):
        parts = [f"{n} {m}" for m, n in modes.items()] + \
                ([f"{report['rotated']} turned upright (EXIF)"] if report.get("rotated") else [])
        lines += _wrap("  converted to the model's channels:", parts, width)
    return lines


def _wrap(head: str, items: list[str] | None = None, width: int = WIDTH) -> list[str]:
    """`head` and up to SHOWN `items` (then how many more), in lines of at most `width` columns, broken between
    words of the head and between items, never inside an item (one longer than a line is cut with "...")."""
    items = list(items or [])
    shown = items[:SHOWN] + ([f"... ({len(items) - SHOWN} more in the data report)"] if len(items) > SHOWN else [])
    pieces = [f"{x}," for x in shown[:-1]] + shown[-1:]
    lead = head[:len(head) - len(head.lstrip())]
    indent = lead + "  "
    lines, line = [], lead
    for piece in head.split() + pieces:
        if line.strip() and len(line) + 1 + len(piece) > width:
            lines.append(line)
            line = indent
        line += piece if line in (lead, indent) else " " + piece
    lines.append(line)
    return [ln if len(ln) <= width else ln[:width - 3] + "..." for ln in lines]


def progress_printer(label: str = "scan", *, stream=None, every_s: float = 0.5) -> Callable[[int, int], None]:
    """progress(done, total) that rewrites one line in place on a terminal ("scan: 120/331 files"), and says
    nothing elsewhere (a log gets the summary only)."""
    import sys

    out = stream or sys.stdout
    tty = getattr(out, "isatty", lambda: False)()
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if not tty or (done not in (0, total) and now - last[0] < every_s):
            return
        last[0] = now
        out.write(f"\r{label}: {done}/{total} files" + ("\r" + " " * (len(label) + 24) + "\r" if done == total
                                                          else ""))
        out.flush()

    return progress


__all__ = ["FileScan", "MIN_IMAGES", "Reason", "bundle_files", "check_readable", "counts_report",
           "format_report", "progress_printer", "scan_bundle", "scan_file", "scan_files"]
