"""Loader for the compiled multi-scale deformable attention op (placeholder until csrc/ lands).

`use_compiled(value)` tells `ms_deform_attn` whether to call ``torch.ops.sdetr.ms_deform_attn``.
"""

from __future__ import annotations

from torch import Tensor


def use_compiled(value: Tensor) -> bool:
    return False


def backend_status() -> dict:
    return {"backend": "pytorch", "reason": "the compiled op is not built yet"}
