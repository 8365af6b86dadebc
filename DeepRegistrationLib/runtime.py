"""Process-wide settings that must be made before torch is imported.

OpenMP's idle threads spin for a while before they sleep (libgomp: 300,000 spins by default). On
a 2-core machine shared with a GUI or another job, two spinning processes starve each other:
two `io` registrations side by side took 20 s each instead of 4.5 s. A short spin (1,000) keeps
almost all of the idle-machine speed (4.3 s against 4.1 s; fully passive waiting costs 5.1 s) and
stays fast under contention (5.1 s each). Measured on 2 mm MNI152 pairs, 2 cores.
"""
import os

SPIN_COUNT = "1000"


def configure_openmp() -> None:
    """Bound OpenMP spin-waiting unless the user chose a wait policy or spin count already."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``; elsewhere nothing).

    glibc keeps freed blocks below its mmap threshold (which rises to 32 MB as large blocks are
    freed) in the heap, so after an optimisation the process still holds the pages of its
    temporaries; the outputs that follow then add their own arrays on top. Trimming between the
    two lowers the process's peak.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to do
        pass
