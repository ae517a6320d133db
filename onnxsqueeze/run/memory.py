"""What a session costs in memory: host RSS from the kernel, device memory from NVML.

Linux keeps a peak-RSS mark per process (VmHWM) that ``/proc/self/clear_refs`` resets, so the
peak a session's load and first run add can be read in-process, one session after another.
Elsewhere these return None and the reports say "n/a" rather than a guess.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(field: str) -> int | None:
    try:
        with _STATUS.open() as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """This process's resident memory now."""
    return _status_kib("VmRSS")


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_since(before: int | None) -> int | None:
    """Peak resident memory above ``before`` since the last reset_peak_rss."""
    peak = _status_kib("VmHWM")
    if peak is None or before is None:
        return None
    return max(0, peak - before)


def gpu_memory_used(provider: str) -> int | None:
    """Device memory in use on GPU 0 for CUDA/TensorRT providers, via NVML (the
    ``nvidia-ml-py`` package) when it is installed; None otherwise."""
    if provider not in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return None
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


#: Sessions of models with fewer weight bytes than this are not worth a collection and trim
#: after them (the test suite's hundreds of small judged sessions took 1.6 minutes longer).
GIVE_BACK_MIN = 64 << 20


def give_back_after(model_bytes: int) -> None:
    """``give_back`` after a session of a model with ``model_bytes`` of weights, if large."""
    if model_bytes >= GIVE_BACK_MIN:
        give_back()


def give_back() -> None:
    """Return freed heap memory to the system after a session is gone. glibc keeps what a
    released onnxruntime session freed in its arenas; the next session then grows the heap
    again, and a budget search that judges candidate after candidate climbed from 0.6 to
    1.2 GiB on a 0.38 GB model. ``malloc_trim`` hands the free pages back (glibc only)."""
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
