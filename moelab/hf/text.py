"""User text for profiling and fine-tuning: files/folders -> domains -> token-id sequences.

Each ``--data`` path is one domain, named after the file stem or folder name. A folder
contributes its ``.txt``/``.md``/``.jsonl``/``.json`` files (sorted, recursively). Text is
tokenised with the model's own tokenizer when one is saved beside the model; otherwise with a
byte fallback (UTF-8 byte value modulo the vocabulary size), which is enough to exercise the
routers of a random test model but meaningless for a real one (a warning says so).

Shape legend: B sequences, L sequence length.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".json")

Tokenize = Callable[[str], list[int]]


@dataclass(frozen=True)
class Domain:
    """One ``--data`` path: its name and its documents' texts."""

    name: str
    texts: tuple[str, ...]


def load_domains(paths: list[str | Path]) -> list[Domain]:
    """Read every path as one domain; a clear ``ValueError`` for a missing or empty path."""
    domains, seen = [], set()
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(f"--data {str(path)!r} does not exist")
        texts = tuple(
            t for t in (f.read_text(encoding="utf-8", errors="replace") for f in files) if t
        )
        if not texts:
            raise ValueError(
                f"--data {str(path)!r} holds no text ({'/'.join(TEXT_SUFFIXES)} files)"
            )
        name = path.stem if path.is_file() else path.name
        if name in seen:  # two paths with the same name stay two domains
            name = f"{name}#{len(domains)}"
        seen.add(name)
        domains.append(Domain(name, texts))
    if not domains:
        raise ValueError("no --data path given")
    return domains


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_hf_tokenizer(model_path: str | Path) -> Any | None:
    """The tokenizer saved with the model (``AutoTokenizer``), or None when there is none.

    A local folder must hold tokenizer files: transformers 5 otherwise builds an *empty*
    tokenizer of the model's type, which encodes every text to nothing.
    """
    path = Path(model_path)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_path))
    except Exception:  # no tokenizer files, or the hub is unreachable
        return None
    return tok if len(tok) > 1 else None


def model_tokenizer(model_path: str | Path, vocab_size: int) -> Tokenize:
    """The tokenizer saved with the model, or the byte fallback (with a warning on stderr)."""
    tok = load_hf_tokenizer(model_path)
    if tok is None:
        print(
            f"moelab.hf: no tokenizer saved with {model_path}; using bytes modulo vocab_size "
            f"({vocab_size}) as token ids (only meaningful for test models)",
            file=sys.stderr,
        )
        return lambda text: byte_tokens(text, vocab_size)
    eos = tok.eos_token_id
    return lambda text: (
        tok(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    )


def byte_tokens(text: str, vocab_size: int) -> list[int]:
    """UTF-8 bytes modulo ``vocab_size``: the fallback tokenizer for test models."""
    return [b % vocab_size for b in text.encode("utf-8")]


def domain_stream(domain: Domain, tokenize: Tokenize, max_tokens: int | None = None) -> Tensor:
    """All documents of a domain tokenised and concatenated: ``(N,)`` int64, at most max_tokens."""
    ids: list[int] = []
    for text in domain.texts:
        ids.extend(tokenize(text))
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)


def batches(stream: Tensor, seq_len: int, batch_size: int) -> Iterator[Tensor]:
    """Cut a token stream into ``(B, L)`` batches; the tail becomes one shorter sequence.

    No padding, so every token the router sees is real text.
    """
    n_full = stream.numel() // seq_len
    full_NL = stream[: n_full * seq_len].view(n_full, seq_len)
    for start in range(0, n_full, batch_size):
        yield full_NL[start : start + batch_size]
    tail = stream[n_full * seq_len :]
    if tail.numel():
        yield tail[None]
