"""Where a source's files are: ``--data`` as a directory, a glob, a brace pattern or one file, and the rule
that nothing we write lands inside a source. Format-neutral (which extension is whose: ``registry``)."""

from __future__ import annotations

import glob
import os

from braceexpand import UnbalancedBracesError, braceexpand, char_range_re, int_range_re, make_char_range

from storage.errors import printable

from ..source_errors import SourceError, permission_error

# A brace pattern may name at most this many files: it is counted before it is expanded, so a typo
# such as {0..99999999} is one line at once, not 10 GB of names and a minute and a half before
# "no such file". LAION-5B is ~230,000 tars.
MAX_PATTERN_FILES = 1_000_000


def files_in(directory: str, ext: str) -> list[str]:
    """The names in ``directory`` ending with ``ext``, sorted."""
    try:
        return sorted(f for f in os.listdir(directory) if f.endswith(ext))
    except PermissionError:
        raise permission_error(directory, "list this folder") from None


def expand_pattern(src: str) -> list[str]:
    """A glob, a brace pattern or one file -> paths (a directory is the registry's: its files by format)."""
    if any(c in src for c in "{}"):
        return expand_braces(src)
    if any(c in src for c in "*?["):
        return sorted(glob.glob(src))
    return [src]


def expand_braces(src: str) -> list[str]:
    """A brace pattern -> its files, counted before they are expanded (braceexpand builds every name
    of a range up front) and each named once: a file named twice would repeat all its samples."""
    try:
        count = brace_count(src)
        if count > MAX_PATTERN_FILES:
            raise SourceError(f"--data {printable(src)}: the pattern names {count:,} files, more than the "
                              f"{MAX_PATTERN_FILES:,} a source may have; check its ranges")
        files = list(braceexpand(src))
    except UnbalancedBracesError:
        raise SourceError(f"--data {printable(src)}: unbalanced braces in the pattern; close every '{{' "
                          "with '}' (or escape a literal brace as \\{)") from None
    seen: dict[str, str] = {}
    for f in files:
        same = seen.setdefault(os.path.normpath(os.path.abspath(f)), f)
        if same is not f:
            raise SourceError(f"--data {printable(src)}: the pattern names {printable(f)} twice (as {printable(same)} "
                              "too), which would repeat its samples; name every file once")
    return files


def brace_count(pattern: str) -> int:
    """How many strings ``braceexpand(pattern)`` yields, without building them; the same grammar
    (a product of literals and {a,b} / {1..9} / {a..z} items, nested, backslash escapes)."""
    total, start, pos, depth = 1, 0, 0, 0
    while pos < len(pattern):
        c = pattern[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            if depth == 0:
                start = pos
            depth += 1
        elif c == "}":  # as braceexpand: a stray "}" unbalances the pattern
            depth -= 1
            if depth == 0:
                expr = pattern[start + 1:pos]
                n = _brace_item_count(expr)
                total *= brace_count(expr) if n is None else n  # no item: literal braces around a pattern
        pos += 1
    if depth:
        raise UnbalancedBracesError(pattern)
    return total


def _brace_item_count(expr: str) -> int | None:
    """Strings of one brace item: a range or a comma sequence; None when it is neither."""
    m = int_range_re.match(expr)
    if m:
        a, b, step = m.groups()
        step = (int(step) or 1) if step else 1
        a, b = int(a), int(b)
        return len(range(a, b + 1, step) if a < b else range(a, b - 1, -step))
    m = char_range_re.match(expr)
    if m:
        return len(make_char_range(*m.groups()))
    parts, start, pos, depth = [], 0, 0, 0
    while pos < len(expr):
        c = expr[pos]
        if c == "\\":
            pos += 2
            continue
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth or not parts:
        return None
    return sum(brace_count(p) for p in parts + [expr[start:]])


def check_outside_source(src: str, out: str, option: str = "--out") -> None:
    """Refuse an output folder (a label store, a train run) inside the source directory ``src``.

    An ImageFolder indexes every sub-folder as a class: a store written inside it becomes one more
    class, so the next run indexes another source and refuses its own store. Stores and runs belong
    beside the data, never in it (the rule holds for any source directory, so it is one rule)."""
    if not os.path.isdir(src):
        return
    root, target = os.path.realpath(src), os.path.realpath(out)
    if target == root or target.startswith(root.rstrip(os.sep) + os.sep):
        raise SourceError(f"{option} {printable(out)} is inside the source --data {printable(src)}: the source would "
                          f"change under it (an ImageFolder would gain a class); put {option} outside {printable(src)}")
