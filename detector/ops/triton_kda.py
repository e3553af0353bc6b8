"""Triton kernels of key-aware deformable attention: forward (output and attention weights) and backward
(query, value, key and sampling locations). They serve ``torch.ops.sdetr.kda`` on CUDA tensors
(`sdetr.detector.ops.kda`); under Triton's interpreter (``TRITON_INTERPRET=1``) they run on CPU tensors.

Semantics are those of ``csrc/cpu/kda_cpu.cpp`` (``grid_sample``: bilinear, zeros padding,
``align_corners=False``). A *row* is one (n, q, m), numbered ``g = (n * Lq + q) * M + m``; each program holds
BLOCK_G rows with all D channels in registers (BLOCK_D = D rounded up to a power of two):

Points are visited in loops (not unrolled: the compiled kernels stay small).

* forward: one pass over the L * P points with an online softmax (running maximum and denominator); the
  sample of a point gives the key too when keys are the values (``SHARED``). The scores are kept in a
  [BLOCK_G, L * P] register tile and normalised into the weights at the end.
* backward, with a_i the forward's weights and h_i = go . v_i (+ the weights' own gradient): pass 1 sums
  c = sum_i a_i h_i and the query gradient sum_i a_i (h_i - c) k_i / sqrt(D) without storing per-point
  vectors; pass 2 re-reads each point's corners, adds ``w a_i go`` (value) and ``w a_i (h_i - c) q / sqrt(D)``
  (key, or value when shared) to the corners with atomics (other rows sample the same pixels), and writes
  the location gradients. The atomics make grad_value's summation order vary in the last bits.

Arithmetic runs in ACC (fp32, or fp64 for fp64 inputs); inputs are read in their dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdetr.detector.ops.triton_util import acc_dtype, acc_tl, import_triton, kernel_device_ok, next_power_of_2

triton = import_triton()

TILE = 2048  # rows x channels per program
NUM_WARPS = 4

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _locate(lx, ly, H, W, level, row_stride, row_ok):
        """Corners (y0,x0), (y0,x1), (y1,x0), (y1,x1) of the points (lx, ly) [BLOCK_G] on an H x W level:
        element offsets from ``level`` (meaningless where a corner is outside: read only under its mask),
        inside-masks, bilinear weights, and (fx, fy)."""
        wf = W.to(lx.dtype)
        hf = H.to(lx.dtype)
        x = lx * wf - 0.5
        y = ly * hf - 0.5
        # Points with no corner inside (and NaN) go to (-2, -2): no corner valid, int conversion in range.
        inside = row_ok & (x > -1.0) & (y > -1.0) & (x < wf) & (y < hf)
        x = tl.where(inside, x, -2.0)
        y = tl.where(inside, y, -2.0)
        x0f = tl.floor(x)
        y0f = tl.floor(y)
        fx = x - x0f
        fy = y - y0f
        x0 = x0f.to(tl.int64)
        y0 = y0f.to(tl.int64)
        okx0 = x0 >= 0
        okx1 = x0 + 1 < W
        oky0 = inside & (y0 >= 0)
        oky1 = inside & (y0 + 1 < H)
        m00 = oky0 & okx0
        m01 = oky0 & okx1
        m10 = oky1 & okx0
        m11 = oky1 & okx1
        base = level + (y0 * W + x0) * row_stride
        # Offsets of invalid corners are computed but never dereferenced: every load and atomic add
        # of a corner is masked by its validity. (Selecting 0 for them with tl.where broke Triton 3.6's
        # layout pass for D divisible by 16: 'arith.select' with mismatched layouts on sm_90.)
        o00 = base
        o01 = base + row_stride
        o10 = base + W * row_stride
        o11 = base + (W + 1) * row_stride
        w00 = (1.0 - fx) * (1.0 - fy)
        w01 = fx * (1.0 - fy)
        w10 = (1.0 - fx) * fy
        w11 = fx * fy
        return o00, o01, o10, o11, m00, m01, m10, m11, w00, w01, w10, w11, fx, fy

    @triton.jit
    def _corner(ptr, off, ok, chans, chan_ok, ACC: tl.constexpr):
        """[BLOCK_G, BLOCK_D] channels at one corner (zeros where outside)."""
        return tl.load(
            ptr + off[:, None] + chans[None, :], mask=ok[:, None] & chan_ok[None, :], other=0.0
        ).to(ACC)

    @triton.jit
    def _sample(
        ptr, o00, o01, o10, o11, m00, m01, m10, m11, w00, w01, w10, w11, chans, chan_ok, ACC: tl.constexpr
    ):
        """[BLOCK_G, BLOCK_D] bilinear sample: the four corners' channels weighted by w_c."""
        out = w00[:, None] * _corner(ptr, o00, m00, chans, chan_ok, ACC)
        out += w01[:, None] * _corner(ptr, o01, m01, chans, chan_ok, ACC)
        out += w10[:, None] * _corner(ptr, o10, m10, chans, chan_ok, ACC)
        return out + w11[:, None] * _corner(ptr, o11, m11, chans, chan_ok, ACC)

    @triton.jit
    def _scatter(ptr, o00, o01, o10, o11, m00, m01, m10, m11, w00, w01, w10, w11, g, chans, chan_ok):
        """Add w_c * g [BLOCK_G, BLOCK_D] at the four corners (atomics: other rows sample the same pixels)."""
        c = chans[None, :]
        ok = chan_ok[None, :]
        tl.atomic_add(ptr + o00[:, None] + c, w00[:, None] * g, mask=m00[:, None] & ok, sem="relaxed")
        tl.atomic_add(ptr + o01[:, None] + c, w01[:, None] * g, mask=m01[:, None] & ok, sem="relaxed")
        tl.atomic_add(ptr + o10[:, None] + c, w10[:, None] * g, mask=m10[:, None] & ok, sem="relaxed")
        tl.atomic_add(ptr + o11[:, None] + c, w11[:, None] * g, mask=m11[:, None] & ok, sem="relaxed")

    @triton.jit
    def kda_forward_kernel(
        q_ptr,  # [N, Lq, M, D]
        value_ptr,  # [N, S, M, D]
        key_ptr,  # [N, S, M, D] (value_ptr when SHARED)
        shapes_ptr,  # int64 [L, 2]
        starts_ptr,  # int64 [L]
        loc_ptr,  # ACC [N, Lq, M, L, P, 2]
        out_ptr,  # [N, Lq, M, D]
        w_ptr,  # [N, Lq, M, L, P]
        G,
        Lq,
        S,
        M,
        D,
        scale_ptr,  # ACC [1]: 1 / sqrt(D)
        L: tl.constexpr,
        P: tl.constexpr,
        SHARED: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_LP: tl.constexpr,
        ACC: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        # From memory, in ACC: a Python float argument would reach the kernel as fp32, even for fp64.
        scale = tl.load(scale_ptr)
        chans = tl.arange(0, BLOCK_D)
        row_ok = rows < G
        chan_ok = chans < D
        tile_ok = row_ok[:, None] & chan_ok[None, :]
        row_stride = M * D
        head = (rows // M // Lq) * S * row_stride + (rows % M) * D
        q = tl.load(q_ptr + rows[:, None] * D + chans[None, :], mask=tile_ok, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=ACC)
        mx = tl.full([BLOCK_G], float("-inf"), dtype=ACC)
        den = tl.zeros([BLOCK_G], dtype=ACC)
        lp = tl.arange(0, BLOCK_LP)
        scores = tl.zeros([BLOCK_G, BLOCK_LP], dtype=ACC)
        for lvl in range(L):
            H = tl.load(shapes_ptr + 2 * lvl)
            W = tl.load(shapes_ptr + 2 * lvl + 1)
            level = head + tl.load(starts_ptr + lvl) * row_stride
            for p in range(P):
                i = rows * (L * P) + (lvl * P + p)
                lx = tl.load(loc_ptr + 2 * i, mask=row_ok, other=0.0)
                ly = tl.load(loc_ptr + 2 * i + 1, mask=row_ok, other=0.0)
                o00, o01, o10, o11, m00, m01, m10, m11, w00, w01, w10, w11, fx, fy = _locate(
                    lx, ly, H, W, level, row_stride, row_ok
                )
                corners = (o00, o01, o10, o11, m00, m01, m10, m11, w00, w01, w10, w11)
                v = _sample(value_ptr, *corners, chans, chan_ok, ACC)
                if SHARED:
                    k = v
                else:
                    k = _sample(key_ptr, *corners, chans, chan_ok, ACC)
                s = tl.sum(q * k, axis=1) * scale
                new_mx = tl.maximum(mx, s)
                r = tl.exp(mx - new_mx)
                e = tl.exp(s - new_mx)
                acc = acc * r[:, None] + e[:, None] * v
                den = den * r + e
                mx = new_mx
                scores = tl.where(lp[None, :] == lvl * P + p, s[:, None], scores)
        out = acc / den[:, None]
        tl.store(out_ptr + rows[:, None] * D + chans[None, :], out.to(out_ptr.dtype.element_ty), mask=tile_ok)
        weights = tl.exp(scores - mx[:, None]) / den[:, None]
        w_mask = row_ok[:, None] & (lp[None, :] < L * P)
        tl.store(
            w_ptr + rows[:, None] * (L * P) + lp[None, :], weights.to(w_ptr.dtype.element_ty), mask=w_mask
        )

    @triton.jit
    def kda_backward_kernel(
        go_ptr,  # [N, Lq, M, D]
        gw_ptr,  # ACC [N, Lq, M, L, P] (unused unless HAS_GW)
        q_ptr,
        value_ptr,
        key_ptr,
        shapes_ptr,
        starts_ptr,
        loc_ptr,  # ACC
        attn_ptr,  # ACC, the forward's weights
        gq_ptr,  # ACC [N, Lq, M, D]
        gv_ptr,  # ACC [N, S, M, D], zeroed
        gk_ptr,  # ACC [N, S, M, D], zeroed (unused when SHARED)
        gloc_ptr,  # ACC [N, Lq, M, L, P, 2]
        G,
        Lq,
        S,
        M,
        D,
        scale_ptr,  # ACC [1]: 1 / sqrt(D)
        L: tl.constexpr,
        P: tl.constexpr,
        SHARED: tl.constexpr,
        HAS_GW: tl.constexpr,
        BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
        # From memory, in ACC: a Python float argument would reach the kernel as fp32, even for fp64.
        scale = tl.load(scale_ptr)
        chans = tl.arange(0, BLOCK_D)
        row_ok = rows < G
        chan_ok = chans < D
        tile_ok = row_ok[:, None] & chan_ok[None, :]
        row_stride = M * D
        head = (rows // M // Lq) * S * row_stride + (rows % M) * D
        tile = rows[:, None] * D + chans[None, :]
        q = tl.load(q_ptr + tile, mask=tile_ok, other=0.0).to(ACC)
        go = tl.load(go_ptr + tile, mask=tile_ok, other=0.0).to(ACC)
        # Pass 1: c = sum_i a_i h_i, and the query gradient's two sums.
        c = tl.zeros([BLOCK_G], dtype=ACC)
        ahk = tl.zeros([BLOCK_G, BLOCK_D], dtype=ACC)
        ak = tl.zeros([BLOCK_G, BLOCK_D], dtype=ACC)
        for lvl in range(L):
            H = tl.load(shapes_ptr + 2 * lvl)
            W = tl.load(shapes_ptr + 2 * lvl + 1)
            level = head + tl.load(starts_ptr + lvl) * row_stride
            for p in range(P):
                i = rows * (L * P) + (lvl * P + p)
                lx = tl.load(loc_ptr + 2 * i, mask=row_ok, other=0.0)
                ly = tl.load(loc_ptr + 2 * i + 1, mask=row_ok, other=0.0)
                a = tl.load(attn_ptr + i, mask=row_ok, other=0.0)
                o00, o01, o10, o11, m00, m01, m10, m11, w00, w01, w10, w11, fx, fy = _locate(
                    lx, ly, H, W, level, row_stride, row_ok
                )
                corners = (o00, o01, o10, o11, m00, m01, m10, m11, w00, w01, w10, w11)
                v = _sample(value_ptr, *corners, chans, chan_ok, ACC)
                if SHARED:
                    k = v
                else:
                    k = _sample(key_ptr, *corners, chans, chan_ok, ACC)
                h = tl.sum(go * v, axis=1)
                if HAS_GW:
                    h += tl.load(gw_ptr + i, mask=row_ok, other=0.0)
                c += a * h
                ahk += (a * h)[:, None] * k
                ak += a[:, None] * k
        tl.store(gq_ptr + tile, scale * (ahk - c[:, None] * ak), mask=tile_ok)
        # Pass 2: scatter into the value / key gradients; location gradients.
        for lvl in range(L):
            H = tl.load(shapes_ptr + 2 * lvl)
            W = tl.load(shapes_ptr + 2 * lvl + 1)
            level = head + tl.load(starts_ptr + lvl) * row_stride
            for p in range(P):
                i = rows * (L * P) + (lvl * P + p)
                lx = tl.load(loc_ptr + 2 * i, mask=row_ok, other=0.0)
                ly = tl.load(loc_ptr + 2 * i + 1, mask=row_ok, other=0.0)
                a = tl.load(attn_ptr + i, mask=row_ok, other=0.0)
                o00, o01, o10, o11, m00, m01, m10, m11, w00, w01, w10, w11, fx, fy = _locate(
                    lx, ly, H, W, level, row_stride, row_ok
                )
                v00 = _corner(value_ptr, o00, m00, chans, chan_ok, ACC)
                v01 = _corner(value_ptr, o01, m01, chans, chan_ok, ACC)
                v10 = _corner(value_ptr, o10, m10, chans, chan_ok, ACC)
                v11 = _corner(value_ptr, o11, m11, chans, chan_ok, ACC)
                if SHARED:
                    k00, k01, k10, k11 = v00, v01, v10, v11
                else:
                    k00 = _corner(key_ptr, o00, m00, chans, chan_ok, ACC)
                    k01 = _corner(key_ptr, o01, m01, chans, chan_ok, ACC)
                    k10 = _corner(key_ptr, o10, m10, chans, chan_ok, ACC)
                    k11 = _corner(key_ptr, o11, m11, chans, chan_ok, ACC)
                gv00 = tl.sum(go * v00, axis=1)
                gv01 = tl.sum(go * v01, axis=1)
                gv10 = tl.sum(go * v10, axis=1)
                gv11 = tl.sum(go * v11, axis=1)
                h = w00 * gv00 + w01 * gv01 + w10 * gv10 + w11 * gv11
                if HAS_GW:
                    h += tl.load(gw_ptr + i, mask=row_ok, other=0.0)
                ck = scale * a * (h - c)  # d loss / d score, divided by sqrt(D)
                g00 = a * gv00 + ck * tl.sum(q * k00, axis=1)
                g01 = a * gv01 + ck * tl.sum(q * k01, axis=1)
                g10 = a * gv10 + ck * tl.sum(q * k10, axis=1)
                g11 = a * gv11 + ck * tl.sum(q * k11, axis=1)
                tl.store(
                    gloc_ptr + 2 * i, W.to(ACC) * ((1.0 - fy) * (g01 - g00) + fy * (g11 - g10)), mask=row_ok
                )
                tl.store(
                    gloc_ptr + 2 * i + 1,
                    H.to(ACC) * ((1.0 - fx) * (g10 - g00) + fx * (g11 - g01)),
                    mask=row_ok,
                )
                gval = a[:, None] * go
                gkey = ck[:, None] * q
                if SHARED:
                    gval += gkey
                corners = (o00, o01, o10, o11, m00, m01, m10, m11, w00, w01, w10, w11)
                _scatter(gv_ptr, *corners, gval, chans, chan_ok)
                if not SHARED:
                    _scatter(gk_ptr, *corners, gkey, chans, chan_ok)


def blocks(d: int, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_G, BLOCK_D): all D channels in one block, rows filling the tile (half a tile for the backward,
    which holds four [rows, D] tiles across its points)."""
    block_d = next_power_of_2(max(d, 1))
    return max(1, (TILE // 2 if backward else TILE) // block_d), block_d


def _check(query: Tensor, value: Tensor, key: Tensor | None, loc: Tensor) -> None:
    torch._check(query.dim() == 4 and value.dim() == 4, lambda: "kda: query and value must be 4-D")
    torch._check(loc.dim() == 6 and loc.shape[5] == 2, lambda: "kda: sampling_locations must be 6-D")
    torch._check(key is None or key.shape == value.shape, lambda: "kda: key must have value's shape")
    torch._check(kernel_device_ok(value.device), lambda: f"kda (Triton): unsupported device {value.device}")


def _prepare(query, value, key, spatial_shapes, level_start_index, loc):
    """Checked, contiguous kernel inputs: (ACC dtype, q, v, k (v when keys are the values), shapes and
    level starts as int64 on value's device, locations in ACC, and 1 / sqrt(D) as a one-element ACC
    tensor, computed in double precision as the CPU op does)."""
    _check(query, value, key, loc)
    acc = acc_dtype(value)
    q, v = query.contiguous(), value.contiguous()
    k = v if key is None else key.contiguous()
    ss = spatial_shapes.to(device=v.device, dtype=torch.long).contiguous()
    lsi = level_start_index.to(device=v.device, dtype=torch.long).contiguous()
    scale = torch.full((1,), max(v.shape[-1], 1) ** -0.5, dtype=acc, device=v.device)
    return acc, q, v, k, ss, lsi, loc.to(acc).contiguous(), scale


def kda_forward(query, value, key, spatial_shapes, level_start_index, sampling_locations):
    """Forward with the Triton kernel; shapes as ``torch.ops.sdetr.kda``. Returns (output [N, Lq, M*D],
    attention_weights [N, Lq, M, L, P]) in value's dtype."""
    prepared = _prepare(query, value, key, spatial_shapes, level_start_index, sampling_locations)
    acc, q, v, k, ss, lsi, loc, scale = prepared
    n, s, m, d = v.shape
    _, lq, _, n_levels, n_points, _ = loc.shape
    out = torch.zeros((n, lq, m * d), dtype=v.dtype, device=v.device)
    weights = torch.full(loc.shape[:5], 1.0 / max(n_levels * n_points, 1), dtype=v.dtype, device=v.device)
    rows = n * lq * m
    if rows == 0 or n_levels * n_points == 0 or d == 0:
        return out, weights
    block_g, block_d = blocks(d)
    kda_forward_kernel[(triton.cdiv(rows, block_g),)](
        q, v, k, ss, lsi, loc, out, weights, rows, lq, s, m, d, scale,
        L=n_levels, P=n_points, SHARED=key is None, BLOCK_G=block_g, BLOCK_D=block_d,
        BLOCK_LP=next_power_of_2(n_levels * n_points), ACC=acc_tl(acc), num_warps=NUM_WARPS,
    )  # fmt: skip
    return out, weights


def kda_backward(grad_output, grad_weights, query, value, key, spatial_shapes, level_start_index, loc, attn):
    """Backward with the Triton kernel: (grad_query, grad_value, grad_key or an empty tensor,
    grad_sampling_locations), each in its input's dtype."""
    acc, q, v, k, ss, lsi, loc_acc, scale = _prepare(
        query, value, key, spatial_shapes, level_start_index, loc
    )
    a = attn.to(acc).contiguous()
    go = grad_output.to(v.dtype).contiguous()
    gw = grad_weights.to(acc).contiguous() if grad_weights is not None else a
    n, s, m, d = v.shape
    _, lq, _, n_levels, n_points, _ = loc.shape
    grad_q = torch.zeros(q.shape, dtype=acc, device=v.device)
    grad_v = torch.zeros(v.shape, dtype=acc, device=v.device)
    grad_k = torch.zeros(v.shape, dtype=acc, device=v.device) if key is not None else grad_v
    grad_loc = torch.zeros(loc.shape, dtype=acc, device=v.device)
    rows = n * lq * m
    if rows > 0 and n_levels * n_points > 0 and d > 0:
        block_g, block_d = blocks(d, backward=True)
        kda_backward_kernel[(triton.cdiv(rows, block_g),)](
            go, gw, q, v, k, ss, lsi, loc_acc, a, grad_q, grad_v, grad_k, grad_loc,
            rows, lq, s, m, d, scale,
            L=n_levels, P=n_points, SHARED=key is None, HAS_GW=grad_weights is not None, BLOCK_G=block_g,
            BLOCK_D=block_d, ACC=acc_tl(acc), num_warps=NUM_WARPS,
        )  # fmt: skip
    grad_key = grad_k.to(value.dtype) if key is not None else value.new_empty((0,))
    return grad_q.to(query.dtype), grad_v.to(value.dtype), grad_key, grad_loc.to(loc.dtype)


def aot_signatures(value_dtype: str = "fp32", acc: str = "fp32", shared: bool = True) -> dict:
    """{kernel: (signature, constexprs)} for `triton_util.aot_compile` at the papers' model shape (4 levels,
    4 points, D = 32)."""
    block_g, block_d = blocks(32)
    block_gb, _ = blocks(32, backward=True)
    acc_type = acc_tl(torch.float64 if acc == "fp64" else torch.float32)
    ints = {"G": "i32", "Lq": "i32", "S": "i32", "M": "i32", "D": "i32", "scale_ptr": f"*{acc}"}
    tables = {"shapes_ptr": "*i64", "starts_ptr": "*i64"}
    data = {"q_ptr": f"*{value_dtype}", "value_ptr": f"*{value_dtype}", "key_ptr": f"*{value_dtype}"}
    common = {"L": 4, "P": 4, "SHARED": shared, "BLOCK_G": block_g, "BLOCK_D": block_d, "ACC": acc_type}
    fwd = {**data, **tables, "loc_ptr": f"*{acc}", "out_ptr": f"*{value_dtype}", "w_ptr": f"*{value_dtype}"}
    fwd.update(ints)
    fwd.update({name: "constexpr" for name in (*common, "BLOCK_LP")})
    bwd = {"go_ptr": f"*{value_dtype}", "gw_ptr": f"*{acc}", **data, **tables}
    bwd.update({"loc_ptr": f"*{acc}", "attn_ptr": f"*{acc}", "gq_ptr": f"*{acc}", "gv_ptr": f"*{acc}"})
    bwd.update({"gk_ptr": f"*{acc}", "gloc_ptr": f"*{acc}", **ints})
    bwd.update({name: "constexpr" for name in (*common, "HAS_GW")})
    return {
        kda_forward_kernel: (fwd, {**common, "BLOCK_LP": 16}),
        kda_backward_kernel: (bwd, {**common, "BLOCK_G": block_gb, "HAS_GW": False}),
    }
