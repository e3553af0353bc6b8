"""`sdetr doctor`: report the toolchain and which multi-scale deformable attention backend is active.

`add_doctor_parser` registers the command, `main_doctor` runs it; `doctor_report()` returns the text.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"error: {e}"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _nvcc_line() -> str:
    from sdetr.detector import ops

    home = ops.find_cuda_home()
    if home is None:
        return "not found (set CUDA_HOME to a CUDA toolkit to build the CUDA kernels)"
    nvcc = os.path.join(home, "bin", "nvcc")
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{nvcc}: error: {e}"
    release = [ln.strip() for ln in out.splitlines() if "release" in ln]
    return f"{nvcc}: {release[0] if release else '?'}"


def _ninja_line() -> str:
    ninja = shutil.which("ninja")
    if ninja is None:
        return "not found (`pip install ninja`)"
    return f"{ninja}: {_run([ninja, '--version'])}"


def _gpus() -> str:
    import torch  # slow to import: only when the command runs

    if not torch.cuda.is_available():
        return "none visible"
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    caps = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    return ", ".join(f"{n} (sm_{a}{b})" for n, (a, b) in zip(names, caps))


def doctor_report(load: bool = True) -> str:
    """Environment and ms_deform_attn backend report. ``load`` builds/loads the op if needed."""
    import torch  # slow to import: only when the command runs

    from sdetr.detector import ops

    st = ops.backend_status(load=load)
    cuda_build = f"CUDA build {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    parallel = "OpenMP" if "parallel backend: OpenMP" in torch.__config__.parallel_info() else "native"
    lines = [
        "sdetr doctor",
        "",
        "environment",
        f"  python        {platform.python_version()} ({sys.executable})",
        f"  platform      {platform.platform()}",
        f"  torch         {torch.__version__} ({cuda_build}); CUDA available: "
        f"{'yes' if torch.cuda.is_available() else 'no'}",
        f"  GPUs          {_gpus()}",
        f"  nvcc          {_nvcc_line()}",
        f"  C++ compiler  {ops.compiler_version()}",
        f"  ninja         {_ninja_line()}",
        f"  CPU           torch capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} intra-op threads ({parallel})",
        "",
        "ms_deform_attn",
        f"  mode          {st.get('mode')} ({ops.BACKEND_ENV}={os.environ.get(ops.BACKEND_ENV, '')!r})",
        f"  backend       {st.get('backend')}",
    ]
    devices = st.get("devices") or {}
    if devices:
        lines.append("  per device    " + ", ".join(f"{k}: {v}" for k, v in devices.items()))
    if st.get("backend") == "compiled":
        lines.append(
            f"  kernels       CPU ({st.get('cpu_kernels_isa')}, "
            f"{'OpenMP' if st.get('openmp') else 'single-threaded'})"
            + (", CUDA" if st.get("cuda_kernels") else "")
        )
    if "cuda_in_build" in st:
        included = "included" if st.get("cuda_in_build") else "not included"
        lines.append(f"  CUDA sources  {included}: {st.get('cuda_reason')}")
    if st.get("build_dir"):
        lines.append(f"  build dir     {st.get('build_dir')}")
    if st.get("library"):
        lines.append(f"  library       {st.get('library')}")
    lines += [
        f"  why           {_indent(st.get('reason', ''))}",
        f"  fix           {_indent(st.get('fix', ''))}",
    ]
    return "\n".join(lines)


def _indent(text: str) -> str:
    return text.replace("\n", "\n" + " " * 16)


def add_doctor_parser(sub) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "doctor", help="check the installation and the active deformable-attention backend"
    )
    parser.set_defaults(func=main_doctor)
    parser.add_argument(
        "--build", action="store_true", help="build the compiled ms_deform_attn now (retrying a failed build)"
    )
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    return parser


def main_doctor(args: argparse.Namespace | None = None) -> int:
    """Print the report. Returns 0 when the compiled op is in use (or the PyTorch path was chosen), else 1."""
    from sdetr.detector import ops

    build = bool(getattr(args, "build", False))
    verbose = bool(getattr(args, "verbose", False))
    if build:
        print("building the compiled ms_deform_attn (this can take a few minutes)...", flush=True)
        try:
            ops.build(verbose=verbose, force=True)
        except RuntimeError as e:
            print(f"build failed: {e}", file=sys.stderr)
    print(doctor_report())
    st = ops.backend_status(load=False)
    return 0 if st.get("backend") == "compiled" or st.get("mode") == "pytorch" else 1
