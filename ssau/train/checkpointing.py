"""The trainer's state on disk (a part of ``Trainer``, kept in its own file): writing a checkpoint on every rank,
resuming from one, and stopping on a signal with a checkpoint at the step it stopped.

A checkpoint holds everything the next step depends on, so that a resumed run is bit-identical, from then on, to
the run that was not interrupted: the model, optimisers, schedules and DeepSpeed partitions, every rank's RNG
states, and every rank's stream position (``TrainStream.state``: which batches it has handed out). A checkpoint
without a stream position (written before ssau kept one), or one written with another world size or worker count,
resumes with fresh shard orders instead, with one line saying so.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from tqdm import tqdm

from ssau.checkpoints import (CheckpointError, atomic_save, check_training_state, clean_partial, last_checkpoint,
                              load_into, newest_step_file, nonfinite_tensors, prune, safe_load, write_pointer)
from ssau.config import to_dict
from ssau.dist.rng import rng_state, set_rng_state
from ssau.errors import RunStopped
from ssau.train.optim import as_built


class Checkpointing:
    """Mixed into ``Trainer``: it supplies rt, cfg, run_dir, method, optimizers, schedulers, engines, aus, step,
    starts, run_id, skipped_updates, tracker and stream."""


    def save_checkpoint(self) -> Path:
        """Every rank's part, then rank 0's step file, then the ``last`` pointer, then pruning. A failure on any
        rank (a full disk, non-finite state) stops every rank with one line; the previous checkpoint stays."""
        rt = self.rt
        ckpt_dir = self.run_dir / "checkpoints"
        rngs = rt.gather_objects(rng_state())
        streams = rt.gather_objects(self.stream.state() if self.stream is not None else {})
        path = ckpt_dir / f"step-{self.step:07d}.pt"
        error = None
        bad = nonfinite_tensors(self.method.state_dict())
        if rt.any_true(bool(bad)):  # every rank refuses together (states are equal, but never hang on a maybe)
            error = f"step {self.step}: not saving a checkpoint with NaN or inf in {bad[0] if bad else 'the model'}"
        try:
            if error is None:
                for name, e in self.engines.items():  # ZeRO partitions optimiser state: every rank saves its part
                    e.save_checkpoint(str(ckpt_dir / "deepspeed" / name), tag=path.stem)
        except (OSError, RuntimeError) as e:
            error = f"cannot write the DeepSpeed checkpoint under {ckpt_dir} ({e})"
        if rt.any_true(error is not None) and error is None:
            error = "another rank could not write its part of the checkpoint"
        if error is None and rt.main:
            state = {"step": self.step, "starts": self.starts, "method": self.method.state_dict(),
                     "optimizers": {k: o.state_dict() for k, o in self.optimizers.items() if k not in self.engines},
                     "schedulers": {k: s.state_dict() for k, s in self.schedulers.items() if k not in self.engines},
                     "rng": rngs, "config": to_dict(self.cfg), "aus": list(self.aus), "run_id": self.run_id,
                     "skipped_updates": self.skipped_updates, "streams": streams}
            try:
                atomic_save(state, path)
                write_pointer(ckpt_dir, path.name)  # only now is step N the one a resume continues from
                prune(ckpt_dir, self.cfg.train.keep_checkpoints)
            except CheckpointError as e:
                error = str(e)
        if rt.any_true(error is not None):
            previous = self._last_good or "none"
            raise RunStopped(f"{error or 'rank 0 could not write the checkpoint'}; "
                             f"the last good checkpoint is {previous}")
        self._last_good = str(path)
        return path

    def _resume(self) -> None:
        t = self.cfg.train
        ckpt_dir = self.run_dir / "checkpoints"
        error = None
        if self.rt.main:  # what a killed save left behind, before anyone writes or reads here
            try:
                for name in clean_partial(ckpt_dir):
                    tqdm.write(f"removed {name}, left by an interrupted checkpoint write", file=sys.stderr)
            except (CheckpointError, OSError) as e:
                error = str(e)
        error = self.rt.broadcast_object(error)  # rank 0's verdict, on every rank (also the barrier)
        if error:
            raise CheckpointError(error)
        if t.resume == "never":
            return
        path = (last_checkpoint(ckpt_dir) or newest_step_file(ckpt_dir)) if t.resume == "auto" else Path(t.resume)
        if path is None:
            return  # nothing to continue: a fresh run under this name
        state = check_training_state(safe_load(path, map_location=self.rt.device), path)  # runs nothing
        if set(state["optimizers"]) - set(self.optimizers) or set(state["schedulers"]) - set(self.schedulers):
            raise CheckpointError(f"{path}: its optimiser groups {sorted(state['optimizers'])} are not this "
                                  f"method's ({sorted(self.optimizers)})")
        load_into(self.method, state["method"], "model", path)
        for k, o in state["optimizers"].items():
            load_into(self.optimizers[k], as_built(self.optimizers[k], o), f"optimiser {k!r}", path)
        for k, s in state["schedulers"].items():
            load_into(self.schedulers[k], s, f"schedule {k!r}", path)
        for name, e in self.engines.items():
            loaded, _ = e.load_checkpoint(str(path.parent / "deepspeed" / name), tag=path.stem)
            if loaded is None:
                raise CheckpointError(f"{path.parent / 'deepspeed' / name / path.stem}: DeepSpeed state missing")
        self.step, self.starts = state["step"], state["starts"] + 1
        self.skipped_updates, self.run_id = state["skipped_updates"], state["run_id"]
        self._last_good = str(path)
        streams = state.get("streams")
        self.resumed_stream = streams[self.rt.rank] if isinstance(streams, list) and len(streams) == self.rt.world \
            else None
        if len(state["rng"]) == self.rt.world:
            try:
                set_rng_state(state["rng"][self.rt.rank])
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as e:
                raise CheckpointError(f"{path}: its RNG state is damaged ({type(e).__name__})") from None
        if self.rt.main:
            tqdm.write(f"resumed {self.run_dir.name} at step {self.step} from {path}", file=sys.stderr)

    def restore_stream(self) -> None:
        """The stream continues where the checkpoint's stopped, or (no position kept, other ranks or workers, a
        damaged position) starts a fresh epoch of shard orders with one line; every rank takes the same branch."""
        if self.resumed_stream is None and not self.step:
            return  # a fresh run: the stream starts at its beginning
        try:
            why = self.stream.restore(self.resumed_stream) if isinstance(self.resumed_stream, dict) else \
                "the checkpoint keeps no stream position for this number of ranks"
        except Exception:  # noqa: BLE001 - whatever a damaged position raises, every rank must reach any_true
            why = "the checkpoint's stream position is damaged"
        if self.rt.any_true(why is not None):
            self.stream.set_epoch(self.starts)
            if self.rt.main:
                tqdm.write(f"resumed with fresh shard orders: {why or 'another rank could not restore its stream'} "
                           f"(from here the run differs from an uninterrupted one)", file=sys.stderr)

    def stop_on_signal(self, signum: int) -> None:
        """A stop signal reached some rank: a checkpoint at this step, the MLflow run KILLED with a line naming it,
        and the exit code of the signal."""
        path = self.save_checkpoint()
        line = (f"{signal.Signals(signum).name} at step {self.step} of {self.cfg.train.steps}: checkpoint {path}; "
                f"train.name={self.run_dir.name} train.resume=auto continues it")
        if self.rt.main:
            tqdm.write(f"ssau: {line}", file=sys.stderr)
            if self.tracker:
                self.tracker.log_tags({"ssau.stopped": line})
                self.tracker.end("KILLED")  # flushes the journal
                self.tracker = None
        raise SystemExit(128 + signum)
