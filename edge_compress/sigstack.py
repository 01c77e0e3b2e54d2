"""Keep the calling thread's alternate signal stack across native calls that replace it.

OpenVINO 2026.4's CPU plugin sets an alternate signal stack of its own (11,568 bytes) on the
thread that compiles a model, and when that compiled model is destroyed it frees the stack and
puts back the one it found. Two compiled models destroyed in the order they were made (an int8
export times its fp32 and int8 models side by side) leave the thread on the first model's freed
stack. CPython registers its signal handlers with ``SA_ONSTACK``, so the next signal the main
thread takes (SIGCHLD when a DataLoader worker exits, SIGINT on Ctrl-C) is delivered onto
unmapped memory and the kernel kills the process with SIGSEGV, no traceback. That is what killed
the full test suite at the first DataLoader with workers after the OpenVINO tests.

``preserved_signal_stack()`` records the thread's alternate stack before the call and restores
it afterwards when the call changed it. Linux only; elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_SS_ONSTACK = 1


class _Stack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

    def key(self) -> tuple[int, int, int]:
        return (self.ss_sp or 0, self.ss_flags, self.ss_size)


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc if hasattr(libc, "sigaltstack") else None
    except OSError:
        return None


_LIBC = _libc()


def current_signal_stack() -> tuple[int, int, int] | None:
    """(address, flags, size) of this thread's alternate signal stack; None where it cannot be read."""
    if _LIBC is None:
        return None
    now = _Stack()
    return now.key() if _LIBC.sigaltstack(None, ctypes.byref(now)) == 0 else None


@contextmanager
def preserved_signal_stack() -> Iterator[None]:
    """Run the body, then give this thread back the alternate signal stack it had before."""
    if _LIBC is None:
        yield
        return
    before = _Stack()
    if _LIBC.sigaltstack(None, ctypes.byref(before)) != 0 or before.ss_flags & _SS_ONSTACK:
        yield   # unreadable, or running on the alternate stack itself: nothing safe to do
        return
    try:
        yield
    finally:
        now = _Stack()
        if _LIBC.sigaltstack(None, ctypes.byref(now)) == 0 and now.key() != before.key():
            _LIBC.sigaltstack(ctypes.byref(before), None)
