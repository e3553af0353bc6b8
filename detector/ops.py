"""Build, load and register the compiled multi-scale deformable attention op (``csrc/``).

The op is ``torch.ops.sdetr.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
attention_weights) -> Tensor`` with the official shapes (see ``csrc/ms_deform_attn.h``), plus
``torch.ops.sdetr.ms_deform_attn_backward``. This module

* builds the C++ (and, where possible, CUDA) sources with ninja through ``torch.utils.cpp_extension``
  into a per-user cache, lazily on first use, under a file lock so that several processes (Ray workers)
  can ask at once and only one compiles;
* registers what torch needs around the compiled kernels: autograd, fake (meta) implementations for
  ``torch.compile``/``FakeTensorMode``, and FLOP formulas for ``torch.utils.flop_counter.FlopCounterMode``;
* decides per call whether the model uses the compiled op (`use_compiled`), and reports why
  (`backend_status`, shown by ``sdetr doctor``).

Environment:
    SDETR_MSDA_BACKEND   ``auto`` (default): the compiled op when it builds and loads, else the pure-PyTorch
                         path with one warning; ``compiled``: raise if it cannot be used; ``pytorch``: never
                         build or use it.
    SDETR_EXT_DIR        cache root for builds (default ``$XDG_CACHE_HOME/sdetr/ext`` or
                         ``~/.cache/sdetr/ext``); each build lives in
                         ``<root>/<torch version>-<cpu|cuda>-<hash>``, the hash covering the sources,
                         flags, compiler and (for CUDA) the target archs.
    SDETR_MSDA_CUDA      ``auto`` (default): compile the CUDA kernels when torch sees a GPU and nvcc is found;
                         ``1``: compile them even without a visible GPU (for a shared cache; the archs
                         come from TORCH_CUDA_ARCH_LIST, default 8.0;9.0); ``0``: never.
    SDETR_MSDA_CPU_ISA   ``default`` forces the baseline-ISA CPU kernels instead of the AVX2 ones.
    CXX, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS   as for ``torch.utils.cpp_extension``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "BACKEND_ENV",
    "backend_status",
    "build",
    "ms_deform_attn_flops",
    "ms_deform_attn_flop_counter_flops",
    "use_compiled",
]

BACKEND_ENV = "SDETR_MSDA_BACKEND"
EXT_DIR_ENV = "SDETR_EXT_DIR"
CUDA_ENV = "SDETR_MSDA_CUDA"
_MODES = ("auto", "compiled", "pytorch")
_DEFAULT_CUDA_ARCHS = "8.0;9.0"
_EXT_NAME = "sdetr_msda"
_OK_FILE = "BUILD_OK.json"
_FAILED_FILE = "BUILD_FAILED.txt"
_FIX_DOCTOR = "Run `sdetr doctor` for details."


# --------------------------------------------------------------------------------------------------
# FLOP counting
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# Sources, toolchain and the build key
# --------------------------------------------------------------------------------------------------
def _csrc_dir() -> Path:
    """The csrc/ sources: ``sdetr.csrc`` when installed, else the repository folder beside detector/."""
    candidates = []
    try:
        import importlib.util

        spec = importlib.util.find_spec("sdetr.csrc")
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) for p in spec.submodule_search_locations]
    except (ImportError, ValueError):
        pass
    candidates.append(Path(__file__).resolve().parent.parent / "csrc")
    for c in candidates:
        if (c / "ms_deform_attn.cpp").is_file():
            return c
    raise FileNotFoundError(
        f"csrc/ms_deform_attn.cpp not found (looked in {', '.join(map(str, candidates))})"
    )


def _sources(csrc: Path, with_cuda: bool) -> list[Path]:
    files = [csrc / "ms_deform_attn.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((csrc / "cuda").glob("*.cu"))
    return files


def _hashed_files(csrc: Path, with_cuda: bool) -> list[Path]:
    exts = {".cpp", ".h", ".hpp", ".cu", ".cuh"}
    files = (p for p in csrc.rglob("*") if p.is_file() and p.suffix in exts)
    return sorted(p for p in files if with_cuda or "cuda" not in p.relative_to(csrc).parts)


def _cxx() -> str:
    return os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")


def _find_cuda_home() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    return None


def _cuda_plan() -> tuple[bool, str]:
    """Whether the CUDA sources go into the build, and why (not)."""
    want = os.environ.get(CUDA_ENV, "auto").strip().lower() or "auto"
    if want in ("0", "no", "false", "off"):
        return False, f"{CUDA_ENV}={want}"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    forced = want in ("1", "yes", "true", "on")
    if not forced and not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    if _find_cuda_home() is None:
        return False, "nvcc not found (set CUDA_HOME to a CUDA toolkit matching torch.version.cuda)"
    if forced and not torch.cuda.is_available():
        return True, f"{CUDA_ENV}={want} (no GPU visible; archs {_cuda_archs()})"
    return True, "CUDA available and nvcc found"


def _cuda_archs() -> str:
    """TORCH_CUDA_ARCH_LIST, else the visible GPUs' architectures, else sm_80 and sm_90."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps) if caps else _DEFAULT_CUDA_ARCHS


def _openmp() -> bool:
    """torch's ATen parallel backend is OpenMP, and at::parallel_for is then inlined OpenMP code."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info() and sys.platform.startswith("linux")


def _flags(with_cuda: bool, openmp: bool) -> dict:
    if sys.platform == "win32":
        cflags = ["/O2"] + (["/openmp"] if openmp else [])
        ldflags: list[str] = []
    else:
        # -O3 without -march: the build may be shared between machines; the AVX2 kernels are picked at
        # run time (csrc/cpu). -fopenmp-simd only enables `omp simd` vectorisation hints.
        cflags = ["-O3", "-fopenmp-simd"] + (["-fopenmp"] if openmp else [])
        ldflags = ["-fopenmp"] if openmp else []
    cuda_cflags = ["-O3"] if with_cuda else []
    return {"cflags": cflags, "ldflags": ldflags, "cuda_cflags": cuda_cflags}


def _cache_root() -> Path:
    root = os.environ.get(EXT_DIR_ENV)
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "sdetr" / "ext"


@dataclasses.dataclass
class _Plan:
    build_dir: Path
    sources: list[Path]
    with_cuda: bool
    cuda_reason: str
    openmp: bool
    flags: dict


def _plan(openmp: bool | None = None) -> _Plan:
    csrc = _csrc_dir()
    with_cuda, cuda_reason = _cuda_plan()
    if openmp is None:
        openmp = _openmp()
    flags = _flags(with_cuda, openmp)
    h = hashlib.sha256()
    for f in _hashed_files(csrc, with_cuda):
        h.update(f.relative_to(csrc).as_posix().encode())
        h.update(f.read_bytes())
    key = {
        "flags": flags,
        "cxx": _cxx(),
        "torch": torch.__version__,
        "torch_git": getattr(torch.version, "git_version", ""),
        "python": sys.version_info[:2],
        "platform": sys.platform,
        "cuda": [torch.version.cuda, _cuda_archs()] if with_cuda else None,
    }
    h.update(json.dumps(key, sort_keys=True).encode())
    kind = "cuda" if with_cuda else "cpu"
    tag = f"{torch.__version__}-{kind}-{h.hexdigest()[:16]}".replace("+", "_").replace(os.sep, "_")
    return _Plan(_cache_root() / tag, _sources(csrc, with_cuda), with_cuda, cuda_reason, openmp, flags)


# --------------------------------------------------------------------------------------------------
# Build and load
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _State:
    loaded: bool = False
    cuda: bool = False  # the loaded library has CUDA kernels
    build_dir: str = ""
    library: str = ""
    reason: str = ""
    fix: str = ""
    openmp: bool = False
    cuda_reason: str = ""
    how: str = ""  # "cached", "built" or "already loaded"
    build_failed: bool = False  # the compiler ran and failed


_lock = threading.RLock()
_state: _State | None = None
_warned: set[str] = set()
_python_registered = False


def _op_loaded() -> bool:
    try:
        torch.ops.sdetr.ms_deform_attn  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _has_cuda_kernel() -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key("sdetr::ms_deform_attn", "CUDA"))


def _library_file(build_dir: Path, name: str) -> Path | None:
    for suffix in (".so", ".pyd", ".dylib", ".dll"):
        p = build_dir / f"{name}{suffix}"
        if p.is_file():
            return p
    return None


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its warning about a missing CUDA runtime."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _toolchain_problem(plan: _Plan) -> tuple[str, str] | None:
    """(reason, fix) when the build cannot even start."""
    cpp_extension = _cpp_extension()

    if shutil.which(_cxx()) is None:
        return (
            f"no C++ compiler found (looked for `{_cxx()}`; set CXX to use another)",
            "install a C++ compiler (Debian/Ubuntu: `apt-get install g++`; macOS: `xcode-select --install`; "
            "conda: `conda install gxx_linux-64`), then run `sdetr doctor --build`",
        )
    if not cpp_extension.is_ninja_available():
        return ("ninja is not installed", "`pip install ninja`, then run `sdetr doctor --build`")
    return None


def _build_and_load(plan: _Plan, verbose: bool, force: bool) -> _State:
    """Load the cached library, or build it (under a lock shared by all processes) and load it.

    A failed build leaves a marker that stops other processes from retrying it; ``force`` ignores it.
    """
    from filelock import FileLock

    state = _State(
        build_dir=str(plan.build_dir), openmp=plan.openmp, cuda_reason=plan.cuda_reason, how="cached"
    )
    plan.build_dir.mkdir(parents=True, exist_ok=True)
    ok_file = plan.build_dir / _OK_FILE
    failed_file = plan.build_dir / _FAILED_FILE

    def load_cached() -> bool:
        if not ok_file.is_file():
            return False
        try:
            lib = plan.build_dir / json.loads(ok_file.read_text())["library"]
        except (OSError, ValueError, KeyError):
            return False
        if not lib.is_file():
            return False
        torch.ops.load_library(str(lib))
        state.library = str(lib)
        return True

    if load_cached():
        return state
    with FileLock(str(plan.build_dir) + ".lock"):
        # Another process may have finished the build while this one waited.
        if load_cached():
            return state
        if failed_file.is_file() and not force:
            state.reason = (
                f"an earlier build in {plan.build_dir} failed (see {failed_file}); not retrying automatically"
            )
            state.fix = "fix the error shown there, then run `sdetr doctor --build` to rebuild"
            return state
        problem = _toolchain_problem(plan)
        if problem is not None:
            state.reason, state.fix = problem
            return state
        cpp_extension = _cpp_extension()
        if plan.with_cuda:
            home = _find_cuda_home()
            cur = cpp_extension.CUDA_HOME
            if home and (cur is None or not (Path(cur) / "bin" / "nvcc").exists()):
                cpp_extension.CUDA_HOME = home  # its import-time guess can miss a toolkit we found
        name = _EXT_NAME + ("_cuda" if plan.with_cuda else "") + ("" if plan.openmp else "_noomp")
        t0 = time.time()
        saved_archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if plan.with_cuda:
            os.environ["TORCH_CUDA_ARCH_LIST"] = _cuda_archs()
        try:
            failed_file.unlink(missing_ok=True)
            ok_file.unlink(missing_ok=True)
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in plan.sources],
                # Copies: cpp_extension appends its own flags to these lists.
                extra_cflags=list(plan.flags["cflags"]),
                extra_ldflags=list(plan.flags["ldflags"]),
                extra_cuda_cflags=list(plan.flags["cuda_cflags"]),
                build_directory=str(plan.build_dir),
                with_cuda=plan.with_cuda,
                is_python_module=False,
                verbose=verbose,
            )
        except Exception as e:  # noqa: BLE001 - any build/load failure becomes a reported fallback
            msg = f"{type(e).__name__}: {e}"
            failed_file.write_text(f"build of {name} failed at {time.ctime()}:\n{msg}\n")
            state.build_failed = True
            state.reason = f"building the op failed: {_first_lines(msg)}"
            state.fix = (
                f"see {failed_file} (or run `sdetr doctor --build` for the full compiler output); "
                "report it with that output"
            )
            return state
        finally:
            if saved_archs is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved_archs
        lib = _library_file(plan.build_dir, name)
        # cpp_extension appends _v<k> when the same name was built twice in one process.
        if lib is None:
            libs = sorted(plan.build_dir.glob(f"{name}*.so"), key=lambda p: p.stat().st_mtime)
            lib = libs[-1] if libs else None
        info = {"library": lib.name if lib else "", "seconds": round(time.time() - t0, 1)}
        info.update({"with_cuda": plan.with_cuda, "openmp": plan.openmp, "flags": plan.flags})
        ok_file.write_text(json.dumps(info, indent=1))
        state.library = str(lib) if lib else ""
        state.how = "built"
        return state


def _first_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[-n:]) if len(lines) > n else "\n".join(lines)


def _load(verbose: bool = False, force: bool = False) -> _State:
    """The op's state in this process; builds/loads on the first call (thread- and process-safe)."""
    global _state
    with _lock:
        if _state is not None and (_state.loaded or not force):
            return _state
        if _op_loaded():
            # Loaded by someone else (e.g. torch.ops.load_library): just add the Python registrations.
            st = _State(how="already loaded")
        else:
            try:
                plan = _plan()
                st = _build_and_load(plan, verbose, force)
                if not _op_loaded() and plan.openmp and st.build_failed:
                    # A compiler without OpenMP support: retry without it (serial CPU kernels).
                    st2 = _build_and_load(_plan(openmp=False), verbose, force)
                    if _op_loaded():
                        st = st2
            except Exception as e:  # noqa: BLE001
                st = _State(reason=f"{type(e).__name__}: {e}", fix=_FIX_DOCTOR)
        if _op_loaded():
            _register_python()
            st.loaded = True
            st.cuda = _has_cuda_kernel()
            st.reason = st.fix = ""
        _state = st
        return st


# --------------------------------------------------------------------------------------------------
# Python-side registrations: autograd, fake implementations, FLOP formulas
# --------------------------------------------------------------------------------------------------
def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    torch._check(value.dim() == 4, lambda: f"value must be [N, S, M, D], got {tuple(value.shape)}")
    torch._check(
        sampling_locations.dim() == 6,
        lambda: f"sampling_locations must be [N, Lq, M, L, P, 2], got {tuple(sampling_locations.shape)}",
    )
    torch._check(
        attention_weights.shape == sampling_locations.shape[:5],
        lambda: "attention_weights must be sampling_locations.shape[:-1]",
    )
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


def _fake_backward(
    grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
):
    return (
        value.new_empty(value.shape),
        sampling_locations.new_empty(sampling_locations.shape),
        attention_weights.new_empty(attention_weights.shape),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.sdetr.ms_deform_attn_backward(
        grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    need = ctx.needs_input_grad
    return (
        grad_value if need[0] else None,
        None,
        None,
        grad_loc if need[3] else None,
        grad_attn if need[4] else None,
    )


def _flop_forward(
    value_shape, spatial_shapes_shape, level_start_index_shape, loc_shape, attn_shape, **kwargs
):
    return ms_deform_attn_flop_counter_flops(value_shape, loc_shape)


def _flop_backward(
    grad_shape, value_shape, spatial_shapes_shape, level_start_shape, loc_shape, attn_shape, **kw
):
    return ms_deform_attn_flop_counter_flops(value_shape, loc_shape, backward=True)


def _register_python() -> None:
    global _python_registered
    with _lock:
        if _python_registered:
            return
        from torch.utils.flop_counter import register_flop_formula

        torch.library.register_fake("sdetr::ms_deform_attn")(_fake_forward)
        torch.library.register_fake("sdetr::ms_deform_attn_backward")(_fake_backward)
        torch.library.register_autograd("sdetr::ms_deform_attn", _backward, setup_context=_setup_context)
        register_flop_formula(torch.ops.sdetr.ms_deform_attn)(_flop_forward)
        register_flop_formula(torch.ops.sdetr.ms_deform_attn_backward)(_flop_backward)
        _python_registered = True


# torch imports this module (C++ set_python_module) when it needs the fake implementation of an op that was
# loaded without it.
if _op_loaded():
    _register_python()


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
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
    st = _state if (_state is not None and _state.loaded) else _load()
    device = value.device.type
    if not st.loaded:
        problem, fix = st.reason, st.fix
    elif device == "cpu" or (device == "cuda" and st.cuda):
        return True
    elif device == "cuda":
        problem = f"the compiled op was built without CUDA kernels ({st.cuda_reason or 'unknown reason'})"
        fix = "install a CUDA toolkit matching torch.version.cuda, set CUDA_HOME, run `sdetr doctor --build`"
    else:
        problem, fix = f"the compiled op has no kernels for device type {device!r}", "none needed"
    if mode == "compiled":
        raise RuntimeError(
            f"{BACKEND_ENV}=compiled, but the compiled ms_deform_attn cannot be used: {problem}. Fix: {fix}."
        )
    _warn_once(
        f"{device}:{problem}",
        f"sdetr: using the pure-PyTorch ms_deform_attn (slower, more memory) on {device}: {problem}. "
        f"Fix: {fix}. {_FIX_DOCTOR} (Set {BACKEND_ENV}=pytorch to silence this.)",
    )
    return False


def build(verbose: bool = False, force: bool = False) -> dict:
    """Build (or load the cached build of) the compiled op now; raise RuntimeError if that fails.

    ``force`` retries a build that failed before (it does not rebuild a library already loaded in this
    process; a changed source tree gets a new build directory anyway).
    """
    st = _load(verbose=verbose, force=force)
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
    st = _state
    if load and mode != "pytorch":
        st = _load()
    try:
        plan = _plan()
        build_dir, with_cuda_planned, cuda_reason = str(plan.build_dir), plan.with_cuda, plan.cuda_reason
    except Exception as e:  # noqa: BLE001
        build_dir, with_cuda_planned, cuda_reason = "", False, f"cannot plan a build: {e}"
    cuda_avail = torch.cuda.is_available()
    status = {
        "mode": mode,
        "backend": "pytorch",
        "devices": {"cpu": "pytorch", "cuda": ("pytorch" if cuda_avail else "n/a (no CUDA device)")},
        "loaded": bool(st and st.loaded),
        "cuda_kernels": bool(st and st.cuda),
        "build_dir": (st.build_dir if st and st.build_dir else build_dir),
        "library": st.library if st else "",
        "how": st.how if st else "",
        "openmp": bool(st.openmp) if st and st.build_dir else _openmp(),
        "cpu_kernels_isa": _cpu_isa(),
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
    if not st.loaded:
        status["reason"], status["fix"] = st.reason, st.fix
        return status
    status["backend"] = "compiled"
    status["devices"]["cpu"] = "compiled"
    if cuda_avail:
        status["devices"]["cuda"] = "compiled" if st.cuda else "pytorch"
    if cuda_avail and not st.cuda:
        status["reason"] = f"compiled op active on CPU only; CUDA kernels not built: {st.cuda_reason}"
        status["fix"] = (
            "install a CUDA toolkit matching torch.version.cuda, set CUDA_HOME, `sdetr doctor --build`"
        )
    else:
        how = {"cached": "loaded from the build cache", "built": "built and loaded"}.get(st.how, st.how)
        status["reason"] = f"compiled op {how} ({'CPU + CUDA' if st.cuda else 'CPU'} kernels)"
        status["fix"] = "nothing to fix"
    return status


def _cpu_isa() -> str:
    isa = os.environ.get("SDETR_MSDA_CPU_ISA", "").lower()
    cap = torch.backends.cpu.get_cpu_capability()
    if isa == "default" or cap in ("DEFAULT", "NO AVX") or cap.startswith(("VSX", "ZVECTOR", "SVE")):
        return "baseline"
    return "avx2+fma" if cap.startswith("AVX") else "baseline"


def compiler_version() -> str:
    """First line of the C++ compiler's --version (for `sdetr doctor`)."""
    cxx = shutil.which(_cxx())
    if cxx is None:
        return f"{_cxx()}: not found"
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cxx}: {e}"
    return f"{cxx}: {out.strip().splitlines()[0] if out.strip() else '?'}"
