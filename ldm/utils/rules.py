"""Typed rules for config values, and the walk that checks a whole config against a table of them.

    >>> rules = {"data.batch_size": Int(min=1), "sampling.sampler": Choice("ddim", "dpm++")}
    >>> check_tree({"data": {"batch_size": 0}, "sampling": {"sampler": "ddim"}}, rules)
    Traceback (most recent call last):
    ...
    ldm.utils.rules.ConfigError: data.batch_size=0: expected an integer >= 1

Every failure is one `ConfigError` line: the key, the value as given, what is allowed. A rule says what a
value may be (`Int`, `Float`, `Bool`, `Str`, `Choice`, `Path`, `ListOf`, `Section`, `Any`, or several with
`|`); `none=True` also allows null. A table maps dotted keys to rules; `*` stands for any one key
(`callbacks.*`, `model.caption_groups.*`). Keys not in the table get a "did you mean" from the keys that are.

Plain Python (no omegaconf, no torch): it runs before anything heavy is imported.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from typing import Any as AnyValue


class ConfigError(ValueError):
    """A config that cannot train; the message is one line naming the setting at fault."""


def show(value: AnyValue) -> str:
    """A value as the message shows it: strings quoted (so `'abc'` reads as text, not a number)."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 120 else text[:117] + "..."


class Rule:
    """What one config value may be. `describe()` is the "expected ..." part of the message."""

    none = False

    def ok(self, value) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def check(self, key: str, value, files: bool = True) -> None:
        """ConfigError unless ``value`` is allowed; ``files=False`` leaves out what needs the filesystem."""
        if value is None and self.none:
            return
        if not self.ok(value):
            expected = self.describe() + (" or null" if self.none else "")
            raise ConfigError(f"{key}={show(value)}: expected {expected}")

    def __or__(self, other: Rule) -> Rule:
        return OneOf(self, other)

    def descends(self) -> bool:
        """Whether a mapping value is a section whose keys are checked one by one."""
        return False


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range(lo, hi, lo_open=False, hi_open=False) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi}"
    return ""


class Int(Rule):
    def __init__(self, min: int | None = None, max: int | None = None, none: bool = False, note: str = ""):
        self.min, self.max, self.none, self.note = min, max, none, note

    def ok(self, value) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                and (self.min is None or value >= self.min) and (self.max is None or value <= self.max))  # fmt: skip

    def describe(self) -> str:
        return " ".join(filter(None, ["an integer", _range(self.min, self.max), self.note]))


class Float(Rule):
    """A number (an integer is a number too); `open_min`/`open_max` exclude the bound itself."""

    def __init__(self, min: float | None = None, max: float | None = None, open_min: bool = False,
                 open_max: bool = False, none: bool = False, note: str = ""):  # fmt: skip
        self.min, self.max, self.open_min, self.open_max, self.none, self.note = min, max, open_min, open_max, none, note

    def ok(self, value) -> bool:
        if not _number(value) or not math.isfinite(value):  # nan and inf are never a setting
            return False
        above = self.min is None or (value > self.min if self.open_min else value >= self.min)
        below = self.max is None or (value < self.max if self.open_max else value <= self.max)
        return above and below

    def describe(self) -> str:
        return " ".join(filter(None, ["a number", _range(self.min, self.max, self.open_min, self.open_max), self.note]))


class Bool(Rule):
    def __init__(self, none: bool = False):
        self.none = none

    def ok(self, value) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"


class Str(Rule):
    """A string; with ``pattern``, one that matches it in full (``note`` says what form, for the message)."""

    def __init__(self, none: bool = False, nonempty: bool = True, note: str = "", pattern: str | None = None):
        self.none, self.nonempty, self.note, self.pattern = none, nonempty, note, pattern

    def ok(self, value) -> bool:
        return (isinstance(value, str) and (bool(value) or not self.nonempty)
                and (self.pattern is None or re.fullmatch(self.pattern, value.strip()) is not None))  # fmt: skip

    def describe(self) -> str:
        if self.pattern is not None:
            return f"a string of the form {self.note or self.pattern}"
        return " ".join(filter(None, ["a non-empty string" if self.nonempty else "a string", self.note]))


class Choice(Rule):
    def __init__(self, *values, none: bool = False):
        self.values, self.none = values, none

    def ok(self, value) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def describe(self) -> str:
        return "one of " + ", ".join(str(v) for v in dict.fromkeys(self.values))


class Path(Rule):
    """A filesystem path; `exists="file" | "dir" | "any"` also requires it to be there (``note`` says what else
    the key takes, for the message)."""

    def __init__(self, exists: str | None = None, none: bool = False, note: str = ""):
        self.exists, self.none, self.note = exists, none, note

    def ok(self, value) -> bool:
        return isinstance(value, str) and bool(value)

    def describe(self) -> str:
        return "a path"

    def check(self, key: str, value, files: bool = True) -> None:
        super().check(key, value)
        if value is None or self.exists is None or not files:
            return
        there = {"file": os.path.isfile, "dir": os.path.isdir, "any": os.path.exists}[self.exists](value)
        if not there:
            what = {"file": "file", "dir": "directory", "any": "file or directory"}[self.exists]
            raise ConfigError(f"{key}={value}: no such {what}" + (f" ({self.note})" if self.note else ""))


class ListOf(Rule):
    def __init__(self, item: Rule, min_len: int = 0, max_len: int | None = None, none: bool = False):
        self.item, self.min_len, self.max_len, self.none = item, min_len, max_len, none

    def ok(self, value) -> bool:
        return (isinstance(value, (list, tuple)) and len(value) >= self.min_len
                and (self.max_len is None or len(value) <= self.max_len))  # fmt: skip

    def describe(self) -> str:
        size = (f"{self.min_len} " if self.max_len == self.min_len
                else f"at least {self.min_len} " if self.min_len else "")  # fmt: skip
        return f"a list of {size}items, each {self.item.describe()}"

    def check(self, key: str, value, files: bool = True) -> None:
        super().check(key, value)
        for i, item in enumerate(value or ()):
            self.item.check(f"{key}[{i}]", item, files)


class Section(Rule):
    """A mapping whose keys have rules of their own (they are checked one by one)."""

    def __init__(self, none: bool = False):
        self.none = none

    def ok(self, value) -> bool:
        return isinstance(value, Mapping)

    def describe(self) -> str:
        return "a section (key: value, ...)"

    def descends(self) -> bool:
        return True


class Options(Rule):
    """A mapping of a library's own options, passed on as they are (not checked key by key)."""

    def __init__(self, none: bool = False):
        self.none = none

    def ok(self, value) -> bool:
        return isinstance(value, Mapping)

    def describe(self) -> str:
        return "a mapping of options"


class Any(Rule):
    """Anything: checked elsewhere (an interpolated copy of another section, a library's own options)."""

    none = True

    def ok(self, value) -> bool:
        return True

    def describe(self) -> str:
        return "anything"


class OneOf(Rule):
    def __init__(self, *rules: Rule):
        self.rules = rules
        self.none = any(r.none for r in rules)

    def ok(self, value) -> bool:
        return any(r.ok(value) for r in self.rules)

    def describe(self) -> str:
        return ", or ".join(r.describe() for r in self.rules)

    def check(self, key: str, value, files: bool = True) -> None:
        if value is None and self.none:
            return
        for rule in self.rules:
            if rule.ok(value):
                rule.check(key, value, files)  # its own further checks (a path that must exist, list items)
                return
        super().check(key, value)

    def descends(self) -> bool:
        return any(r.descends() for r in self.rules)


# --- a table of rules over a whole config -----------------------------------------------------------------
def rule_for(key: str, rules: Mapping[str, Rule]) -> Rule | None:
    """The rule of a dotted key: an exact entry, else an entry with `*` for one of its parts."""
    if key in rules:
        return rules[key]
    parts = key.split(".")
    for pattern, rule in rules.items():
        if "*" in pattern:
            pattern_parts = pattern.split(".")
            if len(pattern_parts) == len(parts) and all(p in ("*", k) for p, k in zip(pattern_parts, parts)):
                return rule
    return None


def is_section(key: str, rules: Mapping[str, Rule]) -> bool:
    """Whether some rule lives under ``key`` (so a mapping there is walked into)."""
    parts = key.split(".")
    for pattern in rules:
        pattern_parts = pattern.split(".")
        if len(pattern_parts) > len(parts) and all(p in ("*", k) for p, k in zip(pattern_parts, parts)):
            return True
    return False


def did_you_mean(key: str, known) -> str:
    """`; did you mean a.b?` for the closest known keys (same section first), or ''."""
    known = [k for k in known if "*" not in k]
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = [k for k in known if k.rsplit(".", 1)[0] == parent] if parent else []
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, [k.rsplit(".", 1)[-1] for k in siblings], n=1, cutoff=0.6)
    if close:
        return f"; did you mean {parent}.{close[0]}?"
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def check_tree(config: Mapping, rules: Mapping[str, Rule], added=(), strict: bool = True, skip=frozenset(),
               files: bool = True, prefix: str = "") -> None:
    """Check every key of a nested plain config against ``rules``; ConfigError (one line) at the first fault.

    A mapping is walked into where rules live below it. A key with no rule is unknown (one line with a "did you
    mean") when ``strict``, unless it was ``added`` on purpose (`+key=...`: the key and everything under it), or its
    section names a `_target_` the table does not know (a component of the user's own, options unchecked).
    Keys in ``skip`` are not checked (here); ``files=False`` leaves out what needs the filesystem (paths that must
    exist), so that what the config alone decides is said first."""
    for name, value in config.items():
        key = f"{prefix}{name}"
        if key in skip or any(key == a or key.startswith(a + ".") for a in added):
            continue
        rule = rule_for(key, rules)
        below = is_section(key, rules) or any(a.startswith(key + ".") for a in added)
        if isinstance(value, Mapping) and (below or (rule is not None and rule.descends())):
            if rule is not None and not rule.descends():
                rule.check(key, value, files)  # a mapping where a plain value goes
            if not _own_component(key, value, rules):
                check_tree(value, rules, added, strict, skip, files, prefix=f"{key}.")
            continue
        if rule is not None:
            rule.check(key, value, files)
        elif below:
            if value is not None:
                raise ConfigError(f"{key}={show(value)}: expected a section (key: value, ...) or null")
        elif strict:
            raise ConfigError(f"{key}: no such config key{did_you_mean(key, rules)} (add a new key with +{key}=...)")


def _own_component(key: str, section: Mapping, rules: Mapping[str, Rule]) -> bool:
    """A section whose `_target_` has no rule of its own here: the user's own class, options unchecked."""
    return "_target_" in section and rule_for(f"{key}._target_", rules) is None
