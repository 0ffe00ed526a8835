"""Python objects as the `_target_` strings Hydra configs name them by, so config checks key on the code itself.

    >>> from ldm.utils.targets import target_of
    >>> target_of(target_of)
    'ldm.utils.targets.target_of'
    >>> names_target({"_target_": "ldm.utils.targets.target_of"}, target_of)
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def target_of(obj: Any) -> str:
    """The dotted path Hydra's `instantiate` resolves to ``obj``: `module.qualname`."""
    return f"{obj.__module__}.{obj.__qualname__}"


def names_target(node: Any, *objs: Any) -> bool:
    """Whether a config node's `_target_` is exactly one of ``objs`` (a subclass or a lookalike name is not)."""
    return isinstance(node, Mapping) and node.get("_target_") in {target_of(o) for o in objs}
