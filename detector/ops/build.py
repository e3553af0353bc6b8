"""Build and load the compiled op (``csrc/``) with ninja through ``torch.utils.cpp_extension``, into a
per-user cache keyed by the sources, flags and toolchain, under a file lock so that several processes can
ask at once and only one compiles."""

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
from pathlib import Path

import torch

from sdetr.detector.ops import registrations
from sdetr.detector.ops.registrations import register_python
from sdetr.detector.ops.triton_util import triton_available

EXT_DIR_ENV = "SDETR_EXT_DIR"
CUDA_ENV = "SDETR_MSDA_CUDA"
_DEFAULT_CUDA_ARCHS = "8.0;9.0"
_EXT_NAME = "sdetr_msda"
_OK_FILE = "BUILD_OK.json"
_FAILED_FILE = "BUILD_FAILED.txt"
FIX_DOCTOR = "Run `sdetr doctor` for details."


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
    candidates.append(Path(__file__).resolve().parents[2] / "csrc")
    for c in candidates:
        if (c / "ms_deform_attn.cpp").is_file():
            return c
    raise FileNotFoundError(
        f"csrc/ms_deform_attn.cpp not found (looked in {', '.join(map(str, candidates))})"
    )


def _sources(csrc: Path, with_cuda: bool) -> list[Path]:
    files = [csrc / "ms_deform_attn.cpp", csrc / "kda.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((csrc / "cuda").glob("*.cu"))
    return files


def _hashed_files(csrc: Path, with_cuda: bool) -> list[Path]:
    exts = {".cpp", ".h", ".hpp", ".cu", ".cuh"}
    files = (p for p in csrc.rglob("*") if p.is_file() and p.suffix in exts)
    return sorted(p for p in files if with_cuda or "cuda" not in p.relative_to(csrc).parts)


def _cxx() -> str:
    return os.environ.get("CXX") or ("cl" if sys.platform == "win32" else "c++")


def find_cuda_home() -> str | None:
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
    want = os.environ.get(CUDA_ENV, "0").strip().lower() or "0"
    if want in ("0", "no", "false", "off"):
        return False, f"CUDA C++ kernels are opt-in ({CUDA_ENV}=1 builds them); Triton serves CUDA tensors"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    forced = want in ("1", "yes", "true", "on")
    if not forced and not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    if find_cuda_home() is None:
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


def openmp_available() -> bool:
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


def plan(openmp: bool | None = None) -> _Plan:
    csrc = _csrc_dir()
    with_cuda, cuda_reason = _cuda_plan()
    if openmp is None:
        openmp = openmp_available()
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


@dataclasses.dataclass
class _State:
    loaded: bool = False
    cuda: bool = False  # the loaded library has the (opt-in) CUDA C++ kernels
    triton: bool = False  # the Triton kernels serve CUDA tensors
    build_dir: str = ""
    library: str = ""
    reason: str = ""
    fix: str = ""
    openmp: bool = False
    cuda_reason: str = ""
    how: str = ""  # "cached", "built" or "already loaded"
    build_failed: bool = False  # the compiler ran and failed


_lock = threading.RLock()
# What `load` found, kept for the process: a build is attempted at most once unless forced.
load_state: _State | None = None


def _has_kernel(op: str, key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(op, key))
    except RuntimeError:  # no such op
        return False


def cpu_kernels_loaded() -> bool:  # the C++ library (CPU kernels) is loaded in this process
    return _has_kernel("sdetr::ms_deform_attn", "CPU")


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
            home = find_cuda_home()
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


def load(verbose: bool = False, force: bool = False) -> _State:
    """The op's state in this process; builds/loads on the first call (thread- and process-safe)."""
    global load_state
    with _lock:
        if load_state is not None and (load_state.loaded or not force):
            return load_state
        if cpu_kernels_loaded():
            # Loaded by someone else (e.g. torch.ops.load_library): just add the Python registrations.
            st = _State(how="already loaded")
        elif registrations.schema_from_python:
            st = load_state or _State()
            st.reason = (
                "the op was defined from Python after the C++ library failed to build in this process "
                f"({st.reason or 'see above'}); the library cannot be loaded on top of that"
            )
            st.fix = "restart the process (after fixing the build: `sdetr doctor --build`)"
        else:
            try:
                build_plan = plan()
                st = _build_and_load(build_plan, verbose, force)
                if not cpu_kernels_loaded() and build_plan.openmp and st.build_failed:
                    # A compiler without OpenMP support: retry without it (serial CPU kernels).
                    st2 = _build_and_load(plan(openmp=False), verbose, force)
                    if cpu_kernels_loaded():
                        st = st2
            except Exception as e:  # noqa: BLE001
                st = _State(reason=f"{type(e).__name__}: {e}", fix=FIX_DOCTOR)
        if cpu_kernels_loaded():
            register_python()
            st.loaded = True
            st.reason = st.fix = ""
        elif triton_available():
            # No C++ library: the schema from Python, so that Triton still serves CUDA tensors.
            registrations.define_schema()
            register_python()
        st.cuda = _has_kernel("sdetr::ms_deform_attn_cuda_cpp", "CUDA")
        st.triton = registrations.cuda_registered and triton_available()
        load_state = st
        return st


def cpu_isa() -> str:
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
