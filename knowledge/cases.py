"""The case library: studies (report text, modality, findings, image) that retrieval can return.

Cases come from any manifest, phantom or real; the caller reads the manifest (the data layer
lives in ``generator``, of which this package imports only the error classes) and hands over :class:`Case` objects.
Text embeddings index them now; an image embedding can be attached once an image encoder exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Case:
    id: str  # stable: "<source>:<row>"
    text: str  # report text
    modality: str
    path: str  # image file (or file.npz#split/index)
    findings: list[dict] = field(default_factory=list)
    source: str = ""  # dataset, e.g. "phantom:cxr", "nih_cxr14_64:train"

    def to_item(self) -> dict:
        """The index metadata row of this case."""
        return {
            "id": self.id,
            "kind": "case",
            "text": self.text,
            "modalities": [self.modality],
            "path": self.path,
            "findings": self.findings,
            "source": self.source,
        }
