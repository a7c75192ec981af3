"""The QLoRA training loop: accumulation, warmup schedules, clipping, NaN guards, checkpoints, resume."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoint.hf import resolve
from ..errors import Nf4tuneError
from ..layers.lora import LoraConfig, trainable_parameters
from ..models.adapters import save_adapter
from ..models.load import load_model, load_tokenizer
from ..optim import PagedAdamW, PagedAdamW8bit
from . import state as ckpt
from .config import Recipe, recipe_to_dict
from .data import IGNORE_INDEX, DataStats, Tokenized, batch_order, collate, load_examples, pack
from .loss import loss_sum
from .tokens import add_tokens_to_tokenizer, grow_vocab

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
    """Micro-batches over epochs, in an order fixed by (seed, epoch); its position is saved and restored."""

    def __init__(self, examples: list[Tokenized], batch_size: int, seed: int, group_by_length: bool):
        self.examples, self.batch_size, self.seed, self.group = examples, batch_size, seed, group_by_length
        self.lengths = [len(e.input_ids) for e in examples]
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
        return batch

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def seek(self, position: dict) -> None:
        self.epoch, self.index, self._order = position["epoch"], position["index"], None


def _device(name: str) -> torch.device | None:
    return None if name == "auto" else torch.device(name)


def _dtype(name: str) -> torch.dtype | None:
    return None if name == "auto" else getattr(torch, name)


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def evaluate(model, examples: list[Tokenized], batch_size: int, pad_id: int, chunk_tokens: int) -> float:
    """Mean token loss over `examples`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(model.device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
            s, n = loss_sum(model, batch, chunk_tokens)
            total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(1, count)


def exact_match(model, tokenizer, examples: list[Tokenized], max_new_tokens: int = 32) -> float:
    """Share of examples whose greedy continuation of the prompt equals the target exactly."""
    was_training = model.training
    model.eval()
    hits = 0
    with torch.no_grad():
        for e in examples:
            prompt_len = next((i for i, label in enumerate(e.labels) if label != IGNORE_INDEX), len(e.labels))
            target = [t for t in e.input_ids[prompt_len:]]
            ids = torch.tensor([e.input_ids[:prompt_len]], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=min(max_new_tokens, len(target)),
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            hits += out[0, prompt_len:].tolist() == target
    model.train(was_training)
    return hits / max(1, len(examples))


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
    `training.output_dir`; with `resume`, continues from a checkpoint exactly."""
    t, d = recipe.training, recipe.data
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = ckpt.find_resume_checkpoint(out, resume) if resume else None
    random.seed(t.seed)
    torch.manual_seed(t.seed)

    # The tokenizer and the data first: a bad row is reported before minutes of model loading.
    model_path = resolve(recipe.model.name_or_path)
    tokenizer = load_tokenizer(model_path)  # a folder's tokenizer files, or a GGUF file's metadata
    if tokenizer is None:
        raise Nf4tuneError(f"{recipe.model.name_or_path} has no tokenizer files; training needs one.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    add_tokens_to_tokenizer(tokenizer, recipe.model.add_tokens, recipe.model.add_special_tokens)

    examples, stats = load_examples(d.path, d.split, d.format, tokenizer, d.source_max_len, d.target_max_len,
                                    d.train_on_source, d.on_bad_row, d.max_samples)
    if recipe.eval.path:
        eval_examples, _ = load_examples(recipe.eval.path, "validation" if not Path(recipe.eval.path).exists() else d.split,
                                         d.format, tokenizer, d.source_max_len, d.target_max_len, d.train_on_source,
                                         d.on_bad_row, recipe.eval.max_eval_samples)
    else:
        examples, eval_examples = _split_eval(recipe, examples)
    eval_examples = eval_examples[: recipe.eval.max_eval_samples] if recipe.eval.max_eval_samples else eval_examples

    lora = LoraConfig(r=recipe.lora.r, alpha=recipe.lora.alpha, dropout=recipe.lora.dropout,
                      target_modules=recipe.lora.target_modules, use_rslora=recipe.lora.use_rslora)
    model, _ = load_model(model_path, recipe.quant.quant_type, recipe.quant.double_quant,
                          _dtype(recipe.model.compute_dtype), _device(recipe.model.device), lora=lora,
                          blocksize=recipe.quant.blocksize,
                          gradient_checkpointing=recipe.model.gradient_checkpointing, progress=progress)
    added = grow_vocab(model, len(tokenizer))
    if added:
        log.info("nf4tune: added %d token(s); their embedding rows train with the adapter", added)

    if d.packing:
        if model.config.is_encoder_decoder:
            raise Nf4tuneError("data.packing is for decoder-only models; turn it off for encoder-decoders such as T5.")
        unpacked = len(examples)
        examples = pack(examples, d.source_max_len + d.target_max_len + 2, t.seed)
        log.info("nf4tune: packed %d examples into %d rows", unpacked, len(examples))
    stream = BatchStream(examples, t.per_device_train_batch_size, t.seed, d.group_by_length)
    total = t.max_steps if t.max_steps > 0 else math.ceil(
        t.num_train_epochs * stream.batches_per_epoch() / t.gradient_accumulation_steps)
    warmup = t.warmup_steps or math.ceil(t.warmup_ratio * total)
    params = [p for p in model.parameters() if p.requires_grad]
    vocab = [p for p in params if p.dim() == 2 and p.shape[0] == model.get_input_embeddings().weight.shape[0]]
    groups = [{"params": [p for p in params if all(p is not v for v in vocab)], "weight_decay": t.weight_decay}]
    if vocab:
        groups.append({"params": vocab, "weight_decay": 0.0})  # decay would move the frozen old rows
    optimizer_class = {"paged_adamw_32bit": PagedAdamW, "paged_adamw_8bit": PagedAdamW8bit,
                       "adamw_torch": torch.optim.AdamW}[t.optim]
    optimizer = optimizer_class(groups, lr=t.learning_rate, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_scheduler_type, warmup, total))
    compute_dtype = next(m for m in model.modules() if hasattr(m, "compute_dtype")).compute_dtype
    scaler = torch.amp.GradScaler(model.device.type) if compute_dtype == torch.float16 else None

    step, tokens, best, best_path, skipped, bad_in_a_row = 0, 0, None, None, 0, 0
    if resume_from is not None:
        saved = ckpt.load_trainer_state(resume_from)
        ckpt.restore_adapter(model, resume_from)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        stream.seek(saved["data_position"])
        step, tokens, skipped = saved["step"], saved["tokens"], saved["skipped_steps"]
        best, best_path = saved["best_eval_loss"], Path(saved["best_checkpoint"]) if saved["best_checkpoint"] else None
        ckpt.set_rng_state(saved["rng"])
        _truncate_metrics(out / "metrics.jsonl", step)
        log.info("nf4tune: resuming from %s at step %d", resume_from, step)
    else:
        (out / "metrics.jsonl").write_text("")
    (out / "recipe.json").write_text(json.dumps(recipe_to_dict(recipe), indent=2) + "\n")

    measure = recipe.eval.exact_match and bool(eval_examples)
    before = exact_match(model, tokenizer, eval_examples) if measure and resume_from is None else None
    trainable, all_params = trainable_parameters(model)
    log.info("nf4tune: %d training examples (%s format), %d held out; %d steps; trainable parameters %s of %s (%.2f%%)",
             len(examples), stats.format, len(eval_examples), total, f"{trainable:,}", f"{all_params:,}",
             100 * trainable / all_params)

    model.train()
    start_time, window_loss, window_tokens, window_start, last_loss = time.time(), 0.0, 0, time.time(), float("nan")
    bar = tqdm(total=total, initial=step, desc="training", unit="step", disable=not progress)
    metrics = (out / "metrics.jsonl").open("a")
    board = _tensorboard(out)
    try:
        while step < total:
            drawn = [stream.next() for _ in range(t.gradient_accumulation_steps)]
            micro = [collate(examples_, tokenizer.pad_token_id) for examples_ in drawn]
            targets = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
            step_loss, step_tokens = 0.0, sum(len(e.input_ids) for examples_ in drawn for e in examples_)
            for batch in micro:
                batch = {k: v.to(model.device) for k, v in batch.items()}
                s, _ = loss_sum(model, batch, t.loss_chunk_tokens)
                loss = s / max(1, targets)
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss.item()
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm))
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                if scaler:
                    scaler.update()
                skipped, bad_in_a_row = skipped + 1, bad_in_a_row + 1
                log.warning("nf4tune: step %d: loss or gradient is NaN/Inf; step skipped", step + 1)
                if bad_in_a_row >= t.max_bad_steps_in_a_row:
                    last = ckpt.checkpoints(out)
                    cause = ("float16 overflow: use bfloat16 compute (model.compute_dtype=bfloat16) where the device has it"
                             if compute_dtype == torch.float16 else "a learning rate too high: lower training.learning_rate")
                    raise Nf4tuneError(
                        f"the loss or gradients were NaN/Inf for {bad_in_a_row} steps in a row; the likely cause is {cause}. "
                        + (f"The last good checkpoint is {last[-1]}." if last else "No checkpoint was written yet."))
                continue
            bad_in_a_row = 0
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            last_loss = step_loss
            tokens += step_tokens
            window_loss, window_tokens = window_loss + step_loss, window_tokens + step_tokens
            record = {}
            if step % t.logging_steps == 0 or step == total:
                n = t.logging_steps if step % t.logging_steps == 0 else step % t.logging_steps
                elapsed = time.time() - window_start
                record.update(step=step, epoch=round(stream.epoch + stream.index / stream.batches_per_epoch(), 4),
                              loss=window_loss / n, lr=lr, grad_norm=grad_norm,
                              tokens_per_s=window_tokens / max(elapsed, 1e-9), memory_gib=round(_memory_gib(model.device), 3))
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
                                mem=f"{record['memory_gib']:.2f}G")
                window_loss, window_tokens, window_start = 0.0, 0, time.time()
            if eval_examples and t.eval_steps and (step % t.eval_steps == 0 or step == total):
                eval_start = time.time()
                eval_loss = evaluate(model, eval_examples, recipe.eval.per_device_eval_batch_size, tokenizer.pad_token_id,
                                     t.loss_chunk_tokens)
                window_start += time.time() - eval_start  # tokens/s measures training only
                record.update(step=step, eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 50)))
                if best is None or eval_loss < best:
                    best = eval_loss
                    best_path = out / f"checkpoint-{step}"
                    _save(out, step, model, tokenizer, optimizer, scheduler, scaler, stream, tokens, skipped, best, best_path)
            if record:
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                if board is not None:
                    for key, value in record.items():
                        if key != "step":
                            board.add_scalar(f"{'eval' if key.startswith('eval') else 'train'}/{key}", value, step)
            if step % t.save_steps == 0 or step == total:
                _save(out, step, model, tokenizer, optimizer, scheduler, scaler, stream, tokens, skipped, best, best_path)
                ckpt.prune(out, t.save_total_limit, keep=best_path)
            bar.update(1)
    finally:
        bar.close()
        metrics.close()
        if board is not None:
            board.close()

    adapter_dir = out / "adapter"
    save_adapter(model, adapter_dir)
    if added:
        tokenizer.save_pretrained(adapter_dir)
    from .plot import plot_losses

    plot_losses(_read_metrics(out / "metrics.jsonl"), out / "loss.png")
    result = TrainResult(out, adapter_dir, step, tokens, time.time() - start_time, last_loss, best, best_path, skipped, stats)
    if measure:
        result.exact_match = {"after": exact_match(model, tokenizer, eval_examples)}
        if before is not None:
            result.exact_match["before"] = before
    summary = {"steps": result.steps, "tokens": result.tokens, "seconds": round(result.seconds, 2),
               "final_loss": result.final_loss, "best_eval_loss": best, "best_checkpoint": str(best_path) if best_path else None,
               "adapter": str(adapter_dir), "skipped_steps": skipped, "exact_match": result.exact_match,
               "data": {"rows": stats.rows, "used": stats.used, "skipped": stats.skipped, "truncated": stats.truncated,
                        "format": stats.format}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


def _tensorboard(out: Path):
    """A TensorBoard writer into OUTPUT/runs when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "runs"))


def _save(out, step, model, tokenizer, optimizer, scheduler, scaler, stream, tokens, skipped, best, best_path):
    ckpt.save_checkpoint(out, step, model, tokenizer, {
        "step": step, "tokens": tokens, "skipped_steps": skipped,
        "best_eval_loss": best, "best_checkpoint": str(best_path) if best_path else None,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler else None,
        "data_position": stream.position(), "rng": ckpt.rng_state(),
    })


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after `step` by the run being resumed."""
    rows = [r for r in _read_metrics(path) if r.get("step", 0) <= step]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
