"""What this machine's CPU can do, for the choices that depend on it: bf16 is several times faster than fp32
where the CPU computes it natively, and several times slower where oneDNN has to emulate it."""

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
