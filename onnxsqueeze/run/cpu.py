"""What the CPU can do for integer kernels: it decides formats (7-bit weights where u8 x s8
products saturate) and belongs in every benchmark's header, since int8 speed-ups on one x86
generation (AVX2) and the next (AVX-512 VNNI, AMX) differ by 2x or more."""

from __future__ import annotations

import functools
import os
import platform

#: x86 feature flags (as /proc/cpuinfo spells them) that give int8 dot products without
#: the int16 intermediate of AVX2's VPMADDUBSW.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; empty where there is none (not Linux)."""
    name, flags = "", frozenset()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as info:
            for line in info:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and not name:
                    name = value.strip()
                elif key == "flags" and not flags:
                    flags = frozenset(value.split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def saturating_u8s8() -> bool:
    """True on x86 CPUs whose u8 x s8 kernels add product pairs in int16 (AVX2 without VNNI):
    full-range int8 weights can saturate there (measured: errors of several output units on
    random data), so weights get 7 bits."""
    if not is_x86():
        return False
    flags = _cpuinfo()[1]
    return "avx2" in flags and not any(f in flags for f in VNNI_FLAGS)


def int8_features() -> str:
    """The CPU's best int8 instruction family, in words."""
    if not is_x86():
        return platform.machine() or "unknown architecture"
    flags = _cpuinfo()[1]
    if "amx_int8" in flags:
        return "AMX int8 and AVX-512 VNNI"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI"
    if "avx_vnni" in flags:
        return "AVX-VNNI"
    if "avx2" in flags:
        return "AVX2 without VNNI"
    return "no AVX2"


def describe() -> str:
    """One line for a benchmark header: cores, model, int8 features, onnxruntime version."""
    import onnxruntime

    name = _cpuinfo()[0] or platform.processor() or "CPU"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores}-core {name} ({int8_features()}), onnxruntime {onnxruntime.__version__}"
