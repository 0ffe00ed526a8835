"""The command line's overrides, before and after Hydra reads them: what they add on purpose, shard patterns that
Hydra's grammar would misread, and Hydra's own composition errors as one line.

    quote_shard_patterns(sys.argv)          # data.train_shards=/d/{000000..000009}.tar -> ...='/d/{...}.tar'
    added_keys(["+my_api_key=x", "a=1"])    # {"my_api_key"}: new keys, not typos
    explain_hydra_error(error)              # "data.batchsize=4: no such config key; did you mean data.batch_size? ..."

Hydra reads `{` as the start of a dictionary, so a brace pattern given without quotes (the shell drops them:
`data.train_shards='/d/{000000..000009}.tar'`) does not parse; for the keys that take shard specs the value is
quoted for it. Plain Python + Hydra's override parser: nothing heavy.
"""

from __future__ import annotations

import re
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.run.schema import KEYS
from ldm.utils.rules import did_you_mean

CONF = Path(__file__).resolve().parents[2] / "conf"
SHARD_KEYS = ("data.train_shards", "data.val_shards", "callbacks.fid.shards")


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
        bad = re.search(r"Error parsing override '(.*)'", first)
        reason = next((line for line in text.splitlines()[1:] if line.strip() and "hydra.cc" not in line), "")
        override = bad.group(1) if bad else first
        return (f"{override}: Hydra cannot read this override ({reason.strip()}); quote the value, e.g. "
                f"\"{override.partition('=')[0]}='{override.partition('=')[2]}'\"")  # fmt: skip
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
