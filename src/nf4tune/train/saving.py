"""The saving side of a run: checkpoints after steps, pruning, the final adapter, and a full disk.

A full disk never loses the run: the last step's checkpoint may be given up for the final adapter,
which is written whole or not at all, and pruning waits until the adapter is whole. What a full
disk leaves is said in one sentence (`Saver.no_space`)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..atomic import move_into_place, temp_dir
from ..outputs import OutOfSpace, is_out_of_space, no_space_sentence
from . import rundir
from . import state as ckpt
from .formats import save_prompt_format

log = logging.getLogger("nf4tune")


class Saver:
    """What a run writes into its output folder `out`, through `par` (a `train.parallel.Parallel`),
    and what it says when the disk is full."""

    def __init__(self, out: Path, par, save_total_limit: int | None):
        self.out, self.par, self.save_total_limit = out, par, save_total_limit
        self.total: int | None = None  # the run's last step, once the data and model are set up
        self.adapter_written = False  # the final adapter is whole on disk
        self.final_checkpoint_error: OutOfSpace | None = None

    def save_step(self, save, state, last: bool) -> None:
        """The checkpoint after a step, written by `save()`, then the older ones pruned; `state` is the
        run's `RunState` (its best checkpoint is kept, and forgotten when it was this one and did not fit)."""
        if last and self.par.world_size == 1:
            # The final adapter comes next and is smaller: a full disk here must not lose the run.
            try:
                save()
            except OutOfSpace as e:
                self.final_checkpoint_error = e
                if state.best_path is not None and not state.best_path.is_dir():
                    state.best_path = None  # it was to be this checkpoint
                log.warning("nf4tune: %s; writing the final adapter anyway", self.no_space(e).split(";")[0])
        else:
            save()
        if not last:  # the last step's pruning waits until the adapter is whole
            self.prune(state.best_path)

    def prune(self, keep: Path | None) -> None:
        """Rank 0 keeps the newest `save_total_limit` checkpoints (and `keep`, the best one)."""
        if self.par.is_main:
            ckpt.prune(self.out, self.save_total_limit, keep=keep)

    def write_adapter(self, model, params: list, prompt_format: str, tokenizer=None) -> Path:
        """The final adapter (with its prompt format and `tokenizer`, given when the run grew it), written
        whole into a temporary folder and renamed onto OUTPUT/adapter: a full disk leaves the earlier one,
        if any. `params`: the trainable parameters, which size it."""
        par, final = self.par, self.out / "adapter"
        needed = sum(p.numel() * p.element_size() for p in params)
        tmp = temp_dir(self.out, prefix=".adapter.") if par.is_main else final  # only rank 0 writes
        try:
            par.save_adapter(model, tmp)
            if par.is_main:
                save_prompt_format(tmp, prompt_format)  # chat and generate then prompt as trained
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                move_into_place(tmp, final)
        except Exception as e:
            if not par.is_main:
                raise
            full = is_out_of_space(e, self.out)  # asked before the space is freed
            if not full:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        else:
            self.adapter_written = True
            return final
        shutil.rmtree(tmp, ignore_errors=True)  # outside the except block: the failed writer is let go first
        raise OutOfSpace(final, needed, self.out)

    # --- a full disk ----------------------------------------------------------------------------

    def no_space(self, error: OutOfSpace) -> str:
        """The sentence for a full disk: what was being written, how much to free, what is kept."""
        return no_space_sentence(error.path, error.needed, self.out, "training.output_dir", self._what_is_kept())

    def _what_is_kept(self) -> str:
        if self.adapter_written:
            return f"the final adapter, {self.out / 'adapter'}, is whole."
        latest = rundir.latest_checkpoint_of_run(self.out)
        if latest is None:
            return "no checkpoint was written yet."
        step = int(latest.name.rsplit("-", 1)[1])
        done = step >= (self.total if self.total is not None else step + 1)
        return f"the last checkpoint, step {step}, is intact" + (
            " (--resume from it writes the adapter without training again)." if done else ".")
