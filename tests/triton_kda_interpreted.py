"""The Triton KDA kernels run by Triton's interpreter on CPU tensors, against the pure-PyTorch reference:
output, attention weights, and the gradients of query, value, key and sampling locations (including the
weights' own gradient).

Not collected by the default run (no ``test_`` prefix): `tests/test_kda_op.py` runs this file with pytest in
a subprocess with ``TRITON_INTERPRET=1``, which Triton reads when it is first imported. Inputs are tiny: the
interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

from sdetr.detector.ops.triton_util import interpreter_on

if not interpreter_on():
    pytest.skip("needs TRITON_INTERPRET=1 (run through tests/test_kda_op.py)", allow_module_level=True)

from sdetr.detector.layers.kda import key_aware_deform_attn  # noqa: E402
from sdetr.detector.ops import triton_kda  # noqa: E402
from tests.test_kda_op import make_inputs  # noqa: E402

# Unequal non-square levels, points inside, across the border of and outside every map, batch > 1, D not a
# power of two (masked channels), and more (n, q, m) rows than one program holds ("rows").
CASES = {
    "D1_b2": dict(n=2, m=2, d=1, shapes=((6, 4), (3, 5), (2, 2)), lq=5, p=3),
    "D6_L1": dict(n=1, m=1, d=6, shapes=((5, 7),), lq=4, p=4),
    "D32_b2_L4": dict(n=2, m=2, d=32, shapes=((7, 9), (4, 5), (2, 3), (1, 2)), lq=3, p=2),
    "rows": dict(n=1, m=3, d=16, shapes=((4, 5), (2, 3)), lq=50, p=1),
}
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=1e-5)}


def run(fn, inputs, seed=1):
    leaves = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
    out, weights = fn(*leaves)
    g = torch.Generator().manual_seed(seed)
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    grad_w = torch.randn(weights.shape, generator=g, dtype=weights.dtype)
    wrt = [t for t in leaves if t is not None and t.is_floating_point()]
    return out, weights, torch.autograd.grad([out, weights], wrt, [grad_out, grad_w])


class _Triton(torch.autograd.Function):
    """The two kernels wired as forward and backward (what the registered CUDA op does on a GPU)."""

    @staticmethod
    def forward(ctx, query, value, key, ss, lsi, loc):
        out, weights = triton_kda.kda_forward(query, value, key, ss, lsi, loc)
        ctx.save_for_backward(query, value, key, ss, lsi, loc, weights)
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, grad_w):
        query, value, key, ss, lsi, loc, weights = ctx.saved_tensors
        gq, gv, gk, gloc = triton_kda.kda_backward(grad_out, grad_w, query, value, key, ss, lsi, loc, weights)
        return gq, gv, gk if key is not None else None, None, None, gloc


def triton_fn(query, value, key, ss, lsi, loc):
    return _Triton.apply(query, value, key, ss, lsi, loc)


def reference(query, value, key, ss, lsi, loc):
    return key_aware_deform_attn(query, key, value, ss, loc)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("separate_key", [False, True])
@pytest.mark.parametrize("case", sorted(CASES))
def test_triton_kda_matches_reference(case, separate_key, dtype):
    inputs = make_inputs(**CASES[case], separate_key=separate_key, dtype=dtype)
    out, weights, grads = run(triton_fn, inputs)
    ref_out, ref_weights, ref_grads = run(reference, inputs)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    torch.testing.assert_close(weights, ref_weights, **TOL[dtype])
    names = ["query", "value", "key", "sampling_locations"] if separate_key else ["query", "value", "loc"]
    for name, got, want in zip(names, grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m, n=name: f"grad {n}: {m}")
