"""The process heap keeps freed memory (hiermodel.heap): set where the environment leaves it open, never
over a user's own setting, and passed on to the processes a command starts."""

import os
import subprocess
import sys

import pytest

from hiermodel import heap


@pytest.fixture
def clean_environment(monkeypatch):
    for variable in heap.SETTINGS:  # set, then removed: the test's own setting is undone after it
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)


def test_it_sets_each_open_setting_here_and_for_child_processes(clean_environment, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: lambda parameter, value: calls.append((parameter, value)) or 1)
    applied = heap.reuse_freed_memory()
    assert applied == {"MALLOC_MMAP_MAX_": True, "MALLOC_TRIM_THRESHOLD_": True}
    assert sorted(calls) == sorted(heap.SETTINGS.values())
    child = subprocess.run([sys.executable, "-c", "import os; print(os.environ['MALLOC_MMAP_MAX_'], os.environ['MALLOC_TRIM_THRESHOLD_'])"],
                           capture_output=True, text=True, check=True).stdout.split()
    assert child == ["0", str(2**31 - 1)]
    calls.clear()
    assert heap.reuse_freed_memory() == {} and calls == []  # the second call finds both set: nothing to do


def test_a_users_own_setting_wins(clean_environment, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: lambda parameter, value: calls.append(parameter) or 1)
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")  # glibc's default, chosen by the user
    assert heap.reuse_freed_memory() == {"MALLOC_TRIM_THRESHOLD_": True}
    assert calls == [heap.M_TRIM_THRESHOLD] and os.environ["MALLOC_MMAP_MAX_"] == "65536"


def test_without_glibc_only_the_environment_is_set(clean_environment, monkeypatch) -> None:
    monkeypatch.setattr(heap, "_glibc_mallopt", lambda: None)
    assert heap.reuse_freed_memory() == {"MALLOC_MMAP_MAX_": False, "MALLOC_TRIM_THRESHOLD_": False}
    assert os.environ["MALLOC_MMAP_MAX_"] == "0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_glibc_takes_the_settings_in_a_fresh_process() -> None:
    """The real mallopt, in a process of its own (the test process keeps its heap as it is)."""
    code = ("import os\nfor v in ('MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_'): os.environ.pop(v, None)\n"
            "from hiermodel import heap\nprint(heap.reuse_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    if heap._glibc_mallopt() is None:
        pytest.skip("no glibc here")
    assert out.strip() == str({"MALLOC_MMAP_MAX_": True, "MALLOC_TRIM_THRESHOLD_": True})
