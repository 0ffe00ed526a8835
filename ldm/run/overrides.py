"""The command line's overrides, before and after Hydra reads them: what they add on purpose, shard patterns that
Hydra's grammar would misread, and Hydra's own composition errors as one line.

    sys.argv[:] = command_line(sys.argv)    # Hydra's options checked (one line), `a=1 -m b=2` read as meant
    quote_shard_patterns(sys.argv)          # data.train_shards=/d/{000000..000009}.tar -> ...='/d/{...}.tar'
    added_keys(["+my_api_key=x", "a=1"])    # {"my_api_key"}: new keys, not typos
    explain_hydra_error(error)              # "data.batchsize=4: no such config key; did you mean data.batch_size? ..."

Hydra reads `{` as the start of a dictionary, so a brace pattern given without quotes (the shell drops them:
`data.train_shards='/d/{000000..000009}.tar'`) does not parse; for the keys that take shard specs the value is
quoted for it. Plain Python + Hydra's override parser: nothing heavy.
"""

from __future__ import annotations

import argparse
import difflib
import re
from pathlib import Path

from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.run.schema import KEYS
from ldm.utils.rules import did_you_mean

CONF = Path(__file__).resolve().parents[2] / "conf"
SHARD_KEYS = ("data.train_shards", "data.val_shards", "callbacks.fid.shards")


class UsageError(ValueError):
    """A command line Hydra's argument parser would refuse with its usage text; the message is one line."""


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's options with their values, the overrides) of a command line, in their order; UsageError for an
    option Hydra does not have. Overrides never start with `-`; an option's value is the next item (`-cn NAME`),
    or for `--info`, the next item when it is one of its choices."""
    actions = get_args_parser()._option_string_actions
    options, overrides = [], []
    items = iter(argv[1:])
    for item in items:
        if item == "--":
            overrides.extend(items)
            break
        if not item.startswith("-") or len(item) == 1:
            overrides.append(item)
            continue
        name = item.partition("=")[0]
        longer = [o for o in actions if o.startswith("--") and o.startswith(name)] if name.startswith("--") else []
        action = actions.get(name) or (actions[longer[0]] if len(longer) == 1 else None)  # argparse's --multi
        if action is None:
            raise UsageError(_unknown_option(item, actions))
        options.append(item)
        if "=" in item or action.nargs == 0:
            continue
        following = next(items, None)
        if following is None:
            break
        if action.nargs is None or (action.nargs == "?" and following in (action.choices or ())):
            options.append(following)
        else:
            overrides.append(following)
    return options, overrides


def _unknown_option(item: str, actions: dict) -> str:
    names = {}  # one entry per option: "-m/--multirun"
    for action in actions.values():
        names.setdefault(id(action), "/".join(action.option_strings))
    close = difflib.get_close_matches(item.partition("=")[0], list(actions), n=1, cutoff=0.75)
    hint = f"did you mean {close[0]}? " if close else ""
    return (f"{item}: no such option of python -m ldm.train; {hint}it takes {', '.join(names.values())}, and "
            f"key=value overrides")  # fmt: skip


def command_line(argv: list[str]) -> list[str]:
    """The command line as Hydra's parser reads it: the overrides, then the options (argparse reads positional
    items only as one run, so `experiment=x -m a=1` would be refused with its usage text). A mistake argparse would
    answer with that text (an unknown option, a value that is not one of an option's choices) is a UsageError in
    one line naming the option."""
    options, overrides = _split(argv)
    parser = get_args_parser()

    def refuse(message: str):
        raise UsageError(f"{message} (python -m ldm.train --help lists the options)")

    parser.error = refuse
    named = [parser._option_string_actions.get(option.partition("=")[0]) for option in options]
    if not any(isinstance(action, argparse._VersionAction) for action in named):  # it would print and exit here
        parser.parse_args([*overrides, *options])
    return [argv[0], *overrides, *options]


def unreadable_override(argv: list[str]) -> tuple[str, str] | None:
    """(the first override of the command line that Hydra's grammar cannot read, why), each read on its own."""
    try:
        overrides = _split(argv)[1]
    except UsageError:
        overrides = [a for a in argv[1:] if not a.startswith("-")]
    for override in overrides:
        try:
            OverridesParser.create().parse_override(override)
        except HydraException as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip() and "hydra.cc" not in line]
            return override, (lines[0] if lines else type(error).__name__)
    return None


def _parses(override: str) -> bool:
    try:
        OverridesParser.create().parse_override(override)
        return True
    except HydraException:
        return False


def quote_shard_patterns(argv: list[str]) -> None:
    """Quote, in place, the values of shard-spec overrides that Hydra's grammar cannot read as given (brace
    patterns, `pipe:` commands with spaces); anything that parses is left alone."""
    for i, arg in enumerate(argv[1:], start=1):
        key, sep, value = arg.partition("=")
        if sep and key.lstrip("+~") in SHARD_KEYS and value and value[0] not in "'\"" and not _parses(arg):
            argv[i] = f"{key}='{value.replace(chr(92), chr(92) * 2).replace(chr(39), chr(92) + chr(39))}'"


def added_keys(overrides: list[str]) -> set[str]:
    """Config keys that `+key=` / `++key=` overrides add on purpose (config groups, `+group=option`, are not keys)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {o.key_or_group for o in parsed if (o.is_add() or o.is_force_add()) and "/" not in o.key_or_group}


def _override_of(key: str, argv: list[str]) -> str | None:
    """The command-line override that sets ``key`` (as typed), if any."""
    for arg in argv[1:]:
        if arg.partition("=")[0].lstrip("+~") == key:
            return arg
    return None


def _options_with(key: str) -> list[str]:
    """`group=option` choices of conf/ whose file holds ``key`` (`model.unet.path` -> [`model/unet=pretrained`])."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        group = CONF.joinpath(*parts[:depth])
        if group.is_dir():
            rest = ".".join(parts[depth:])
            return [f"{'/'.join(parts[:depth])}={f.stem}" for f in sorted(group.glob("*.yaml")) if _holds(f, rest)]
    return []


def _holds(path: Path, key: str) -> bool:
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def explain_hydra_error(error: BaseException, argv: list[str]) -> str | None:
    """One line for an error Hydra raised while reading the command line and composing the config; None for any
    other error."""
    if not isinstance(error, (HydraException, OmegaConfBaseException)):
        return None
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    if isinstance(error, OverrideParseException):
        found = unreadable_override(argv)
        if found is None:  # not one item alone: say Hydra's own first line
            return f"Hydra cannot read the overrides: {first}"
        override, reason = found
        key, equals, value = override.partition("=")
        if not equals:
            return (f"{override}: not an override ({reason}); overrides are key=value (+key=value adds a key, "
                    f"~key deletes one)")  # fmt: skip
        quoted = f"\"{key}='{value}'\"" if "'" not in value else f"'{key}=\"{value}\"'"  # as typed in a shell
        return f"{override}: Hydra cannot read this override ({reason}); to give the value as text, quote it: {quoted}"
    if isinstance(error, MissingConfigException) and error.options is not None:
        missing = re.search(r"Could not find '([^']+)'", text)
        name = missing.group(1) if missing else first
        group, _, option = name.rpartition("/")
        return f"{group}={option}: no such option; choose one of {', '.join(sorted(error.options))}"
    override = re.search(r"Could not override '([^']+)'", text)
    if isinstance(error, ConfigCompositionException) and override:
        key = override.group(1)
        typed = _override_of(key, argv) or key
        if key in KEYS or any(k.startswith(key + ".") for k in KEYS):
            options = _options_with(key)
            where = f" (it is in {', '.join(options)})" if options else ""
            return (f"{typed}: {key} is not a key of the config as composed{where}; or add it with +{typed.lstrip('+')}")
        return f"{typed}: no such config key{did_you_mean(key, KEYS)} (add a new key with +{typed.lstrip('+')})"
    cause = error.__cause__
    detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    return f"{first}: {detail}" if detail and detail not in first else first
