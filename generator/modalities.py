"""Modality names: resolving what users type ("CXR", "chest x-ray") to a configured modality id."""

from __future__ import annotations

from collections.abc import Mapping

from .config import ModalityConfig, default_modalities, normalise_modality_text
from .errors import UnknownModalityError  # defined with the other errors; importable from here as before


def alias_table(modalities: Mapping[str, ModalityConfig]) -> dict[str, str]:
    """normalised name or alias -> modality id."""
    table: dict[str, str] = {}
    for name, spec in modalities.items():
        for alias in [name, *spec.aliases]:
            table[normalise_modality_text(alias)] = name
    return table


def describe_modalities(modalities: Mapping[str, ModalityConfig]) -> str:
    return "; ".join(f"{name} (aliases: {', '.join(spec.aliases) or 'none'})" for name, spec in modalities.items())


class ModalityResolver:
    """``resolve_modality`` with the alias table built once, for per-row use on large manifests."""

    def __init__(self, modalities: Mapping[str, ModalityConfig] | None = None):
        self.modalities = default_modalities() if modalities is None else modalities
        self.table = alias_table(self.modalities)
        self.cache: dict[str, str] = {}

    def __call__(self, text: str) -> str:
        found = self.cache.get(text)
        if found is None:
            found = self.table.get(normalise_modality_text(str(text)))
            if found is None:
                raise _unknown(text, self.modalities)
            self.cache[text] = found
        return found


def _unknown(text: str, modalities: Mapping[str, ModalityConfig]) -> UnknownModalityError:
    return UnknownModalityError(
        f"unknown modality {text!r}; known modalities: {describe_modalities(modalities)}. "
        "Add a new one under data.modalities in your config profile."
    )


def resolve_modality(text: str, modalities: Mapping[str, ModalityConfig] | None = None) -> str:
    """The modality id for a name or alias; an error listing the known ones otherwise."""
    modalities = default_modalities() if modalities is None else modalities
    found = alias_table(modalities).get(normalise_modality_text(str(text)))
    if found is None:
        raise _unknown(text, modalities)
    return found
