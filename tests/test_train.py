"""Tests for jaxquant.train and scripts/train.py on a tiny SwinIR and tiny synthetic images."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
import shutil
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ctrl_c_on_call
from data_parallel_child import tiny_data
from jaxquant.checkpoint import Model, load_model, save_model
from jaxquant.patches import lr_pool_from_folder, sample_patches
from jaxquant import runs
from jaxquant.runs import RunCheckpointer, write_atomically
from jaxquant.swinir import SwinIR, SwinIRConfig
from jaxquant.train import TrainConfig, init_params, init_state, l1_loss, train, train_step, transfer_params

TINY = SwinIRConfig(upscale=2, embed_dim=12, depths=(1, 1), num_heads=(2, 2), window_size=4)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    """train/: 4 smooth 40x40 colour images; benchmark/Set5/HR: 2 images of 32x32 (LR made on load)."""
    return tiny_data(tmp_path_factory.mktemp("data"))


def tiny_config(tiny_root: Path, **overrides) -> TrainConfig:
    """One config for all f32 step tests: `train_step` compiles once per distinct config."""
    base = dict(scale=2, model=TINY, batch=4, patch=8, steps=30, lr=1e-3, warmup=3, val_every=15, ckpt_every=15,
                data_root=str(tiny_root), train_dir=str(tiny_root / "train"))
    return TrainConfig(**{**base, **overrides})


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(k, simple=True, separator="/"): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_array_equal(fa[path], fb[path], err_msg=path)


def test_loss_goes_down(tiny_root):
    cfg = tiny_config(tiny_root)
    pool = lr_pool_from_folder(cfg.images_dir, 2, min_size=cfg.patch)
    lr, hr = sample_patches(pool, jax.random.PRNGKey(123), 16, 8)  # a fixed evaluation batch
    eval_loss = jax.jit(lambda p: l1_loss(p, SwinIR(TINY), lr, hr))
    state = init_state(cfg)
    before = float(eval_loss(state.params))
    cache = train_step._cache_size()
    for _ in range(cfg.steps):
        state, _ = train_step(state, pool, cfg=cfg)
    after = float(eval_loss(state.params))
    assert train_step._cache_size() - cache == 1  # compiled once for 30 steps
    assert int(state.step) == 30
    # Recorded: 0.727 -> 0.279 (CPU, jax 0.10.2).
    assert after < 0.5 * before, (before, after)


def test_bf16_step_keeps_float32_params(tiny_root):
    cfg = tiny_config(tiny_root, bf16=True)
    state = init_state(cfg)
    pool = lr_pool_from_folder(cfg.images_dir, 2, min_size=cfg.patch)
    # Flax's LayerNorm calls promote_types(bfloat16, float32), which strict promotion (conftest) rejects.
    with jax.numpy_dtype_promotion("standard"):
        new, loss = train_step(state, pool, cfg=cfg)
        new, loss = train_step(new, pool, cfg=cfg)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    assert {v.dtype for v in _flat(new.params).values()} == {np.dtype(np.float32)}


def test_killed_run_resumes_bit_for_bit(tiny_root, tmp_path, monkeypatch):
    cfg = tiny_config(tiny_root)
    full = train(cfg, tmp_path / "full")
    assert train(cfg, tmp_path / "cut", stop_after=15) is None  # "killed" after step 15
    assert not (tmp_path / "cut" / "model").exists()
    with RunCheckpointer(tmp_path / "cut", every=15) as ckpt:
        assert ckpt.latest_step() == 15
    resumed = train(cfg, tmp_path / "cut", resume=True)
    assert resumed["steps_this_process"] == 15
    assert_trees_equal(load_model(tmp_path / "full").params, load_model(tmp_path / "cut").params)
    state = init_state(cfg)
    with RunCheckpointer(tmp_path / "full", 15) as a, RunCheckpointer(tmp_path / "cut", 15) as b:
        assert_trees_equal(a.restore_latest(state), b.restore_latest(state))  # params, Adam state, step, key
    assert full["final_loss"] == resumed["final_loss"]
    assert full["set5_psnr_y"] == resumed["set5_psnr_y"] and np.isfinite(full["set5_psnr_y"])
    assert (tmp_path / "full" / "results.md").read_text().count("\n") == 3
    written = (tmp_path / "cut" / "results.json").read_text()
    assert train(cfg, tmp_path / "cut", resume=True) == json.loads(written)  # a finished run only reports
    assert (tmp_path / "cut" / "results.json").read_text() == written

    # A first Ctrl-C during step 17 (no checkpoint step: every 15) lets the step finish and checkpoints it.
    with monkeypatch.context() as patch:
        ctrl_c_on_call(patch, sys.modules["jaxquant.train"], "train_step", call=17)
        with pytest.raises(KeyboardInterrupt, match="training checkpointed at step 17"):
            train(cfg, tmp_path / "ctrl-c")
    with RunCheckpointer(tmp_path / "ctrl-c", every=15) as ckpt:
        assert ckpt.latest_step() == 17
    train(cfg, tmp_path / "ctrl-c", resume=True)
    assert_trees_equal(load_model(tmp_path / "full").params, load_model(tmp_path / "ctrl-c").params)


def test_a_resumed_run_needs_its_checkpoint_not_its_init_source(tiny_root, tmp_path):
    save_model(tmp_path / "init", Model(TINY, init_params(tiny_config(tiny_root), jax.random.PRNGKey(7))))
    cfg = tiny_config(tiny_root, init=str(tmp_path / "init"))
    train(cfg, tmp_path / "full")
    train(cfg, tmp_path / "cut", stop_after=15)
    shutil.rmtree(tmp_path / "init")  # moved or deleted since the run started
    train(cfg, tmp_path / "cut", resume=True)
    assert_trees_equal(load_model(tmp_path / "full").params, load_model(tmp_path / "cut").params)


def test_restored_state_is_placed_like_the_fresh_one(tmp_path):
    """Orbax restores committed arrays; jit would compile afresh for them where the fresh state was not."""
    fresh = {"step": jnp.int32(3), "bounds": jnp.arange(4.0), "key": jax.random.key(7), "raw": jax.random.PRNGKey(1),
             "pinned": jax.device_put(jnp.ones(2), jax.devices()[0])}
    with RunCheckpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, fresh)
        restored = ckpt.restore_latest(fresh)
    step = jax.jit(lambda state: state)
    step(fresh)
    step(restored)
    assert step._cache_size() == 1  # one compilation for both
    for name, x in fresh.items():
        y = restored[name]
        assert (y.dtype, y.committed) == (x.dtype, x.committed), name
    without_key = lambda state: {k: v for k, v in state.items() if k != "key"}
    assert_trees_equal(without_key(fresh), without_key(restored))
    np.testing.assert_array_equal(jax.random.key_data(restored["key"]), jax.random.key_data(fresh["key"]))


def test_states_off_the_checkpoint_interval_are_not_read(tmp_path, monkeypatch):
    """A training loop offers every step's state: only those on the interval (or forced) are packed to the host."""
    packed = []
    original = runs._pack
    monkeypatch.setattr(runs, "_pack", lambda state: packed.append(int(state["step"])) or original(state))
    with RunCheckpointer(tmp_path, every=3) as ckpt:
        saved = [ckpt.save(step, {"step": jnp.int32(step)}, force=step == 5) for step in range(1, 7)]
    assert saved == [True, False, True, False, True, True]  # orbax saves the first step it is offered
    assert packed == [1, 3, 5, 6]


def test_a_checkpoint_of_another_state_is_refused(tmp_path):
    with RunCheckpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, {"bounds": jnp.arange(6.0), "step": jnp.int32(1)})
        with pytest.raises(ValueError, match="another kind of run state"):
            ckpt.restore_latest({"bounds": jnp.arange(4.0), "step": jnp.int32(1)})
        assert ckpt.restore_latest({"bounds": jnp.zeros(6), "step": jnp.int32(0)})["step"] == 1


def test_a_damaged_checkpoint_is_named(tmp_path):
    state = {"bounds": jnp.arange(4.0), "step": jnp.int32(1)}
    with RunCheckpointer(tmp_path, every=1) as ckpt:
        ckpt.save(1, state)
        ckpt.save(2, state)
        for data in (tmp_path / "checkpoints" / "2").rglob("d/*"):
            data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
        with pytest.raises(ValueError, match=rf"^{tmp_path}/checkpoints/2 is a damaged checkpoint: OUT_OF_RANGE"):
            ckpt.restore_latest(state)


def test_run_dir_guards(tiny_root, tmp_path):
    cfg = tiny_config(tiny_root)
    with pytest.raises(FileNotFoundError, match="not a training run"):
        train(cfg, tmp_path / "none", resume=True)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train(cfg, tmp_path / "run")
    with pytest.raises(ValueError, match=r"\(lr, seed differ\)"):
        train(dataclasses.replace(cfg, lr=2e-3, seed=1), tmp_path / "run", resume=True)
    with pytest.raises(FileNotFoundError):  # inputs load before the run dir is claimed
        train(dataclasses.replace(cfg, train_dir=str(tmp_path / "nowhere")), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match=re.escape(f"{tmp_path / 'afile'} is a file, not a folder")):
        train(cfg, tmp_path / "afile" / "run")


def test_a_killed_write_leaves_the_old_file(tmp_path, monkeypatch, default_sigint):
    """Run files a resume reads back (configs, validation logs, results) are replaced whole or not at all."""
    path = tmp_path / "validation.json"
    write_atomically(path, "[1]")
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(os, "replace", lambda *_: os.kill(os.getpid(), signal.SIGINT))  # killed as it renames
        write_atomically(path, "[1, 2]")
    assert path.read_text() == "[1]" and [p.name for p in tmp_path.iterdir()] == ["validation.json"]


def test_init_x4_from_x2_keeps_body_and_reinitialises_upsampler(tiny_root, tmp_path):
    x2 = init_params(tiny_config(tiny_root), jax.random.PRNGKey(7))
    save_model(tmp_path / "x2", Model(TINY, x2))
    x4 = dataclasses.replace(TINY, upscale=4)
    key = jax.random.PRNGKey(0)
    scratch = _flat(init_params(tiny_config(tiny_root, scale=4, model=x4), key))
    started = _flat(init_params(tiny_config(tiny_root, scale=4, model=x4, init=str(tmp_path / "x2")), key))
    source = _flat(x2)
    assert started.keys() == scratch.keys()
    assert started["upsample_0/kernel"].shape == (3, 3, 12, 3 * 16)
    for path, value in started.items():
        expected = scratch[path] if path.startswith("upsample_0/") else source[path]
        np.testing.assert_array_equal(value, expected, err_msg=path)


def test_transfer_params_names_every_mismatch():
    def params(embed, extra=None, up=12):
        tree = {"conv_first": {"kernel": jnp.ones((3, 3, 3, embed))},
                "upsample_0": {"kernel": jnp.zeros((3, 3, embed, up))}}
        return tree | ({extra: {"bias": jnp.ones((embed,))}} if extra else {})

    copied = transfer_params(params(12), params(12, up=48), keep_upsampler=False)
    np.testing.assert_array_equal(copied["conv_first"]["kernel"], 1.0)
    np.testing.assert_array_equal(copied["upsample_0"]["kernel"], 0.0)  # left as initialised
    with pytest.raises(ValueError, match=r"missing norm/bias; unexpected old/bias; conv_first/kernel is "
                                         r"\(3, 3, 3, 16\), needs \(3, 3, 3, 12\) \(3 in all\)"):
        transfer_params(params(12, "norm"), params(16, "old"), keep_upsampler=False)
    with pytest.raises(ValueError, match=r"upsample_0/kernel is \(3, 3, 12, 48\)"):
        transfer_params(params(12), params(12, up=48), keep_upsampler=True)


def test_config_round_trip_and_checks():
    cfg = TrainConfig(scale=2, model=TINY, steps=10, warmup=2)
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="model config is x2 but scale is 4"):
        TrainConfig(scale=4, model=TINY)
    with pytest.raises(ValueError, match="warmup"):
        TrainConfig(steps=10, warmup=10)
    for lr in (float("nan"), -1.0, 0.0):
        with pytest.raises(ValueError, match="lr must be > 0"):
            TrainConfig(lr=lr)


def train_cli(argv: list[str]) -> None:
    runpy.run_path(str(REPO / "scripts" / "train.py"))["main"](argv)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0", "--data-root", "{root}", "--train-dir", "{root}/train"], "error: steps must be >= 1"),
        (["--data-root", "{root}/missing"], "error: data root {root}/missing does not exist"),
        (["--train-dir", "{root}/nope", "--data-root", "{root}"], "error: image folder {root}/nope does not exist"),
        (["--train-dir", "{root}/train/0.png", "--data-root", "{root}"],
         "error: image folder {root}/train/0.png is a file, not a folder"),
        (["--resume", "{root}/train"], "error: {root}/train is not a training run"),
    ],
)
def test_script_errors_are_one_line(tiny_root, argv, message):
    with pytest.raises(SystemExit) as info:
        train_cli([a.format(root=tiny_root) for a in argv])
    assert str(info.value).startswith(message.format(root=tiny_root)) and "\n" not in str(info.value)


def test_ctrl_c_before_the_run_dir_is_claimed_suggests_no_resume(tiny_root, tmp_path, monkeypatch, default_sigint):
    ctrl_c_on_call(monkeypatch, sys.modules["jaxquant.train"], "lr_pool_from_folder", call=1)  # as the images load
    with pytest.raises(SystemExit) as stopped:
        train_cli(["--data-root", str(tiny_root), "--train-dir", str(tiny_root / "train"), "--run-dir", str(tmp_path)])
    assert stopped.value.code == "interrupted"  # nothing to resume, and the same command starts afresh


def test_script_resume_rejects_config_flags(tiny_root, capsys):
    with pytest.raises(SystemExit):
        train_cli(["--resume", str(tiny_root), "--lr", "1e-3"])
    assert "--resume takes the config from RUN_DIR; drop --lr" in capsys.readouterr().err
