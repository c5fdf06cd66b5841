"""Renaming checkpoint keys saved under another naming scheme (``--weights-key-map``).

A key map is a function ``state_dict -> state_dict``. ``--weights-key-map`` accepts

* a built-in name (see :data:`BUILTIN`),
* ``old=new`` prefix renames, comma-separated (``module.=`` strips DataParallel's prefix),
* ``package.module:function``, a key map in user code.

Key maps only rename: loading stays strict, so a map that misses a key is reported
with the missing and unexpected names.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from ..errors import WeightsError

T = TypeVar("T")
KeyMap = Callable[[dict[str, T]], dict[str, T]]

# lukemelas/EfficientNet-PyTorch names inside a block -> timm names, for the
# depthwise-separable first block (no expansion) and the inverted-residual blocks
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
       "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3",
       "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
        "_fc": "classifier"}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.([^.]+)\.(.+)$")

#: blocks per stage of EfficientNet-Lite0 (and of EfficientNet-B0)
LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


def lukemelas_efficientnet(state: dict[str, T], depths: Sequence[int] = LITE0_DEPTHS) -> dict[str, T]:
    """``_blocks.N._depthwise_conv.weight`` (lukemelas) -> ``blocks.S.I.conv_dw.weight`` (timm).

    Block ``N`` is block ``I`` of stage ``S`` given the blocks per stage ``depths``; a
    block without ``_expand_conv`` is the depthwise-separable kind.
    """
    where = [(s, i) for s, d in enumerate(depths) for i in range(d)]
    expanding = {int(m.group(1)) for k in state if (m := _BLOCK.match(k)) and m.group(2) == "_expand_conv"}
    out = {}
    for key, value in state.items():
        m = _BLOCK.match(key)
        if m:
            n, module, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(where):
                raise WeightsError(f"block {n} in {key!r} is beyond the {len(where)} blocks of {tuple(depths)}")
            s, i = where[n]
            names = _IR if n in expanding else _DS
            out[f"blocks.{s}.{i}.{names.get(module, module)}.{rest}"] = value
        else:
            module, _, rest = key.partition(".")
            out[f"{_TOP.get(module, module)}.{rest}"] = value
    return out


def prefix_renames(pairs: Sequence[tuple[str, str]]) -> KeyMap:
    """Rename key prefixes; the first matching ``(old, new)`` pair wins."""

    def rename(state: dict[str, T]) -> dict[str, T]:
        out = {}
        for key, value in state.items():
            for old, new in pairs:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
            out[key] = value
        return out

    return rename


BUILTIN: dict[str, KeyMap] = {
    "lukemelas-efficientnet-lite0": lukemelas_efficientnet,
    "strip-module": prefix_renames([("module.", "")]),
}


def parse_key_map(value: str) -> KeyMap:
    """A ``--weights-key-map`` value -> a key map (see the module docstring)."""
    if value in BUILTIN:
        return BUILTIN[value]
    if "=" in value:
        pairs = [tuple(p.split("=", 1)) for p in value.split(",")]
        return prefix_renames(pairs)  # type: ignore[arg-type]
    if ":" in value:
        module, _, attr = value.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise WeightsError(f"cannot import key map {value!r}: {e}") from e
    raise WeightsError(
        f"unknown key map {value!r}; use one of {sorted(BUILTIN)}, 'old=new' prefix renames, "
        "or 'package.module:function'"
    )
