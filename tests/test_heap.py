"""The process heap keeps freed memory (hiermodel.heap): set here and for the processes a command starts,
never over a user's own heap settings, and off on request."""

import os
import subprocess
import sys

import pytest

from hiermodel import heap


@pytest.fixture
def mallopt_calls(monkeypatch) -> list:
    for variable in (*heap.USER_VARIABLES, heap.OPT_OUT, "GLIBC_TUNABLES"):  # set, then removed: undone after the test
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    calls = []
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: lambda parameter, value: calls.append((parameter, value)) or 1)
    return calls


def test_it_sets_the_heap_here_and_for_child_processes(mallopt_calls) -> None:
    assert heap.reuse_freed_memory() == {"MALLOC_MMAP_MAX_": True, "MALLOC_TRIM_THRESHOLD_": True}
    assert sorted(mallopt_calls) == sorted(heap.SETTINGS.values())
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['MALLOC_MMAP_MAX_'], os.environ['MALLOC_TRIM_THRESHOLD_'])"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert child == ["0", str(2**31 - 1)]
    mallopt_calls.clear()
    assert heap.reuse_freed_memory() == {} and mallopt_calls == []  # set already (as in a child): nothing to do


@pytest.mark.parametrize("variable, value", [("MALLOC_MMAP_THRESHOLD_", "1048576"), ("MALLOC_MMAP_MAX_", "65536"),
                                             ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576"),
                                             (heap.OPT_OUT, "0")])
def test_a_users_own_heap_settings_or_the_opt_out_leave_it_alone(mallopt_calls, monkeypatch, variable, value) -> None:
    monkeypatch.setenv(variable, value)
    assert heap.reuse_freed_memory() == {} and mallopt_calls == []
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ and os.environ[variable] == value


def test_other_glibc_tunables_do_not_count(mallopt_calls, monkeypatch) -> None:
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.cpu.hwcaps=-AVX512F")
    assert heap.reuse_freed_memory() == {"MALLOC_MMAP_MAX_": True, "MALLOC_TRIM_THRESHOLD_": True}


def test_without_glibc_only_the_environment_is_set(mallopt_calls, monkeypatch) -> None:
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: None)
    assert heap.reuse_freed_memory() == {"MALLOC_MMAP_MAX_": False, "MALLOC_TRIM_THRESHOLD_": False}
    assert os.environ["MALLOC_MMAP_MAX_"] == "0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_glibc_takes_the_settings_in_a_fresh_process() -> None:
    """The real mallopt, in a process of its own (the test process keeps its heap as it is)."""
    if heap._glibc_mallopt() is None:
        pytest.skip("no glibc here")
    code = ("import os\nfor v in ('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_TOP_PAD_', "
            "'HIERFED_KEEP_FREED_MEMORY', 'GLIBC_TUNABLES'): os.environ.pop(v, None)\n"
            "from hiermodel import heap\nprint(heap.reuse_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str({"MALLOC_MMAP_MAX_": True, "MALLOC_TRIM_THRESHOLD_": True})
