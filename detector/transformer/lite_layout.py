"""Lite DETR's encoder layouts (Li et al., CVPR 2023): names, and which tokens each layer updates.

The flattened pyramid is split into low-level tokens (the L finest levels, most of the tokens) and
high-level tokens (the H coarsest levels). A layout is named as in the paper, ``H<H>L<L>-(<A>+1)x<K>``:
K blocks, each updating the high-level tokens A times and the low-level tokens once.

Two structures read that name differently:

* ``official`` — as the released code (IDEA-Research/Lite-DETR, ``TransformerEncoder``) builds it: a block
  is A layers; the first A - 1 take the high-level tokens as queries, the last takes all tokens as
  queries (the "+1" low-level update, which updates the high-level tokens too, their A-th update).
  ``H3L1-(3+1)x2`` = [H, H, All] x 2, ``H2L2-(2+1)x3`` = [H, All] x 3, ``H3L1-(6+1)x1`` = [H x 5, All]:
  A·K layers (6 for all four of the paper's layouts, the code's ``enc_layers``).
* ``paper_text`` — this project's earlier reading of the paper's text: a block is A high-level layers
  followed by one layer whose queries are the low-level tokens only: A·K + K layers (8 for H3L1-(3+1)x2).

In both, every layer's keys and values are all tokens (the current high-level and low-level ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdetr.detector.errors import ConfigError

_LAYOUT = re.compile(r"^H(\d+)L(\d+)-\((\d+)\+1\)[x×](\d+)$")

STRUCTURES = ("official", "paper_text")
# What one layer takes as queries: the high-level tokens, the low-level tokens, or all tokens.
HIGH, LOW, ALL = "high", "low", "all"


@dataclass(frozen=True)
class LiteLayout:
    """The shape of an interleaved encoder."""

    high_levels: int  # the coarsest levels, updated A times per block
    low_levels: int  # the finest levels, updated once per block
    high_updates: int  # A
    blocks: int  # K

    @property
    def name(self) -> str:
        return f"H{self.high_levels}L{self.low_levels}-({self.high_updates}+1)x{self.blocks}"

    @property
    def num_levels(self) -> int:
        return self.high_levels + self.low_levels

    def schedule(self, structure: str = "official") -> list[str]:
        """The queries of each layer in order: ``high``, ``all`` (official) or ``high``, ``low`` (paper_text).

        >>> parse_lite_layout("H3L1-(3+1)x2").schedule()
        ['high', 'high', 'all', 'high', 'high', 'all']
        """
        if structure == "official":
            block = [HIGH] * (self.high_updates - 1) + [ALL]
        elif structure == "paper_text":
            block = [HIGH] * self.high_updates + [LOW]
        else:
            raise ConfigError(f"model.lite_structure {structure!r}: expected one of {', '.join(STRUCTURES)}")
        return block * self.blocks

    def num_layers(self, structure: str = "official") -> int:
        return len(self.schedule(structure))


def parse_lite_layout(text: str) -> LiteLayout:
    """``"H3L1-(3+1)x2"`` -> LiteLayout(3, 1, 3, 2); a ConfigError naming the expected form otherwise."""
    m = _LAYOUT.match(text.strip().replace(" ", ""))
    if not m:
        raise ConfigError(
            f"model.lite_layout {text!r}: expected H<high levels>L<low levels>-(<A>+1)x<K>, e.g. H3L1-(3+1)x2"
        )
    layout = LiteLayout(*(int(g) for g in m.groups()))
    if min(layout.high_levels, layout.low_levels, layout.high_updates, layout.blocks) < 1:
        raise ConfigError(f"model.lite_layout {text!r}: every number must be at least 1")
    return layout
