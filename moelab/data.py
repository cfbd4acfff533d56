"""Text domains, a byte-level BPE tokenizer, an on-disk cache and deterministic batching.

Shape legend: ``B`` sequences, ``L`` sequence length, ``N`` tokens of one domain split.

A *domain* is one kind of text. The builtin corpus has four: three vendored xz files in
``moelab/corpus/`` and the Python standard library (``code_stdlib``); each user path given in
``DataConfig.sources`` (a file, a folder or a glob) adds one more. Every domain is split into a
training head and a validation tail, each capped by evenly spaced chunks; the tokenizer is trained
on the training text of the training domains only. Tokenizer and token ids are cached on disk.
"""

from __future__ import annotations

import codecs
import functools
import glob
import hashlib
import json
import lzma
import math
import os
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np
import tokenizers
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moelab.config import _check_literals, check_choice, check_range

EOT = "<|endoftext|>"  # document separator, the tokenizer's only special token
TOKENIZER_VERSION = "moelab-bytelevel-bpe-v1"  # bump when tokenisation changes: new cache keys
CORPUS_DIR = Path(__file__).parent / "corpus"
BUILTIN_DOMAINS = ("literary_shakespeare", "literary_kjv", "technical_python_docs", "code_stdlib")
# Generated domains, chosen by name in ``data.domains`` (never part of the default set).
# synthetic_uniform: i.i.d. uniform characters of SYNTHETIC_ALPHABET in lines of SYNTHETIC_LINE
# characters + a newline: no causal model can beat SYNTHETIC_NATS_PER_CHAR on it, so a lower
# loss proves that routing leaked future tokens (Wang et al. 2024 §5.2).
SYNTHETIC_DOMAINS = ("synthetic_uniform",)
SYNTHETIC_ALPHABET = "abcdefghijklmnopqrstuvwxyz .,;:!"
SYNTHETIC_LINE = 63
SYNTHETIC_CHARS = 2_000_000
SYNTHETIC_NATS_PER_CHAR = SYNTHETIC_LINE / (SYNTHETIC_LINE + 1) * math.log(len(SYNTHETIC_ALPHABET))
BYTE_ALPHABET = pre_tokenizers.ByteLevel.alphabet()  # the 256 byte symbols
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
_CHUNK_CHARS = 20_000  # size of the evenly spaced chunks that cap a long domain
_PIECE_CHARS = 1 << 16  # text is encoded in pieces of about this size, cut at line ends


@dataclass(frozen=True)
class DataConfig:
    """Which text to train on, how to tokenise it and how to batch it.

    sources: ``"builtin"`` (the four builtin domains) and/or paths: a text file, a folder (all
        text files below it, sorted) or a glob. Each path is one domain named after the file
        stem / folder name (``.xz`` files are decompressed).
    domains: the builtin domains to use (empty = all of ``BUILTIN_DOMAINS``; the generated
        ``SYNTHETIC_DOMAINS`` only when named).
    vocab_size: BPE vocabulary size including the 256 bytes and ``<|endoftext|>``.
    seq_len: tokens per training sequence.
    max_chars_per_domain: cap on each domain's characters (train + val), taken as evenly
        spaced chunks so that a long domain keeps its variety; keeps tokenisation fast.
    val_fraction: share of each domain held out as validation, a contiguous tail.
    batch_mode: ``mixed`` (every sequence draws its domain, proportional to domain size),
        ``single_domain`` (one domain per batch, drawn the same way) or ``grouped`` (each run
        of ``domain_group`` consecutive sequences draws one domain: with micro-batches of that
        many sequences, every micro-batch is single-domain and the global batch mixed; the
        count-matched control of Qiu et al.'s shuffle).
    domain_group: sequences per same-domain group in ``grouped`` mode.
    holdout_domains: domains never trained on (not even by the tokenizer); all their text is
        validation (leave-one-domain-out experiments).
    cache_dir: tokenizer / token cache; empty = ``$MOELAB_CACHE`` or ``~/.cache/moelab``.
    """

    _prefix = "data"

    sources: tuple[str, ...] = ("builtin",)
    domains: tuple[str, ...] = ()
    vocab_size: int = 4096
    seq_len: int = 256
    max_chars_per_domain: int = 2_000_000
    val_fraction: float = 0.05
    batch_mode: Literal["mixed", "single_domain", "grouped"] = "mixed"
    domain_group: int = 4
    holdout_domains: tuple[str, ...] = ()
    cache_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("sources", "domains", "holdout_domains"):
            object.__setattr__(self, name, _as_names(f"data.{name}", getattr(self, name)))
        _check_literals(self)
        if not self.sources:
            raise ValueError("data.sources=() is empty; allowed: 'builtin' and/or text paths")
        check_range("data.vocab_size", self.vocab_size, lo=len(BYTE_ALPHABET) + 1)
        check_range("data.seq_len", self.seq_len, lo=1)
        check_range("data.max_chars_per_domain", self.max_chars_per_domain, lo=1000)
        check_range("data.val_fraction", self.val_fraction, lo=0, hi=0.5, lo_open=True)
        check_range("data.domain_group", self.domain_group, lo=1)
        if self.domains and "builtin" not in self.sources:
            raise ValueError(
                f"data.domains={list(self.domains)} selects builtin domains but data.sources "
                "has no 'builtin'; add 'builtin' to data.sources or leave data.domains empty"
            )
        _check_names("data.domains", self.domains, BUILTIN_DOMAINS + SYNTHETIC_DOMAINS)
        if self.sources == ("builtin",):  # user domain names are known only when loading
            _check_holdout(self.holdout_domains, list(self.domains or BUILTIN_DOMAINS))


def _as_names(field: str, value: object) -> tuple[str, ...]:
    """A str or a list of strs as a tuple (TOML and the CLI give lists)."""
    value = (value,) if isinstance(value, str) else value
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{field}={value!r} is not allowed; give a list of non-empty strings")
    return tuple(value)


def absolute_path(spec: str) -> str:
    """A data path (file, folder or glob; ``~`` expanded) made absolute against the working
    directory, so a run's config.json names the same text from any directory; ``builtin`` and
    an empty string stay as they are."""
    if spec in ("builtin", ""):
        return spec
    return os.path.abspath(os.path.expanduser(spec))


def _check_names(field: str, names: tuple[str, ...], allowed: list[str] | tuple[str, ...]) -> None:
    for name in names:
        check_choice(field, name, tuple(allowed))


def _check_holdout(holdout: tuple[str, ...], names: list[str]) -> None:
    _check_names("data.holdout_domains", holdout, names)
    if set(names) <= set(holdout):
        raise ValueError(
            f"data.holdout_domains={list(holdout)} holds out every domain; keep at least one "
            f"of {names} for training"
        )


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Source:
    """One domain: its name and its files (read in this order, joined by ``EOT``)."""

    name: str
    files: tuple[Path, ...]

    def digest(self) -> str:
        """sha256 of the raw bytes (compressed for .xz) of the files: cheap and exact."""
        h = hashlib.sha256()
        if self.name in SYNTHETIC_DOMAINS:  # generated: its recipe is its content
            recipe = [self.name, SYNTHETIC_ALPHABET, SYNTHETIC_LINE, SYNTHETIC_CHARS, 0]
            return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()
        for path in self.files:
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
        return h.hexdigest()

    def text(self) -> str:
        if self.name in SYNTHETIC_DOMAINS:
            return synthetic_text()
        text = EOT.join(_read_text(p) for p in self.files)
        if not text.strip():
            raise ValueError(f"data domain {self.name!r} has no text; give non-empty text files")
        return text


def synthetic_text(n_chars: int = SYNTHETIC_CHARS, seed: int = 0) -> str:
    """The ``synthetic_uniform`` domain: i.i.d. uniform characters of ``SYNTHETIC_ALPHABET``,
    ``SYNTHETIC_LINE`` per line, each line ended by a newline (deterministic in ``seed``)."""
    rng = np.random.default_rng(seed)
    n_lines = n_chars // (SYNTHETIC_LINE + 1)
    idx_NL = rng.integers(0, len(SYNTHETIC_ALPHABET), size=(n_lines, SYNTHETIC_LINE))
    rows = np.array(list(SYNTHETIC_ALPHABET))[idx_NL]
    return "".join("".join(r) + "\n" for r in rows)


def _read_text(path: Path) -> str:
    if path.suffix == ".xz":
        with lzma.open(path, "rt", encoding="utf-8", errors="replace") as f:
            return f.read()
    return path.read_text(encoding="utf-8", errors="replace")


def _looks_text(path: Path) -> bool:
    """True unless the first KB has a NUL byte or invalid UTF-8 (after xz decompression)."""
    try:
        opener = lzma.open if path.suffix == ".xz" else open
        with opener(path, "rb") as f:
            head = f.read(1024)
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except (UnicodeDecodeError, lzma.LZMAError, EOFError):
        return False
    return b"\0" not in head


def _check_text_file(path: Path, spec: str) -> None:
    if path.stat().st_size == 0:
        raise ValueError(f"data path {spec!r} is empty; give a non-empty text file")
    if not _looks_text(path):
        raise ValueError(f"data path {spec!r} looks binary (not UTF-8 text); give text files")


def _domain_name(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".xz") else path.name
    return Path(name).stem if path.is_file() else name


def _user_source(spec: str) -> _Source:
    """One user path (file, folder or glob) as a domain; ValueError says what to fix."""
    if any(c in spec for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not files:
            raise ValueError(f"data glob {spec!r} matches no files; check the pattern")
        for path in files:
            _check_text_file(path, str(path))
        plain = [part for part in Path(spec).parts[:-1] if not any(c in part for c in "*?[")]
        return _Source(plain[-1] if plain else "glob", tuple(files))
    path = Path(spec).expanduser()
    if not path.exists():
        raise ValueError(f"data path {spec!r} does not exist; give a text file, folder or glob")
    if path.is_file():
        _check_text_file(path, spec)
        return _Source(_domain_name(path), (path,))
    files = [
        p
        for p in sorted(path.rglob("*"))
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
        and p.stat().st_size > 0
        and _looks_text(p)
    ]
    if not files:
        raise ValueError(f"data folder {spec!r} has no non-empty text files; add some")
    return _Source(_domain_name(path.resolve()), tuple(files))


def _stdlib_files() -> tuple[Path, ...]:
    """The standard library's non-test ``*.py`` files, sorted (the ``code_stdlib`` domain)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        keep = [n for n in sorted(names) if n.endswith(".py") and not n.startswith("test_")]
        files += [Path(folder, n) for n in keep]
    return tuple(files)


def _discover(cfg: DataConfig) -> list[_Source]:
    """All domains of ``cfg.sources`` in order; duplicate names are an error."""
    sources: list[_Source] = []
    for spec in cfg.sources:
        if spec != "builtin":
            sources.append(_user_source(spec))
            continue
        for name in cfg.domains or BUILTIN_DOMAINS:
            if name in SYNTHETIC_DOMAINS:
                files = ()
            elif name == "code_stdlib":
                files = _stdlib_files()
            else:
                files = (CORPUS_DIR / f"{name}.txt.xz",)
            sources.append(_Source(name, files))
    names = [s.name for s in sources]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(
                f"two data sources are both named {name!r} (a domain is named after its file "
                "stem / folder name); rename one of them"
            )
    return sources


# ----------------------------------------------------------------------------- text preparation


def _line_start(text: str, i: int) -> int:
    """The first line start at or after ``i`` (within 1000 chars; else ``i`` itself)."""
    if i <= 0 or text[i - 1] == "\n":
        return max(i, 0)
    j = text.find("\n", i, i + 1000)
    return i if j < 0 else j + 1


def _cap(text: str, max_chars: int) -> str:
    """At most ``max_chars`` characters of ``text`` as evenly spaced chunks joined by ``EOT``."""
    if len(text) <= max_chars:
        return text
    n = -(-max_chars // _CHUNK_CHARS)
    size = max_chars // n
    chunks = []
    for start in np.linspace(0, len(text) - size, n).astype(int):
        a = _line_start(text, int(start))
        end = text.rfind("\n", a, a + size)
        chunks.append(text[a : end + 1 if end >= 0 else a + size])
    return EOT.join(chunks)


def _split(text: str, cfg: DataConfig, holdout: bool) -> tuple[str, str]:
    """(train, val) text of a domain: a head and a disjoint tail, each capped."""
    if holdout:
        return "", _cap(text, cfg.max_chars_per_domain)
    cut = _line_start(text, int(len(text) * (1 - cfg.val_fraction)))
    train_chars = int(cfg.max_chars_per_domain * (1 - cfg.val_fraction))
    return _cap(text[:cut], train_chars), _cap(text[cut:], cfg.max_chars_per_domain - train_chars)


def _pieces(text: str) -> Iterator[str]:
    """``text`` cut after a newline every ~64K chars (never inside ``EOT``)."""
    i = 0
    while i < len(text):
        j = text.find("\n", i + _PIECE_CHARS)
        j = len(text) if j < 0 else j + 1
        yield text[i:j]
        i = j


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer (GPT-2 style) with ``<|endoftext|>`` as id 0."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=BYTE_ALPHABET,
        show_progress=False,
    )
    docs = (piece for text in texts for doc in text.split(EOT) for piece in _pieces(doc))
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def _encode(tok: Tokenizer, text: str) -> np.ndarray:
    """Token ids (N,) of ``text``, uint16 when the vocabulary fits, else uint32."""
    dtype = np.uint16 if tok.get_vocab_size() < 2**16 else np.uint32
    encodings = tok.encode_batch(list(_pieces(text)), add_special_tokens=False)
    return np.concatenate([np.zeros(0, dtype)] + [np.asarray(e.ids, dtype) for e in encodings])


# ----------------------------------------------------------------------------- cache


def cache_root(cfg: DataConfig) -> Path:
    """Folder of the data cache: ``cfg.cache_dir``, ``$MOELAB_CACHE`` or ``~/.cache/moelab``."""
    base = cfg.cache_dir or os.environ.get("MOELAB_CACHE") or "~/.cache/moelab"
    return Path(base).expanduser() / "data"


def _sha(payload: object) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write via a temporary file and ``os.replace`` so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _rebuild_note(path: Path, why: str) -> None:
    print(
        f"moelab: data cache entry {str(path)!r} is damaged ({why}); rebuilding it", file=sys.stderr
    )


def _cached_tokenizer(path: Path) -> Tokenizer | None:
    """The cached tokenizer, or None when it is missing or damaged (a note names the file)."""
    if not path.exists():
        return None
    try:
        return Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        _rebuild_note(path, f"{type(exc).__name__}: {str(exc)[:80]}")
        return None


def _cached_ids(path: Path, vocab_size: int) -> np.ndarray | None:
    """Cached token ids (N,), or None when missing or damaged: unreadable, not 1-D unsigned
    ids, or ids outside the vocabulary (a note names the file)."""
    if not path.exists():
        return None
    try:
        ids = np.load(path)
    except (OSError, ValueError, EOFError) as exc:
        _rebuild_note(path, f"{type(exc).__name__}: {str(exc)[:80]}")
        return None
    if ids.ndim != 1 or ids.dtype not in (np.uint16, np.uint32):
        _rebuild_note(path, f"{ids.dtype} array of shape {ids.shape}, expected 1-D token ids")
        return None
    if ids.size and int(ids.max()) >= vocab_size:
        _rebuild_note(path, f"token id {int(ids.max())} >= the vocabulary's {vocab_size}")
        return None
    return ids


# ----------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Tokenised domains. ``train`` has the training domains only; ``val`` has every domain.

    Domain labels in batches are indices into ``domains``; ``holdout`` lists the domains that
    were never trained on (all their text is in ``val``).
    """

    domains: list[str]
    tokenizer: Tokenizer
    train: dict[str, np.ndarray]  # name -> (N,) uint16/uint32 ids
    val: dict[str, np.ndarray]  # name -> (N,) uint16/uint32 ids
    holdout: tuple[str, ...] = ()
    digest: str = ""  # of the sources' bytes and the data settings: same digest, same ids

    @property
    def vocab_size(self) -> int:
        """Actual vocabulary size (at most ``DataConfig.vocab_size``; less on tiny corpora)."""
        return self.tokenizer.get_vocab_size()

    @property
    def eot_id(self) -> int:
        return self.tokenizer.token_to_id(EOT)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | np.ndarray | torch.Tensor) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_corpus(cfg: DataConfig) -> Corpus:
    """Read, split, tokenise and cache the domains of ``cfg`` (a cache hit only reads files)."""
    sources = _discover(cfg)
    names = [s.name for s in sources]
    _check_holdout(cfg.holdout_domains, names)
    holdout = set(cfg.holdout_domains)
    digests = {s.name: s.digest() for s in sources}
    settings = [cfg.vocab_size, cfg.max_chars_per_domain, cfg.val_fraction, TOKENIZER_VERSION]
    settings.append(tokenizers.__version__)
    train_names = [n for n in names if n not in holdout]
    tok_key = _sha([[[n, digests[n]] for n in train_names], settings])
    folder = cache_root(cfg) / tok_key[:24]

    by_name = {s.name: s for s in sources}

    @functools.cache
    def texts(name: str) -> tuple[str, str]:  # read only on a cache miss
        return _split(by_name[name].text(), cfg, name in holdout)

    tok_path = folder / "tokenizer.json"
    tokenizer = _cached_tokenizer(tok_path)
    if tokenizer is None:
        tokenizer = train_tokenizer([texts(n)[0] for n in train_names], cfg.vocab_size)
        _atomic_write(tok_path, lambda f: f.write(tokenizer.to_str().encode("utf-8")))

    splits: dict[str, dict[str, np.ndarray]] = {"train": {}, "val": {}}
    for name in names:
        ids_key = _sha([tok_key, name, digests[name], name in holdout, settings])[:24]
        for i, split in enumerate(("train", "val")):
            if split == "train" and name in holdout:
                continue
            path = folder / f"ids-{ids_key}.{split}.npy"
            ids = _cached_ids(path, tokenizer.get_vocab_size())
            if ids is None:
                ids = _encode(tokenizer, texts(name)[i])
                _atomic_write(path, lambda f, ids=ids: np.save(f, ids))
            splits[split][name] = ids
    digest = _sha([[[n, digests[n]] for n in names], sorted(holdout), settings])[:24]
    holdout_ = tuple(cfg.holdout_domains)
    return Corpus(names, tokenizer, splits["train"], splits["val"], holdout_, digest)


# ----------------------------------------------------------------------------- batching


@dataclass(frozen=True)
class Batch:
    """Sequences with their next-token targets and domain labels (indices into Corpus.domains)."""

    tokens: torch.Tensor  # (B, L) int64 input ids
    targets: torch.Tensor  # (B, L) int64 next-token ids
    domains: torch.Tensor  # (B,) int64 domain index

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def _rows(self, start: int, stop: int) -> Batch:
        return Batch(self.tokens[start:stop], self.targets[start:stop], self.domains[start:stop])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.tokens.to(device), self.targets.to(device), self.domains.to(device))

    def split(self, num_micro: int) -> list[Batch]:
        """``num_micro`` equal micro-batches of consecutive sequences (for grad accumulation)."""
        if num_micro < 1 or len(self) % num_micro:
            raise ValueError(
                f"cannot split a batch of {len(self)} sequences into {num_micro} micro-batches; "
                f"allowed: a divisor of {len(self)}"
            )
        size = len(self) // num_micro
        return [self._rows(i * size, (i + 1) * size) for i in range(num_micro)]

    def shard(self, rank: int, world: int) -> Batch:
        """The contiguous share of sequences of data-parallel ``rank`` out of ``world``."""
        if not 0 <= rank < world:
            raise ValueError(f"rank={rank} is out of range; allowed: 0 <= rank < world={world}")
        return self.split(world)[rank]


def _batch(windows_BL1: np.ndarray, labels_B: np.ndarray) -> Batch:
    """Batch from windows of L+1 tokens: inputs are the first L, targets the last L."""
    w = torch.from_numpy(windows_BL1.astype(np.int64))  # (B, L+1)
    return Batch(w[:, :-1].contiguous(), w[:, 1:].contiguous(), torch.from_numpy(labels_B))


class Batcher:
    """Global training batches of random windows; batch ``step`` depends only on (seed, step).

    ``mixed``: each sequence draws its domain with probability proportional to the domain's
    training tokens; ``single_domain``: one such draw per batch; ``grouped``: one draw per run
    of ``group`` consecutive sequences. Resume with ``load_state_dict``.
    """

    def __init__(
        self,
        corpus: Corpus,
        *,
        batch_size: int,
        seq_len: int,
        mode: str = "mixed",
        seed: int = 0,
        group: int = 4,
    ) -> None:
        check_choice("data.batch_mode", mode, ("mixed", "single_domain", "grouped"))
        check_range("data.domain_group", group, lo=1)
        self.group = group
        check_range("batch_size", batch_size, lo=1)
        check_range("seq_len", seq_len, lo=1)
        self.names = list(corpus.train)
        if not self.names:
            raise ValueError("the corpus has no training domains; hold out fewer domains")
        for name in self.names:
            if len(corpus.train[name]) < seq_len + 1:
                raise ValueError(
                    f"domain {name!r} has {len(corpus.train[name])} training tokens, fewer than "
                    f"seq_len+1={seq_len + 1}; lower seq_len or give more text"
                )
        self.batch_size, self.seq_len, self.mode, self.seed = batch_size, seq_len, mode, seed
        self.step = 0
        self._arrays = [corpus.train[n] for n in self.names]
        self._labels = np.array([corpus.domains.index(n) for n in self.names], dtype=np.int64)
        sizes = np.array([len(a) for a in self._arrays], dtype=np.float64)
        self._probs = sizes / sizes.sum()

    def batch_at(self, step: int) -> Batch:
        """The global batch number ``step`` (pure: does not move the position)."""
        rng = np.random.default_rng([self.seed, step])
        B, L = self.batch_size, self.seq_len
        if self.mode == "mixed":
            which_B = rng.choice(len(self.names), size=B, p=self._probs)
        elif self.mode == "grouped":
            n_groups = -(-B // self.group)
            which_G = rng.choice(len(self.names), size=n_groups, p=self._probs)
            which_B = np.repeat(which_G, self.group)[:B]
        else:
            which_B = np.full(B, rng.choice(len(self.names), p=self._probs))
        lengths_B = np.array([len(self._arrays[d]) for d in which_B])
        starts_B = rng.integers(0, lengths_B - L)  # window [start, start+L] fits
        pairs = zip(which_B, starts_B, strict=True)
        windows_BL1 = np.stack([self._arrays[d][s : s + L + 1] for d, s in pairs])
        return _batch(windows_BL1, self._labels[which_B])

    def next(self) -> Batch:
        """The next global batch."""
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int | str]:
        return {"step": self.step, "seed": self.seed, "mode": self.mode}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Resume at ``state["step"]``; seed and mode must match for the same continuation."""
        for key in ("seed", "mode"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"batcher state has {key}={state[key]!r} but this batcher has "
                    f"{getattr(self, key)!r}; build it with the same {key} to resume"
                )
        self.step = int(state["step"])


def val_batches(
    corpus: Corpus, *, batch_size: int, seq_len: int, domains: list[str] | None = None
) -> Iterator[Batch]:
    """Each domain's validation split once, as consecutive non-overlapping windows.

    Domain order follows ``domains`` (default: all of ``corpus.domains``, holdout included);
    a domain's last partial window is dropped. Batches may hold several domains (see
    ``Batch.domains``); the final batch may have fewer than ``batch_size`` sequences.
    """
    names = corpus.domains if domains is None else list(domains)
    _check_names("domains", tuple(names), corpus.domains)
    inputs, targets, labels = [], [], []
    for name in names:
        ids_N = corpus.val[name].astype(np.int64)
        n = max(len(ids_N) - 1, 0) // seq_len
        inputs.append(ids_N[: n * seq_len].reshape(n, seq_len))
        targets.append(ids_N[1 : n * seq_len + 1].reshape(n, seq_len))
        labels.append(np.full(n, corpus.domains.index(name), dtype=np.int64))
    x, y, d = (torch.from_numpy(np.concatenate(a)) for a in (inputs, targets, labels))
    for i in range(0, len(d), batch_size):
        yield Batch(x[i : i + batch_size], y[i : i + batch_size], d[i : i + batch_size])
