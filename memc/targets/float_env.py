"""Denormal floats flushed to zero (FTZ / DAZ) on the calling thread for the length of a session run.

Why: attention's softmax leaves most far-away probabilities in the denormal range (exp of scores 87-104 below the
row's maximum), and on Intel cores every arithmetic op that reads or writes a denormal takes a microcode assist. On
an AVX-512 Xeon here that made onnxruntime's GroupQueryAttention ~6x slower than on random data: ref-llama's decode
step at ~1k context took 1.9 ms with denormals and 1.2 ms flushed, model.onnx prefill of 1024 tokens 3,960 vs
9,450 tokens/s (AMD cores pay far less). Flushing changes results only below 1.2e-38, far under every tolerance.

The mode is the thread's own CPU state (MXCSR on x86-64, FPCR on aarch64), so it is set around each run and the
caller's mode restored after: a process that imports memc keeps its own float semantics everywhere else. onnxruntime's
``session.set_denormal_as_zero`` does the same for its intra-op pool threads, but on the calling thread (where a
one-thread session runs everything) it applies once per process and for good; ``create_session`` uses both.

Linux x86-64 / aarch64 (glibc's ``fegetmode`` / ``fesetmode`` through ctypes); elsewhere ``SUPPORTED`` is False
and the scope does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform
import threading

_X86_FLUSH = (1 << 15) | (1 << 6)  # MXCSR: flush-to-zero, denormals-are-zero
_ARM_FLUSH = 1 << 24  # FPCR.FZ


class _X86Mode(ctypes.Structure):  # glibc's femode_t on x86-64
    _fields_ = [("control_word", ctypes.c_ushort), ("reserved", ctypes.c_ushort), ("mxcsr", ctypes.c_uint)]


class _ArmMode(ctypes.Structure):  # glibc's femode_t on aarch64: the FPCR
    _fields_ = [("fpcr", ctypes.c_uint)]


def _libm():
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        get, set_ = lib.fegetmode, lib.fesetmode
    except (OSError, AttributeError):  # no glibc, or one older than 2.25
        return None
    for fn in (get, set_):
        fn.restype = ctypes.c_int
    return get, set_


_LIB = _libm()
SUPPORTED = _LIB is not None
_ARM = platform.machine() in ("aarch64", "arm64")


class _Thread(threading.local):
    """Per thread: the caller's saved mode and the flushed one (a run on another thread keeps its own)."""

    def __init__(self) -> None:
        kind = _ArmMode if _ARM else _X86Mode
        self.saved, self.flushed = kind(), kind()
        self.saved_ref, self.flushed_ref = ctypes.byref(self.saved), ctypes.byref(self.flushed)
        self.depth = 0


_local = _Thread()


def enter() -> None:
    """Flush denormals on this thread until the matching ``leave`` (nested pairs keep the outermost caller's mode)."""
    if _LIB is None:
        return
    t = _local
    t.depth += 1
    if t.depth > 1:
        return
    _LIB[0](t.saved_ref)
    saved, flushed = t.saved, t.flushed
    if _ARM:
        flushed.fpcr = saved.fpcr | _ARM_FLUSH
    else:
        flushed.control_word = saved.control_word
        flushed.mxcsr = saved.mxcsr | _X86_FLUSH
    _LIB[1](t.flushed_ref)


def leave() -> None:
    """Restore the mode the matching ``enter`` found."""
    if _LIB is None:
        return
    t = _local
    t.depth -= 1
    if t.depth == 0:
        _LIB[1](t.saved_ref)


class flushed:
    """``with flushed(): ...`` — denormals flushed to zero on this thread inside the block."""

    __slots__ = ()

    def __enter__(self) -> None:
        enter()

    def __exit__(self, *exc) -> None:
        leave()


def is_flushing() -> bool:
    """Whether this thread currently flushes denormals (read from the CPU's mode, not from memc's bookkeeping)."""
    if _LIB is None:
        return False
    mode = _ArmMode() if _ARM else _X86Mode()
    _LIB[0](ctypes.byref(mode))
    return bool(mode.fpcr & _ARM_FLUSH) if _ARM else (mode.mxcsr & _X86_FLUSH) == _X86_FLUSH
