"""The private parts of transformers and PEFT that nf4tune still relies on, one test each, named.

Each has no public replacement today. When a new release changes one, its test here fails first, with a
sentence saying what in nf4tune breaks; fix nf4tune (or keep the dependency's bound below that release).
The behaviour each hook serves is tested at length elsewhere (named in each test). What
`peft.PeftModel.from_pretrained` on an nf4tune model takes from PEFT is listed in
tests/test_peft_resume.py::test_the_peft_internals_nf4tune_relies_on."""

import inspect

import pytest
import torch

import nf4tune
from nf4tune.checkpoint.tiny import build_tiny_checkpoint
from nf4tune.layers.kept_outputs import KeepOutputsCheckpoint
from nf4tune.models.checkpointing import disable_checkpointing, enable_checkpointing
from nf4tune.train import compile as compile_mod


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = build_tiny_checkpoint(tmp_path_factory.mktemp("hooks") / "llama", dtype=torch.float32, num_hidden_layers=2)
    model, _ = nf4tune.load_model(path, device="cpu", progress=False, compute_dtype=torch.float32,
                                  lora=nf4tune.LoraConfig(r=4, dropout=0.0), gradient_checkpointing=False)
    return model


def _spy_on_checkpoint_functions(layers):
    """Wrap each layer's `_gradient_checkpointing_func` (as transformers set it) to count its calls."""
    calls = []
    for layer in layers:
        def spy(function, *args, _inner=layer._gradient_checkpointing_func, **kwargs):
            calls.append(function)
            return _inner(function, *args, **kwargs)
        layer._gradient_checkpointing_func = spy
    return calls


def test_set_gradient_checkpointing_is_where_every_way_of_turning_checkpointing_on_ends(model):
    """`PreTrainedModel._set_gradient_checkpointing(enable=, gradient_checkpointing_func=)`: nf4tune's models
    override it (models/peft_compat.py) so that load_model, Trainer and a script's enable call, under either
    of transformers' names, give each layer the checkpoint that keeps the 4-bit outputs (behaviour:
    test_trainer_compat.py::test_checkpointing_keeps_the_4bit_outputs_for_the_recompute)."""
    from transformers import PreTrainedModel

    parameters = inspect.signature(PreTrainedModel._set_gradient_checkpointing).parameters
    assert {"enable", "gradient_checkpointing_func"} <= set(parameters), (
        "transformers changed PreTrainedModel._set_gradient_checkpointing's arguments: nf4tune's override in "
        "models/peft_compat.py no longer installs KeepOutputsCheckpoint on the layers.")
    seen = []
    original = type(model)._set_gradient_checkpointing

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("enable", args[0] if args else True))
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model), "_set_gradient_checkpointing", recording)
        enable_checkpointing(model)
        disable_checkpointing(model)
    assert seen == [True, False], (
        "transformers' checkpointing enable/disable no longer goes through _set_gradient_checkpointing: the "
        "layers would get transformers' plain checkpoint instead of nf4tune's KeepOutputsCheckpoint.")


def test_checkpointed_layers_call_their_gradient_checkpointing_func(model):
    """`GradientCheckpointingLayer._gradient_checkpointing_func`, which `_set_gradient_checkpointing` sets and
    each layer calls as `func(function, *args)` in a training forward: where KeepOutputsCheckpoint runs."""
    layers = compile_mod.decoder_layers(model)
    enable_checkpointing(model)
    try:
        assert layers and all(isinstance(layer._gradient_checkpointing_func, KeepOutputsCheckpoint) for layer in layers)
        calls = _spy_on_checkpoint_functions(layers)
        model.train()
        ids = torch.randint(4, 90, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        assert len(calls) == len(layers), (
            "transformers' decoder layers no longer call _gradient_checkpointing_func in training: nf4tune's "
            "KeepOutputsCheckpoint (4-bit outputs kept for the recompute) never runs.")
    finally:
        disable_checkpointing(model)
        model.eval()


def test_the_layers_own_forward_is_found_under_transformers_checkpointing_wrapper(model):
    """`transformers.modeling_layers.GradientCheckpointingLayer` marks the decoder layers, and on releases
    that checkpoint by wrapping each layer class's `forward` (the wrapper's code is named
    `forward_with_checkpointing`), `train/compile.py` unwraps it: the compiled (or offloaded) layer is then
    checkpointed once, outside its graph (behaviour: test_compiled_train.py, no graph break)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = compile_mod.decoder_layers(model)
    assert len(layers) == 2 and all(isinstance(layer, GradientCheckpointingLayer) for layer in layers)
    wraps_forward = compile_mod.is_checkpointing_wrapper(type(layers[0]).forward)
    checkpoints_in_call = "__call__" in vars(GradientCheckpointingLayer)
    assert wraps_forward or checkpoints_in_call, (
        "transformers no longer checkpoints its layers in GradientCheckpointingLayer.__call__ nor in a "
        f"{compile_mod.CHECKPOINTING_WRAPPER!r} wrapper around forward: train/compile.py cannot find the "
        "layers' own forward, and compiled layers would be checkpointed twice.")

    enable_checkpointing(model)
    try:
        calls = _spy_on_checkpoint_functions(layers)
        own = compile_mod.own_forward(layers[0])
        assert not compile_mod.is_checkpointing_wrapper(own.__func__)
        model.train()
        hidden = torch.randn(1, 4, model.config.hidden_size)
        positions = model.model.rotary_emb(hidden, torch.arange(4)[None])
        own(hidden, position_embeddings=positions, attention_mask=None)
        assert calls == [], "train/compile.py's own_forward still runs transformers' checkpointing wrapper."
    finally:
        disable_checkpointing(model)
        model.eval()


def test_keep_in_fp32_modules_names_what_transformers_keeps_in_float32():
    """`PreTrainedModel._keep_in_fp32_modules` (e.g. T5's `wo`): load_model and `nf4tune quantize` leave those
    modules out of the 4-bit layers as transformers + bitsandbytes do (behaviour: test_model.py's T5 case)."""
    from transformers import PreTrainedModel, T5ForConditionalGeneration

    assert hasattr(PreTrainedModel, "_keep_in_fp32_modules") and "wo" in (
        T5ForConditionalGeneration._keep_in_fp32_modules or []), (
        "transformers renamed _keep_in_fp32_modules: load_model would quantize T5's wo, which transformers + "
        "bitsandbytes keep in 16-bit (checkpoint/architecture.py, models/load.py).")


def test_trainer_reads_keys_to_ignore_on_save_when_it_resumes_from_an_adapter():
    """`PreTrainedModel._keys_to_ignore_on_save`: nf4tune's models name the frozen base there, so that
    Trainer's resume from an adapter-only checkpoint reports no missing keys (behaviour:
    test_trainer_compat.py::test_trainer_trains_saves_peft_adapters_and_resumes)."""
    from transformers import Trainer

    assert "_keys_to_ignore_on_save" in inspect.getsource(Trainer), (
        "Trainer no longer reads model._keys_to_ignore_on_save: resuming an nf4tune model from a checkpoint "
        "would warn about every frozen base weight as missing (models/peft_compat.py).")


def test_peft_entry_points_have_the_names_nf4tune_stops_on():
    """models/peft_compat.py tells PEFT's `prepare_model_for_kbit_training`, `get_peft_model` and
    `BaseTuner.inject_adapter` by their names on the call stack, to stop them with one sentence (behaviour:
    test_trainer_compat.py::test_peft_habits_stop_with_one_sentence_or_work)."""
    peft = pytest.importorskip("peft", reason="peft is a dev extra")
    from peft.tuners.tuners_utils import BaseTuner

    from nf4tune.models.peft_compat import _PEFT_ENTRY_POINTS

    found = {peft.prepare_model_for_kbit_training, peft.get_peft_model, BaseTuner.inject_adapter}
    assert {f.__name__ for f in found} == _PEFT_ENTRY_POINTS and all(f.__module__.startswith("peft") for f in found), (
        "PEFT renamed or moved an entry point nf4tune stops on: it would freeze or re-wrap the 4-bit adapters.")


def test_gguf_reader_and_rope_helpers_are_where_nf4tune_imports_them():
    """GGUF in (checkpoint/gguf.py) uses transformers' GGUF reader `modeling_gguf_pytorch_utils`
    (`load_gguf_checkpoint`, `TENSOR_PROCESSORS`, `TensorProcessor`); GGUF out (checkpoint/gguf_arch.py)
    uses `modeling_rope_utils.ROPE_INIT_FUNCTIONS` for llama3 / longrope scaling (behaviour: test_gguf.py)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert callable(gguf_utils.load_gguf_checkpoint) and isinstance(gguf_utils.TENSOR_PROCESSORS, dict) \
        and inspect.isclass(gguf_utils.TensorProcessor), "transformers moved its GGUF reader: .gguf inputs fail to load."
    assert {"llama3", "longrope"} <= set(ROPE_INIT_FUNCTIONS), (
        "transformers renamed its rope initialisers: GGUF export of llama3 / longrope scaled models fails.")
    assert callable(ROPE_INIT_FUNCTIONS["llama3"]) and callable(ROPE_INIT_FUNCTIONS["longrope"])


def test_transformers_conversion_mapping_streams_one_tensor_at_a_time():
    """transformers' checkpoint conversion (`conversion_mapping.get_model_conversion_mapping`, and of
    `core_model_loading`: `WeightConverter` with `.operations`, `.source_patterns`, `.target_patterns`,
    `WeightTransform.rename_source_key`, `ConversionOps.convert(dict, source_patterns=, target_patterns=)`):
    nf4tune's KeyConverter (checkpoint/expert_keys.py) applies them one tensor at a time, so MoE checkpoints
    (per-expert keys) load fused and streamed; if these change, every MoE checkpoint fails to load
    (behaviour: tests/test_moe.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    config = AutoConfig.for_model("qwen3_moe", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=8, num_experts=2, moe_intermediate_size=8)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    converters = [t for t in get_model_conversion_mapping(model, add_legacy=False) if isinstance(t, WeightConverter)]
    key = "model.layers.0.mlp.experts.1.up_proj.weight"
    found = [(c, *c.rename_source_key(key)) for c in converters]
    matched = [(c, target, pattern) for c, target, pattern in found if pattern is not None]
    assert matched and matched[0][1] == "model.layers.0.mlp.experts.gate_up_proj", (
        "transformers' conversion mapping no longer renames per-expert keys to the fused parameter this way: "
        "nf4tune's KeyConverter cannot fuse MoE checkpoints.")
    converter = matched[0][0]
    collected = {p: [torch.zeros(8, 16), torch.ones(8, 16)] for p in converter.source_patterns}
    for op in converter.operations:
        collected = op.convert(collected, source_patterns=converter.source_patterns,
                               target_patterns=converter.target_patterns, full_layer_name=matched[0][1])
    (fused,) = collected.values()
    assert fused.shape == (2, 16, 16), "transformers' expert fusing operations changed their arguments or results."


def test_experts_interface_takes_a_registered_forward():
    """`transformers.integrations.moe.ExpertsInterface.register(name, forward)` and
    `PreTrainedModel.set_experts_implementation(name)`: the MoE experts modules compute nf4tune's 4-bit
    forward (layers/experts4bit.py) through them; if they change, MoE models compute with missing
    weights (behaviour: tests/test_moe.py)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from nf4tune.layers.experts4bit import EXPERTS_IMPLEMENTATION, experts_forward, register

    register()
    assert ALL_EXPERTS_FUNCTIONS.get_interface(EXPERTS_IMPLEMENTATION, None) is experts_forward, (
        "transformers' ExpertsInterface no longer returns a registered experts forward: nf4tune's 4-bit experts "
        "are not called.")


def test_cpu_flash_attention_ops_and_the_mask_interfaces_argument_names():
    """layers/chunked_attention.py calls PyTorch's CPU flash-attention ops (`aten::_scaled_dot_product_flash_attention_
    for_cpu` and its backward) to keep a causal attention's output and log-sum-exp through a checkpoint, and calls
    transformers' `sdpa` mask function with its keyword arguments block by block (behaviour: test_long_context.py)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    from nf4tune.layers.chunked_attention import _flash_cpu

    assert _flash_cpu() is not None, (
        "PyTorch dropped its CPU flash-attention ops: long causal steps on CPU recompute attention again (slower).")
    q = torch.randn(1, 2, 8, 4)
    out, lse = _flash_cpu()[0](q, q, q, 0.0, True, scale=0.5)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.5))
    params = inspect.signature(ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]).parameters
    assert {"q_offset", "kv_offset", "mask_function", "attention_mask", "allow_is_causal_skip", "use_vmap"} <= set(params), (
        "transformers renamed the sdpa mask function's arguments: nf4tune_chunked cannot evaluate masks by block.")
