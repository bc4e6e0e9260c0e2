"""What this machine's CPU and GPU can do, for the choices that depend on it: bf16 is several times faster than
fp32 where the CPU computes it natively, and several times slower where oneDNN has to emulate it; GPUs compute
bf16 natively from compute capability 8.0 (sm_80) on."""

from __future__ import annotations

import functools
import platform

# x86: AMX (Sapphire Rapids on) and AVX512-BF16 (Cooper Lake, Zen 4 on); Arm: the BF16 extension (Graviton 3 on).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 `flags`, Arm `Features`); empty where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> str | None:
    """The flag by which this CPU computes bf16 natively, or None."""
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in cpu_flags()), None)


def cpu_model() -> str:
    """The CPU's model name, and whether it has native bf16: what every benchmark figure is quoted with."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    flag = native_bf16()
    return f"{name}, {'native bf16 (' + flag + ')' if flag else 'no native bf16 (no avx512_bf16 or amx_bf16)'}"


def gpu_capability() -> tuple[int, int] | None:
    """This machine's first GPU's compute capability, (8, 0) for sm_80; None where torch sees no GPU."""
    import torch  # here: the CPU-side callers of this module need no torch

    return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None


def gpu_half_precision(capability: tuple[int, int] | None) -> tuple[str, str]:
    """The half precision to autocast to on a GPU of this compute capability, and why. bf16 from sm_80 on (A100,
    A10G, L4, H100 and later), whose tensor cores compute it natively; fp16 before (V100, T4), which run bf16
    convolutions slower than fp16 and need a GradScaler to train in fp16. An unknown GPU (none on this machine to
    ask) gets bf16, native on the GPUs of today's clusters."""
    if capability is None:
        return "bf16", "native from sm_80 on; this machine has no GPU to ask which it is"
    name = f"sm_{capability[0]}{capability[1]}"
    if tuple(capability) >= (8, 0):
        return "bf16", f"this GPU ({name}) computes bf16 natively"
    return "fp16", f"this GPU ({name}) computes bf16 slower than fp16 (native bf16 is sm_80 and up)"
