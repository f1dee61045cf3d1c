"""latentlab: working in an autoencoder's latent space on MNIST."""
import ctypes

# OpenMP's wait policy is left at its default (an idle worker spins a few milliseconds, then sleeps). PASSIVE,
# set here before, put the worker to sleep after every op, so each of the autoencoder's ops on two threads
# waited for it to wake: its training ran a third slower on 2 cores. Stages on one thread start no worker, so
# nothing spins beside the stage in the other process (the tests still ask for PASSIVE).

__version__ = "0.1.0"

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(mmap_mb: int = 32, trim_mb: int = 64) -> bool:
    """Let glibc keep up to `trim_mb` of freed memory for the next allocation instead of handing it back.

    By default glibc returns the top of its heap to the system once more than twice its largest recent block is
    free, and a training step frees its activations each step: the next step then takes fresh pages from the
    kernel, each zeroed on first touch (the autoencoder's step spent 15% of its CPU time in the kernel). Blocks up
    to `mmap_mb` come from the heap (glibc's own upper limit for its adaptive threshold). Returns whether glibc
    took both settings; elsewhere (another C library) nothing changes."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    took_mmap = mallopt(M_MMAP_THRESHOLD, mmap_mb << 20)
    took_trim = mallopt(M_TRIM_THRESHOLD, trim_mb << 20)
    return bool(took_mmap and took_trim)


keep_freed_memory()
