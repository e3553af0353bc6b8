"""Triton kernels of multi-scale deformable attention: forward, and backward for value, sampling locations
and attention weights. They serve ``torch.ops.sdetr.ms_deform_attn`` on CUDA tensors (`registrations`).

Semantics are the official CUDA kernel's, i.e. ``grid_sample`` with bilinear interpolation, zeros padding
and ``align_corners=False``: level l is sampled at pixel ``(x, y) = (loc_x * W_l - 0.5, loc_y * H_l - 0.5)``
and corners outside the map contribute zero.

Layout (the official one): value [N, S, M, D], sampling_locations [N, Lq, M, L, P, 2], attention_weights
[N, Lq, M, L, P], output [N, Lq, M, D]. A *row* is one (n, q, m), numbered ``g = (n * Lq + q) * M + m``,
so a row's points and its output channels are contiguous. Each program handles BLOCK_G rows:

* forward: grid (rows / BLOCK_G, D / BLOCK_D); each program sums its rows' L * P points for BLOCK_D
  channels in registers and writes them once (no atomics).
* backward: grid (rows / BLOCK_G,); for each point the program loops over D in BLOCK_D chunks, adds
  ``attn * w_k * grad_out`` to grad_value at the four corners with atomics (other rows sample the same
  pixels), and reduces over D in registers the three scalars a point's gradients need:
  ``<grad_out, sampled>`` (grad of the attention weight) and ``<grad_out, d sampled / dx>``, ``/ dy``
  (grad of the location). Those are written once per point by the program owning the row.

Precision: values are read in their dtype (fp32, fp16, bf16, fp64); arithmetic runs in ACC (fp32, or fp64
for fp64 values): locations and weights are converted to it before the launch, and grad_value is
accumulated in an ACC buffer (cast to value's dtype at the end). The atomics make grad_value's summation
order vary between runs (non-deterministic in the last bits).

Under Triton's interpreter (``TRITON_INTERPRET=1``) the same functions run on CPU tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdetr.detector.ops.triton_util import acc_dtype, acc_tl, import_triton, next_power_of_2

triton = import_triton()

# Rows x channels per program, and warps; chosen for D = 32 (8 heads x 32 channels, the papers' models).
MAX_BLOCK_D = 64
TILE = 2048
NUM_WARPS = 4

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _corners(lx, ly, H, W, level, row_stride, row_ok):
        """The four bilinear corners of the points (lx, ly) [BLOCK_G] on an H x W level.

        Returns the element offsets of the corners (y0,x0), (y0,x1), (y1,x0), (y1,x1) from ``level``
        (not to be read where invalid: every use is masked), their validity masks, and the fractional
        position (fx, fy).
        """
        wf = W.to(lx.dtype)
        hf = H.to(lx.dtype)
        x = lx * wf - 0.5
        y = ly * hf - 0.5
        # A point with no corner inside (NaN included) is moved to (-2, -2), where none is valid: keeps
        # the float -> int conversion below in range.
        inside = row_ok & (x > -1.0) & (y > -1.0) & (x < wf) & (y < hf)
        x = tl.where(inside, x, -2.0)
        y = tl.where(inside, y, -2.0)
        xf = tl.floor(x)
        yf = tl.floor(y)
        fx = x - xf
        fy = y - yf
        x0 = xf.to(tl.int64)
        y0 = yf.to(tl.int64)
        vx0 = inside & (x0 >= 0)
        vx1 = inside & (x0 + 1 < W)
        vy0 = inside & (y0 >= 0)
        vy1 = inside & (y0 + 1 < H)
        ok00 = vy0 & vx0
        ok01 = vy0 & vx1
        ok10 = vy1 & vx0
        ok11 = vy1 & vx1
        base = level + (y0 * W + x0) * row_stride
        # Offsets of invalid corners are computed but never dereferenced: every load and atomic add
        # of a corner is masked by its validity. (Selecting 0 for them with tl.where broke Triton 3.6's
        # layout pass for D divisible by 16: 'arith.select' with mismatched layouts on sm_90.)
        o00 = base
        o01 = base + row_stride
        o10 = base + W * row_stride
        o11 = base + (W + 1) * row_stride
        return o00, o01, o10, o11, ok00, ok01, ok10, ok11, fx, fy

    @triton.jit
    def msda_forward_kernel(
        value_ptr,  # [N, S, M, D]
        shapes_ptr,  # int64 [L, 2]
        starts_ptr,  # int64 [L]
        loc_ptr,  # ACC [N, Lq, M, L, P, 2]
        attn_ptr,  # ACC [N, Lq, M, L, P]
        out_ptr,  # [N, Lq, M, D], value's dtype
        G,  # rows: N * Lq * M
        Lq,
        S,
        M,
        D,
        L,
        P,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        chans = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < G
        chan_ok = chans < D
        row_stride = M * D
        head = (rows // M // Lq) * S * row_stride + (rows % M) * D  # value offset of (n, 0, m, 0)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=ACC)
        for lvl in range(L):
            H = tl.load(shapes_ptr + 2 * lvl)
            W = tl.load(shapes_ptr + 2 * lvl + 1)
            level = head + tl.load(starts_ptr + lvl) * row_stride
            for p in range(P):
                i = rows * (L * P) + (lvl * P + p)
                lx = tl.load(loc_ptr + 2 * i, mask=row_ok, other=0.0)
                ly = tl.load(loc_ptr + 2 * i + 1, mask=row_ok, other=0.0)
                aw = tl.load(attn_ptr + i, mask=row_ok, other=0.0)
                o00, o01, o10, o11, ok00, ok01, ok10, ok11, fx, fy = _corners(
                    lx, ly, H, W, level, row_stride, row_ok
                )
                c = chans[None, :]
                cm = chan_ok[None, :]
                v00 = tl.load(value_ptr + o00[:, None] + c, mask=ok00[:, None] & cm, other=0.0).to(ACC)
                v01 = tl.load(value_ptr + o01[:, None] + c, mask=ok01[:, None] & cm, other=0.0).to(ACC)
                v10 = tl.load(value_ptr + o10[:, None] + c, mask=ok10[:, None] & cm, other=0.0).to(ACC)
                v11 = tl.load(value_ptr + o11[:, None] + c, mask=ok11[:, None] & cm, other=0.0).to(ACC)
                w00 = aw * (1.0 - fx) * (1.0 - fy)
                w01 = aw * fx * (1.0 - fy)
                w10 = aw * (1.0 - fx) * fy
                w11 = aw * fx * fy
                acc += w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
        out_mask = row_ok[:, None] & chan_ok[None, :]
        out_offs = rows[:, None] * D + chans[None, :]
        tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)

    @triton.jit
    def msda_backward_kernel(
        grad_out_ptr,  # [N, Lq, M, D], value's dtype
        value_ptr,  # [N, S, M, D]
        shapes_ptr,  # int64 [L, 2]
        starts_ptr,  # int64 [L]
        loc_ptr,  # ACC [N, Lq, M, L, P, 2]
        attn_ptr,  # ACC [N, Lq, M, L, P]
        grad_value_ptr,  # ACC [N, S, M, D], zeroed; accumulated with atomics
        grad_loc_ptr,  # ACC [N, Lq, M, L, P, 2]
        grad_attn_ptr,  # ACC [N, Lq, M, L, P]
        G,
        Lq,
        S,
        M,
        D,
        L,
        P,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        row_ok = rows < G
        row_stride = M * D
        head = (rows // M // Lq) * S * row_stride + (rows % M) * D
        for lvl in range(L):
            H = tl.load(shapes_ptr + 2 * lvl)
            W = tl.load(shapes_ptr + 2 * lvl + 1)
            level = head + tl.load(starts_ptr + lvl) * row_stride
            for p in range(P):
                i = rows * (L * P) + (lvl * P + p)
                lx = tl.load(loc_ptr + 2 * i, mask=row_ok, other=0.0)
                ly = tl.load(loc_ptr + 2 * i + 1, mask=row_ok, other=0.0)
                aw = tl.load(attn_ptr + i, mask=row_ok, other=0.0)
                o00, o01, o10, o11, ok00, ok01, ok10, ok11, fx, fy = _corners(
                    lx, ly, H, W, level, row_stride, row_ok
                )
                w00 = (1.0 - fx) * (1.0 - fy)
                w01 = fx * (1.0 - fy)
                w10 = (1.0 - fx) * fy
                w11 = fx * fy
                g_attn = tl.zeros([BLOCK_G], dtype=ACC)
                g_x = tl.zeros([BLOCK_G], dtype=ACC)
                g_y = tl.zeros([BLOCK_G], dtype=ACC)
                for d0 in range(0, D, BLOCK_D):
                    chans = d0 + tl.arange(0, BLOCK_D)
                    c = chans[None, :]
                    cm = (chans < D)[None, :]
                    go = tl.load(
                        grad_out_ptr + rows[:, None] * D + c, mask=row_ok[:, None] & cm, other=0.0
                    ).to(ACC)
                    m00 = ok00[:, None] & cm
                    m01 = ok01[:, None] & cm
                    m10 = ok10[:, None] & cm
                    m11 = ok11[:, None] & cm
                    v00 = tl.load(value_ptr + o00[:, None] + c, mask=m00, other=0.0).to(ACC)
                    v01 = tl.load(value_ptr + o01[:, None] + c, mask=m01, other=0.0).to(ACC)
                    v10 = tl.load(value_ptr + o10[:, None] + c, mask=m10, other=0.0).to(ACC)
                    v11 = tl.load(value_ptr + o11[:, None] + c, mask=m11, other=0.0).to(ACC)
                    sampled = w00[:, None] * v00 + w01[:, None] * v01
                    sampled += w10[:, None] * v10 + w11[:, None] * v11
                    g_attn += tl.sum(go * sampled, axis=1)
                    # d sampled / dx and / dy (pixel units); invalid corners read as 0 (zeros padding).
                    dx = (1.0 - fy)[:, None] * (v01 - v00) + fy[:, None] * (v11 - v10)
                    dy = (1.0 - fx)[:, None] * (v10 - v00) + fx[:, None] * (v11 - v01)
                    g_x += tl.sum(go * dx, axis=1)
                    g_y += tl.sum(go * dy, axis=1)
                    ago = aw[:, None] * go
                    gv = grad_value_ptr + c
                    tl.atomic_add(gv + o00[:, None], w00[:, None] * ago, mask=m00, sem="relaxed")
                    tl.atomic_add(gv + o01[:, None], w01[:, None] * ago, mask=m01, sem="relaxed")
                    tl.atomic_add(gv + o10[:, None], w10[:, None] * ago, mask=m10, sem="relaxed")
                    tl.atomic_add(gv + o11[:, None], w11[:, None] * ago, mask=m11, sem="relaxed")
                tl.store(grad_attn_ptr + i, g_attn, mask=row_ok)
                # d x / d loc_x = W, d y / d loc_y = H.
                tl.store(grad_loc_ptr + 2 * i, aw * W.to(ACC) * g_x, mask=row_ok)
                tl.store(grad_loc_ptr + 2 * i + 1, aw * H.to(ACC) * g_y, mask=row_ok)


def blocks(d: int, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_G, BLOCK_D) for D channels: BLOCK_D covers D up to MAX_BLOCK_D, BLOCK_G fills the tile."""
    block_d = min(next_power_of_2(max(d, 1)), MAX_BLOCK_D)
    tile = TILE // 2 if backward else TILE
    return max(1, tile // block_d), block_d


def _prepare(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    acc = acc_dtype(value)
    return (
        value.contiguous(),
        spatial_shapes.to(device=value.device, dtype=torch.long).contiguous(),
        level_start_index.to(device=value.device, dtype=torch.long).contiguous(),
        sampling_locations.to(acc).contiguous(),
        attention_weights.to(acc).contiguous(),
        acc,
    )


def ms_deform_attn_forward(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Forward with the Triton kernel. Shapes as `ms_deform_attn_pytorch`; returns [N, Lq, M*D] in value's
    dtype. Inputs on one CUDA device (or CPU tensors under the interpreter); shapes are checked by the
    caller (`registrations.check_inputs`)."""
    v, ss, lsi, loc, attn, acc = _prepare(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    n, s, m, d = v.shape
    _, lq, _, n_levels, n_points, _ = loc.shape
    out = torch.empty((n, lq, m * d), dtype=v.dtype, device=v.device)
    rows = n * lq * m
    if out.numel() == 0:
        return out
    if n_levels * n_points == 0:
        return out.zero_()
    block_g, block_d = blocks(d)
    grid = (triton.cdiv(rows, block_g), triton.cdiv(d, block_d))
    msda_forward_kernel[grid](
        v, ss, lsi, loc, attn, out, rows, lq, s, m, d,
        L=n_levels, P=n_points, BLOCK_G=block_g, BLOCK_D=block_d, ACC=acc_tl(acc), num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def ms_deform_attn_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward with the Triton kernel: (grad_value, grad_sampling_locations, grad_attention_weights),
    each in its input's dtype. grad_output: [N, Lq, M*D]."""
    v, ss, lsi, loc, attn, acc = _prepare(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    n, s, m, d = v.shape
    _, lq, _, n_levels, n_points, _ = loc.shape
    go = grad_output.to(v.dtype).contiguous()
    grad_value = torch.zeros(v.shape, dtype=acc, device=v.device)
    grad_loc = torch.zeros(loc.shape, dtype=acc, device=v.device)
    grad_attn = torch.zeros(attn.shape, dtype=acc, device=v.device)
    rows = n * lq * m
    if rows > 0 and n_levels * n_points > 0 and d > 0:
        block_g, block_d = blocks(d, backward=True)
        msda_backward_kernel[(triton.cdiv(rows, block_g),)](
            go, v, ss, lsi, loc, attn, grad_value, grad_loc, grad_attn, rows, lq, s, m, d,
            L=n_levels, P=n_points, BLOCK_G=block_g, BLOCK_D=block_d, ACC=acc_tl(acc), num_warps=NUM_WARPS,
        )  # fmt: skip
    return (
        grad_value.to(value.dtype),
        grad_loc.to(sampling_locations.dtype),
        grad_attn.to(attention_weights.dtype),
    )


def aot_signatures(value_dtype: str = "fp32", acc: str = "fp32") -> dict:
    """{kernel: (signature, constexprs)} for `triton_util.aot_compile`, at the papers' model shape
    (4 levels, 4 points, D = 32)."""
    block_g, block_d = blocks(32)
    block_gb, block_db = blocks(32, backward=True)
    ints = {"G": "i32", "Lq": "i32", "S": "i32", "M": "i32", "D": "i32", "L": "i32", "P": "i32"}
    shape_ptrs = {"shapes_ptr": "*i64", "starts_ptr": "*i64"}
    sig = {"BLOCK_G": "constexpr", "BLOCK_D": "constexpr"}
    sig["ACC"] = "constexpr"
    fwd = {"value_ptr": f"*{value_dtype}", **shape_ptrs, "loc_ptr": f"*{acc}", "attn_ptr": f"*{acc}"}
    fwd.update({"out_ptr": f"*{value_dtype}", **ints, **sig})
    bwd = {"grad_out_ptr": f"*{value_dtype}", "value_ptr": f"*{value_dtype}", **shape_ptrs}
    bwd.update({"loc_ptr": f"*{acc}", "attn_ptr": f"*{acc}", "grad_value_ptr": f"*{acc}"})
    bwd.update({"grad_loc_ptr": f"*{acc}", "grad_attn_ptr": f"*{acc}", **ints, **sig})
    common = {"ACC": acc_tl(torch.float64 if acc == "fp64" else torch.float32)}
    return {
        msda_forward_kernel: (fwd, {**common, "BLOCK_G": block_g, "BLOCK_D": block_d}),
        msda_backward_kernel: (bwd, {**common, "BLOCK_G": block_gb, "BLOCK_D": block_db}),
    }
