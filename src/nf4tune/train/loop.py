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

from ..checkpoint.architecture import is_encoder_decoder
from ..checkpoint.hf import load_tokenizer, open_checkpoint, resolve
from ..errors import Nf4tuneError
from ..layers.lora import trainable_parameters
from ..models.load import load_model
from ..models.loss import loss_sum, target_count
from ..registry import OPTIMIZERS
from . import rundir
from . import state as ckpt
from .config import Recipe, recipe_to_dict
from .data import IGNORE_INDEX, DataStats, Tokenized, batch_order, collate, load_examples, pack, plan_packing
from .formats import save_prompt_format
from .tokens import add_tokens_to_tokenizer, grow_vocab, parameter_groups

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


class BatchStream:
    """Micro-batches over epochs, in an order fixed by (seed, epoch); its position is saved and restored.
    With `pack_to`, each micro-batch of `batch_size` examples comes packed into rows of at most that many tokens."""

    def __init__(self, examples: list[Tokenized], batch_size: int, seed: int, group_by_length: bool,
                 pack_to: int | None = None):
        self.examples, self.batch_size, self.seed, self.group = examples, batch_size, seed, group_by_length
        self.pack_to = pack_to
        self.lengths = [e.length for e in examples]
        self.epoch, self.index, self._order = 0, 0, None

    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.batch_size)

    def next(self) -> list[Tokenized]:
        if self._order is None:
            self._order = batch_order(self.lengths, self.batch_size, self.seed, self.epoch, self.group)
        if self.index >= len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = batch_order(self.lengths, self.batch_size, self.seed, self.epoch, self.group)
        batch = [self.examples[i] for i in self._order[self.index]]
        self.index += 1
        return pack(batch, self.pack_to) if self.pack_to else batch

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict) -> None:
        self.epoch, self.index, self._order = position["epoch"], position["index"], None


def _dtype(name: str) -> torch.dtype | None:
    return None if name == "auto" else getattr(torch, name)


def peak_memory_gib(device: torch.device) -> float:
    """The peak memory of this process so far, in GiB: on CUDA the most its tensors held at once
    (`max_memory_allocated`); elsewhere the peak resident set of the process (`ru_maxrss`), which also
    counts the model's loading, the Python interpreter and torch itself."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def peak_memory_summary(device: torch.device, reduce_max) -> dict:
    """summary.json's peak memory keys (the largest over ranks, through `reduce_max`), named by what they measure."""
    summary = {"peak_memory_gib": round(reduce_max(peak_memory_gib(device)), 3)}
    if device.type == "cuda":
        summary["peak_memory_reserved_gib"] = round(reduce_max(torch.cuda.max_memory_reserved(device) / 2**30), 3)
        summary["peak_memory_measure"] = "torch.cuda.max_memory_allocated (reserved: max_memory_reserved)"
    else:
        summary["peak_memory_measure"] = "peak resident set of the process (getrusage ru_maxrss)"
    return summary


def eval_batches(count: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range | None]:
    """This rank's share of the evaluation, as ranges of example indices: one process's batches (runs of
    `batch_size` consecutive examples) dealt round-robin, so the ranks' sums are one process's sums.
    Every rank gets the same number of entries, None standing for a padding forward whose result is
    discarded: under FSDP each forward is a collective, so no rank may call it fewer times."""
    starts = range(0, count, batch_size)
    mine = [range(s, min(s + batch_size, count)) for s in starts[rank::world_size]]
    return mine + [None] * (math.ceil(len(starts) / world_size) - len(mine))


def evaluate(loss_fn, model, examples: list[Tokenized], batch_size: int, pad_id: int, par=None) -> float:
    """Mean token loss over `examples`; `loss_fn(batch)` is (sum of token losses, count). With `par`
    (a `train.parallel.Parallel`), each rank evaluates its `eval_batches` and the sums are all-reduced."""
    rank, world = (par.rank, par.world_size) if par is not None else (0, 1)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for rows in eval_batches(len(examples), batch_size, rank, world):
            chosen = examples[rows.start:rows.stop] if rows is not None else examples[:1]  # padding: discarded
            batch = {k: v.to(model.device) for k, v in collate(chosen, pad_id).items()}
            s, n = loss_fn(batch)
            if rows is not None:
                total, count = total + float(s), count + n
    model.train(was_training)
    if par is not None:
        total, count = par.sums([total, count])
    return total / max(1, count)


def exact_match(model, tokenizer, examples: list[Tokenized], batch_size: int = 8, par=None) -> float:
    """Share of held-out examples whose greedy reply equals the target reply, both ended at the
    end-of-turn token (the chat template's text after it does not count), decoded in batches. With
    `par`, each rank generates for its `eval_batches` of one process's batches and the hits are
    all-reduced (generation runs on this rank's whole model: not under FSDP)."""
    from ..evaluate.exact_match import exact_match_accuracy

    pairs = [_prompt_and_reply(e) for e in examples]
    if par is None or par.world_size == 1:
        return exact_match_accuracy(model, tokenizer, pairs, batch_size=batch_size)
    # exact_match_accuracy batches the pairs in order of prompt length (a stable sort): the same order
    # here, dealt by batches, gives each rank some of one process's batches, unchanged.
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    mine = [pairs[order[i]] for rows in eval_batches(len(pairs), batch_size, par.rank, par.world_size)
            if rows is not None for i in rows]
    hits = exact_match_accuracy(model, tokenizer, mine, batch_size=batch_size) * len(mine)
    hits, count = par.sums([round(hits), len(mine)])
    return hits / max(1, count)


def _prompt_and_reply(e: Tokenized) -> tuple[list[int], list[int]]:
    """What generation is given and what it should answer: an encoder-decoder's source and target (its
    labels), or a decoder-only example cut where its labels start."""
    if e.seq2seq:
        return e.input_ids, e.labels
    prompt_len = next((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX), len(e.labels))
    return e.input_ids[:prompt_len], e.input_ids[prompt_len:]


def _split_eval(recipe: Recipe, examples: list[Tokenized]) -> tuple[list[Tokenized], list[Tokenized]]:
    size = recipe.eval.size
    if size <= 0:
        return examples, []
    n = int(size) if size >= 1 else max(1, int(round(size * len(examples))))
    if n >= len(examples):
        raise Nf4tuneError(f"eval.size {size} leaves no training data ({len(examples)} examples).")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(recipe.training.seed)).tolist()
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in order[:n]]


def train(recipe: Recipe, resume: str | bool | None = None, progress: bool = True) -> TrainResult:
    """Run the recipe. Writes checkpoints, `metrics.jsonl`, `loss.png` and the final adapter to
    `training.output_dir`; with `resume`, continues from a checkpoint exactly.

    Under torchrun (WORLD_SIZE > 1) every rank runs this; `train.parallel` holds what differs."""
    from .parallel import Parallel, resume_after_restart

    par = Parallel.from_environment(recipe)
    try:
        recipe, resume = resume_after_restart(recipe, resume)  # torchrun restarted the ranks: continue
        return Trainer(recipe, par, resume, progress).run()
    except Nf4tuneError as e:
        sentence = par.fail(e)
        if sentence != str(e):
            e.args = (sentence,)
        raise
    except Exception as e:
        if par.world_size == 1:
            raise
        sentence = par.fail(e)  # one sentence naming the rank; torchrun stops the others
        log.exception("nf4tune: rank %d failed", par.rank)
        raise Nf4tuneError(sentence) from e
    finally:
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
        if par.is_main:  # a folder holding another run is refused (or moved aside), never mixed into
            rundir.prepare_output_dir(self.out, resume, self.t.overwrite_output_dir)
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
                rundir.check_resume_fits(self.resume_from, recipe_to_dict(recipe))
            self.run_id = rundir.start_run(self.out, self.resume_from)
        par.barrier()
        self.state = RunState()

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
        recipe, d = self.recipe, self.recipe.data
        self.model_path = resolve(recipe.model.name_or_path)
        tokenizer = load_tokenizer(self.model_path)  # a folder's tokenizer files, or a GGUF file's metadata
        if tokenizer is None:
            raise Nf4tuneError(f"{recipe.model.name_or_path} has no tokenizer files; training needs one.")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        add_tokens_to_tokenizer(tokenizer, recipe.model.add_tokens, recipe.model.add_special_tokens)
        # An encoder-decoder (T5) reads the source in its encoder and the target in its decoder: the data
        # is tokenized and batched apart for it, and cannot be packed into one sequence.
        self.seq2seq = is_encoder_decoder(open_checkpoint(self.model_path).config)
        if d.packing and self.seq2seq:
            raise Nf4tuneError("data.packing is for decoder-only models; turn it off for encoder-decoders such as T5.")
        examples, self.stats = load_examples(d.path, d.split, d.format, tokenizer, d.source_max_len, d.target_max_len,
                                             d.train_on_source, d.on_bad_row, d.max_samples, self.seq2seq)
        if recipe.eval.path:
            eval_split = "validation" if not Path(recipe.eval.path).exists() else d.split
            eval_examples, _ = load_examples(recipe.eval.path, eval_split, d.format, tokenizer, d.source_max_len,
                                             d.target_max_len, d.train_on_source, d.on_bad_row,
                                             recipe.eval.max_eval_samples, self.seq2seq)
        else:
            examples, eval_examples = _split_eval(recipe, examples)
        max_eval = recipe.eval.max_eval_samples
        from ..evaluate.benchmarks import parse_benchmarks

        self.benchmarks = parse_benchmarks(recipe.eval.benchmarks)  # a bad entry stops here, before the model loads
        if self.benchmarks and self.seq2seq:
            raise Nf4tuneError("eval.benchmarks (multiple choice, perplexity) score decoder-only models; remove them "
                               "for encoder-decoders such as T5 (eval_loss and eval.exact_match still apply).")
        self.tokenizer, self.examples = tokenizer, examples
        self.eval_examples = eval_examples[:max_eval] if max_eval else eval_examples

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
        from .compile import prepare_layers  # training.compile / offload_activations, before any wrapping

        self.offloader = prepare_layers(model, t.compile, t.offload_activations, recipe.model.gradient_checkpointing,
                                        model.device)
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
                _truncate_metrics(out / "metrics.jsonl", s.step)
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
        self.metrics = (self.out / "metrics.jsonl").open("a") if self.par.is_main else None
        self.board = _tensorboard(self.out) if self.par.is_main else None
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
            if self.board is not None:
                self.board.close()

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
        if self.eval_examples and t.eval_steps and (s.step % t.eval_steps == 0 or s.step == self.total):
            eval_start = time.time()
            eval_loss = evaluate(self.loss_fn, self.model, self.eval_examples, self.recipe.eval.per_device_eval_batch_size,
                                 self.tokenizer.pad_token_id, self.par)
            s.window_start += time.time() - eval_start  # tokens/s measures training only
            record.update(step=s.step, eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50)))
            if s.best is None or eval_loss < s.best:
                s.best = eval_loss
                s.best_path = self.out / f"checkpoint-{s.step}"
                self._save()
        if record and self.metrics is not None:
            self.metrics.write(json.dumps(record) + "\n")
            self.metrics.flush()
            if self.board is not None:
                for key, value in record.items():
                    if key != "step":
                        self.board.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}", value, s.step)
        if s.step % t.save_steps == 0 or s.step == self.total:
            self._save()
            if self.par.is_main:
                ckpt.prune(self.out, t.save_total_limit, keep=s.best_path)

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
        out, s, par = self.out, self.state, self.par
        adapter_dir = out / "adapter"
        par.save_adapter(self.model, adapter_dir)
        if par.is_main:
            save_prompt_format(adapter_dir, self.stats.format)  # chat and generate then prompt as trained
            if self.added:
                self.tokenizer.save_pretrained(adapter_dir)
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

            plot_losses(_read_metrics(out / "metrics.jsonl"), out / "loss.png")
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


def _tensorboard(out: Path):
    """A TensorBoard writer into OUTPUT/runs when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "runs"))


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after `step` by the run being resumed."""
    rows = [r for r in _read_metrics(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
