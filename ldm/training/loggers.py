"""Loggers: W&B that falls back to offline by itself, and the CSV logger.

    logger = wandb_logger(project="ldm", save_dir="runs/x")   # online with a valid key and a server, else offline

Logging never stops training: no API key, an unreachable or silent server, or a key the server
rejects all mean offline logging, said in one warning, decided within a few seconds.

Offline runs write `wandb/offline-run-*` under `save_dir`; `wandb sync DIR` uploads them later.
"""

from __future__ import annotations

import logging
import os
import socket
from urllib.parse import urlparse

from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)

OFFLINE_MODES = ("offline", "dryrun")
VERIFY_TIMEOUT_S = 5.0  # the longest the API key check may wait for the server


def _api_key() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    try:
        import netrc

        auth = netrc.netrc().authenticators(urlparse(_base_url()).hostname or "api.wandb.ai")
        return auth[2] if auth else None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _reachable(url: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _key_rejected(url: str, key: str, timeout: float | None = None) -> str | None:
    """Why the server does not accept ``key`` (None when it does): one GraphQL `viewer` query."""
    import requests

    try:
        response = requests.post(f"{url.rstrip('/')}/graphql", json={"query": "query { viewer { id } }"},
                                 auth=("api", key), timeout=timeout or VERIFY_TIMEOUT_S)  # fmt: skip
    except requests.RequestException as error:
        return f"W&B server {url} did not answer ({type(error).__name__})"
    if response.status_code in (401, 403):
        return f"W&B server {url} rejected the API key (HTTP {response.status_code})"
    if response.status_code >= 400:
        return f"W&B server {url} answered HTTP {response.status_code}"
    try:
        viewer = (response.json().get("data") or {}).get("viewer")
    except ValueError:
        return f"W&B server {url} answered something that is not JSON"
    return None if viewer else f"W&B server {url} does not know the API key"


def wandb_offline_reason() -> str | None:
    """Why W&B must run offline here (None when online is possible)."""
    if os.environ.get("WANDB_MODE", "").lower() in OFFLINE_MODES:
        return "WANDB_MODE=offline"
    key = _api_key()
    if not key:
        return "no W&B API key (WANDB_API_KEY or ~/.netrc)"
    if not _reachable(_base_url()):
        return f"W&B server {_base_url()} unreachable"
    return _key_rejected(_base_url(), key)


def wandb_logger(project: str = "ldm", save_dir: str = ".", offline: bool | None = None, **kwargs) -> WandbLogger:
    """Lightning's `WandbLogger`, offline when asked, or when there is no API key or no server (said once)."""
    if offline is None:
        reason = wandb_offline_reason()
        offline = reason is not None
        if offline and reason != "WANDB_MODE=offline":
            if rank_zero_only.rank == 0:  # one line, on the console and in the run's log (not a Python warning)
                log.warning(f"W&B: {reason}; logging offline to {save_dir}/wandb (upload later with `wandb sync`)")
    if offline:
        os.environ["WANDB_MODE"] = "offline"  # also for DDP children and wandb's service process
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(project=project, save_dir=save_dir, offline=offline, **kwargs)
