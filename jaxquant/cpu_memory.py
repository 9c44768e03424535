"""XLA:CPU's scratch memory, kept between calls instead of page-faulted in again by every call.

Each call of a compiled computation on the CPU backend takes its scratch memory as one block (a DQC step with
stored activations, x4, batch 4 of 32x32: 1.27 GiB) and frees it when it ends. glibc's malloc serves a block
that large from a fresh mmap and unmaps it on free, so the next call faults every page in again and the kernel
zeroes each one: 326,000 faults and ~0.5 s of system time a step on a 2-core VM. Two process-wide settings keep
the block: calls run on the thread that makes them (no asynchronous dispatch), so the block comes from glibc's
main heap, which can grow without mmap; and with mmap off and the trim threshold at its maximum (2 GiB) a freed
block stays in that heap for the next call. (A worker thread's heap is capped at 64 MiB and falls back to
mmap whatever the settings, which is why dispatch has to change too.) README, "Memory and speed".
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import pkgutil

import jax

# mallopt(3) parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
# The largest trim threshold mallopt takes (an int): a freed top of the heap up to this size stays mapped.
KEPT_BYTES = 2**31 - 1

_kept = False


def _glibc_mallopt():
    """glibc's mallopt, or None in a process not on glibc (macOS, musl)."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc.mallopt


def accelerator_expected() -> bool:
    """Whether JAX will compute on an accelerator, judged without starting a backend: `jax_platforms`
    (JAX_PLATFORMS) names another platform first, or, where it is unset, an accelerator plugin is installed
    (JAX finds them as `jax_plugins` entry points or modules)."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() != "cpu"
    try:
        import jax_plugins
    except ImportError:
        modules = []
    else:
        modules = list(pkgutil.iter_modules(jax_plugins.__path__))
    return bool(modules or importlib.metadata.entry_points(group="jax_plugins"))


def keep_cpu_scratch() -> bool:
    """Keep XLA:CPU's per-call scratch memory (up to `KEPT_BYTES`) between calls, for the rest of the process.

    Call it before JAX's first computation: the CPU client reads its dispatch mode once. The scripts do; a
    library user may. Returns whether the scratch is now kept: False off glibc, and where JAX will run on an
    accelerator (`accelerator_expected`), since the settings would only cost host memory there; nothing
    changes then. Costs: memory freed by large computations stays with the process, and Python no longer runs
    ahead of the CPU computations it has queued."""
    global _kept
    if _kept:
        return True
    from jax._src import xla_bridge  # private, but the only way to ask without starting a backend

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("keep_cpu_scratch() must run before JAX's first computation (the CPU client is running)")
    mallopt = _glibc_mallopt()
    if mallopt is None or accelerator_expected():
        return False
    if not (mallopt(_M_MMAP_MAX, 0) and mallopt(_M_TRIM_THRESHOLD, KEPT_BYTES)):
        raise OSError("glibc refused mallopt(M_MMAP_MAX, 0) or mallopt(M_TRIM_THRESHOLD, 2**31 - 1)")
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _kept = True
    return True


def cpu_scratch_kept() -> bool:
    """Whether `keep_cpu_scratch` has run in this process."""
    return _kept
