"""Strict configuration dataclasses: unknown keys are an error, not a silent typo."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T", bound="StrictConfig")


@dataclasses.dataclass
class StrictConfig:
    """Base for config dataclasses; `from_dict` rejects keys the dataclass does not declare."""

    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any]) -> T:
        """Build the config from a mapping, naming any unknown keys in the error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__}: unknown key(s) {unknown}; valid keys are {sorted(names)}"
            )
        return cls(**dict(data))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict view (JSON-friendly when the fields are)."""
        return dataclasses.asdict(self)

    def replace(self: T, **changes: Any) -> T:
        """A copy with some fields changed (unknown names are rejected)."""
        return self.from_dict({**self.to_dict(), **changes})
