"""The pass registry: pass classes and presets by name, and passes built from strings.

Instance-scoped (``pipeline.presets.builtin_registry`` makes a fresh one each call), so no
module global is filled at import time and tests or plugins extend their own copy.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

from onnxsqueeze.core.errors import PipelineConfigError
from onnxsqueeze.core.pass_base import SqueezePass


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named list of pass names (each with option overrides)."""

    name: str
    summary: str
    passes: tuple[tuple[str, Mapping[str, Any]], ...]


class PassRegistry:
    """Pass classes and presets by name. Instance-scoped: tests and plugins make their own."""

    def __init__(self) -> None:
        self._passes: dict[str, type[SqueezePass]] = {}
        self._presets: dict[str, Preset] = {}

    def register(self, cls: type[SqueezePass]) -> type[SqueezePass]:
        if not cls.name or cls.name in self._passes:
            raise PipelineConfigError(f"pass '{cls.name}': missing or duplicate pass name")
        self._passes[cls.name] = cls
        return cls

    def add_preset(
        self, name: str, summary: str, passes: Iterable[str | tuple[str, Mapping]]
    ) -> None:
        items = tuple((p, {}) if isinstance(p, str) else (p[0], dict(p[1])) for p in passes)
        for pass_name, _ in items:
            self.get(pass_name)
        self._presets[name] = Preset(name, summary, items)

    def get(self, name: str) -> type[SqueezePass]:
        try:
            return self._passes[name]
        except KeyError:
            known = ", ".join(sorted(self._passes)) or "none"
            raise PipelineConfigError(f"unknown pass '{name}' (known passes: {known})") from None

    def preset(self, name: str) -> Preset:
        try:
            return self._presets[name]
        except KeyError:
            known = ", ".join(sorted(self._presets)) or "none"
            raise PipelineConfigError(f"unknown preset '{name}' (known presets: {known})") from None

    @property
    def pass_classes(self) -> list[type[SqueezePass]]:
        return list(self._passes.values())

    @property
    def presets(self) -> list[Preset]:
        return list(self._presets.values())

    def create(self, name: str, options: Mapping[str, Any] | None = None) -> SqueezePass:
        """Instantiate a pass; option values may be strings (from the CLI) and are coerced."""
        cls = self.get(name)
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        hints = typing.get_type_hints(cls.Options)
        kwargs = {}
        for key, value in (options or {}).items():
            key = key.replace("-", "_")
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise PipelineConfigError(f"pass '{name}' has no option '{key}' (options: {known})")
            kwargs[key] = coerce_option(name, key, hints[key], value)
            check_number(name, key, kwargs[key], fields[key].metadata.get("range", (0, math.inf)))
        return cls(cls.Options(**kwargs))

    def build(self, specs: Iterable[Any]) -> list[SqueezePass]:
        """Passes from names, ``(name, options)`` pairs, pass instances or preset names."""
        out: list[SqueezePass] = []
        for spec in specs:
            if isinstance(spec, SqueezePass):
                out.append(spec)
            elif isinstance(spec, tuple):
                out.append(self.create(spec[0], spec[1]))
            elif isinstance(spec, str) and spec not in self._passes and spec in self._presets:
                out.extend(self.create(n, o) for n, o in self._presets[spec].passes)
            elif isinstance(spec, str):
                out.append(self.create(spec))
            else:
                raise PipelineConfigError(f"cannot build a pass from {spec!r}")
        return out


def check_number(pass_name: str, key: str, value: Any, bounds: tuple[float, float]) -> None:
    """A numeric option is finite and within its field's ``range`` metadata (default: not
    negative: sizes, counts, tolerances and ratios all are), so ``rtol=-5`` or ``rtol=nan``
    (which every comparison lets through) is refused, not run."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high = bounds
    if not (math.isfinite(value) and low <= value <= high):
        where = f"at least {low:g}" if math.isinf(high) else f"from {low:g} to {high:g}"
        raise PipelineConfigError(
            f"pass '{pass_name}': option '{key}' must be a number {where}, got {value!r}"
        )


def coerce_option(pass_name: str, key: str, hint: Any, value: Any) -> Any:
    """Turn a CLI string into the option's declared type; pass typed values through."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        hint = args[0]
    if not isinstance(value, str):
        return value
    try:
        if hint is bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if isinstance(hint, type) and issubclass(hint, enum.Enum):
            return hint(value)
        if hint in (int, float, str):
            return hint(value)
        if typing.get_origin(hint) is tuple:  # comma-separated, as --exclude-nodes A,B
            return tuple(v.strip() for v in value.split(",") if v.strip())
    except ValueError:
        raise PipelineConfigError(
            f"pass '{pass_name}': option '{key}' expects {getattr(hint, '__name__', hint)}, got '{value}'"
        ) from None
    return value
