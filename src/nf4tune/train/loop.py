"""The QLoRA training loop: accumulation, warmup schedules, clipping, NaN guards, checkpoints, resume."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import Nf4tuneError
from ..layers.lora import trainable_parameters
from ..models.load import load_model
from ..models.loss import enable_router_aux_loss, loss_sum, target_count
from ..outputs import OutOfSpace, is_out_of_space
from ..registry import OPTIMIZERS
from . import rundir
from . import state as ckpt
from .config import Recipe, recipe_to_dict
from .data import DataStats, collate, plan_packing
from .evaluation import evaluate, exact_match
from .inputs import BatchStream, load_inputs
from .metrics import MetricsLog, peak_memory_gib, peak_memory_summary, read_metrics, truncate_metrics
from .saving import Saver
from .tokens import grow_vocab, parameter_groups

log = logging.getLogger("nf4tune")


@dataclass
class TrainResult:
    output_dir: Path
    adapter_dir: Path
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    best_eval_loss: float | None = None
    best_checkpoint: Path | None = None
    skipped_steps: int = 0
    data: DataStats | None = None
    exact_match: dict = field(default_factory=dict)
    benchmarks: dict = field(default_factory=dict)  # {"before": {...}, "after": {...}}, as metrics.jsonl names them
    peak_memory: dict = field(default_factory=dict)  # summary.json's peak_memory_* keys


def lr_lambda(kind: str, warmup: int, total: int):
    """Multiplier of the base learning rate at step s, as transformers' schedules with warmup."""
    def f(s: int) -> float:
        if s < warmup:
            return s / max(1, warmup)
        if kind == "constant":
            return 1.0
        progress = (s - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return f


def _dtype(name: str) -> torch.dtype | None:
    return None if name == "auto" else getattr(torch, name)


def train(recipe: Recipe, resume: str | bool | None = None, progress: bool = True) -> TrainResult:
    """Run the recipe. Writes checkpoints, `metrics.jsonl`, `loss.png` and the final adapter to
    `training.output_dir`; with `resume`, continues from a checkpoint exactly.

    Under torchrun (WORLD_SIZE > 1) every rank runs this; `train.parallel` holds what differs."""
    from .parallel import Parallel, resume_after_restart

    par = Parallel.from_environment(recipe)
    trainer = None
    try:
        recipe, resume = resume_after_restart(recipe, resume)  # torchrun restarted the ranks: continue
        trainer = Trainer(recipe, par, resume, progress)
        return trainer.run()
    except Nf4tuneError as e:
        if isinstance(e, OutOfSpace) and trainer is not None:
            e.args = (trainer.saver.no_space(e),)
        sentence = par.fail(e)
        if sentence != str(e):
            e.args = (sentence,)
        raise
    except Exception as e:
        if trainer is not None and is_out_of_space(e, trainer.out):  # a write outside the checkpoints (metrics...)
            full = OutOfSpace(getattr(e, "filename", None) or trainer.out, 0, trainer.out)
            raise Nf4tuneError(par.fail(Nf4tuneError(trainer.saver.no_space(full)))) from e
        if par.world_size == 1:
            raise
        sentence = par.fail(e)  # one sentence naming the rank; torchrun stops the others
        log.exception("nf4tune: rank %d failed", par.rank)
        raise Nf4tuneError(sentence) from e
    finally:
        if trainer is not None:
            trainer.release_output()
        par.close()


@dataclass
class RunState:
    """What changes as training runs, and what a checkpoint saves of it."""

    step: int = 0
    tokens: int = 0
    skipped: int = 0
    bad_in_a_row: int = 0
    best: float | None = None
    best_path: Path | None = None
    last_loss: float = float("nan")
    window_loss: float = 0.0
    window_tokens: int = 0
    window_start: float = field(default_factory=time.time)


class Trainer:
    """One training run in small steps: data, model, optimizer, resume, then `train_step` and
    `evaluate_and_save` until the last step, then `finish`. World size 1 is the single-device run."""

    def __init__(self, recipe: Recipe, par, resume: str | bool | None = None, progress: bool = True):
        self.recipe, self.par, self.t, self.progress = recipe, par, recipe.training, progress and par.is_main
        self.out = Path(self.t.output_dir)
        self.lock = None
        # Rank 0 alone locks the folder (the ranks are one run); a folder holding another run, or in
        # use by one, is refused (or moved aside), never mixed into.
        if par.is_main:
            self.lock, _ = rundir.claim_output_dir(self.out, resume, self.t.overwrite_output_dir)
        try:
            self._start(resume)
        except BaseException:
            self.release_output()
            raise

    def release_output(self) -> None:
        """Let another run use the output folder (once, however the run ended)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _start(self, resume: str | bool | None) -> None:
        par = self.par
        par.barrier()
        self.resume_from = None
        if resume is True:
            self.resume_from = rundir.latest_checkpoint_of_run(self.out) or ckpt.find_resume_checkpoint(self.out, True)
        elif resume:
            self.resume_from = ckpt.find_resume_checkpoint(self.out, resume)
        self.run_id = None  # rank 0's, which it saves in every checkpoint
        if par.is_main:
            if self.resume_from is not None:
                rundir.check_checkpoint_run(self.out, self.resume_from)
                rundir.check_resume_fits(self.resume_from, recipe_to_dict(self.recipe))
            self.run_id = rundir.start_run(self.out, self.resume_from)
        par.barrier()
        self.state = RunState()
        self.saver = Saver(self.out, par, self.t.save_total_limit)

    def run(self) -> TrainResult:
        self._setup_data()  # the data first: a bad row is reported before minutes of model loading
        self._setup_model()
        self._setup_optimizer()
        self._restore_or_start()
        self._train_all()
        return self._finish()

    # --- setup --------------------------------------------------------------------------------

    def _setup_data(self) -> None:
        """The tokenizer (with any added tokens), the training and evaluation examples, and the batches."""
        inputs = load_inputs(self.recipe, self.par.is_main)
        self.model_path, self.tokenizer, self.seq2seq = inputs.model_path, inputs.tokenizer, inputs.seq2seq
        self.examples, self.eval_examples, self.stats = inputs.examples, inputs.eval_examples, inputs.stats
        from ..evaluate.benchmarks import parse_benchmarks

        self.benchmarks = parse_benchmarks(self.recipe.eval.benchmarks)  # a bad entry stops here, before the model loads
        if self.benchmarks and self.seq2seq:
            raise Nf4tuneError("eval.benchmarks (multiple choice, perplexity) score decoder-only models; remove them "
                               "for encoder-decoders such as T5 (eval_loss and eval.exact_match still apply).")

    def _setup_model(self) -> None:
        recipe, t, d = self.recipe, self.t, self.recipe.data
        # Seeded here, after everything that may build or download (the built-in demo model is made
        # on first use): the adapters' initialisation is then the same on the first run and every later one.
        rundir.seed_everything(t.seed)
        lora = recipe.lora
        device = self.par.device(recipe.model.device)
        model, _ = load_model(self.model_path, recipe.quant.quant_type, recipe.quant.double_quant,
                              _dtype(recipe.model.compute_dtype), device, lora=lora,
                              blocksize=recipe.quant.blocksize,
                              gradient_checkpointing=recipe.model.gradient_checkpointing, progress=self.progress,
                              layer_ready=self.par.loading_hook(recipe, self.model_path, self.resume_from))
        if recipe.model.output_router_logits:
            enable_router_aux_loss(model)
        from .compile import prepare_layers  # training.compile / offload_activations, before any wrapping
        from .offload import offload_choice

        offload, why = offload_choice(t.offload_activations, model.device, d.source_max_len + d.target_max_len + 2,
                                      recipe.model.gradient_checkpointing)
        log.info("nf4tune: activation offload %s (%s)", "on" if offload else "off", why)
        self.offloader = prepare_layers(model, t.compile, offload, recipe.model.gradient_checkpointing, model.device)
        self.added = grow_vocab(model, len(self.tokenizer))
        if self.added:
            log.info("nf4tune: added %d token(s); their embedding rows train with the adapter", self.added)
        pack_to = None
        if d.packing:  # (refused for encoder-decoders with the data, before the model loaded)
            # per_device_train_batch_size keeps counting examples: each batch is packed on its own
            pack_to = d.source_max_len + d.target_max_len + 2
            self.packing = plan_packing(self.examples, t.per_device_train_batch_size, pack_to, t.seed, d.group_by_length)
            log.info("nf4tune: %s", self.packing.describe())
        self.stream = BatchStream(self.examples, t.per_device_train_batch_size, t.seed, d.group_by_length, pack_to)
        # One optimizer step reads accumulation x world size micro-batches: the global batch.
        self.micro_per_step = t.gradient_accumulation_steps * self.par.world_size
        self.total = t.max_steps if t.max_steps > 0 else math.ceil(
            t.num_train_epochs * self.stream.batches_per_epoch() / self.micro_per_step)
        self.saver.total = self.total
        self.trainable, self.all_params = trainable_parameters(model)
        self.compute_dtype = next(m for m in model.modules() if hasattr(m, "compute_dtype")).compute_dtype
        self.model = model
        if self.resume_from is not None:  # before wrapping: the adapter is copied into whole tensors
            self.par.restore_adapter(model, self.resume_from)
        self.loss_fn = self.par.wrap(model, self.recipe, loss_sum, t.loss_chunk_tokens, self.model_path)

    def _setup_optimizer(self) -> None:
        t, model = self.t, self.model
        warmup = t.warmup_steps or math.ceil(t.warmup_ratio * self.total)
        self.params = [p for p in model.parameters() if p.requires_grad]
        groups = parameter_groups(model, t)
        self.optimizer = OPTIMIZERS[t.optim].build(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2),
                                                   eps=t.adam_epsilon)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(t.lr_scheduler_type, warmup, self.total))
        self.scaler = torch.amp.GradScaler(model.device.type) if self.compute_dtype == torch.float16 else None

    def _restore_or_start(self) -> None:
        out, s = self.out, self.state
        if self.resume_from is not None:
            saved = ckpt.load_trainer_state(self.resume_from)
            self.par.load_optimizer(self.model, self.optimizer, saved, self.resume_from)
            self.par.check_global_batch(saved.get("global_batch"), self.t)
            self.scheduler.load_state_dict(saved["scheduler"])
            if self.scaler is not None and saved.get("scaler"):
                self.scaler.load_state_dict(saved["scaler"])
            self.stream.seek(saved["data_position"])
            s.step, s.tokens, s.skipped = saved["step"], saved["tokens"], saved["skipped_steps"]
            s.best = saved["best_eval_loss"]
            s.best_path = Path(saved["best_checkpoint"]) if saved["best_checkpoint"] else None
            ckpt.set_rng_state(saved["rng"])
            if self.par.is_main:
                truncate_metrics(out / "metrics.jsonl", s.step)
            log.info("nf4tune: resuming from %s at step %d", self.resume_from, s.step)
        elif self.par.is_main:
            (out / "metrics.jsonl").write_text("")
        if self.par.is_main:
            (out / "recipe.json").write_text(json.dumps(recipe_to_dict(self.recipe), indent=2) + "\n")
        self.measure = self.recipe.eval.exact_match and bool(self.eval_examples) and self.par.can_generate
        if self.recipe.eval.exact_match and not self.par.can_generate:
            log.warning("nf4tune: eval.exact_match is not measured under FSDP (generation needs the whole model); "
                        "eval_loss still is")
        self.before = None
        if self.measure and self.resume_from is None:
            self.before = self._exact_match()
            if self.par.is_main:
                rundir.update_run_info(self.out, exact_match_before=self.before)
        elif self.measure:  # measured when the run started: kept for the summary
            self.before = rundir.read_run_info(self.out).get("exact_match_before")
        self.benchmarks_before = {}
        if self.benchmarks and self.resume_from is None:
            self.benchmarks_before = self._run_benchmarks()
            if self.par.is_main:
                rundir.update_run_info(self.out, benchmarks_before=self.benchmarks_before)
        elif self.benchmarks:
            self.benchmarks_before = rundir.read_run_info(self.out).get("benchmarks_before", {})
        log.info("nf4tune: %d training examples (%s format), %d held out; %d steps; trainable parameters %s of %s (%.2f%%)",
                 len(self.examples), self.stats.format, len(self.eval_examples), self.total, f"{self.trainable:,}",
                 f"{self.all_params:,}", 100 * self.trainable / self.all_params)
        self.par.log_layout(self.t)

    def _exact_match(self) -> float:
        """Every rank takes part (its share of the examples); not under FSDP (see `can_generate`)."""
        return exact_match(self.model, self.tokenizer, self.eval_examples, self.recipe.eval.per_device_eval_batch_size,
                           self.par)

    def _run_benchmarks(self) -> dict[str, float]:
        """The recipe's benchmark scores (rank 0; not under FSDP, where no rank holds the whole model)."""
        if not (self.benchmarks and self.par.is_main and self.par.can_generate):
            return {}
        from ..evaluate.benchmarks import run_benchmarks

        return run_benchmarks(self.model, self.tokenizer, self.benchmarks)

    # --- training -----------------------------------------------------------------------------

    def _train_all(self) -> None:
        self.model.train()
        self.start_time = self.state.window_start = time.time()
        bar = tqdm(total=self.total, initial=self.state.step, desc="training", unit="step", disable=not self.progress)
        self.metrics = MetricsLog(self.out) if self.par.is_main else None
        self._resume_point = (self.stream.position(), ckpt.rng_state())
        try:
            while self.state.step < self.total:
                record = self.train_step()
                if record is None:
                    continue
                if "loss" in record:
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", peak_mem=f"{record['peak_memory_gib']:.2f}G")
                self.evaluate_and_save(record)
                bar.update(1)
        except KeyboardInterrupt:
            raise self._interrupted() from None
        finally:
            bar.close()
            if self.metrics is not None:
                self.metrics.close()

    def train_step(self) -> dict | None:
        """One optimizer step over the global batch (this rank's share of it); the record to log, or
        None when the step was skipped for a NaN/Inf loss or gradient."""
        t, s, par, optimizer, scaler = self.t, self.state, self.par, self.optimizer, self.scaler
        drawn = [self.stream.next() for _ in range(self.micro_per_step)]
        # The loss is normalised by the target tokens of the whole global batch, known to every rank,
        # so the averaged gradients of N ranks are those of one process over the same examples.
        targets = sum(target_count(collate(b, self.tokenizer.pad_token_id)["labels"], self.seq2seq)
                      for b in drawn) if par.world_size > 1 else None
        mine = par.my_share(drawn)
        micro = [collate(examples_, self.tokenizer.pad_token_id) for examples_ in mine]
        if targets is None:
            targets = sum(target_count(b["labels"], self.seq2seq) for b in micro)
        step_loss, step_tokens = 0.0, sum(e.length for examples_ in drawn for e in examples_)
        for i, batch in enumerate(micro):
            batch = {k: v.to(self.model.device) for k, v in batch.items()}
            with par.accumulating(last=i == len(micro) - 1):
                summed, _ = self.loss_fn(batch)
                loss = summed * par.world_size / max(1, targets)  # ranks' gradients are averaged
                (scaler.scale(loss) if scaler else loss).backward()
            step_loss += loss.item() / par.world_size
        step_loss = par.sum(step_loss)
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, t.max_grad_norm))
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            self._skip_step()
            return None
        s.bad_in_a_row = 0
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        s.step += 1
        self._resume_point = (self.stream.position(), ckpt.rng_state())  # where a save on Ctrl-C continues
        s.last_loss = step_loss
        s.tokens += step_tokens
        s.window_loss, s.window_tokens = s.window_loss + step_loss, s.window_tokens + step_tokens
        if not (s.step % t.logging_steps == 0 or s.step == self.total):
            return {}
        n = t.logging_steps if s.step % t.logging_steps == 0 else s.step % t.logging_steps
        elapsed = time.time() - s.window_start
        stream = self.stream
        record = dict(step=s.step, epoch=round(stream.epoch + stream.index / stream.batches_per_epoch(), 4),
                      loss=s.window_loss / n, lr=lr, grad_norm=grad_norm,
                      tokens_per_s=s.window_tokens / max(elapsed, 1e-9),
                      peak_memory_gib=round(par.max(peak_memory_gib(self.model.device)), 3))
        s.window_loss, s.window_tokens, s.window_start = 0.0, 0, time.time()
        return record

    def _interrupted(self) -> "rundir.TrainingInterrupted":
        """Ctrl-C: keep the progress (a checkpoint of the last complete step when the run has none
        newer) and say what is saved; the CLI prints the exact --resume command."""
        self.optimizer.zero_grad(set_to_none=True)
        step = self.state.step
        latest, saved_now = rundir.latest_checkpoint_of_run(self.out), False
        if self.par.world_size == 1 and rundir.should_save_on_interrupt(self.out, step):
            position, rng = self._resume_point
            self.stream.seek(position)
            ckpt.set_rng_state(rng)
            self._save()
            latest, saved_now = self.out / f"checkpoint-{step}", True
        return rundir.TrainingInterrupted(self.out, step, latest, saved_now)

    def _skip_step(self) -> None:
        s = self.state
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:
            self.scaler.update()
        s.skipped, s.bad_in_a_row = s.skipped + 1, s.bad_in_a_row + 1
        log.warning("nf4tune: step %d: loss or gradient is NaN/Inf; step skipped", s.step + 1)
        if s.bad_in_a_row >= self.t.max_bad_steps_in_a_row:
            last = ckpt.checkpoints(self.out)
            cause = ("float16 overflow: use bfloat16 compute (model.compute_dtype=bfloat16) where the device has it"
                     if self.compute_dtype == torch.float16 else "a learning rate too high: lower training.learning_rate")
            raise Nf4tuneError(
                f"the loss or gradients were NaN/Inf for {s.bad_in_a_row} steps in a row; the likely cause is {cause}. "
                + (f"The last good checkpoint is {last[-1]}." if last else "No checkpoint was written yet."))

    def evaluate_and_save(self, record: dict) -> None:
        """After a step: evaluate, log, checkpoint, as the recipe's step counts say."""
        t, s = self.t, self.state
        if self.benchmarks and t.eval_steps and (s.step % t.eval_steps == 0 or s.step == self.total):
            bench_start = time.time()
            scores = self._run_benchmarks()
            s.window_start += time.time() - bench_start  # tokens/s measures training only
            if scores:
                record.update(step=s.step, **scores)
                self.benchmarks_last = (s.step, scores)
        last = s.step == self.total
        save = s.step % t.save_steps == 0 or last
        if self.eval_examples and t.eval_steps and (s.step % t.eval_steps == 0 or last):
            eval_start = time.time()
            eval_loss = evaluate(self.loss_fn, self.model, self.eval_examples, self.recipe.eval.per_device_eval_batch_size,
                                 self.tokenizer.pad_token_id, self.par)
            s.window_start += time.time() - eval_start  # tokens/s measures training only
            record.update(step=s.step, eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50)))
            if s.best is None or eval_loss < s.best:
                s.best = eval_loss
                s.best_path = self.out / f"checkpoint-{s.step}"
                save = True
        if record and self.metrics is not None:
            self.metrics.write(record, s.step)
        if save:
            self.saver.save_step(self._save, s, last)

    def _save(self) -> None:
        s = self.state
        self.par.save_checkpoint(self.out, s.step, self.model, self.tokenizer, self.optimizer, {
            "step": s.step, "run_id": self.run_id, "tokens": s.tokens, "skipped_steps": s.skipped,
            "best_eval_loss": s.best, "best_checkpoint": str(s.best_path) if s.best_path else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "data_position": self.stream.position(), "rng": ckpt.rng_state(),
            "global_batch": self.micro_per_step * self.t.per_device_train_batch_size,
        })

    # --- the end ------------------------------------------------------------------------------

    def _finish(self) -> TrainResult:
        out, s, par, saver = self.out, self.state, self.par, self.saver
        adapter_dir = saver.write_adapter(self.model, self.params, self.stats.format, self.tokenizer if self.added else None)
        saver.prune(s.best_path)  # the checkpoints the last step's save made old go only now that the adapter is whole
        if saver.final_checkpoint_error is not None:
            log.warning("nf4tune: the final adapter is whole in %s, but the last checkpoint could not be written "
                        "for lack of space: %s", adapter_dir, saver.no_space(saver.final_checkpoint_error))
        result = TrainResult(out, adapter_dir, s.step, s.tokens, time.time() - self.start_time, s.last_loss, s.best,
                             s.best_path, s.skipped, self.stats)
        if self.measure:
            after = self._exact_match()
            if par.is_main:
                result.exact_match = {"after": after}
                if self.before is not None:
                    result.exact_match["before"] = self.before
        if self.benchmarks:
            step, scores = getattr(self, "benchmarks_last", (None, None))
            after = scores if step == s.step else self._run_benchmarks()
            result.benchmarks = {"before": self.benchmarks_before, "after": after}
        layout = par.layout(self.model)  # a collective: every rank takes part
        result.peak_memory = peak_memory_summary(self.model.device, par.max)  # a collective too
        if par.is_main:
            from .plot import plot_losses

            plot_losses(read_metrics(out / "metrics.jsonl"), out / "loss.png")
            stats = self.stats
            summary = {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
                       "final_loss": result.final_loss, "best_eval_loss": s.best,
                       "best_checkpoint": str(s.best_path) if s.best_path else None,
                       "adapter": str(adapter_dir), "skipped_steps": s.skipped, "exact_match": result.exact_match,
                       "benchmarks": result.benchmarks,
                       "data": {"rows": stats.rows, "used": stats.used, "skipped": stats.skipped,
                                "truncated": stats.truncated, "format": stats.format,
                                **({"packed_rows_per_epoch": self.packing.rows} if self.recipe.data.packing else {})},
                       **result.peak_memory, **layout}
            (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        par.barrier()
        return result
