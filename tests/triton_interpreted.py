"""The Triton deformable-attention kernels run by Triton's interpreter on CPU tensors, against the
pure-PyTorch reference: forward and the gradients of value, sampling locations and attention weights.

Not collected by the default run (no ``test_`` prefix): `tests/test_triton_msda.py` runs this file with
pytest in a subprocess with ``TRITON_INTERPRET=1``, which Triton reads when it is first imported, and the
main test process may have imported Triton already. Inputs are tiny: the interpreter is slow.
"""

from __future__ import annotations

import pytest
import torch

from sdetr.detector.ops.triton_util import interpreter_on

if not interpreter_on():
    pytest.skip("needs TRITON_INTERPRET=1 (run through tests/test_triton_msda.py)", allow_module_level=True)

from sdetr.detector.layers.ms_deform_attn import ms_deform_attn_pytorch  # noqa: E402
from sdetr.detector.ops import cuda_impl, triton_msda  # noqa: E402
from tests.test_ms_deform_attn_op import make_inputs  # noqa: E402

# Unequal non-square levels, points inside, across the border of and outside every map (make_inputs),
# batch > 1, and head widths below, at and above one channel block (MAX_BLOCK_D = 64): D = 71 takes two
# blocks, D = 1 and 30 leave most of a block masked. "rows" has more (n, q, m) rows than one program holds.
CASES = {
    "D1_b2": dict(n=2, m=2, d=1, shapes=((6, 4), (3, 5), (2, 2)), lq=5, p=3),
    "D8_b3_L1": dict(n=3, m=1, d=8, shapes=((5, 7),), lq=4, p=4),
    "D30": dict(n=1, m=2, d=30, shapes=((4, 3), (2, 3)), lq=4, p=2),
    "D32_b2_L4": dict(n=2, m=2, d=32, shapes=((7, 9), (4, 5), (2, 3), (1, 2)), lq=3, p=2),
    "D71": dict(n=1, m=2, d=71, shapes=((3, 2), (2, 1), (1, 1)), lq=3, p=2),
    "rows": dict(n=2, m=3, d=16, shapes=((4, 5), (2, 3)), lq=30, p=1),
}
TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=2e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=3e-2, rtol=2e-2),
}
NAMES = ("output", "grad value", "grad sampling_locations", "grad attention_weights")


def _padded(args, dtype):
    """Zero the last tokens of every level in batch 0, as the model does at padded pixels."""
    value, ss, lsi = args[0], args[1], args[2]
    value = value.detach().clone()
    for (h, w), start in zip(ss.tolist(), lsi.tolist()):
        value[0, start + (h - 1) * w : start + h * w] = 0
    return [value, *args[1:]]


def _reference(args, grad_out):
    """Output and the three gradients of the reference, in float64."""
    ref = [a.detach().double().requires_grad_() if a.is_floating_point() else a for a in args]
    out = ms_deform_attn_pytorch(*ref)
    grads = torch.autograd.grad(out, [ref[0], ref[3], ref[4]], grad_out.double())
    return (out, *grads)


def _check(args, dtype):
    inputs = [a.detach().to(dtype) if a.is_floating_point() else a for a in args]
    out = triton_msda.ms_deform_attn_forward(*inputs)
    grad_out = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    grads = triton_msda.ms_deform_attn_backward(grad_out, *inputs)
    # The reference sees the same (rounded) inputs, so only the kernels' arithmetic differs.
    want = _reference(inputs, grad_out)
    got = (out, *grads)
    for name, a, b, src in zip(NAMES, got, want, (inputs[0], inputs[0], inputs[3], inputs[4])):
        assert a.dtype == src.dtype, f"{name}: dtype {a.dtype}, expected {src.dtype}"
        tol = TOL[dtype]
        if dtype == torch.bfloat16 and name != "output":
            # Gradients sum many bf16-rounded products: compare relative to their scale.
            tol = dict(atol=3e-2 * float(b.abs().max()) + 1e-3, rtol=0)
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference(case, dtype):
    _check(make_inputs(**CASES[case], seed=3), dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_padded_tokens(dtype):
    _check(_padded(make_inputs(**CASES["D32_b2_L4"], seed=4), dtype), dtype)


def test_mixed_dtypes_fp16_value_fp32_locations():
    """Under autocast the op gets an fp16 value with fp32 locations and weights."""
    v, ss, lsi, loc, attn = make_inputs(**CASES["D30"], seed=5)
    v16 = v.half()
    out = triton_msda.ms_deform_attn_forward(v16, ss, lsi, loc.float(), attn.float())
    assert out.dtype == torch.float16
    ref = ms_deform_attn_pytorch(v16.double(), ss, lsi, loc, attn)
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)
    grads = triton_msda.ms_deform_attn_backward(torch.ones_like(out), v16, ss, lsi, loc.float(), attn.float())
    assert [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float32]


def test_empty_inputs():
    v, ss, lsi, loc, attn = make_inputs(**CASES["D30"], dtype=torch.float32)
    assert triton_msda.ms_deform_attn_forward(v, ss, lsi, loc[:, :0], attn[:, :0]).shape == (1, 0, 60)
    grads = triton_msda.ms_deform_attn_backward(torch.empty(1, 0, 60), v, ss, lsi, loc[:, :0], attn[:, :0])
    assert grads[0].shape == v.shape and not grads[0].any()


def test_cuda_entry_point_checks_inputs():
    """The op's CUDA kernel (`cuda_impl.forward_cuda`) checks shapes before launching Triton."""
    v, ss, lsi, loc, attn = make_inputs(**CASES["D30"], dtype=torch.float32)
    want = triton_msda.ms_deform_attn_forward(v, ss, lsi, loc, attn)
    torch.testing.assert_close(cuda_impl.forward_cuda(v, ss, lsi, loc, attn), want)
    with pytest.raises(RuntimeError, match="attention_weights"):
        cuda_impl.forward_cuda(v, ss, lsi, loc, attn[..., :1])
    with pytest.raises(RuntimeError, match="value must be"):
        cuda_impl.forward_cuda(v[0], ss, lsi, loc, attn)
