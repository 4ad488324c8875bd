"""The process heap keeps freed memory (hiermodel.heap): glibc really serves large blocks from the heap
afterwards and keeps them, never over a user's own heap settings, off on request, once per process."""

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest

from hiermodel import heap

# allocate and free 40 MB (glibc's default: a fresh mapping of its own, returned at free), then report
# the blocks mapped for it and the heap's size after the free
PROBE = textwrap.dedent("""
    import ctypes, sys
    from hiermodel import heap
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype, libc.malloc.restype = MallInfo2, ctypes.c_void_p
    libc.malloc.argtypes, libc.free.argtypes = [ctypes.c_size_t], [ctypes.c_void_p]
    set_here = heap.reuse_freed_memory() if sys.argv[1] == "on" else False
    before = libc.mallinfo2().hblks
    block = libc.malloc(40 << 20)
    ctypes.memset(block, 1, 40 << 20)
    mapped = libc.mallinfo2().hblks - before
    libc.free(block)
    print(set_here, mapped, libc.mallinfo2().arena >= 40 << 20)
""")


def _glibc_with_mallinfo2() -> bool:
    try:
        return sys.platform.startswith("linux") and hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:
        return False


def _probe(mode: str, **env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in (*heap.USER_VARIABLES, heap.OPT_OUT, "GLIBC_TUNABLES")}
    return subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                          env={**clean, **env}).stdout.split()


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc 2.33 or newer (mallinfo2)")
def test_large_blocks_come_from_the_heap_and_stay_there() -> None:
    assert _probe("off") == ["False", "1", "False"]  # glibc's default: a mapping of its own, unmapped at free
    assert _probe("on") == ["True", "0", "True"]  # from the heap, and kept there after the free
    # the user's own thresholds, or the opt-out, leave glibc's behaviour alone
    assert _probe("on", MALLOC_MMAP_THRESHOLD_=str(64 << 20))[0] == "False"
    assert _probe("on", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000000")[0] == "False"
    assert _probe("on", HIERFED_KEEP_FREED_MEMORY="0") == ["False", "1", "False"]
    # a tunable that is no heap threshold does not count, and nothing reaches a child process
    assert _probe("on", GLIBC_TUNABLES="glibc.malloc.arena_max=2") == ["True", "0", "True"]


def test_it_is_set_once_and_passes_nothing_on(monkeypatch) -> None:
    for variable in (*heap.USER_VARIABLES, heap.OPT_OUT, "GLIBC_TUNABLES"):  # set, then removed: undone after the test
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    calls = []
    monkeypatch.setattr(heap, "_done", False)
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: lambda parameter, value: calls.append((parameter, value)) or 1)
    before = dict(os.environ)
    assert heap.reuse_freed_memory() and heap.reuse_freed_memory()
    assert calls == list(heap.SETTINGS.items()) and dict(os.environ) == before


@pytest.mark.parametrize("answer", [None, 0])  # no glibc; or glibc refusing a setting
def test_without_glibc_it_does_nothing(monkeypatch, answer) -> None:
    monkeypatch.setattr(heap, "_done", False)
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: None if answer is None else (lambda parameter, value: answer))
    for variable in (*heap.USER_VARIABLES, heap.OPT_OUT, "GLIBC_TUNABLES"):
        monkeypatch.delenv(variable, raising=False)
    assert heap.reuse_freed_memory() is False
