"""Build, load and register the compiled multi-scale deformable attention op (``csrc/``).

The op is ``torch.ops.sdetr.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
attention_weights) -> Tensor`` with the official shapes (see ``csrc/ms_deform_attn.h``), plus
``torch.ops.sdetr.ms_deform_attn_backward``. This module

* serves CUDA tensors with Triton kernels (`triton_msda`, registered for the CUDA dispatch key by
  `registrations`; checked without a GPU by Triton's interpreter and ahead-of-time compiles in the tests);
* builds the C++ CPU sources (and, opted in, the CUDA C++ ones) with ninja through
  ``torch.utils.cpp_extension`` into a per-user cache, lazily on first use, under a file lock so that
  several processes (Ray workers) can ask at once and only one compiles;
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
    SDETR_MSDA_CUDA      ``0`` (default): no CUDA C++ kernels (Triton serves CUDA tensors); ``1``: compile
                         the opt-in CUDA C++ kernels, even without a visible GPU (archs from
                         TORCH_CUDA_ARCH_LIST, else the visible GPUs', else 8.0;9.0); ``auto``: when torch
                         sees a GPU and nvcc is found.
    SDETR_MSDA_CUDA_IMPL ``triton`` (default) or ``cpp``: which kernels serve CUDA tensors (`cuda_impl`).
    SDETR_MSDA_CPU_ISA   ``default`` forces the baseline-ISA CPU kernels instead of the AVX2 ones.
    CXX, CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS   as for ``torch.utils.cpp_extension``.
"""

from __future__ import annotations

from sdetr.detector.ops.backend import BACKEND_ENV, backend_status, build, use_compiled, use_compiled_kda
from sdetr.detector.ops.build import compiler_version, find_cuda_home, load
from sdetr.detector.ops.flops import ms_deform_attn_flop_counter_flops, ms_deform_attn_flops

__all__ = [
    "BACKEND_ENV",
    "backend_status",
    "build",
    "compiler_version",
    "find_cuda_home",
    "load",
    "ms_deform_attn_flop_counter_flops",
    "ms_deform_attn_flops",
    "use_compiled",
    "use_compiled_kda",
]
