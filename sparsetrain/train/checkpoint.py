"""Checkpoints with orbax: parameters, optimizer state, data-iterator position, step and config.

Layout: RUN_DIR/checkpoints/<step>/{params, opt_state, data, meta}. Orbax writes each save into a
temporary directory and renames it only once complete, so a crash or kill -9 mid-save leaves the last
good checkpoint as the latest one; `latest_step()` never sees a partial save.

A complete save can still be damaged later (a full disk, a bad copy, a flipped bit). Orbax reads
back overwritten array bytes without complaint, so `meta` also holds a checksum of every array
(`array_checksums`), and `restore` checks each item and raises `CorruptCheckpoint` naming the bad
folder or array. `move_aside` renames a bad step to `<step>.corrupt`, where orbax no longer sees it.
"""

from __future__ import annotations

from pathlib import Path
import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sparsetrain.checkpoint.model_def import path_str
from sparsetrain.config import CheckpointConfig
from sparsetrain.errors import InputError
from sparsetrain.train.sharding import placed_like

ITEMS = ("params", "opt_state", "data", "meta")
CHECKSUMMED = ("params", "opt_state")
# Bit patterns are summed in words of this type: integer sums wrap, so they are exact and do not depend
# on the order of the reduction (any mesh gives the same value).
_WORD = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}


class CorruptCheckpoint(InputError):
    """A saved step that cannot be restored as it was written."""

    def __init__(self, step: int, where: Path | str, reason: str):
        reason = " ".join(str(reason).split())   # one line: tensorstore messages span many
        super().__init__(f"checkpoint step {step} is corrupt: {where}: {reason[:400]}")
        self.step = step


def _word_sum(x: jax.Array) -> jax.Array:
    words = jax.lax.bitcast_convert_type(x, _WORD[x.dtype.itemsize]) if x.dtype.itemsize in _WORD \
        else jax.lax.bitcast_convert_type(x, jnp.uint32)   # 8-byte items become two words
    return jnp.sum(words.astype(jnp.uint32), dtype=jnp.uint32)


_word_sums = jax.jit(lambda tree: jax.tree.map(_word_sum, tree))


def array_checksums(tree) -> dict[str, int]:
    """{path: sum of the array's bit patterns mod 2**32}: any changed element changes its sum."""
    sums = jax.device_get(_word_sums(tree))
    return {path_str(path): int(value) for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


class Checkpointer:
    def __init__(self, run_dir: Path, cfg: CheckpointConfig):
        self.directory = Path(run_dir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep,
                                               enable_async_checkpointing=cfg.async_save)
        self.manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        """Complete steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def save(self, step: int, state: dict, data_iter, meta: dict, *, force: bool = False) -> None:
        """Start a save (async if configured); the previous async save is finished first."""
        checksums = {item: array_checksums(state[item]) for item in CHECKSUMMED}
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave({**meta, "checksums": checksums})), force=force)

    def restore(self, step: int, abstract_state: dict, shardings: dict, data_iter) -> tuple[dict, dict]:
        """State placed on `shardings` (any mesh: orbax reshards), and the saved metadata. The data
        iterator is moved to the saved position in place. Raises CorruptCheckpoint naming the item
        folder (or array) that cannot be read or does not match its checksum."""
        args = {"meta": ocp.args.JsonRestore(), "data": grain.checkpoint.CheckpointRestore(data_iter)}
        args.update({item: ocp.args.StandardRestore(placed_like(abstract_state[item], shardings[item]))
                     for item in CHECKSUMMED})
        restored = {item: self._restore_item(step, item, arg) for item, arg in args.items()}
        meta = dict(restored["meta"])
        # Checkpoints written before checksums existed have none: orbax's own checks are all they get.
        for item, saved in meta.get("checksums", {}).items():
            actual = array_checksums(restored[item])
            bad = sorted(path for path in saved if actual.get(path) != saved[path])
            if bad:
                raise CorruptCheckpoint(step, self.directory / str(step) / item,
                                        f"array(s) {', '.join(bad[:5])} differ from what was saved (checksum)")
        state = {"params": restored["params"], "opt_state": restored["opt_state"],
                 "step": jax.device_put(np.int32(meta["step"]), shardings["step"])}
        return state, meta

    def _restore_item(self, step: int, item: str, arg):
        """One item, so that a failure names its folder. Out-of-memory is no corruption: re-raised."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**{item: arg}))[item]
        except Exception as e:
            if "RESOURCE_EXHAUSTED" in str(e) or isinstance(e, MemoryError):
                raise
            raise CorruptCheckpoint(step, self.directory / str(step) / item, f"{type(e).__name__}: {e}") from e

    def move_aside(self, step: int) -> Path:
        """Rename a corrupt step to `<step>.corrupt` (then .corrupt.1, ...), out of orbax's sight; it
        is kept for inspection, never deleted."""
        target = self.directory / f"{step}.corrupt"
        n = 0
        while target.exists():
            n += 1
            target = self.directory / f"{step}.corrupt.{n}"
        (self.directory / str(step)).rename(target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
