"""XLA:CPU's scratch kept between calls (`jaxquant.cpu_memory`), and the DQC block execution that follows it."""

import platform

import jax
import pytest

from jaxquant import cpu_memory, dqc
from jaxquant.dqc import DQCConfig
from test_convert import run_script

# A fresh process (the setting must precede JAX's first computation) times the page faults of a call whose
# 64 MiB intermediate (a 4096 x 4096 float32 product, the operand of another matmul) is XLA scratch.
FAULTS_A_CALL = """
import resource, sys
from jaxquant.cpu_memory import keep_cpu_scratch
kept = sys.argv[1] == "keep" and keep_cpu_scratch()
import jax, jax.numpy as jnp
a, b, c = jnp.ones((4096, 32)), jnp.ones((32, 4096)), jnp.ones((4096, 8))
f = jax.jit(lambda a, b, c: jnp.sum(jnp.tanh(a @ b) @ c)).lower(a, b, c).compile()
f(a, b, c).block_until_ready()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(a, b, c).block_until_ready()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 5)
"""
SCRATCH_PAGES = 4096 * 4096 * 4 // 4096


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what is tuned")
def test_kept_scratch_is_not_page_faulted_in_again():
    faults = {}
    for mode in ("keep", "default"):
        result = run_script("-c", FAULTS_A_CALL, mode)
        assert result.returncode == 0, result.stderr[-2000:]
        kept, faults[mode] = result.stdout.split()
        assert kept == str(mode == "keep")
    # Without it each call maps and faults in the whole product again; with it, the same memory serves them all.
    assert float(faults["default"]) > 0.9 * SCRATCH_PAGES, faults
    assert float(faults["keep"]) < 0.01 * SCRATCH_PAGES, faults


def test_keeping_the_scratch_after_jax_has_run_is_refused():
    import jax.numpy as jnp

    jnp.ones(2).block_until_ready()  # the CPU client runs, with the dispatch it started with
    with pytest.raises(RuntimeError, match="before JAX's first computation"):
        cpu_memory.keep_cpu_scratch()
    assert not cpu_memory.cpu_scratch_kept()


@pytest.mark.parametrize("kept, batch, patch, given, expected", [
    (False, 4, 32, {}, (True, True)),  # scratch returned after each call: recompute, in a scan
    (True, 4, 32, {}, (False, False)),  # kept, and 1.27 GiB fits: store
    (True, 8, 32, {}, (True, True)),  # kept, but twice that would not stay kept
    (True, 4, 32, {"remat": True}, (True, True)),  # recomputation asked for: in a scan
    (False, 4, 32, {"remat": False}, (False, False)),
    (True, 4, 32, {"scan": True}, (False, True)),
])
def test_cpu_block_execution_follows_the_kept_scratch(monkeypatch, kept, batch, patch, given, expected):
    monkeypatch.setattr(dqc, "cpu_scratch_kept", lambda: kept)
    config = DQCConfig(batch=batch, patch=patch, **given)
    assert config.block_execution(batch * patch**2) == expected
    assert (config.resolved().remat, config.resolved().scan) == expected


@pytest.mark.parametrize("platforms, plugins, expected", [
    (None, [], False), (None, ["cuda"], True), ("cpu", ["cuda"], False), ("cuda,cpu", [], True),
])
def test_an_accelerator_is_recognised_before_jax_starts(monkeypatch, platforms, plugins, expected):
    """On an accelerator host the scratch settings would only cost host memory: keep_cpu_scratch leaves them."""
    previous = jax.config.jax_platforms
    monkeypatch.setattr(cpu_memory.importlib.metadata, "entry_points", lambda group: plugins)
    jax.config.update("jax_platforms", platforms)
    try:
        assert cpu_memory.accelerator_expected() == expected
    finally:
        jax.config.update("jax_platforms", previous)
