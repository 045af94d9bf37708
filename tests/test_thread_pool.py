"""The CPU thread pool (csrc/common/cpu/thread_pool.cpp) through the native
checks of tests/native/thread_pool_check.cpp: built as is, and under
ThreadSanitizer and AddressSanitizer where the compiler supports them.

Exception propagation is checked natively only: no input that Python can
pass makes a kernel's task throw (short of running out of memory for a
task's scratch buffer)."""

import subprocess

import pytest

from tests import native_build

SOURCES = [native_build.REPO / "tests/native/thread_pool_check.cpp",
           native_build.CSRC / "common/cpu/thread_pool.cpp"]
VARIANTS = {
    "plain": [],
    "tsan": ["-fsanitize=thread", "-g"],
    "asan": ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"],
}
CHECKS = [
    "every_task_once",
    "exception_first_or_last_task",
    "exception_on_worker",
    "exception_on_caller",
    "sleeping_workers_wake",
    "concurrent_callers",
    "resize_while_running",
    "many_small_jobs",
    "idle_uses_no_cpu",
]


@pytest.fixture(scope="module", params=list(VARIANTS))
def checker(request):
    try:
        return native_build.executable(f"thread_pool_check_{request.param}", SOURCES, VARIANTS[request.param])
    except native_build.CompilerMissing as e:
        pytest.skip(str(e))
    except RuntimeError as e:  # no sanitizer runtime for this compiler
        if request.param == "plain":
            raise
        pytest.skip(f"{request.param} unavailable: {str(e)[-300:]}")


@pytest.mark.parametrize("check", CHECKS)
def test_thread_pool(checker, check):
    # A sanitizer's report makes the process exit non-zero.
    result = subprocess.run([str(checker), check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and f"ok {check}" in result.stdout, result.stdout + result.stderr
