"""The tokenizer side of a GGUF export: llama.cpp's vocabulary, merges, pre-tokenizer, special tokens and chat
template, copied from a source GGUF or made from a transformers fast tokenizer, padded to the embedding's rows; and
the check that the vocabulary and the embedding / output tensors agree, as llama.cpp requires."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from ..errors import Nf4tuneError
from .gguf import require_gguf

log = logging.getLogger("nf4tune")


def padded_vocabulary(tokens: list, scores: list | None, types: list, n_vocab: int) -> tuple[list, list | None, list]:
    """(tokens, scores, types) grown to `n_vocab` entries as llama.cpp's converter grows them: an unused "[PAD{id}]"
    token for each embedding row no token names (Qwen2.5 and Qwen3 round their embeddings up well past their
    tokenizers), so llama.cpp, which sizes token_embd by the vocabulary, accepts the file. A vocabulary larger than
    the embedding is refused."""
    gguf = require_gguf()
    if len(tokens) > n_vocab:
        raise Nf4tuneError(f"the tokenizer has {len(tokens)} tokens but the model's embedding has {n_vocab} rows, so "
                           "llama.cpp cannot run it; export with the tokenizer the model was trained with.")
    pad = range(len(tokens), n_vocab)
    tokens = list(tokens) + [f"[PAD{i}]" for i in pad]
    types = list(types) + [int(gguf.TokenType.UNUSED)] * len(pad)
    if scores is not None:  # SentencePiece-style vocabularies: the score llama.cpp's converter gives its pads
        scores = list(scores) + [-1000.0] * len(pad)
    return tokens, scores, types


_VOCABULARY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type")


def copy_tokenizer_fields(writer, source_gguf: Path, n_vocab: int) -> None:
    """The source GGUF's tokenizer.* metadata (vocabulary, merges, pre-tokenizer, special ids, chat template) as
    they are, the vocabulary padded to `n_vocab` (the embedding of a model whose adapter added rows)."""
    gguf = require_gguf()
    from .gguf import reader

    fields = reader(source_gguf).fields
    for key, fld in fields.items():
        if not key.startswith("tokenizer.") or key in _VOCABULARY_KEYS:
            continue
        vtype = fld.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, fld.contents(), vtype, sub_type=fld.types[-1])
        else:
            writer.add_key_value(key, fld.contents(), vtype)
    tokens = fields["tokenizer.ggml.tokens"].contents()
    scores = fields["tokenizer.ggml.scores"].contents() if "tokenizer.ggml.scores" in fields else None
    types = (fields["tokenizer.ggml.token_type"].contents() if "tokenizer.ggml.token_type" in fields
             else [int(gguf.TokenType.NORMAL)] * len(tokens))
    tokens, scores, types = padded_vocabulary(tokens, scores, types, n_vocab)
    _add_vocabulary(writer, tokens, scores, types)


def _add_vocabulary(writer, tokens: list, scores: list | None, types: list) -> None:
    writer.add_token_list(tokens)
    if scores is not None:
        writer.add_token_scores(scores)
    writer.add_token_types(types)


def add_hf_tokenizer(writer, tokenizer, n_vocab: int) -> None:
    """A transformers fast tokenizer as llama.cpp's vocabulary, padded to `n_vocab` tokens (the embedding's rows):
    byte-level BPE ("gpt2", with merges) or BPE with byte fallback ("llama", SentencePiece-style scores), special
    and added tokens, chat template."""
    require_gguf()  # one sentence on how to install gguf when it is missing
    from gguf.vocab import BpeVocab, LlamaHfVocab, SpecialVocab

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tj = Path(tmp) / "tokenizer.json"
        model = json.loads(tj.read_text())["model"] if tj.is_file() else {}
        if model.get("type") != "BPE":
            raise Nf4tuneError(f"the tokenizer is a {model.get('type') or 'slow'} tokenizer; GGUF holds BPE or SentencePiece "
                               "vocabularies, so it cannot be written for llama.cpp.")
        byte_fallback = bool(model.get("byte_fallback"))
        vocab = LlamaHfVocab(Path(tmp)) if byte_fallback else BpeVocab(Path(tmp))
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        tokens, scores, types = padded_vocabulary(tokens, scores if byte_fallback else None, types, n_vocab)
        writer.add_tokenizer_model("llama" if byte_fallback else "gpt2")
        writer.add_tokenizer_pre("default" if byte_fallback else _pre_tokenizer(json.loads(tj.read_text())))
        _add_vocabulary(writer, tokens, scores, types)
        if byte_fallback and not _adds_space_prefix(json.loads(tj.read_text())):
            writer.add_add_space_prefix(False)  # llama.cpp's SentencePiece default is a "▁" in front (Gemma has none)
        SpecialVocab(Path(tmp), load_merges=not byte_fallback, n_vocab=n_vocab).add_to_gguf(writer, quiet=True)
        if tokenizer.chat_template and "tokenizer.chat_template" not in writer.kv_data[0]:
            writer.add_chat_template(tokenizer.chat_template)


def _adds_space_prefix(tokenizer_json: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "▁" in front of the text (Llama 2, Mistral: a Prepend
    normalizer, or a Metaspace pre-tokenizer that prepends), as llama.cpp assumes unless told otherwise."""
    def steps(part: dict | None, key: str) -> list[dict]:
        part = part or {}
        return part.get(key, []) if part.get("type") == "Sequence" else [part]

    for step in steps(tokenizer_json.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "▁":
            return True
    for step in steps(tokenizer_json.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never" \
                and step.get("add_prefix_space", True):
            return True
    return False


# The pre-tokenizers llama.cpp knows by name (llama-vocab.cpp), recognised from tokenizer.json: the
# regex of a Split step (with a ByteLevel step that no longer splits), or GPT-2's own ByteLevel split
# with or without single digits first. llama.cpp's converter names them by hashing a tokenization
# instead; the table here covers the families nf4tune supports.
_SPLIT_REGEX_NAMES = {
    # Llama 3 (and 3.1/3.2): numbers in runs of up to three digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    # Qwen2 / Qwen2.5: single digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}


def _pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (how text is split before BPE merges); one it
    has no name for gets llama.cpp's default split, with a warning."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2's split after single digits (SmolLM, SmolLM2)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = _SPLIT_REGEX_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    log.warning("nf4tune: the tokenizer's pre-tokenizer (%s) has no llama.cpp name known to nf4tune; llama.cpp will "
                "split text with its default rules, which may tokenize some texts differently.", " + ".join(map(str, kinds)))
    return "default"


_VOCABULARY_TENSORS = ("token_embd.weight", "output.weight")


def check_vocabulary_rows(n_tokens: int, rows: dict[str, int]) -> None:
    """llama.cpp sizes token_embd and output by the vocabulary and refuses a file whose tensors differ ("wrong shape"):
    such a file is never written."""
    for gguf_name, n in sorted(rows.items(), key=lambda item: _VOCABULARY_TENSORS.index(item[0])):
        if n != n_tokens:
            raise Nf4tuneError(f"{gguf_name} has {n} rows but the vocabulary has {n_tokens} tokens (the config's "
                               "vocab_size), so llama.cpp would refuse the file; the config does not match the weights.")
