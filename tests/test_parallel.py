"""Data parallelism (jaxquant.parallel): every stage on two host devices against one device, on a tiny SwinIR.

The two devices need XLA_FLAGS before JAX starts, so one child process (tests/data_parallel_child.py) runs every
stage on a mesh of one device and of two and prints what it measured; the tests below read it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxquant import parallel
from jaxquant.patches import make_pool, sample_patches

REPO = Path(__file__).resolve().parents[1]
STEPS = 3  # data_parallel_child.STEPS


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "XLA_FLAGS": flags, "PYTHONPATH": path}
    done = subprocess.run([sys.executable, str(REPO / "tests" / "data_parallel_child.py"),
                           str(tmp_path_factory.mktemp("two_devices"))],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"the two-device child failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_devices_split_the_steps(measured):
    """The batch is really split: the steps' compiled programs all-reduce on two devices, and on one do not."""
    assert measured["all_reduces"]["1"] == {"dqc": 0, "train": 0}, measured["all_reduces"]
    assert all(count > 0 for count in measured["all_reduces"]["2"].values()), measured["all_reduces"]


def test_dobi_bounds_do_not_depend_on_the_device_count(measured):
    d = measured["dobi"]
    assert d["differing"] == 0, f"DOBI: {d['differing']} of {d['of']} bounds differ on 2 devices, by {d['max_abs']:.3g}"


def test_dqc_bounds_on_two_devices_equal_one_within_float_summation(measured):
    """Two devices sum the loss and its gradient over the batch in another order (two partial sums, then an
    all-reduce), so gradients differ by a few float32 ulps relative. Adam divides each gradient by its own running
    scale, so an update changes by about lr x 1e-6 = 1e-8, while each step rounds the bounds to float32 (half an ulp
    of the largest, 1.5e-8 here): after k steps they may differ by k ulps of the largest bound."""
    d = measured["dqc"]
    tolerance = STEPS * d["ulp_at_max"]
    assert d["max_abs"] <= tolerance, (f"DQC after {STEPS} steps: {d['differing']} of {d['of']} bounds differ by up "
                                       f"to {d['max_abs']:.3g} (tolerance {tolerance:.3g})")


def test_training_loss_curve_on_two_devices_equals_one(measured):
    """The L1 loss is a mean over 3,072 outputs, summed in another order on two devices: float32 reassociation
    moves it by up to log2(3072) x 6e-8 = 7e-7 relative a step; rtol 1e-5 leaves room for the params' few-ulp
    drift over 3 steps, and is 100x below the loss's change from step to step."""
    one, two = measured["losses"]["1"], measured["losses"]["2"]
    assert len(one) == len(two) == STEPS
    np.testing.assert_allclose(two, one, rtol=1e-5, err_msg="FP training losses, 2 devices against 1")


def test_evaluation_psnr_is_identical(measured):
    assert measured["psnr"]["1"] == measured["psnr"]["2"], f"Set5 PSNRs by device count: {measured['psnr']}"


def test_a_killed_two_device_run_resumes_bit_for_bit(measured):
    r = measured["resume"]
    assert not r["stopped_completed"] and r["completed"], r
    assert r["bounds"]["differing"] == 0, f"resumed DQC bounds differ from a straight run's: {r['bounds']}"
    assert r["logs_equal"], "the resumed run's validation log differs from a straight run's"


def test_a_process_samples_its_rows_of_the_batch():
    """Row i of a batch is drawn from the step's key alone: a process's rows are those rows of the whole batch."""
    pool = make_pool([np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3)], min_size=8)
    key = jax.random.PRNGKey(3)
    whole, _ = sample_patches(pool, key, 4, 8)
    part, _ = sample_patches(pool, key, 4, 8, rows=(1, 3))
    np.testing.assert_array_equal(np.asarray(part), np.asarray(whole)[1:3])
    assert parallel.process_rows(4) == (0, 4)  # one process feeds the whole batch


def test_a_batch_or_device_count_that_does_not_fit_is_one_clear_error(measured):
    assert measured["uneven_batch_error"] == ("--batch 3 does not split evenly over 2 devices; use a multiple of 2 "
                                              "or fewer --devices")
    with pytest.raises(ValueError, match=r"^--devices must be 1\.\.\d+ \(the devices of this process\), got 0$"):
        parallel.data_mesh(0)
