"""The device a run uses and its mixed precision (``train.device``, ``train.amp``): which modes exist,
which dtype a mode means on a device, and whether bf16 is fast there."""

from __future__ import annotations

from sdetr.detector.errors import ConfigError

AMP_MODES = ("none", "bf16", "fp16", "auto")


def fast_bf16(device_type: str) -> bool:
    """Whether ``device_type`` has bf16 arithmetic, so that bf16 autocast speeds training up: a CUDA GPU
    that supports bf16, or a CPU with AMX tiles or AVX512-BF16 (oneDNN's bf16 kernels). On other CPUs bf16
    is emulated and slower than fp32."""
    import torch

    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    return False


def slow_bf16_note(amp: str, device_type: str, where: str = "train.amp") -> str | None:
    """A line for the log when ``amp`` asks for bf16 on a CPU without bf16 arithmetic (AVX2 only, for
    example): oneDNN emulates it there, and a ``mini_*`` training step took 9x as long as in fp32 on such
    a CPU (docs/benchmarks.md, "Demo"). None otherwise; ``auto`` chooses by itself."""
    if amp != "bf16" or device_type != "cpu" or fast_bf16("cpu"):
        return None
    return (
        f"note: {where}=bf16 on a CPU without AMX or AVX512-BF16: bf16 is emulated here and training "
        f"is several times slower than in fp32; {where}=auto uses bf16 only where it is fast"
    )


def amp_dtype(amp: str, device_type: str, where: str = "train.amp"):
    """The autocast dtype of ``train.amp`` on ``device_type`` ("cpu" / "cuda"), or None for ``none``.

    bf16 runs on CPU and GPU; fp16 only on a GPU (CPU autocast in fp16 is slow and needs loss scaling that
    the trainer only sets up on CUDA); ``auto`` is bf16 where `fast_bf16` says so, else None. Anything else
    is a ConfigError.
    """
    import torch

    if amp not in AMP_MODES:
        raise ConfigError(f"{where}: expected one of {', '.join(AMP_MODES)}, got {amp!r}")
    if amp == "auto":
        return torch.bfloat16 if fast_bf16(device_type) else None
    if amp == "none":
        return None
    if amp == "fp16" and device_type != "cuda":
        raise ConfigError(f"{where}=fp16 needs a CUDA GPU (the device is {device_type}); use bf16 on the CPU")
    return torch.bfloat16 if amp == "bf16" else torch.float16


def resolve_device(name: str = "auto"):
    """``auto`` → the GPU when one is visible, else the CPU; asking for CUDA without one is a ConfigError."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA GPU is visible; use cpu")
    return torch.device(name)
