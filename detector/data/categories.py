"""Category ids of a data set <-> the contiguous labels a detector's class head predicts.

Two mappings:

* ``raw``: label = category id (DETR / Deformable DETR / Sparse DETR on COCO: ``num_classes`` = largest id
  + 1, 91 for COCO, and official checkpoints' class heads are indexed by COCO id). Unused ids are
  labels that never occur in the targets.
* ``contiguous``: label = rank of the id among the data set's sorted ids, so a set with ids 7, 12, 40
  trains a 3-way head (labels 0, 1, 2) and its predictions are written back with ids 7, 12, 40.

``auto`` picks ``raw`` when it wastes at most one label (ids within 0..K for K categories: the synthetic
set's 1..5, any 0- or 1-based numbering) or when the ids are COCO's 80 (so COCO keeps its 91-way head and
official checkpoints evaluate as they are), else ``contiguous``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdetr.detector.errors import DataError

MAPPINGS = ("auto", "raw", "contiguous")
# COCO 2017's 80 category ids (1..90 with gaps): the id layout of every official DETR-family checkpoint.
COCO_IDS = frozenset(
    [*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70, *range(72, 83)]
    + [*range(84, 91)]
)


@dataclass(frozen=True)
class CategoryMap:
    """``label_ids[label]`` is the category id of each label (-1: a label no category uses, raw only);
    ``names[i]`` is the name of ``label_ids[i]`` ("" when unused)."""

    mode: str  # raw | contiguous
    label_ids: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """The class-head width this mapping needs."""
        return len(self.label_ids)

    @property
    def category_ids(self) -> list[int]:
        return [i for i in self.label_ids if i >= 0]

    def label_of(self) -> dict[int, int]:
        """``{category id: label}``"""
        return {cid: label for label, cid in enumerate(self.label_ids) if cid >= 0}

    def labels(self, category_ids: Sequence[int]) -> Tensor:
        """Category ids -> int64 labels [n]; an id outside the map is a DataError."""
        lookup = self.label_of()
        missing = sorted({int(c) for c in category_ids if int(c) not in lookup})
        if missing:
            raise DataError(
                f"category ids {missing[:10]} are not in the category map (ids {self.category_ids})"
            )
        return torch.tensor([lookup[int(c)] for c in category_ids], dtype=torch.int64)

    def ids(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """int64 labels [k] -> (category ids [k'], keep bool [k]): labels no category uses are dropped."""
        table = torch.tensor(self.label_ids, dtype=torch.int64, device=labels.device)
        inside = (labels >= 0) & (labels < len(table))
        ids = torch.where(inside, table[labels.clamp(0, len(table) - 1)], -1)
        keep = ids >= 0
        return ids[keep], keep

    def to_list(self) -> list[dict[str, Any]]:
        """What a checkpoint stores (``categories``): label order, ``{"label", "id", "name"}``."""
        return [
            {"label": label, "id": cid, "name": name}
            for label, (cid, name) in enumerate(zip(self.label_ids, self.names))
            if cid >= 0
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "num_classes": self.num_classes, "categories": self.to_list()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "checkpoint") -> CategoryMap:
        try:
            mode, n = str(data["mode"]), int(data["num_classes"])
            label_ids, names = [-1] * n, [""] * n
            for cat in data["categories"]:
                label_ids[int(cat["label"])] = int(cat["id"])
                names[int(cat["label"])] = str(cat.get("name", ""))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DataError(f"{source}: unreadable category map ({type(exc).__name__}: {exc})") from None
        return cls(mode, tuple(label_ids), tuple(names))


def build_category_map(
    categories: list[dict[str, Any]], mapping: str = "auto", source: str = ""
) -> CategoryMap:
    """The map of a COCO ``categories`` list (``id``, optional ``name``); see the module docstring."""
    if mapping not in MAPPINGS:
        raise DataError(f"{source}: category mapping {mapping!r} is not one of {', '.join(MAPPINGS)}")
    names = {int(c["id"]): str(c.get("name", "")) for c in categories}
    ids = sorted(names)
    if not ids:
        return CategoryMap("raw", (), ())
    if mapping == "auto":
        compact = ids[0] >= 0 and ids[-1] <= len(ids)
        mapping = "raw" if compact or set(ids) == COCO_IDS else "contiguous"
    if mapping == "raw":
        if ids[0] < 0:
            raise DataError(f"{source}: category id {ids[0]} is negative; raw mapping needs ids >= 0")
        label_ids = tuple(i if i in names else -1 for i in range(ids[-1] + 1))
    else:
        label_ids = tuple(ids)
    return CategoryMap(mapping, label_ids, tuple(names.get(i, "") for i in label_ids))


def check_same_categories(expected: CategoryMap, found: CategoryMap, what: str, source: str) -> None:
    """Refuse ``found`` when one of its category ids is not in ``expected`` (e.g. a val set with a class
    the training set, or the checkpoint being evaluated, does not know)."""
    known = expected.label_of()
    missing = [
        (cid, name) for cid, name in zip(found.label_ids, found.names) if cid >= 0 and cid not in known
    ]
    if missing:
        shown = ", ".join(f"{cid} ({name})" if name else str(cid) for cid, name in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise DataError(
            f"{source}: categories {shown}{more} are not among the {len(known)} categories of {what} "
            f"(ids {expected.category_ids[:20]})"
        )
