"""edge_compress.sigstack: a native call that replaces the thread's alternate signal stack gets it put back."""

import ctypes
import sys

import pytest

from edge_compress.sigstack import _Stack, current_signal_stack, preserved_signal_stack

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack via libc: Linux only")


def _set_stack(buf) -> None:
    new = _Stack(ctypes.cast(buf, ctypes.c_void_p), 0, len(buf))
    assert ctypes.CDLL(None).sigaltstack(ctypes.byref(new), None) == 0


def test_a_replaced_stack_is_restored():
    before = current_signal_stack()
    foreign = ctypes.create_string_buffer(64 * 1024)
    with preserved_signal_stack():
        _set_stack(foreign)
        assert current_signal_stack()[0] == ctypes.addressof(foreign)
    assert current_signal_stack() == before


def test_restored_when_the_body_raises():
    before = current_signal_stack()
    foreign = ctypes.create_string_buffer(32 * 1024)
    with pytest.raises(RuntimeError), preserved_signal_stack():
        _set_stack(foreign)
        raise RuntimeError("boom")
    assert current_signal_stack() == before
