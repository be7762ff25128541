"""Model and LoRA adapter folders: local or s3:// (cached per node), safe loading (safetensors only), tiny
from-config models."""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable

import pyarrow.fs as pafs

from metaaligner import storage as st
from metaaligner.storage import Storage

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # a PEFT LoRA folder, safetensors only


def cache_root() -> Path:
    return Path(os.environ.get("METAALIGNER_CACHE", Path(tempfile.gettempdir()) / "metaaligner-cache"))


def list_model_files(uri: str, storage: Storage) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime) of a model folder's files, or a clear error (missing, no config.json, no safetensors)."""
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"model folder not found: {uri}")
    files = {i.path[len(path):].lstrip("/"): (i.size or 0, i.mtime_ns or 0)
             for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File}
    if "config.json" not in files:
        raise FileNotFoundError(f"{uri}: not a model folder (no config.json)")
    if not any(n.endswith(".safetensors") for n in files):
        raise ValueError(f"{uri}: no *.safetensors weights; only safetensors are loaded (convert .bin/.pt first)")
    return files


def local_model_dir(uri: str, storage: Storage, weights: bool = True, cache_dir: str | Path | None = None) -> Path:
    """The folder itself when local; else a per-node cached copy under `cache_dir` (default: cache_root()/models);
    weights=False copies config + tokenizer only."""
    if not st.is_s3(uri):
        list_model_files(uri, storage)
        return Path(uri).expanduser().resolve()
    files = list_model_files(uri, storage)
    names = sorted(n for n in files if weights or not n.endswith(WEIGHT_SUFFIXES))
    return _cached_copy(uri, storage, files, names, cache_dir)


def _cached_copy(uri: str, storage: Storage, files: dict[str, tuple[int, int]], names: list[str],
                 cache_dir: str | Path | None) -> Path:
    """`names` of the s3:// folder `uri` copied once per node (keyed by their sizes and times)."""
    digest = hashlib.sha256(repr((uri, [(n, files[n]) for n in names])).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / digest if cache_dir else cache_root() / "models" / digest
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one copy per node even with 8 workers starting together
        if not (folder / ".complete").exists():
            fs, path = storage.filesystem(uri)
            local = pafs.LocalFileSystem()
            for name in names:
                pafs.copy_files(f"{path}/{name}", str(folder / name), source_filesystem=fs, destination_filesystem=local)
            (folder / ".complete").write_text(uri)
    return folder


def list_adapter_files(uri: str, storage: Storage) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime) of a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), or a
    clear error."""
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"adapter folder not found: {uri}")
    files = {i.path[len(path):].lstrip("/"): (i.size or 0, i.mtime_ns or 0)
             for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File}
    missing = [n for n in ADAPTER_FILES if n not in files]
    if missing:
        raise FileNotFoundError(f"{uri}: not a PEFT adapter folder (missing {missing}; safetensors only)")
    return files


def local_adapter_dir(uri: str, storage: Storage, cache_dir: str | Path | None = None) -> Path:
    """An adapter folder: itself when local, else a per-node cached copy of its two files."""
    files = list_adapter_files(uri, storage)
    if not st.is_s3(uri):
        return Path(uri).expanduser().resolve()
    return _cached_copy(uri, storage, files, list(ADAPTER_FILES), cache_dir)


def check_model_folder(path: str | Path) -> Path:
    """A local Hugging Face folder with config.json and safetensors weights, or a clear error."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no *.safetensors weights; only safetensors are loaded (convert .bin/.pt first)")
    return folder


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, padding_side=padding_side)
    if tok.eos_token_id is None:
        raise ValueError(f"{path}: tokenizer has no EOS token")
    if tok.pad_token_id is None:  # LLaMA convention of the reference code: pad = unk
        if tok.unk_token_id is None:
            raise ValueError(f"{path}: tokenizer has neither a pad nor an unk token to pad with")
        tok.pad_token = tok.unk_token
    return tok


def load_model(path: str | Path, trust_remote_code: bool = False, dtype=None, device: str | None = None):
    """AutoModelForCausalLM from a checked local folder, safetensors only."""
    from transformers import AutoModelForCausalLM

    folder = check_model_folder(path)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), use_safetensors=True, trust_remote_code=trust_remote_code, dtype=dtype
    )
    return model.to(device) if device else model


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer trained locally (nothing is downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)


def create_tiny_model(
    folder: str | Path,
    texts: Iterable[str],
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a randomly initialised tiny Llama + locally trained tokenizer as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 4,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
