"""Run-state helpers shared by training and DQC: orbax checkpoints for exact resume, a progress bar, results.

Exact resume: a run's state is one pytree (params, optimizer state, step, base PRNG key) saved every N
steps; each step draws its randomness from `jax.random.fold_in(key, step)`, so a resumed run replays the
same batches and ends bit-for-bit equal to an uninterrupted one (on the same backend).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Collection, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from jaxquant import parallel
from jaxquant.checkpoint import reading_checkpoint
from jaxquant.cli import interrupted
from jaxquant.data import check_output_path


def _is_typed_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """New-style PRNG keys -> their uint32 key data (orbax stores plain arrays only)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_typed_key(x) else x, tree)


def _placed_like(target: Any, value: np.ndarray) -> Any:
    """A restored host array as an array like `target`: committed to its device only if `target` is, a typed
    PRNG key if `target` is one."""
    if _is_typed_key(target):
        data = _placed_like(jax.random.key_data(target), value)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(target))
    if isinstance(target, jax.Array) and target.committed:
        return jax.device_put(value, target.sharding)
    return jnp.asarray(value)


def _pack(tree: Any) -> dict[str, np.ndarray]:
    """The leaves of `tree` (keys as key data) in one flat host array per dtype. Orbax spends about a
    millisecond per leaf, and a DQC state has ~1,500 small ones (1.5 s a save on a 2-core CPU)."""
    groups: dict[str, list] = {}
    for leaf in jax.device_get(jax.tree.leaves(_keys_to_data(tree))):  # one transfer, not a sync per leaf
        groups.setdefault(np.dtype(leaf.dtype).name, []).append(np.ravel(leaf))
    return {dtype: np.concatenate(parts) for dtype, parts in groups.items()}


def _unpack(packed: dict[str, np.ndarray], target: Any) -> Any:
    """The inverse of `_pack`: host arrays shaped as `target`'s leaves (keys as key data)."""
    leaves, treedef = jax.tree.flatten(_keys_to_data(target))
    offsets = dict.fromkeys(packed, 0)
    out = []
    for leaf in leaves:
        dtype = np.dtype(leaf.dtype).name
        out.append(packed[dtype][offsets[dtype] : offsets[dtype] + leaf.size].reshape(leaf.shape))
        offsets[dtype] += leaf.size
    return treedef.unflatten(out)


def check_run_dir(run_dir: Path, config_file: str, resume: bool, kind: str) -> None:
    """Refuse, before any work, a run dir the run could not claim: for a resume one that holds no `kind`; for a
    new run one that holds a run or anything else, or that could not be created (under a file, read-only). In a
    multi-host run process 0 alone checks and claims it: the others would find it claimed."""
    if not parallel.is_main_process():
        return
    if resume:
        read_run_json(run_dir, config_file, kind)
    elif (run_dir / config_file).exists():
        raise FileExistsError(f"{run_dir} already holds a {kind}; resume it or pick another run dir")
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise FileExistsError(f"{run_dir} exists and is not an empty folder; pick another run dir")
    elif not run_dir.exists():
        check_output_path(run_dir, folder=True)


def claim_run_dir(run_dir: Path, config_file: str, config: dict, resume: bool, kind: str,
                  growable: Collection[str] = ()) -> None:
    """Record `config` (a JSON dict) in a new run dir, or check that a resumed run dir was started with it.

    A run dir belongs to one run: its checkpoints hold that run's state, which a run with other settings must
    not silently continue (it would keep the old seed, optimizer state and validation history). A setting the
    saved config lacks (at any depth) is newer than the run, which resumes with its current value. The lists
    named in `growable` (work added after the run, such as more benchmarks to evaluate) may gain items on a
    resume. A resume records what it changed."""
    if not parallel.is_main_process():
        return
    check_run_dir(run_dir, config_file, resume, kind)
    current = json.loads(json.dumps(config))
    if resume:
        saved = read_run_json(run_dir, config_file, kind)
        changed = sorted(k for k in saved if _changes(saved[k], current.get(k))
                         and not (k in growable and set(saved[k]) <= set(current.get(k) or ())))
        if changed:
            raise ValueError(f"{run_dir} was started with a different config ({', '.join(changed)} differ)")
        if saved == current:
            return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / config_file, json.dumps(current, indent=2) + "\n")


def _changes(saved: Any, current: Any) -> bool:
    """Whether `current` changes a setting that `saved` records; in nested settings (DQC's), one that `saved` lacks
    is newer than it and does not count."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return any(_changes(value, current.get(key)) for key, value in saved.items())
    return saved != current


def interrupted_run(stopped: KeyboardInterrupt, run_dir: Path, config_file: str, script: str) -> str:
    """The exit message of a run stopped by Ctrl-C: with the command that resumes it once its run dir is
    claimed; before that there is nothing to resume (and the same command starts it afresh)."""
    if not (Path(run_dir) / config_file).is_file():
        return "interrupted"
    return interrupted(stopped, f"python {script} --resume {run_dir}")


def read_run_json(run_dir: Path, name: str, kind: str) -> dict:
    """The JSON object a run dir holds as `name` (its config, its results); missing, it is not a `kind`."""
    path = Path(run_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a {kind} (no {name})")
    return read_json_object(path)


def read_json(path: Path) -> Any:
    """The value a JSON file holds; unreadable JSON is a one-line ValueError naming the file."""
    try:
        return json.loads(Path(path).read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object; anything else is a one-line ValueError naming the file."""
    value = read_json(path)
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to `path` through a file beside it and a rename: a kill leaves the old file or the new one,
    never a torn one that a resume could not read back. In a multi-host run only process 0 writes."""
    if not parallel.is_main_process():
        return
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


class RunCheckpointer:
    """Saves a train-state pytree under `<run_dir>/checkpoints/<step>` every `every` steps, keeping `keep`."""

    def __init__(self, run_dir: str | Path, every: int, keep: int = 2):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1, got {every}")
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=every, max_to_keep=keep, enable_async_checkpointing=False
        )
        self._manager = ocp.CheckpointManager(
            Path(run_dir).resolve() / "checkpoints", options=options, item_handlers=ocp.StandardCheckpointHandler()
        )

    def save(self, step: int, state: Any, force: bool = False) -> bool:
        """Save `state` as `step` if `step` is on the interval (or `force`); True if it saved. Off the interval
        nothing is read: packing copies the whole state to the host."""
        if not (force or self._manager.should_save(step)):
            return False
        return self._manager.save(step, args=ocp.args.StandardSave(_pack(state)), force=force)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore_latest(self, target: Any) -> Any | None:
        """The latest saved state, with the structure, dtypes, key types and placement of `target`; None if
        none saved. Placement matters: orbax restores arrays committed to a device, and jit compiles afresh for
        committed arguments where the fresh state was uncommitted (a resumed DQC run compiled everything twice).
        """
        step = self._manager.latest_step()
        if step is None:
            return None
        directory = self._manager.directory / str(step)
        with reading_checkpoint(directory):  # restored as saved, with no template to fit (or truncate) it to
            restored = self._manager.restore(step, args=ocp.args.StandardRestore())
        saved = {dtype: array.shape for dtype, array in restored.items()}
        if saved != {dtype: array.shape for dtype, array in _pack(target).items()}:
            raise ValueError(f"{directory} holds another kind of run state (saved array sizes {saved})")
        return jax.tree.map(_placed_like, target, _unpack(restored, target))

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress(tqdm):
    """A tqdm bar (with ETA) whose postfix keeps the latest value of each named metric."""

    def log(self, **metrics: float) -> None:
        self._metrics = {**getattr(self, "_metrics", {}), **{k: f"{v:.4g}" for k, v in metrics.items()}}
        self.set_postfix(self._metrics, refresh=False)


def progress(total: int, initial: int = 0, desc: str | None = None, unit: str = "step") -> Progress:
    """A progress bar over `initial..total` (none where that is empty); `bar.log(loss=..., psnr=...)` updates
    its postfix."""
    return Progress(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, disable=total == initial)


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[Callable[[], bool]]:
    """Inside, the first Ctrl-C asks a training loop to stop rather than killing it: the yielded function
    turns True, and the loop checkpoints its current step and raises `KeyboardInterrupt`. A second Ctrl-C
    interrupts at once. (Off the main thread Python takes no signal handler, and Ctrl-C interrupts at once.)"""
    requested = threading.Event()

    def ask_to_stop(signum, frame) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()
        print("\nstopping after this step, once it is checkpointed (Ctrl-C again to stop now)", file=sys.stderr)

    if threading.current_thread() is not threading.main_thread():
        yield requested.is_set
        return
    previous = signal.signal(signal.SIGINT, ask_to_stop)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def write_results(run_dir: str | Path, results: dict, table: str) -> None:
    """Write `results.json` (the dict) and `results.md` (the markdown table) into `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomically(run_dir / "results.md", table.rstrip("\n") + "\n")
