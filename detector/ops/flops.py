"""FLOP formulas of the deformable-attention op, in the papers' (fvcore) convention."""

from __future__ import annotations


def ms_deform_attn_flops(value_shape, sampling_locations_shape, include_weighted_sum: bool = False) -> int:
    """FLOPs of one forward call in fvcore's convention (the one the Deformable/Sparse DETR papers use).

    fvcore counts the reference path's ``grid_sample`` calls (``aten::grid_sampler``, bilinear) as 4 per
    output value, i.e. per level ``4 * (N*M) * D * Lq * P``, and ignores the elementwise multiply by the
    attention weights and the sum over points. Summed over the L levels this is ``4 * N*M*D*Lq*L*P``.
    The weighted sum would add one multiply-add per sampled value, ``N*M*D*Lq*L*P``
    (``include_weighted_sum=True`` adds it; fvcore does not).

    Args:
        value_shape: [N, S, M, D]
        sampling_locations_shape: [N, Lq, M, L, P, 2]
    """
    n, _, m, d = (int(x) for x in value_shape)
    _, lq, _, n_levels, n_points, _ = (int(x) for x in sampling_locations_shape)
    per_value = 5 if include_weighted_sum else 4
    return per_value * n * m * d * lq * n_levels * n_points


def ms_deform_attn_flop_counter_flops(value_shape, sampling_locations_shape, backward: bool = False) -> int:
    """What ``FlopCounterMode`` counts for the op (the formula registered for it).

    FlopCounterMode counts 2 FLOPs per multiply-add (``mm`` is ``2*m*n*k``) where fvcore counts 1, so the
    forward op is registered as ``2 * ms_deform_attn_flops(...)``: halving a FlopCounterMode total gives
    fvcore's convention for this op exactly as it does for matmuls and convolutions. The backward op is
    counted as twice the forward (gradients for value and for the sampled points), the convention
    FlopCounterMode uses for ``mm``.
    """
    forward = 2 * ms_deform_attn_flops(value_shape, sampling_locations_shape)
    return 2 * forward if backward else forward
