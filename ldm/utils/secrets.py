"""Keep API keys and tokens out of logged configs, run directories and W&B files.

    clean = redact(config_dict)                 # values of *key*/*token*/*secret*/*password* -> "<redacted>"
    redact_files(run_dir / ".hydra")           # the config and overrides Hydra wrote
    redact_argv()                              # W&B records the command line
    redact_hydra_writes()                      # Hydra's own files (.hydra/*.yaml, multirun.yaml) written redacted

A config key is secret when one of its `_`/`-`-separated words is key, token, secret, password (and a
few spellings): `api_key`, `hf_token`, `wandb-secret`, but not `tokenizer_subfolder`. Any string that
contains the value of a secret environment variable (WANDB_API_KEY, HF_TOKEN, ...) is redacted too,
wherever it sits (e.g. `${oc.env:HF_TOKEN}` resolved into the config).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import yaml

REDACTED = "<redacted>"
SECRET_WORDS = {"key", "apikey", "token", "secret", "password", "passwd", "credential", "credentials"}
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN", "AWS_SECRET_ACCESS_KEY")


def is_secret_name(name: str) -> bool:
    words = re.split(r"[_\-.\s/]+", str(name).lower())
    return any(word in SECRET_WORDS for word in words)


def secret_values() -> list[str]:
    """Values of secret environment variables (at least 8 characters: shorter ones would redact noise)."""
    names = set(SECRET_ENV) | {k for k in os.environ if is_secret_name(k)}
    return sorted({os.environ[k] for k in names if len(os.environ.get(k, "")) >= 8}, key=len, reverse=True)


# `key=value`, where a sweep's value list runs on through commas up to the next `key=` (`k=a,b,other=1`)
_OVERRIDE = re.compile(r"(?P<name>(?:^|(?<=[,\s]))[+~]{0,2}[\w.\-/]+)=(?P<value>[^,\s]+(?:,(?![^,\s]*=)[^,\s]+)*)")


def _redact_string(text: str, values: list[str]) -> str:
    for value in values:
        text = text.replace(value, REDACTED)

    # overrides `a.b.api_key=VALUE` (the command line, Hydra's overrides and `override_dirname`, comma-joined)
    def hide(match: re.Match) -> str:
        secret = is_secret_name(match.group("name").rsplit(".", 1)[-1])
        return f"{match.group('name')}={REDACTED}" if secret else match.group(0)

    return _OVERRIDE.sub(hide, text)


def redact(obj: Any, values: list[str] | None = None) -> Any:
    """A copy of a nested dict/list with secret values replaced by "<redacted>"."""
    values = secret_values() if values is None else values
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret_name(k) and obj[k] not in (None, "") else redact(v, values))
                for k, v in obj.items()}  # fmt: skip
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v, values) for v in obj)
    if isinstance(obj, str):
        return _redact_string(obj, values)
    return obj


def redact_files(folder: str | Path) -> None:
    """Rewrite the YAML files in ``folder`` (Hydra's `.hydra/`) with secrets redacted."""
    values = secret_values()
    for path in Path(folder).glob("*.yaml"):
        data = yaml.safe_load(path.read_text())
        clean = redact(data, values)
        if clean != data:
            path.write_text(yaml.safe_dump(clean, sort_keys=False))


def redact_argv() -> None:
    """Redact secret overrides in `sys.argv` in place (W&B stores the command line in its metadata)."""
    values = secret_values()
    sys.argv[:] = [_redact_string(arg, values) for arg in sys.argv]


def redact_logging() -> None:
    """Redact every log record from now on, whatever logger or handler writes it (idempotent): the record factory
    is wrapped, so it holds through Hydra configuring its logging again (its launcher does, then logs each job's
    overrides: `#0 : optim.lr=1e-4 +api_key=...`), W&B, Lightning and the run's train.log."""
    make = logging.getLogRecordFactory()
    if getattr(make, "_ldm_redacts", False):
        return

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        message = record.getMessage()
        clean = _redact_string(message, secret_values())
        if clean != message:
            record.msg, record.args = clean, None
        return record

    factory._ldm_redacts = True
    logging.setLogRecordFactory(factory)


def _redacted_config(cfg, resolve: bool = False):
    """A copy of an OmegaConf config with secrets redacted (interpolations left as written unless ``resolve``), or
    ``cfg`` itself when it holds none."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(cfg, resolve=resolve, enum_to_str=True)
    clean = redact(data)
    return cfg if clean == data else OmegaConf.create(clean)


def redact_hydra_writes() -> None:
    """Make Hydra write its own files with secrets redacted (idempotent). It writes them before any code of a run
    is called, with the command line's values in clear: a run's `.hydra/{config,hydra,overrides}.yaml`
    (`hydra.core.utils._save_config`, then the job starts) and a multirun's `multirun.yaml` (its sweeper's
    `OmegaConf.save`, before the first job starts). Only those files are redacted: a config this project saves for
    its own processes to read (`ldm.run.launch`) keeps its values."""
    import hydra.core.utils as hydra_utils
    from omegaconf import OmegaConf

    save_config = getattr(hydra_utils, "_save_config", None)
    if save_config is not None and not getattr(save_config, "_ldm_redacts", False):

        def redacting_save_config(cfg, filename, output_dir):
            save_config(_redacted_config(cfg), filename, output_dir)

        redacting_save_config._ldm_redacts = True
        hydra_utils._save_config = redacting_save_config
    save = OmegaConf.save
    if not getattr(save, "_ldm_redacts", False):

        def redacting_save(config, f, resolve: bool = False) -> None:
            if isinstance(f, (str, os.PathLike)) and Path(f).name == "multirun.yaml" and OmegaConf.is_config(config):
                config = _redacted_config(config, resolve)
            save(config, f, resolve)

        redacting_save._ldm_redacts = True
        OmegaConf.save = redacting_save
