"""The compiled multi-scale deformable attention op (csrc/) against the pure-PyTorch reference.

The op is built once per session (the `op` fixture). A missing toolchain (no C++ compiler or ninja) skips
these tests with the reason, unless CI or SDETR_REQUIRE_COMPILED_OP is set; any other build or load
failure fails them. CUDA tests are marked `cuda` and skipped without a GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sdetr.detector import ops
from sdetr.detector.layers.ms_deform_attn import ms_deform_attn, ms_deform_attn_pytorch

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# name -> sizes. Non-square maps, several levels, channel counts 1, 30, 32, 64, 71 and 1025 (tiny elsewhere).
CONFIGS = {
    "D1": dict(n=2, m=2, d=1, shapes=((6, 4), (3, 5), (2, 2)), lq=5, p=3),
    "D30": dict(n=1, m=2, d=30, shapes=((4, 3), (2, 3)), lq=4, p=2),
    "D32": dict(n=2, m=2, d=32, shapes=((4, 3), (3, 2), (1, 2)), lq=3, p=2),
    "D64": dict(n=1, m=2, d=64, shapes=((3, 4), (2, 1)), lq=3, p=2),
    "D71": dict(n=1, m=2, d=71, shapes=((3, 2), (2, 1), (1, 1)), lq=3, p=2),
    "D1025": dict(n=1, m=1, d=1025, shapes=((2, 1), (1, 2)), lq=2, p=3),
}


def make_inputs(n, m, d, shapes, lq, p, dtype=torch.float64, device="cpu", requires_grad=False, seed=0):
    """Inputs with sampling points inside, across the border of and outside each map.

    Points are drawn in pixel space as integer + U(0.1, 0.9), so that none lies on an exact integer pixel
    coordinate (where bilinear sampling is not differentiable); x ranges over [-1.9, W + 1.9]
    (a pixel x = loc_x * W - 0.5).
    """
    g = torch.Generator().manual_seed(seed)
    ss = torch.tensor(shapes, dtype=torch.long)
    lsi = torch.cat([ss.new_zeros(1), (ss[:, 0] * ss[:, 1]).cumsum(0)[:-1]])
    s = int((ss[:, 0] * ss[:, 1]).sum())
    n_levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    size_wh = ss.flip(-1).to(torch.float64)  # (W, H) per level
    shape = (n, lq, m, n_levels, p, 2)
    cell = (torch.rand(shape, generator=g, dtype=torch.float64) * (size_wh[:, None, :] + 4)).floor() - 2
    pix = cell + 0.1 + 0.8 * torch.rand(cell.shape, generator=g, dtype=torch.float64)
    loc = (pix + 0.5) / size_wh[:, None, :]
    attn = torch.randn(n, lq, m, n_levels * p, generator=g, dtype=torch.float64).softmax(-1)
    attn = attn.view(n, lq, m, n_levels, p)
    out = []
    for t in (value, ss, lsi, loc, attn):
        if t.is_floating_point():
            t = t.to(dtype=dtype, device=device).requires_grad_(requires_grad)
        else:
            t = t.to(device)
        out.append(t)
    return out


def _toolchain_missing_ok() -> bool:
    return not (os.environ.get("CI") or os.environ.get("SDETR_REQUIRE_COMPILED_OP"))


@pytest.fixture(scope="session")
def op():
    """Builds/loads the compiled op once per session."""
    if os.environ.get(ops.BACKEND_ENV, "auto").lower() == "pytorch":
        pytest.skip(f"{ops.BACKEND_ENV}=pytorch")
    state = ops.load(force=True)
    if not state.loaded:
        missing = "no C++ compiler" in state.reason or "ninja is not installed" in state.reason
        if missing and _toolchain_missing_ok():
            pytest.skip(f"compiled op unavailable: {state.reason} (fix: {state.fix})")
        pytest.fail(f"compiled op failed to build/load: {state.reason}\nfix: {state.fix}")
    return torch.ops.sdetr.ms_deform_attn


@pytest.fixture(scope="session")
def cuda_op(op):
    """The op on CUDA tensors: Triton, or the opt-in CUDA C++ kernels with SDETR_MSDA_CUDA_IMPL=cpp."""
    st = ops.load()
    if not (st.triton or st.cuda):
        pytest.fail(f"the op has no CUDA kernels on a machine with a GPU: {ops.backend_status(load=False)}")
    return op


def _grads(fn, inputs, grad_out):
    outs = fn(*inputs)
    return (outs, *torch.autograd.grad(outs, [inputs[0], inputs[3], inputs[4]], grad_out))


TOL = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=5e-6, rtol=1e-5),
}
GRAD_TOL = {
    torch.float64: dict(atol=1e-11, rtol=1e-10),
    torch.float32: dict(atol=5e-5, rtol=1e-5),
}


# --------------------------------------------------------------------------------------------------
# CPU
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_forward_matches_reference(op, cfg, dtype):
    args = make_inputs(**CONFIGS[cfg], dtype=dtype)
    out = op(*args)
    ref = ms_deform_attn_pytorch(*args)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cfg", ["D1", "D32", "D71"])
def test_backward_matches_reference(op, cfg, dtype):
    args = make_inputs(**CONFIGS[cfg], dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(ms_deform_attn_pytorch(*args))
    got = _grads(op, args, grad_out)
    want = _grads(ms_deform_attn_pytorch, args, grad_out)
    for name, a, b in zip(("output", "value", "sampling_locations", "attention_weights"), got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_gradcheck_fp64(op, cfg):
    args = make_inputs(**CONFIGS[cfg], requires_grad=True, seed=1)
    assert torch.autograd.gradcheck(op, args, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_sparse_detr_like_shapes_fp32(op):
    """Four levels, 8 heads x 32 channels, 4 points, batch 2: the layout of the real model."""
    args = make_inputs(
        2, 8, 32, ((13, 16), (7, 8), (4, 4), (2, 2)), 40, 4, dtype=torch.float32, requires_grad=True
    )
    grad_out = torch.randn(2, 40, 256)
    for a, b in zip(_grads(op, args, grad_out), _grads(ms_deform_attn_pytorch, args, grad_out)):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5)


def test_backward_with_more_threads_than_heads(op):
    """With N * M < threads the backward splits each head's queries and sums per-chunk grad_value buffers."""
    args = make_inputs(1, 1, 8, ((9, 7), (4, 5)), 300, 2, requires_grad=True)
    grad_out = torch.randn(1, 300, 8, dtype=torch.float64)
    want = _grads(ms_deform_attn_pytorch, args, grad_out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        got = _grads(op, args, grad_out)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL[torch.float64])


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_many_queries_in_spatial_order(op, threads):
    """Enough queries that the kernels' spatial visiting order (queries sorted by their mean sampling
    location) differs from the input order, batch 2, M = 3 heads (not divisible into the thread count's
    head groups): forward and all three gradients against the reference."""
    args = make_inputs(2, 3, 32, ((11, 13), (6, 7), (3, 4)), 257, 3, requires_grad=True, seed=3)
    grad_out = torch.randn(2, 257, 96, dtype=torch.float64)
    want = _grads(ms_deform_attn_pytorch, args, grad_out)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        got = _grads(op, args, grad_out)
    finally:
        torch.set_num_threads(saved)
    for name, a, b in zip(("output", "value", "sampling_locations", "attention_weights"), got, want):
        torch.testing.assert_close(a, b, **GRAD_TOL[torch.float64], msg=lambda m, name=name: f"{name}: {m}")


def test_non_finite_locations(op):
    """A NaN or infinite sampling location contributes nothing (and gets zero gradients), and does not
    disturb the visiting order of the other queries."""
    v, ss, lsi, loc, attn = make_inputs(**CONFIGS["D32"])
    bad = loc.clone()
    bad[0, 1, 0, 0, 0, 0] = float("nan")
    bad[1, 2, 1, 1, 1, 1] = float("inf")
    bad[0, 0] = float("nan")  # every point of one query: its mean location is NaN
    keep = attn.clone()
    keep[0, 1, 0, 0, 0] = 0
    keep[1, 2, 1, 1, 1] = 0
    keep[0, 0] = 0
    torch.testing.assert_close(op(v, ss, lsi, bad, attn), op(v, ss, lsi, loc, keep), **TOL[torch.float64])
    grad_out = torch.randn(2, 3, 64, dtype=torch.float64)
    _, g_loc, g_attn = torch.ops.sdetr.ms_deform_attn_backward(grad_out, v, ss, lsi, bad, attn)
    assert torch.isfinite(g_loc).all() and torch.isfinite(g_attn).all()
    assert g_attn[0, 0].abs().sum() == 0 and g_loc[0, 1, 0, 0, 0].abs().sum() == 0


@pytest.mark.parametrize("points", [2, 3, 5], ids=["LP8", "LP12", "LP20"])
def test_fp32_corners_in_vector_and_tail_lanes(op, points, monkeypatch):
    """fp32 rows of L * P = 8, 12 and 20 points: the AVX2 copy locates 8 points at a time and the rest
    one by one. With non-finite locations in both parts, it matches the reference (the non-finite points
    as points of zero weight) and the baseline copy."""
    cfg = dict(n=1, m=2, d=32, shapes=((5, 7), (3, 4), (2, 3), (1, 2)), lq=4, p=points)
    v, ss, lsi, loc, attn = make_inputs(**cfg, dtype=torch.float32)
    bad, keep = loc.clone(), attn.clone()
    for q, head, level, point, xy, x in (
        (0, 0, 0, 0, 0, "nan"),
        (1, 1, 3, points - 1, 1, "inf"),
        (2, 0, 2, points - 1, 0, "-inf"),
        (3, 1, 1, 0, 1, "nan"),
    ):
        bad[0, q, head, level, point, xy] = float(x)
        keep[0, q, head, level, point] = 0
    args = [t.detach().requires_grad_() if t.is_floating_point() else t for t in (v, ss, lsi, bad, attn)]
    grad_out = torch.randn(1, cfg["lq"], 64)
    default = _grads(op, args, grad_out)
    ref_args = [t.detach().requires_grad_() if t.is_floating_point() else t for t in (v, ss, lsi, loc, keep)]
    reference = _grads(ms_deform_attn_pytorch, ref_args, grad_out)
    torch.testing.assert_close(default[0], reference[0], **TOL[torch.float32])
    torch.testing.assert_close(default[1], reference[1], **GRAD_TOL[torch.float32])
    finite = torch.isfinite(bad).all(-1, keepdim=True)  # [N, Lq, M, L, P, 1]
    torch.testing.assert_close(default[2] * finite, reference[2] * finite, **GRAD_TOL[torch.float32])
    finite_point = finite[..., 0]
    tol = GRAD_TOL[torch.float32]
    torch.testing.assert_close(default[3] * finite_point, reference[3] * finite_point, **tol)
    for grad in default[2:]:
        assert torch.isfinite(grad).all()
    assert (default[2] * ~finite == 0).all() and (default[3] * ~finite_point == 0).all()
    monkeypatch.setenv("SDETR_MSDA_CPU_ISA", "default")
    baseline = _grads(op, args, grad_out)
    for a, b in zip(default, baseline):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_baseline_isa_matches_avx2(op, monkeypatch):
    args = make_inputs(**CONFIGS["D32"], dtype=torch.float32, requires_grad=True)
    grad_out = torch.randn(2, 3, 64)
    default = _grads(op, args, grad_out)
    monkeypatch.setenv("SDETR_MSDA_CPU_ISA", "default")
    baseline = _grads(op, args, grad_out)
    for a, b in zip(default, baseline):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_on_cpu(op, dtype):
    args = make_inputs(**CONFIGS["D32"], dtype=dtype, requires_grad=True)
    out = op(*args)
    assert out.dtype == dtype
    ref = ms_deform_attn_pytorch(*[a.detach().double() if a.is_floating_point() else a for a in args])
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    out.sum().backward()
    assert args[0].grad.dtype == dtype and args[3].grad.dtype == dtype and args[4].grad.dtype == dtype


def test_mixed_dtypes(op):
    """fp32 value with fp64 locations/weights: output in value's dtype, each grad in its input's."""
    v, ss, lsi, loc, attn = make_inputs(**CONFIGS["D30"], requires_grad=True)
    v32 = v.detach().float().requires_grad_()
    out = op(v32, ss, lsi, loc, attn)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        out.double(), ms_deform_attn_pytorch(v, ss, lsi, loc, attn), atol=1e-5, rtol=1e-5
    )
    out.sum().backward()
    assert v32.grad.dtype == torch.float32 and loc.grad.dtype == torch.float64


def test_empty_and_invalid_inputs(op):
    v, ss, lsi, loc, attn = make_inputs(**CONFIGS["D32"])
    out = op(v, ss, lsi, loc[:, :0], attn[:, :0])
    assert out.shape == (2, 0, 64)
    with pytest.raises(RuntimeError, match="does not fit"):
        op(v[:, :-1], ss, lsi, loc, attn)
    with pytest.raises(RuntimeError, match="attention_weights"):
        op(v, ss, lsi, loc, attn[..., :1])
    with pytest.raises(RuntimeError, match="value must be"):
        op(v[0], ss, lsi, loc, attn)


def test_opcheck_cpu(op):
    args = make_inputs(**CONFIGS["D32"], requires_grad=True)
    torch.library.opcheck(torch.ops.sdetr.ms_deform_attn.default, args)
    plain = [a.detach() for a in args]
    torch.library.opcheck(torch.ops.sdetr.ms_deform_attn.default, plain)
    grad_out = torch.randn(2, 3, 64, dtype=torch.float64)
    torch.library.opcheck(torch.ops.sdetr.ms_deform_attn_backward.default, [grad_out, *plain])


def test_flop_counter_and_fake_tensors(op):
    args = make_inputs(**CONFIGS["D32"], requires_grad=True)
    fvcore = ops.ms_deform_attn_flops(args[0].shape, args[3].shape)
    n, lq, m, n_levels, p, _ = args[3].shape
    assert fvcore == 4 * n * m * 32 * lq * n_levels * p
    assert (
        ops.ms_deform_attn_flops(args[0].shape, args[3].shape, include_weighted_sum=True) == fvcore // 4 * 5
    )
    with FlopCounterMode(display=False) as counter:
        op(*args).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    assert counts[torch.ops.sdetr.ms_deform_attn] == 2 * fvcore
    assert counts[torch.ops.sdetr.ms_deform_attn_backward] == 4 * fvcore

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) for a in args]
        with FlopCounterMode(display=False) as counter:
            out = op(*fake)
        assert out.shape == (2, 3, 64) and out.dtype == torch.float64
    assert counter.get_total_flops() == 2 * fvcore


def test_torch_compile(op):
    args = make_inputs(**CONFIGS["D32"], dtype=torch.float32, requires_grad=True)
    grad_out = torch.randn(2, 3, 64)
    compiled = torch.compile(
        lambda *a: torch.ops.sdetr.ms_deform_attn(*a) * 2, backend="aot_eager", fullgraph=True
    )
    got = _grads(compiled, args, grad_out)
    want = _grads(lambda *a: op(*a) * 2, args, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # The detector's entry point (dispatch included) compiles too.
    detector = torch.compile(ms_deform_attn, backend="aot_eager")
    torch.testing.assert_close(detector(*args), want[0] / 2)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", ["auto", "compiled", "pytorch"])
def test_detector_dispatch(op, monkeypatch, mode):
    monkeypatch.setenv(ops.BACKEND_ENV, mode)
    args = make_inputs(**CONFIGS["D32"], dtype=torch.float32)
    with _RecordOps() as rec:
        out = ms_deform_attn(*args)
    assert ("sdetr.ms_deform_attn.default" in rec.names) == (mode != "pytorch")
    torch.testing.assert_close(out, ms_deform_attn_pytorch(*args), **TOL[torch.float32])


def test_backend_status(op):
    st = ops.backend_status()
    assert st["backend"] == "compiled" and st["loaded"] and st["devices"]["cpu"] == "compiled"
    assert st["build_dir"] and st["reason"] and st["fix"]
    from sdetr.platform.cli.doctor import doctor_report

    report = doctor_report()
    assert "ms_deform_attn" in report and "backend       compiled" in report


def test_fallback_without_compiler(tmp_path):
    """No compiler: `auto` warns once and uses the reference on CPU, `compiled` raises, doctor says how to
    fix; the op is still defined (from Python) with its Triton CUDA kernels."""
    code = textwrap.dedent(
        """
        import os, warnings, torch
        from sdetr.detector import ops
        from sdetr.detector.layers.ms_deform_attn import ms_deform_attn, ms_deform_attn_pytorch
        from sdetr.platform.cli.doctor import main_doctor
        ss = torch.tensor([[3, 4], [2, 2]]); lsi = torch.tensor([0, 12])
        args = (torch.randn(1, 16, 2, 4), ss, lsi, torch.rand(1, 5, 2, 2, 2, 2), torch.rand(1, 5, 2, 2, 2))
        os.environ[ops.BACKEND_ENV] = "compiled"
        try:
            ms_deform_attn(*args)
            raise SystemExit("compiled mode did not raise")
        except RuntimeError as e:
            assert "no C++ compiler" in str(e), e
        os.environ[ops.BACKEND_ENV] = "auto"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = ms_deform_attn(*args)
            b = ms_deform_attn(*args)
        msgs = [str(w.message) for w in caught if "ms_deform_attn" in str(w.message)]
        assert len(msgs) == 1 and "no C++ compiler" in msgs[0] and "sdetr doctor" in msgs[0], msgs
        torch.testing.assert_close(a, ms_deform_attn_pytorch(*args))
        torch.testing.assert_close(a, b)
        st = ops.backend_status()
        assert st["backend"] == "pytorch" and "compiler" in st["reason"] and "install" in st["fix"], st
        assert main_doctor(None) == 1
        # Without the C++ library the schema comes from Python, and Triton still serves CUDA tensors.
        from sdetr.detector.ops import registrations
        has = torch._C._dispatch_has_kernel_for_dispatch_key
        assert registrations.schema_from_python and st["triton"], st
        assert has("sdetr::ms_deform_attn", "CUDA") and not has("sdetr::ms_deform_attn", "CPU")
        print("FALLBACK-OK")
        """
    )
    env = dict(os.environ, SDETR_EXT_DIR=str(tmp_path), CXX=str(tmp_path / "no-such-c++"))
    env.pop(ops.BACKEND_ENV, None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "FALLBACK-OK" in proc.stdout, proc.stdout + proc.stderr
    assert "fix" in proc.stdout and "install a C++ compiler" in proc.stdout


# --------------------------------------------------------------------------------------------------
# CUDA (run when a GPU is present)
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_cuda_forward_backward_match_reference(cuda_op, cfg, dtype):
    args = make_inputs(**CONFIGS[cfg], dtype=dtype, device="cuda", requires_grad=True)
    grad_out = torch.randn_like(ms_deform_attn_pytorch(*args))
    got = _grads(cuda_op, args, grad_out)
    want = _grads(ms_deform_attn_pytorch, args, grad_out)
    tol = GRAD_TOL[dtype] if dtype == torch.float64 else dict(atol=1e-4, rtol=1e-4)
    for name, a, b in zip(("output", "value", "sampling_locations", "attention_weights"), got, want):
        assert a.device.type == "cuda"
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("cfg", list(CONFIGS), ids=list(CONFIGS))
def test_cuda_gradcheck_fp64(cuda_op, cfg):
    args = make_inputs(**CONFIGS[cfg], device="cuda", requires_grad=True, seed=1)
    assert torch.autograd.gradcheck(cuda_op, args, eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=1e-12)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("batch", [1, 3, 7])
def test_cuda_matches_cpu_any_batch(cuda_op, batch):
    args = make_inputs(batch, 8, 32, ((13, 16), (7, 8), (4, 4), (2, 2)), 37, 4, dtype=torch.float32)
    grad_out = torch.randn(batch, 37, 256)
    cpu = _grads(cuda_op, [a.requires_grad_() if a.is_floating_point() else a for a in args], grad_out)
    gpu_args = [a.detach().cuda().requires_grad_() if a.is_floating_point() else a.cuda() for a in args]
    gpu = _grads(cuda_op, gpu_args, grad_out.cuda())
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("loc_dtype", ["same", "fp32"])
def test_cuda_low_precision(cuda_op, dtype, loc_dtype):
    args = make_inputs(2, 8, 32, ((13, 16), (7, 8), (4, 4)), 29, 4, dtype=torch.float32, device="cuda")
    v, ss, lsi, loc, attn = args
    low = [
        v.to(dtype),
        ss,
        lsi,
        loc if loc_dtype == "fp32" else loc.to(dtype),
        attn if loc_dtype == "fp32" else attn.to(dtype),
    ]
    low = [a.requires_grad_() if a.is_floating_point() else a for a in low]
    out = cuda_op(*low)
    assert out.dtype == dtype
    ref = ms_deform_attn_pytorch(*[a.detach().float() if a.is_floating_point() else a for a in low])
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [low[0], low[3], low[4]], grad_out.to(dtype))
    ref_in = [a.detach().float().requires_grad_() if a.is_floating_point() else a for a in low]
    ref_grads = torch.autograd.grad(
        ms_deform_attn_pytorch(*ref_in), [ref_in[0], ref_in[3], ref_in[4]], grad_out
    )
    for g, rg, src in zip(grads, ref_grads, (low[0], low[3], low[4])):
        assert g.dtype == src.dtype and torch.isfinite(g).all()
        scale = rg.abs().max().item() + 1e-6
        assert (g.float() - rg).abs().max().item() / scale < 5e-2


@pytest.mark.cuda
@needs_cuda
def test_cuda_opcheck(cuda_op):
    args = make_inputs(**CONFIGS["D32"], device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.sdetr.ms_deform_attn.default, args)


def test_cuda_backward_alerts_under_deterministic_algorithms():
    """The CUDA backwards sum with atomics: torch's rule for such ops (an error under
    use_deterministic_algorithms(True), a warning with warn_only=True, silence otherwise)."""
    from sdetr.detector.ops.cuda_impl import alert_not_deterministic

    was, was_warn_only = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    try:
        torch.use_deterministic_algorithms(False)
        alert_not_deterministic("sdetr::test_op")  # nothing
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="sdetr::test_op does not have a deterministic implementation"):
            alert_not_deterministic("sdetr::test_op")
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="sdetr::test_op .* warn_only=True"):
            alert_not_deterministic("sdetr::test_op")
    finally:
        torch.use_deterministic_algorithms(was, warn_only=was_warn_only)
