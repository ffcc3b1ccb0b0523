"""A mistyped name gets a guess: `resnet-18` -> "did you mean resnet18?", not a page of every valid name."""
from __future__ import annotations

import difflib
from collections.abc import Iterable

SHOWN = 6   # valid names listed when nothing is close (the rest: the command that lists them all)


def _plain(name: str) -> str:
    """The name as a user may have meant it: case, '-', '_', '.' and spaces ignored (ResNet-18 = resnet18)."""
    return "".join(c for c in name.lower() if c not in "-_. ")


def close_matches(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to `name`, best first: those equal to it but for case and separators (only those,
    when there are), else difflib's close matches (ratio >= 0.6)."""
    choices = list(dict.fromkeys(choices))
    same = [c for c in choices if _plain(c) == _plain(name) and c != name]
    if same:
        return same[:n]
    by_plain: dict[str, list[str]] = {}
    for c in choices:
        by_plain.setdefault(_plain(c), []).append(c)
    near = [c for p in difflib.get_close_matches(_plain(name), list(by_plain), n=n) for c in by_plain[p]]
    return list(dict.fromkeys(near))[:n]


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """"; did you mean X?" when `name` is close to one of `choices`, else "" (to end an existing message)."""
    guess = close_matches(name, choices)
    return f"; did you mean {' or '.join(guess)}?" if guess else ""


def unknown_name(what: str, name: str, choices: Iterable[str], *, list_all: str | None = None,
                 shown: int = SHOWN) -> str:
    """One line for an unknown `name`: "unknown architecture 'resnet-18'; did you mean resnet18?". With no close
    match, the first `shown` valid names, and `list_all` (e.g. "`edgeres archs` lists them") when there are more."""
    choices = list(choices)
    if close_matches(name, choices):
        return f"unknown {what} {name!r}" + did_you_mean(name, choices)
    if len(choices) <= shown:
        return f"unknown {what} {name!r}; valid: {', '.join(choices)}"
    more = f"{len(choices) - shown} more" + (f"; {list_all}" if list_all else "")
    return f"unknown {what} {name!r}; valid: {', '.join(choices[:shown])}, ... ({more})"


__all__ = ["close_matches", "did_you_mean", "unknown_name"]
