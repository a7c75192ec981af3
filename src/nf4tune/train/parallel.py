"""Where ranks differ: the process group, the wrapped model (DDP or FSDP2), each rank's share of the
global batch, the all-reduced figures, and checkpoint I/O. With one process (no torchrun, or
WORLD_SIZE=1) every method is the single-device behaviour, and nothing here touches torch.distributed.

- DDP: the 4-bit base is replicated; only the trainable parameters (LoRA, new-token rows) are
  all-reduced, in buckets overlapped with backward, and not at all during accumulation (`no_sync`).
- FSDP2 (`fully_shard`): one unit per decoder layer plus the root; the 4-bit storage (packed codes,
  absmax, nested absmax), the 16-bit parts and the adapters are all sharded, since the 4-bit buffers
  become frozen parameters first (same tensors, storage unchanged).
- Data: every rank draws the same global batch (accumulation x world size micro-batches, in an order
  fixed by the seed and the step) and computes only its own slice of it.
- Rank 0 alone writes files; adapters are gathered into an ordinary PEFT adapter; the optimizer
  state is saved through torch.distributed.checkpoint, so a run resumes at another world size.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import Nf4tuneError
from ..outputs import OutOfSpace, is_out_of_space
from . import state as ckpt

log = logging.getLogger("nf4tune")

OPTIMIZER_DIR = "optimizer"  # torch.distributed.checkpoint files inside a checkpoint folder


class LossModule(nn.Module):
    """The model and its chunked loss as one module: DDP and FSDP hook a module's forward, and the loss
    reads the output head's weight directly, so the root unit must be around both."""

    def __init__(self, model: nn.Module, loss_sum, chunk_tokens: int):
        super().__init__()
        self.model = model
        self._loss_sum, self._chunk = loss_sum, chunk_tokens

    def forward(self, batch: dict) -> tuple[torch.Tensor, int]:
        return self._loss_sum(self.model, batch, self._chunk)


class Parallel:
    """This process's place in the run: rank, world size, strategy, and what differs by rank."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, parallel: str = "auto",
                 cpu_offload: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.requested, self.cpu_offload = parallel, cpu_offload
        self.strategy = "single" if world_size == 1 else None
        self.root: nn.Module | None = None  # what state dicts are named from (the LossModule)
        self.wrapped: nn.Module | None = None  # what forward goes through (DDP or the FSDP root)
        self._failed = False
        self._owns_group = False
        self._streamed = False  # layers sharded while loading (FSDP)
        self.load_peak_bytes = 0  # the most parameter and buffer bytes the model held while loading

    # --- the process group --------------------------------------------------------------------

    @classmethod
    def from_environment(cls, recipe) -> "Parallel":
        """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): joins the
        process group, NCCL on CUDA and gloo on CPU. Without it, one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        t = recipe.training
        if world <= 1:
            return cls(parallel=t.parallel, cpu_offload=t.fsdp_cpu_offload)
        import torch.distributed as dist

        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        par = cls(rank, world, local_rank, t.parallel, t.fsdp_cpu_offload)
        par._owns_group = not dist.is_initialized()
        if par._owns_group:
            cuda = torch.cuda.is_available() and recipe.model.device != "cpu"
            if cuda:
                torch.cuda.set_device(local_rank)
            timeout = datetime.timedelta(seconds=float(os.environ.get("NF4TUNE_DIST_TIMEOUT", "1800")))
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **_attempt_store(rank, world, timeout))
        if rank != 0:  # one voice: the other ranks only warn
            logging.getLogger("nf4tune").setLevel(logging.WARNING)
        return par

    def fail(self, error: BaseException) -> str:
        """Note that this rank failed (it then leaves without a final barrier) and say why in one
        sentence naming the rank: torchrun stops the other ranks when this one exits non-zero."""
        self._failed = True
        text = str(error)
        if self.world_size == 1 or text.startswith("rank "):
            return text
        if isinstance(error, Nf4tuneError):
            return f"rank {self.rank} of {self.world_size}: {text}"
        first = (text.splitlines() or [""])[0]
        if "Connection closed by peer" in first or "Connection reset by peer" in first:
            return f"rank {self.rank} of {self.world_size} stopped: another rank failed or was stopped ({first})"
        return f"rank {self.rank} of {self.world_size} failed: {type(error).__name__}: {first}"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def can_generate(self) -> bool:
        """Whether rank 0 can run `generate` on its own (a sharded model needs every rank)."""
        return self.strategy != "fsdp"

    def device(self, name: str) -> torch.device | None:
        """The device to load the model on: this rank's GPU under torchrun, else what the recipe says."""
        if self.world_size == 1:
            return None if name == "auto" else torch.device(name)
        if name in ("auto", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu" if name == "auto" else name)

    def close(self) -> None:
        if self.world_size > 1 and not self._failed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                if self._owns_group:
                    dist.destroy_process_group()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def sum(self, value: float) -> float:
        return self._reduce(value, "SUM")

    def max(self, value: float) -> float:
        return self._reduce(value, "MAX")

    def sums(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks, in one all-reduce (float64: token counts stay exact)."""
        if self.world_size == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def _reduce(self, value: float, op: str) -> float:
        if self.world_size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return float(t)

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        return torch.device("cuda", self.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")

    # --- data ---------------------------------------------------------------------------------

    def my_share(self, drawn: list) -> list:
        """This rank's micro-batches of a global batch: a contiguous, disjoint slice."""
        per_rank = len(drawn) // self.world_size
        return drawn[self.rank * per_rank:(self.rank + 1) * per_rank]

    def accumulating(self, last: bool):
        """DDP all-reduces gradients on the last micro-batch of a step only."""
        if self.strategy == "ddp" and not last:
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    # --- the model ----------------------------------------------------------------------------

    def loading_hook(self, recipe, model_path: Path, resume_from: Path | None = None):
        """What `load_model(layer_ready=...)` calls as each decoder layer arrives, or None. Under FSDP
        the layer (with its adapters, restored from `resume_from` when resuming) is sharded at once,
        so a rank holds whole only the layer being read, its shards of the others, and the 16-bit
        parts outside the layers until the root unit is sharded: ranks do not each hold the model."""
        if self.world_size == 1:
            return None
        self._decide(recipe, model_path)
        if self.strategy != "fsdp":
            return None
        adapter, pairs = None, None  # the checkpoint's pairs by module name, resolved on the first layer
        if resume_from is not None:
            from ..models.adapters import read_adapter

            adapter = read_adapter(resume_from)
        options = _fsdp_options(self.world_size, self.device(recipe.model.device), self.cpu_offload)
        self._streamed = True

        def shard(model: nn.Module, name: str) -> None:
            from torch.distributed.fsdp import fully_shard

            from ..models.adapters import pairs_by_module

            nonlocal pairs
            if pairs is None:  # expert adapters are named by the model's expert weights
                pairs = {} if adapter is None else pairs_by_module(model, adapter[0], adapter[1], resume_from)
            layer = model.get_submodule(name)
            _copy_adapters(layer, name, pairs)
            self.load_peak_bytes = max(self.load_peak_bytes, param_bytes(model))
            frozen_buffers_as_parameters(layer)
            fully_shard(layer, **options)

        return shard

    def restore_adapter(self, model: nn.Module, path: Path) -> None:
        """A checkpoint's adapter into the loaded model (before `wrap`); the layers sharded while
        loading got theirs then, so only the rows outside them (new-token embeddings) are left."""
        if not self._streamed:
            ckpt.restore_adapter(model, path)
            return
        from ..models.adapters import read_adapter

        saved = read_adapter(path)[2]
        with torch.no_grad():
            for name, weight in saved.items():
                model.get_submodule(name).weight.copy_(weight)

    def wrap(self, model: nn.Module, recipe, loss_sum, chunk_tokens: int, model_path: Path):
        """`loss_fn(batch) -> (sum of token losses, count)` through the strategy's wrapper."""
        self.load_peak_bytes = max(self.load_peak_bytes, param_bytes(model))
        if self.world_size == 1:
            return lambda batch: loss_sum(model, batch, chunk_tokens)
        self._decide(recipe, model_path)
        self.root = LossModule(model, loss_sum, chunk_tokens)
        if self.strategy == "ddp":
            self.wrapped = _ddp(self.root, model.device)
        else:
            self.wrapped = _fsdp(self.root, model, _fsdp_options(self.world_size, model.device, self.cpu_offload))
        return self.wrapped

    def _decide(self, recipe, model_path: Path) -> None:
        """The strategy, chosen and logged once (before loading, where the loading depends on it)."""
        if self.strategy is not None:
            return
        self.strategy, why = self._choose(recipe, model_path)
        if self.strategy == "fsdp" and recipe.training.optim == "paged_adamw_8bit":
            raise Nf4tuneError("FSDP shards the optimizer states already; use training.optim=paged_adamw_32bit or "
                               "adamw_torch with it (paged_adamw_8bit quantizes whole tensors), or training.parallel=ddp.")
        log.info("nf4tune: %d ranks, %s (%s)", self.world_size, self.strategy.upper(), why)
        if self.cpu_offload and (self.strategy != "fsdp" or self.device(recipe.model.device).type != "cuda"):
            self.cpu_offload = False  # FSDP's offload policy moves shards off an accelerator: none here, or no shards
            log.info("nf4tune: training.fsdp_cpu_offload has nothing to do %s", "with DDP (no shards)"
                     if self.strategy != "fsdp" else "on CPU (the shards are in host memory already)")

    def _choose(self, recipe, model_path: Path) -> tuple[str, str]:
        if self.requested != "auto":
            return self.requested, f"training.parallel={self.requested}"
        from ..plan.estimate import pick_strategy

        device = self.device(recipe.model.device)
        return pick_strategy(str(model_path), device_bytes=_device_bytes(device), gpus=self.world_size,
                             **plan_arguments(recipe), device="cuda" if device.type == "cuda" else "cpu")

    def log_layout(self, t) -> None:
        per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
        log.info("nf4tune: global batch %d = %d per device x %d accumulation x %d rank(s)",
                 per_step * self.world_size, t.per_device_train_batch_size, t.gradient_accumulation_steps,
                 self.world_size)

    def check_global_batch(self, saved: int | None, t) -> None:
        """Warn when a resumed run's global batch differs from the checkpoint's (another world size
        without the accumulation to match): it trains on, but no longer as the uninterrupted run would."""
        per_rank = t.per_device_train_batch_size * self.world_size
        now = per_rank * t.gradient_accumulation_steps
        if saved is None or saved == now:
            return
        hint = (f"; training.gradient_accumulation_steps={saved // per_rank} keeps it" if saved % per_rank == 0 else "")
        log.warning("nf4tune: the checkpoint was trained with a global batch of %d and this run's is %d (%d per device "
                    "x %d accumulation x %d rank(s)): the losses will differ from an uninterrupted run's%s",
                    saved, now, t.per_device_train_batch_size, t.gradient_accumulation_steps, self.world_size, hint)

    def layout(self, model: nn.Module) -> dict:
        """`world_size`, `strategy`, `param_bytes_per_rank` (parameters and buffers this rank holds,
        the largest over ranks) and `load_peak_param_bytes_per_rank` (the most it held while loading,
        the largest over ranks) for summary.json."""
        module = self.root if self.root is not None else model
        return {"world_size": self.world_size, "strategy": self.strategy,
                "param_bytes_per_rank": int(self.max(float(param_bytes(module)))),
                "load_peak_param_bytes_per_rank": int(self.max(float(self.load_peak_bytes)))}

    # --- checkpoints --------------------------------------------------------------------------

    def save_adapter(self, model: nn.Module, directory: Path) -> None:
        """An ordinary PEFT adapter, gathered from every rank and written by rank 0."""
        from ..models.adapters import save_adapter

        if self.strategy != "fsdp":  # whole adapters on every rank
            if self.is_main:
                save_adapter(model, directory)
            self.barrier()
            return
        with _gathered(self.root):
            if self.is_main:
                save_adapter(model, directory)
        self.barrier()

    def save_checkpoint(self, out: Path, step: int, model, tokenizer, optimizer, trainer_state: dict) -> None:
        """Rank 0 writes the adapter and trainer state; with several ranks the optimizer state is
        written by all of them through torch.distributed.checkpoint, beside it in the same folder."""
        if self.world_size == 1:
            ckpt.save_checkpoint(out, step, model, tokenizer, {**trainer_state, "optimizer": optimizer.state_dict()})
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        tmp = out / f".checkpoint-{step}.partial"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.barrier()
        needed = ckpt.checkpoint_bytes(out, model, trainer_state)
        state = {"optimizer": get_optimizer_state_dict(self.root, optimizer)}
        try:
            dcp.save(state, checkpoint_id=str(tmp / OPTIMIZER_DIR))
            torch.save(ckpt.rng_state(), tmp / f"rng-rank{self.rank}.pt")
            full = False
        except Exception as e:
            full = is_out_of_space(e, out)
            if not full:
                raise
        if full:  # raised outside the except block: the failed writer (and its open file) is let go
            raise OutOfSpace(out / f"checkpoint-{step}", needed, out)  # the next start removes the folder
        # Every rank's files are in before rank 0 renames the folder into place: without this barrier
        # a DDP rank 0 (no collective until here) could move the folder while rank 1 was still writing.
        self.barrier()
        state = {**trainer_state, "optimizer": None, "world_size": self.world_size, "strategy": self.strategy}
        with _gathered(self.root) if self.strategy == "fsdp" else contextlib.nullcontext():
            if self.is_main:
                from ..models.adapters import save_adapter

                ckpt.save_checkpoint(out, step, model, tokenizer, state, save_adapter, tmp)
        self.barrier()

    def load_optimizer(self, model: nn.Module, optimizer, saved: dict, path: Path) -> None:
        """The optimizer state of a checkpoint, whichever world size wrote it (DCP reshards)."""
        if saved.get("optimizer") is not None and self.world_size == 1:
            optimizer.load_state_dict(saved["optimizer"])
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

        root = self.root if self.root is not None else LossModule(model, None, 0)
        if saved.get("optimizer") is not None:  # written by one process: whole tensors by parameter index
            full = _by_name(root, optimizer, saved["optimizer"])
            set_optimizer_state_dict(root, optimizer, full, options=StateDictOptions(full_state_dict=True))
        else:
            import torch.distributed.checkpoint as dcp

            state = {"optimizer": get_optimizer_state_dict(root, optimizer)}
            with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=safe_checkpoint_reader(path / OPTIMIZER_DIR))
            set_optimizer_state_dict(root, optimizer, state["optimizer"])
        mine = path / f"rng-rank{self.rank}.pt"
        if saved.get("world_size", 1) == self.world_size and mine.is_file():
            rng = ckpt.read_state_file(mine)  # tensors and plain values only: no code runs
            if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor):
                raise Nf4tuneError(f"{mine} is not a generator state nf4tune wrote; resume from an earlier checkpoint.")
            saved["rng"] = rng


# What a torch.distributed.checkpoint `.metadata` file may name: DCP's own records, torch's dtypes and
# sizes, a path. DCP reads the file with plain `pickle.load`, which would call anything a crafted file names.
_DCP_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.distributed.checkpoint.filesystem", "_StoragePrefix"),
     ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")} | {
    (module, name) for module in ("pathlib", "pathlib._local") for name in ("PosixPath", "WindowsPath", "PurePosixPath")}


def read_dcp_metadata(file, path: Path):
    """Unpickle a torch.distributed.checkpoint `.metadata` file (`file`, open for binary reading)
    allowing only the classes such a file holds; anything else is refused with a sentence."""
    import importlib
    import pickle

    class NotAllowed(Exception):
        pass

    class AllowListed(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if (module, name) in _DCP_METADATA_CLASSES:
                return getattr(importlib.import_module(module), name)
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
            raise NotAllowed(f"{module}.{name}")

    try:
        return AllowListed(file).load()
    except NotAllowed as e:
        raise Nf4tuneError(f"{path} holds Python objects that only running code could load ({e}); nf4tune reads only "
                           "what torch.distributed.checkpoint writes, so it does not load this checkpoint: resume from "
                           "a checkpoint nf4tune wrote, or start again without --resume.") from None
    except Exception as e:
        first = (str(e).splitlines() or [""])[0] or type(e).__name__
        raise Nf4tuneError(f"{path} cannot be read ({first}); resume from an earlier checkpoint.") from e


def safe_checkpoint_reader(path: Path):
    """A torch.distributed.checkpoint reader of the folder `path` whose metadata is read by
    `read_dcp_metadata` rather than `pickle.load`; the tensors and values are read as DCP reads them
    (torch.load with weights_only=True). The metadata is read here, so that a refusal is this
    sentence rather than the exception DCP would wrap it in."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    def read(file: Path):
        with open(file, "rb") as f:
            return read_dcp_metadata(f, file)

    whole = read(Path(path) / ".metadata") if (Path(path) / ".metadata").is_file() else None

    class Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            rank = kwargs.get("rank")
            metadata = whole if rank is None and whole is not None else read(
                Path(self.path) / (".metadata" if rank is None else f"__{rank}.metadata"))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader(str(path))


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dict:
    """Under torchrun's shared rendezvous store, the process group's keys in a store of their own for
    each attempt. The agent keeps one store across elastic restarts, so a restarted rank could read
    the address its dead predecessor published and fail with "Connection refused" (seen with
    `--max-restarts`). Elsewhere: {} (the usual env:// rendezvous)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    import torch.distributed as dist

    store = dist.TCPStore(host_name=os.environ["MASTER_ADDR"], port=int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=False, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return {"store": dist.PrefixStore(f"nf4tune/attempt-{attempt}", store), "rank": rank, "world_size": world}


def resume_after_restart(recipe, resume):
    """(recipe, resume) for this attempt. When torchrun's elastic agent has restarted the ranks
    (`--max-restarts`, after a rank died), the run continues from its last complete checkpoint in
    `training.output_dir`. With none yet, it starts again as the first attempt did: from the checkpoint
    `resume` names, else from step 0, the earlier attempt's folder moved aside (`OUTPUT.old-<time>`).
    A first attempt is unchanged. The CLI and `train` both ask; the decision is logged once."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts == 0:
        return recipe, resume
    import dataclasses

    from .rundir import latest_checkpoint_of_run

    latest = latest_checkpoint_of_run(recipe.training.output_dir)
    if latest is not None:
        _restart_note(restarts, f"resuming from the last complete checkpoint, {latest}")
        return recipe, True
    if resume:
        _restart_note(restarts, "no checkpoint of this run yet, resuming again from "
                      + ("the latest checkpoint" if resume is True else str(resume)))
        return recipe, resume
    _restart_note(restarts, "no checkpoint of this run yet, starting again from step 0 "
                  "(the earlier attempt's folder is moved aside)")
    return dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, overwrite_output_dir=True)), resume


_restarts_noted: set[int] = set()  # the attempt this process belongs to is logged once, though asked twice


def _restart_note(restarts: int, what: str) -> None:
    if restarts not in _restarts_noted:
        _restarts_noted.add(restarts)
        log.warning("nf4tune: restart %d of the ranks: %s", restarts, what)


def plan_arguments(recipe) -> dict:
    """The planner's inputs from a recipe: what `auto` and `nf4tune estimate` share."""
    target = recipe.lora.target_modules
    return dict(seq_len=recipe.data.source_max_len + recipe.data.target_max_len,
                batch=recipe.training.per_device_train_batch_size, r=recipe.lora.r,
                target=target if isinstance(target, str) else ",".join(target), optim=recipe.training.optim,
                checkpointing=recipe.model.gradient_checkpointing, double_quant=recipe.quant.double_quant,
                blocksize=recipe.quant.blocksize, compute_dtype=recipe.model.compute_dtype,
                quant_type=recipe.quant.quant_type)


def _device_bytes(device: torch.device) -> int:
    """The memory one rank may count on: its GPU's, or on CPU its share of the host's (the ranks of
    a node share it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(1, ranks_here)


def param_bytes(module: nn.Module) -> int:
    """Bytes of the parameters and buffers this process holds (its shards, under FSDP)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    tensors = {id(t): local(t) for t in list(module.parameters()) + list(module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values() if t.device.type != "meta")  # meta: not loaded yet


def _ddp(root: LossModule, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    # Only the trainable parameters are synchronised; the frozen 4-bit base is never broadcast.
    frozen = [n for n, p in root.named_parameters() if not p.requires_grad] + [n for n, _ in root.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(root, frozen)
    with warnings.catch_warnings():  # broadcast_buffers=False is what keeps the 4-bit buffers from being broadcast
        warnings.simplefilter("ignore", FutureWarning)
        return DDP(root, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)


def _fsdp_options(world: int, device: torch.device, cpu_offload: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy

    options = {"mesh": init_device_mesh(device.type, (world,))}
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    return options


def _fsdp(root: LossModule, model: nn.Module, options: dict) -> nn.Module:
    from torch.distributed.fsdp import FSDPModule, fully_shard

    layers = getattr(getattr(model, model.base_model_prefix, None), "layers", None)
    if layers is None:
        raise Nf4tuneError(f"FSDP needs a decoder-only model with .layers; {model.config.model_type} has none: "
                           "use training.parallel=ddp.")
    frozen_buffers_as_parameters(model)
    for layer in layers:
        if not isinstance(layer, FSDPModule):  # not sharded while loading
            fully_shard(layer, **options)
    fully_shard(root, **options)
    return root


def _copy_adapters(layer: nn.Module, name: str, pairs: dict) -> None:
    """A saved adapter's A and B into the layer `name`'s adapters (whole tensors, before sharding)."""
    with torch.no_grad():
        for module_name, pair in pairs.items():
            if module_name.startswith(name + "."):
                module = layer.get_submodule(module_name[len(name) + 1:])
                module.lora_A.copy_(pair["A"])
                module.lora_B.copy_(pair["B"])


def frozen_buffers_as_parameters(model: nn.Module) -> None:
    """Register each Linear4bit's and each ExpertWeight4bit's (a MoE layer's fused experts) packed codes,
    absmax and nested absmax as frozen parameters: FSDP shards parameters, not buffers. The tensors are
    the same objects; nothing is re-quantized."""
    from ..layers.experts4bit import ExpertWeight4bit
    from ..layers.linear4bit import Linear4bit

    for module in model.modules():
        for name in module.STORAGE if isinstance(module, (Linear4bit, ExpertWeight4bit)) else ():
            tensor = module._buffers.get(name) if name in module._buffers else None
            if tensor is not None:
                del module._buffers[name]
                module.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


@contextlib.contextmanager
def _gathered(root: nn.Module):
    """Every FSDP unit under `root` unsharded (each rank joins), resharded afterwards: for writing
    the adapter on rank 0 from whole tensors."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def _by_name(root: nn.Module, optimizer, saved: dict) -> dict:
    """A one-process optimizer state (keyed by parameter index) keyed by parameter name instead."""
    names = {id(p): n for n, p in root.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    state = {order[i]: v for i, v in saved["state"].items()}
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": state, "param_groups": groups}
