"""Plumbing shared by the Triton kernels of ``sdetr.detector.ops``: is Triton usable, is its interpreter on,
and ahead-of-time compilation for a GPU that this machine need not have.

Triton's interpreter (``TRITON_INTERPRET=1``, read when ``triton`` is first imported) runs ``@triton.jit``
kernels on CPU tensors through numpy: that is how the kernels are tested without a GPU
(``tests/test_triton_msda.py`` runs those tests in a subprocess that sets the variable first).
`aot_compile` lowers a kernel to a cubin for a given compute capability with Triton's own compiler (no
GPU, driver or nvcc needed): the check that each kernel compiles for the GPUs sdetr targets.

A module with kernels follows this pattern::

    triton = import_triton()          # None when Triton is not installed
    if triton is not None:
        import triton.language as tl

        @triton.jit
        def _kernel(...): ...
"""

from __future__ import annotations

import functools
import os

import torch

INTERPRET_ENV = "TRITON_INTERPRET"
# The GPUs the AOT check compiles for: A100 (sm_80) and H100/H200 (sm_90).
AOT_CAPABILITIES = (80, 90)


def import_triton():
    """The ``triton`` module, or None when it is not installed (CPU-only torch wheels on some platforms)."""
    try:
        import triton
        import triton.language  # noqa: F401
    except ImportError:
        return None
    return triton


@functools.cache
def triton_available() -> bool:
    return import_triton() is not None


def interpreter_on() -> bool:
    """Whether this process runs Triton kernels in the interpreter (on CPU tensors).

    Only meaningful when set before ``triton`` was imported; Triton reads it at import and at each launch.
    """
    return os.environ.get(INTERPRET_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def kernel_device_ok(device) -> bool:
    """Whether kernels can run on tensors of ``device``: CUDA, or the CPU under the interpreter."""
    device_type = getattr(device, "type", str(device))
    return device_type == "cuda" or (device_type == "cpu" and interpreter_on())


def acc_dtype(value: torch.Tensor) -> torch.dtype:
    """The kernels' arithmetic dtype for ``value``: float64 for float64 values, else float32."""
    return torch.float64 if value.dtype == torch.float64 else torch.float32


def acc_tl(acc: torch.dtype):
    """`acc_dtype`'s Triton type, for a kernel's ``ACC`` constexpr."""
    import triton.language as tl

    return tl.float64 if acc == torch.float64 else tl.float32


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def jit_divisible_by_16(signature: dict, ints: tuple[str, ...] = ("D",)) -> tuple[str, ...]:
    """The arguments that a launch's JIT compile marks as multiples of 16: every pointer (torch's
    allocations are aligned) and the named integer arguments, whose values at the papers' shapes are
    multiples of 16 (D = 32). Pass to `aot_compile` to build what a GPU builds for such a launch, which
    differs from the unmarked build."""
    pointers = tuple(name for name, kind in signature.items() if kind.startswith("*"))
    return pointers + tuple(name for name in ints if name in signature)


def aot_compile(
    kernel,
    signature: dict,
    constexprs: dict,
    capability: int,
    num_warps: int = 4,
    divisible_by_16: tuple[str, ...] = (),
):
    """Compile a ``@triton.jit`` kernel for CUDA compute capability ``capability`` (80 = sm_80) without a GPU.

    Args:
        kernel: the ``@triton.jit`` function (not launched, so its arguments are described here).
        signature: {argument name: Triton type string}: ``"*fp32"`` for a pointer to float32, ``"i32"``,
            ``"i64"``, ``"fp32"``; constexpr arguments as ``"constexpr"``.
        constexprs: {argument name: value} of the ``tl.constexpr`` arguments.
        capability: 80, 90, ...
        divisible_by_16: arguments to compile as multiples of 16, as the JIT specialises a launch whose
            pointers are 16-byte aligned and whose integers divide by 16 (`jit_divisible_by_16`). Triton
            3.6 failed to compile both kernels for sm_90 only with this specialisation.
    Returns:
        Triton's compiled kernel; ``.asm["cubin"]`` holds the machine code, ``.asm["ptx"]`` the PTX.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible_by_16}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    # warp size 32 on every NVIDIA GPU.
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})
