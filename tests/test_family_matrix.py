"""The family matrix: every family in `registry.FAMILIES` through what a user does with it.

Each family's tiny random checkpoint (checkpoint/tiny.py, written by transformers' save_pretrained) is
loaded in 4-bit, fine-tuned by `train()`, its adapter read by PEFT, merged, exported to GGUF and asked for a
reply, each step against an oracle: bitsandbytes' own 4-bit model, transformers' own loss, PEFT on the
dequantized base, transformers' greedy `generate`. A step runs for every family unless the registry says
the family lacks the capability (STEPS names which), and is then skipped saying so. The README's family
table is this registry's, checked below.

One family is built at a time (module-scoped fixtures parametrized by family); float32 compute, where the
oracles agree to rounding, except the reply, made as `nf4tune generate` makes it (its default compute dtype).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.architecture import model_class
from nf4tune.checkpoint.tiny import build_tiny_checkpoint, byte_level_tokenizer, tiny_archs
from nf4tune.cli.main import main
from nf4tune.layers.experts4bit import ExpertWeight4bit
from nf4tune.layers.linear4bit import Linear4bit
from nf4tune.models.loss import IGNORE_INDEX, loss_sum
from nf4tune.quant.codes import bits_per_parameter
from nf4tune.registry import FAMILIES
from nf4tune.train import loop as loop_mod
from nf4tune.train.config import recipe_from_dict

peft = pytest.importorskip("peft", reason="PEFT is the oracle for adapters and merges")
pytest.importorskip("bitsandbytes", reason="bitsandbytes is the oracle for the 4-bit layers")
gguf = pytest.importorskip("gguf", reason="the gguf package reads the exported files back")
from transformers import BitsAndBytesConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The families the matrix runs: those checkpoint/tiny.py builds a tiny checkpoint of (a family registered before it
# can, as the mixture-of-experts families registered for their GGUF export, is listed as skipped).
MATRIX_FAMILIES = tuple(name for name in FAMILIES if name in tiny_archs())


@dataclass(frozen=True)
class Step:
    """One column of the matrix: a test below and the README's column.

    `capability` is the FamilySpec field a family needs for the step (None: every registered family);
    `cell` what the README shows for a family that has it."""

    name: str
    capability: str | None = None
    cell: str = "yes"


STEPS = (
    Step("Load"),
    Step("4-bit"),
    Step("Train"),
    Step("Chunked loss", "chunked_loss"),
    Step("PEFT"),
    Step("Merge"),
    Step("GGUF", "gguf_arch", cell="`{gguf_arch}`"),
    Step("Generate"),
    Step("nf4tune decoder", "decoder"),
)
STEP = {s.name: s for s in STEPS}

BNB = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)
IDS = torch.tensor([[1, 40, 41, 42, 15, 77, 90, 3, 60], [1, 55, 23, 78, 9, 10, 11, 12, 13]])
ROWS = [{"prompt": f"Is {n} even or odd? ", "completion": "even" if n % 2 == 0 else "odd"} for n in range(10, 26)]
PROMPT, NEW_TOKENS = "Is 31 even or odd? ", 8


def requires(family: str, step: str) -> None:
    """Skip unless the registry gives `family` the capability `step` needs, saying which."""
    capability = STEP[step].capability
    if capability is not None and not getattr(FAMILIES[family], capability):
        pytest.skip(f"registry.FAMILIES[{family!r}].{capability} is not set: {step} does not apply")


def _logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Logits for `ids`; an encoder-decoder reads them in its encoder and the first five in its decoder."""
    kwargs = {"decoder_input_ids": ids[:, :5]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return model(ids, **kwargs).logits.float()


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-4) -> None:
    # Both sides multiply the same float32 weights; only the order of the sums differs.
    assert (ours - theirs).abs().max() <= rel * theirs.abs().max(), (ours - theirs).abs().max()


def _config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def _transformers_model(path: Path, **kwargs):
    """transformers' own model of the checkpoint at `path` (float32 unless kwargs say otherwise)."""
    config = _config(path)
    return model_class(config).from_pretrained(path, **{"dtype": torch.float32, **kwargs})


# --- one family at a time ------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request) -> str:
    if request.param not in MATRIX_FAMILIES:
        pytest.skip(f"checkpoint/tiny.py builds no tiny {request.param} checkpoint yet: not in the matrix")
    return request.param


@pytest.fixture(scope="module")
def root(family, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp(family)


@pytest.fixture(scope="module")
def checkpoint(family, root) -> Path:
    # a byte-level BPE vocabulary, which GGUF files hold
    return build_tiny_checkpoint(root / "base", arch=family, dtype=torch.float32, tokenizer=byte_level_tokenizer())


@pytest.fixture(scope="module")
def plain(checkpoint):
    """The checkpoint loaded in 4-bit without adapters, computing in float32."""
    model, tokenizer = nf4tune.load_model(checkpoint, device="cpu", compute_dtype=torch.float32, progress=False)
    return model, tokenizer


@dataclass
class TrainRun:
    adapter: Path
    losses: list[float]
    first_batch: dict[str, torch.Tensor]  # what the first step's loss was computed on


@pytest.fixture(scope="module")
def trained(root, checkpoint) -> TrainRun:
    """`train()` on prompt/completion rows for a few steps, in float32 without dropout; the first
    micro-batch is kept (the loss function is wrapped to see it)."""
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    recipe = recipe_from_dict({
        "model": {"name_or_path": str(checkpoint), "compute_dtype": "float32", "device": "cpu"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"path": str(root / "train.jsonl"), "source_max_len": 32, "target_max_len": 8},
        "training": {"output_dir": str(root / "run"), "max_steps": 5, "per_device_train_batch_size": 4,
                     "learning_rate": 1e-2, "optim": "adamw_torch", "logging_steps": 1, "save_steps": 1000,
                     "seed": 0, "compile": False},
    })
    batches = []

    def seen_loss_sum(model, batch, chunk_tokens=1024):
        if not batches:
            batches.append({k: v.detach().clone() for k, v in batch.items()})
        return loss_sum(model, batch, chunk_tokens)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop_mod, "loss_sum", seen_loss_sum)
        result = loop_mod.train(recipe, progress=False)
    metrics = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return TrainRun(result.adapter_dir, [r["loss"] for r in metrics if "loss" in r], batches[0])


@pytest.fixture(scope="module")
def adapter_model(checkpoint, trained):
    """The trained adapter on the 4-bit base, computing in float32."""
    model, _ = nf4tune.load_model(checkpoint, device="cpu", compute_dtype=torch.float32, adapter=trained.adapter,
                                  progress=False)
    return model


@pytest.fixture(scope="module")
def dequantized_base_path(root, checkpoint, plain) -> Path:
    """transformers' model of the checkpoint with every 4-bit layer's weight replaced by its dequantized
    NF4 (as nf4tune loaded it): the float model the adapters train on, saved for PEFT to load."""
    model = _transformers_model(checkpoint)
    with torch.no_grad():
        for name, module in plain[0].named_modules():
            if isinstance(module, Linear4bit):
                model.get_submodule(name).weight.copy_(module.quantized_weight.dequantize(torch.float32))
            elif isinstance(module, ExpertWeight4bit):  # a mixture of experts' fused expert weights
                model.get_parameter(name).copy_(module.dequantized(torch.float32))
    model.save_pretrained(root / "dequantized")
    return root / "dequantized"


@pytest.fixture(scope="module")
def peft_model(dequantized_base_path, trained):
    """PEFT's model: the adapter loaded by peft.PeftModel.from_pretrained onto the dequantized base."""
    return peft.PeftModel.from_pretrained(_transformers_model(dequantized_base_path), trained.adapter).eval()


@pytest.fixture(scope="module")
def merged(root, checkpoint, trained) -> Path:
    """`nf4tune merge BASE ADAPTER OUT`: the adapter merged into the original float32 weights."""
    assert main(["merge", str(checkpoint), str(trained.adapter), str(root / "merged")]) == 0
    return root / "merged"


# --- the steps ------------------------------------------------------------------------------------

def test_load(family, plain, dequantized_base_path):
    """The 4-bit model computes transformers' function of its dequantized weights."""
    requires(family, "Load")
    model, tokenizer = plain
    assert model.config.model_type == family and tokenizer is not None
    _assert_close(_logits(model), _logits(_transformers_model(dequantized_base_path)))


def test_4bit(family, checkpoint, plain):
    """Exactly the layers transformers + bitsandbytes quantize are 4-bit, bit for bit theirs; the head,
    embeddings and norms stay in 16/32-bit."""
    requires(family, "4-bit")
    import bitsandbytes as bnb

    ours = plain[0]
    theirs = _transformers_model(checkpoint, quantization_config=BNB, device_map="cpu")
    quantized = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert set(quantized) == {n for n, m in theirs.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    their_state = theirs.state_dict()
    for name, module in quantized.items():
        for key, tensor in module.quantized_weight.bnb_state_dict(f"{name}.weight").items():
            assert torch.equal(tensor, their_state[key].to(tensor.dtype).view(tensor.shape)), key

    assert not isinstance(ours.get_output_embeddings(), Linear4bit)
    rest = [(n, p) for n, p in ours.named_parameters() if n.rsplit(".", 1)[0] not in quantized]
    assert any("norm" in n for n, _ in rest) and all(p.dtype == torch.float32 for _, p in rest)
    params = sum(m.quantized_weight.numel for m in quantized.values())
    nbytes = sum(m.quantized_weight.nbytes for m in quantized.values())
    assert params == sum(m.in_features * m.out_features for m in quantized.values())
    # NF4 codes, uint8 absmax per 64 and a float32 scale per 256 of those: 4.127 bits, a little more
    # where a tensor's last nested block is partial
    assert bits_per_parameter(64, True) <= 8 * nbytes / params < 4.2


def test_train(family, checkpoint, trained, dequantized_base_path):
    """train() teaches the completion given the prompt; its first loss is transformers' own loss of the
    base model on that batch (the adapters start at zero); the loss falls and every adapter moves."""
    requires(family, "Train")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    batch, tokenizer = trained.first_batch, AutoTokenizer.from_pretrained(checkpoint)
    completions = {r["prompt"]: r["completion"] for r in ROWS}
    encoder_decoder = _config(checkpoint).is_encoder_decoder
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        read = tokenizer.decode(ids[mask.bool()], skip_special_tokens=True)
        learned = tokenizer.decode(labels[labels != IGNORE_INDEX], skip_special_tokens=True)
        # an encoder-decoder reads the prompt (its decoder is fed the completion from the labels); a
        # decoder-only model reads both, taught only the completion
        prompt = read if encoder_decoder else read.removesuffix(learned)
        assert prompt in completions and learned == completions[prompt], (read, learned)

    with torch.no_grad():
        expected = _transformers_model(dequantized_base_path)(**batch).loss.item()
    assert trained.losses[0] == pytest.approx(expected, rel=1e-4)
    assert all(map(torch.isfinite, torch.tensor(trained.losses))) and trained.losses[-1] < trained.losses[0]
    adapter = load_file(trained.adapter / "adapter_model.safetensors")
    assert adapter and all(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at zero


def test_chunked_loss(family, adapter_model, trained):
    """The chunked loss (the training loop's and the labels forward's) is transformers' loss, with the
    same adapter gradients, logit scaling and soft-capping included."""
    requires(family, "Chunked loss")
    model, batch = adapter_model, trained.first_batch

    def labels_forward():  # nf4tune's forward with labels in training mode: the chunked loss
        return model(**batch).loss

    def transformers_loss():  # the model's own loss, from the whole logits
        return model(**batch, skip_logits=False).loss

    def training_loop():  # the loop's loss, in several chunks
        total, count = loss_sum(model, batch, chunk_tokens=7)
        return total / count

    results = {}
    model.train()
    try:
        for compute in (labels_forward, transformers_loss, training_loop):
            model.zero_grad(set_to_none=True)
            loss = compute()
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[compute.__name__] = loss.item(), grads
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()
    expected, expected_grads = results.pop("transformers_loss")
    assert expected_grads
    for way, (loss, grads) in results.items():
        assert loss == pytest.approx(expected, rel=1e-5), way
        assert grads.keys() == expected_grads.keys(), way
        for name, g in expected_grads.items():
            assert torch.allclose(grads[name], g, rtol=1e-3, atol=1e-6 * g.abs().max().item()), (way, name)


def test_peft(family, adapter_model, peft_model):
    """The saved adapter, read by PEFT onto the dequantized base, gives nf4tune's logits."""
    requires(family, "PEFT")
    theirs = _logits(peft_model)
    _assert_close(_logits(adapter_model), theirs)
    with peft_model.disable_adapter():  # and the adapter matters
        assert (_logits(peft_model) - theirs).abs().max() > 1e-2 * theirs.abs().max()


def test_merge(family, root, checkpoint, trained, peft_model, merged):
    """`nf4tune merge --dequantized` gives the adapter model's function as one float model; the plain
    merge is PEFT's merge_and_unload on the original weights, tensor for tensor."""
    requires(family, "Merge")
    assert main(["merge", str(checkpoint), str(trained.adapter), str(root / "merged-exact"), "--dequantized"]) == 0
    _assert_close(_logits(_transformers_model(root / "merged-exact")), _logits(peft_model))

    ours = _transformers_model(merged).state_dict()
    reference = peft.PeftModel.from_pretrained(_transformers_model(checkpoint), trained.adapter).merge_and_unload()
    reference = reference.state_dict()
    assert ours.keys() == reference.keys()
    for key in reference:
        assert torch.equal(ours[key], reference[key]), key


def test_gguf(family, root, checkpoint, trained, merged):
    """`nf4tune export --adapter` writes the family's llama.cpp architecture with every checkpoint tensor
    once, under llama.cpp's names, the adapter merged in (read back with the gguf package)."""
    requires(family, "GGUF")
    if FAMILIES[family].moe_experts:
        pytest.skip("mixture-of-experts export (stacked experts, expert LoRA refused) is tested against llama.cpp "
                    "in tests/test_gguf_moe.py")
    from safetensors import safe_open

    arch = FAMILIES[family].gguf_arch
    out = root / "model.gguf"
    assert main(["export", str(checkpoint), str(out), "--adapter", str(trained.adapter), "--type", "f16"]) == 0
    reader = gguf.GGUFReader(out)
    config = json.loads((checkpoint / "config.json").read_text())
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == arch
    assert field(f"{arch}.block_count") == config["num_hidden_layers"]
    assert field(f"{arch}.embedding_length") == config["hidden_size"]
    assert len(field("tokenizer.ggml.tokens")) == config["vocab_size"]

    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    known = {gguf.TENSOR_NAMES[t].format(bid=b) for t in gguf.MODEL_TENSORS[arch_id]
             for b in range(config["num_hidden_layers"])}
    tensors = {t.name: t for t in reader.tensors}
    assert {name.rsplit(".", 1)[0] for name in tensors} <= known
    stored = [key for shard in checkpoint.glob("*.safetensors") for key in safe_open(shard, "pt").keys()]
    assert len(tensors) == len(stored)
    # ffn_down is written as it is (no row order or norm shift): the clean merge of the adapter, in float16
    model = _transformers_model(merged)
    for block in range(config["num_hidden_layers"]):
        down = torch.from_numpy(tensors[f"blk.{block}.ffn_down.weight"].data.copy())
        expected = model.get_submodule(f"{model.base_model_prefix}.layers.{block}.mlp.down_proj").weight
        assert torch.equal(down.view(expected.shape), expected.half()), block


@pytest.fixture(scope="module")
def served(checkpoint, trained):
    """The model as `nf4tune generate` loads it: the adapter on the 4-bit base, default compute dtype."""
    model, tokenizer = nf4tune.load_model(checkpoint, device="cpu", adapter=trained.adapter, progress=False)
    return model, tokenizer


def test_generate(family, root, checkpoint, trained, served):
    """`nf4tune generate` replies with transformers' greedy generate on the same 4-bit model: the new
    tokens only, and as many of them (the budget is the oracle's reply length, so one token too many or
    too few shows even where the reply would end at the end of sequence)."""
    requires(family, "Generate")
    model, tokenizer = served
    # encoded as the engine encodes it: an encoder-decoder's prompt with the tokenizer's special tokens, as
    # training feeds its encoder; a decoder-only model's as the text it continues
    ids = tokenizer(PROMPT, add_special_tokens=model.config.is_encoder_decoder, return_tensors="pt").input_ids
    with torch.no_grad():
        output = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
    # a decoder-only model's output starts with the prompt, an encoder-decoder's with its start token
    new = output[0, 1:] if model.config.is_encoder_decoder else output[0, ids.shape[1]:]
    reply_tokens = next((i for i, t in enumerate(new.tolist()) if t == tokenizer.eos_token_id), len(new))

    (root / "prompts.jsonl").write_text(json.dumps({"prompt": PROMPT}) + "\n")
    out = root / "replies.jsonl"
    assert main(["generate", str(checkpoint), "--adapter", str(trained.adapter), "--prompts",
                 str(root / "prompts.jsonl"), "--out", str(out), "--temperature", "0",
                 "--max-new-tokens", str(max(1, reply_tokens)), "--device", "cpu"]) == 0
    [reply] = [json.loads(line) for line in out.read_text().splitlines()]
    assert reply["completion"] == tokenizer.decode(new[:reply_tokens], skip_special_tokens=True)
    assert reply["finish_reason"] == ("length" if reply_tokens else "stop")


def test_nf4tune_decoder(family, served):
    """A family the registry gives nf4tune's decoder is served by it, not by transformers' generate."""
    requires(family, "nf4tune decoder")
    from nf4tune import dispatch
    from nf4tune.serve import Engine

    if not dispatch.path("decode_attention", torch.zeros(1)).fast:
        pytest.skip("nf4tune's CPU decoder needs the AVX-512 kernels, which this CPU lacks")
    engine = Engine(*served)
    try:
        assert engine.decode_path.name != dispatch.REFERENCE, engine.decode_path.reason
    finally:
        engine.close()


# --- the README's table -----------------------------------------------------------------------------

def family_table() -> str:
    """The README's family matrix, from the registry: a row per family the matrix runs, a column per step."""
    def cell(spec, step: Step) -> str:
        value = getattr(spec, step.capability) if step.capability else True
        return step.cell.format(**vars(spec)) if value else "-"

    lines = ["| Family (`model_type`) | " + " | ".join(s.name for s in STEPS) + " |",
             "| --- | " + " | ".join("---" for _ in STEPS) + " |"]
    lines += [f"| `{name}` | " + " | ".join(cell(FAMILIES[name], s) for s in STEPS) + " |" for name in MATRIX_FAMILIES]
    return "\n".join(lines) + "\n"


def test_readme_family_table_is_the_registrys():
    table = family_table()
    assert table in (ROOT / "README.md").read_text(), f"the README's family table should read:\n{table}"
