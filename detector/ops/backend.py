"""Which deformable-attention backend the model uses per call (`use_compiled`), and why (`backend_status`,
shown by ``sdetr doctor``)."""

from __future__ import annotations

import os
import threading
import warnings

import torch
from torch import Tensor

from sdetr.detector.ops import build as _build
from sdetr.detector.ops.build import FIX_DOCTOR, cpu_isa, openmp_available, plan
from sdetr.detector.ops.cuda_impl import cuda_impl
from sdetr.detector.ops.kda import kda_op_loaded
from sdetr.detector.ops.triton_util import triton_available

BACKEND_ENV = "SDETR_MSDA_BACKEND"
_MODES = ("auto", "compiled", "pytorch")
_lock = threading.Lock()
_warned: set[str] = set()


def _mode() -> str:
    mode = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"{BACKEND_ENV}={mode!r}: expected one of {', '.join(_MODES)}")
    return mode


def _warn_once(key: str, message: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def use_compiled(value: Tensor) -> bool:
    """Whether `ms_deform_attn` should call the compiled op for ``value``'s device.

    ``SDETR_MSDA_BACKEND=pytorch`` -> False; ``compiled`` -> True or raise; ``auto`` -> True when the op is
    loaded with kernels for the device, else False after one warning (per reason, per process).
    """
    mode = _mode()
    if mode == "pytorch":
        return False
    st = _build.load_state if (_build.load_state is not None and _build.load_state.loaded) else _build.load()
    device = value.device.type
    if (device == "cpu" and st.loaded) or (device == "cuda" and (st.triton or st.cuda)):
        return True
    if device == "cpu":
        problem, fix = st.reason, st.fix
    elif device == "cuda":
        problem = "Triton is not installed (it serves CUDA tensors) and the CUDA C++ kernels are not built"
        fix = "install triton (it comes with torch's CUDA wheels), or build with SDETR_MSDA_CUDA=1"
    else:
        problem, fix = f"the compiled op has no kernels for device type {device!r}", "none needed"
    if mode == "compiled":
        raise RuntimeError(
            f"{BACKEND_ENV}=compiled, but the compiled ms_deform_attn cannot be used: {problem}. Fix: {fix}."
        )
    _warn_once(
        f"{device}:{problem}",
        f"sdetr: using the pure-PyTorch ms_deform_attn (slower, more memory) on {device}: {problem}. "
        f"Fix: {fix}. {FIX_DOCTOR} (Set {BACKEND_ENV}=pytorch to silence this.)",
    )
    return False


def build(verbose: bool = False, force: bool = False) -> dict:
    """Build (or load the cached build of) the compiled op now; raise RuntimeError if that fails.

    ``force`` retries a build that failed before (it does not rebuild a library already loaded in this
    process; a changed source tree gets a new build directory anyway).
    """
    st = _build.load(verbose=verbose, force=force)
    if not st.loaded:
        raise RuntimeError(f"could not build/load the compiled ms_deform_attn: {st.reason}. Fix: {st.fix}")
    return backend_status(load=False)


def backend_status(load: bool = True) -> dict:
    """Which ms_deform_attn backend the model uses, on which devices, why, and how to fix it.

    With ``load`` (default) this builds/loads the op first if ``SDETR_MSDA_BACKEND`` allows it.
    """
    try:
        mode = _mode()
    except ValueError as e:
        return {"backend": "pytorch", "mode": "invalid", "reason": str(e), "fix": f"unset {BACKEND_ENV}"}
    st = _build.load_state
    if load and mode != "pytorch":
        st = _build.load()
    try:
        build_plan = plan()
        build_dir, with_cuda_planned, cuda_reason = (
            str(build_plan.build_dir),
            build_plan.with_cuda,
            build_plan.cuda_reason,
        )
    except Exception as e:  # noqa: BLE001
        build_dir, with_cuda_planned, cuda_reason = "", False, f"cannot plan a build: {e}"
    cuda_avail = torch.cuda.is_available()
    status = {
        "mode": mode,
        "backend": "pytorch",
        "devices": {"cpu": "pytorch", "cuda": ("pytorch" if cuda_avail else "n/a (no CUDA device)")},
        "loaded": bool(st and st.loaded),
        "triton": bool(st and st.triton),
        "cuda_kernels": bool(st and st.cuda),
        "build_dir": (st.build_dir if st and st.build_dir else build_dir),
        "library": st.library if st else "",
        "how": st.how if st else "",
        "openmp": bool(st.openmp) if st and st.build_dir else openmp_available(),
        "cpu_kernels_isa": cpu_isa(),
        "cuda_in_build": with_cuda_planned,
        "cuda_reason": cuda_reason,
        "reason": "",
        "fix": "",
    }
    if mode == "pytorch":
        status["reason"] = f"{BACKEND_ENV}=pytorch selects the pure-PyTorch path"
        status["fix"] = f"unset {BACKEND_ENV} (or set it to auto) to use the compiled op"
        return status
    if st is None:
        status["reason"] = "not loaded yet (it builds/loads on first use)"
        status["fix"] = "call sdetr.detector.ops.build() or run `sdetr doctor --build` to build ahead of time"
        return status
    if cuda_avail and (st.triton or st.cuda):
        try:
            status["devices"]["cuda"] = "triton" if cuda_impl() == "triton" else "compiled (CUDA C++)"
        except (ValueError, RuntimeError) as e:
            status["devices"]["cuda"] = f"error: {e}"
    if not st.loaded:
        status["reason"], status["fix"] = st.reason, st.fix
        return status
    status["backend"] = "compiled"
    status["devices"]["cpu"] = "compiled"
    how = {"cached": "loaded from the build cache", "built": "built and loaded"}.get(st.how, st.how)
    kernels = "CPU" + (" + CUDA C++" if st.cuda else "") + (", Triton for CUDA" if st.triton else "")
    status["reason"] = f"compiled op {how} ({kernels} kernels)"
    status["fix"] = "nothing to fix"
    if cuda_avail and not (st.triton or st.cuda):
        status["reason"] += "; no CUDA kernels: Triton is not installed"
        status["fix"] = "install triton (it comes with torch's CUDA wheels)"
    return status


def use_compiled_kda(value: Tensor) -> bool:
    """Whether `sdetr.detector.layers.kda.kda` should call ``torch.ops.sdetr.kda`` for ``value``'s device.

    Follows ``SDETR_MSDA_BACKEND`` as the deformable-attention op does (``pytorch`` -> never; ``auto`` -> when
    the library is loaded, after one warning otherwise; ``compiled`` -> or raise). CPU: the C++ kernels;
    CUDA: the Triton kernel (needs triton).
    """
    if value.device.type == "cuda":
        # The library (for the schema) must be loaded; the kernel is Triton, not the C++ CUDA build.
        if not use_compiled(torch.empty(0)) or not kda_op_loaded():
            return False
        if not triton_available():
            if _mode() == "compiled":
                raise RuntimeError("SDETR_MSDA_BACKEND=compiled, but the KDA GPU kernel needs triton")
            return False
        return True
    return value.device.type == "cpu" and use_compiled(value) and kda_op_loaded()
