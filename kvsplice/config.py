"""Helpers shared by the validated config dataclasses (ablation, frontier): type checks, building a
dataclass from a TOML table with unknown keys refused, and reading a TOML file with clear errors."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from kvsplice.errors import KVSpliceError


def is_int(v: Any) -> bool:
    """An int that is not a bool (TOML true/false must not pass as 1/0)."""
    return isinstance(v, int) and not isinstance(v, bool)


def check(cond: bool, msg: str, error: type[KVSpliceError] = KVSpliceError) -> None:
    if not cond:
        raise error(msg)


def from_table(cls: type, d: Any, where: str, error: type[KVSpliceError] = KVSpliceError) -> Any:
    """cls(**d) for a dataclass, with a clear error for a non-table or unknown keys."""
    check(isinstance(d, dict), f"[{where}] must be a table, found {type(d).__name__}", error)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    check(not unknown, f"unknown key(s) {unknown} in [{where}]; expected some of {sorted(known)}", error)
    return cls(**d)


def read_toml(path: str | Path, what: str, error: type[KVSpliceError] = KVSpliceError) -> dict[str, Any]:
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise error(f"{what} config {str(path)!r} not found") from e
    except tomllib.TOMLDecodeError as e:
        raise error(f"{what} config {str(path)!r} is not valid TOML: {e}") from e
