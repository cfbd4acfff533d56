"""Tests for moelab.data: config validation, sources, splits, tokenizer cache and batching."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from moelab import data
from moelab.data import (
    BUILTIN_DOMAINS,
    EOT,
    Batch,
    Batcher,
    Corpus,
    DataConfig,
    cache_root,
    load_corpus,
    val_batches,
)

SMALL = dict(vocab_size=512, max_chars_per_domain=200_000)


@pytest.fixture(scope="session")
def builtin(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """The four builtin domains, small cap and vocabulary, in a temporary cache."""
    return load_corpus(DataConfig(cache_dir=str(tmp_path_factory.mktemp("cache")), **SMALL))


def numbered_text(n: int, tag: str = "line") -> str:
    return "".join(f"{tag} {i:05d} of the numbered text\n" for i in range(n))


def line_numbers(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"line (\d{5})", text)]


def contains_window(ids_N: np.ndarray, window: np.ndarray) -> bool:
    """True if ``window`` occurs as a contiguous run in ``ids_N``."""
    for start in np.flatnonzero(ids_N[: len(ids_N) - len(window) + 1] == window[0]):
        if np.array_equal(ids_N[start : start + len(window)], window):
            return True
    return False


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_mode="random"), r"data.batch_mode='random' is not allowed"),
        (dict(domains=("poetry",)), r"data.domains='poetry' is not allowed; choose one of"),
        (dict(vocab_size=100), r"data.vocab_size=100 is out of range"),
        (dict(val_fraction=0.0), r"data.val_fraction=0.0 is out of range"),
        (dict(max_chars_per_domain=10), r"data.max_chars_per_domain=10 is out of range"),
        (dict(sources=()), r"data.sources=\(\) is empty"),
        (dict(holdout_domains=BUILTIN_DOMAINS), r"holds out every domain"),
        (dict(holdout_domains=("x",)), r"data.holdout_domains='x' is not allowed"),
        (dict(sources=("a.txt",), domains=("literary_kjv",)), r"has no 'builtin'"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    """Each bad DataConfig value raises a ValueError naming the field and what is allowed."""
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_config_accepts_lists_and_strings() -> None:
    """TOML/CLI lists and a bare string become tuples, so the frozen config stays hashable."""
    cfg = DataConfig(sources=["builtin"], domains="literary_kjv")  # type: ignore[arg-type]
    assert cfg.sources == ("builtin",) and cfg.domains == ("literary_kjv",)
    assert hash(cfg)


def test_cache_root_uses_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An empty cache_dir falls back to $MOELAB_CACHE."""
    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path))
    assert cache_root(DataConfig()) == tmp_path / "data"
    assert cache_root(DataConfig(cache_dir="/x")) == Path("/x/data")


# ----------------------------------------------------------------------------- builtin corpus


def test_builtin_corpus_has_four_domains(builtin: Corpus) -> None:
    """The builtin corpus gives the four domains, uint16 ids and at most the asked vocabulary."""
    assert builtin.domains == list(BUILTIN_DOMAINS)
    assert set(builtin.train) == set(builtin.val) == set(BUILTIN_DOMAINS)
    assert builtin.vocab_size <= SMALL["vocab_size"]
    for name in BUILTIN_DOMAINS:
        assert builtin.train[name].dtype == np.uint16
        assert len(builtin.train[name]) > 10 * len(builtin.val[name]) > 0
        assert builtin.train[name].max() < builtin.vocab_size


def test_domains_look_like_their_source(builtin: Corpus) -> None:
    """Decoded text of each domain is what its name says (guards against mixed-up files)."""
    text = {n: builtin.decode(builtin.train[n][:3000]) for n in BUILTIN_DOMAINS}
    assert "def " in text["code_stdlib"] or "import " in text["code_stdlib"]
    assert "LORD" in builtin.decode(builtin.train["literary_kjv"][:50000])
    assert ".." in text["technical_python_docs"]  # reStructuredText directives


@pytest.mark.parametrize("text", ["Hello, world!\n", "  def f(x):\n\treturn x  # é — 漢字 🙂\n"])
def test_encode_decode_round_trip(builtin: Corpus, text: str) -> None:
    """Byte-level BPE decodes back to exactly the encoded text, Unicode and whitespace included."""
    assert builtin.decode(builtin.encode(text)) == text


def test_eot_is_a_single_special_token(builtin: Corpus) -> None:
    """The document separator encodes to one id and decodes back."""
    ids = builtin.encode(f"a{EOT}b")
    assert builtin.eot_id in ids and len(ids) == 3
    assert builtin.decode(ids) == f"a{EOT}b"


def test_stdlib_files_skip_tests() -> None:
    """code_stdlib uses sorted non-test *.py files and no site-packages."""
    files = data._stdlib_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any({"test", "tests", "site-packages"} & set(f.parts) for f in files)
    assert data._stdlib_files() == files  # deterministic order


# ----------------------------------------------------------------------------- splits and caps


def test_cap_takes_evenly_spaced_chunks() -> None:
    """A capped domain keeps text from its start, middle and end, within the character budget."""
    text = numbered_text(20_000)  # ~760K chars
    capped = data._cap(text, 100_000)
    assert len(capped.replace(EOT, "")) <= 100_000
    nums = line_numbers(capped)
    assert min(nums) < 100 and max(nums) > 19_800
    assert np.histogram(nums, bins=4, range=(0, 20_000))[0].min() > 0.2 * len(nums)


def test_train_and_val_are_disjoint(tmp_path: Path) -> None:
    """Validation is a contiguous tail: every training line comes before every validation line."""
    path = tmp_path / "numbers.txt"
    path.write_text(numbered_text(3000))
    cfg = DataConfig(
        sources=(str(path),),
        vocab_size=300,
        val_fraction=0.1,
        cache_dir=str(tmp_path),
    )
    corpus = load_corpus(cfg)
    train = line_numbers(corpus.decode(corpus.train["numbers"]))
    val = line_numbers(corpus.decode(corpus.val["numbers"]))
    assert set(train).isdisjoint(val) and max(train) < min(val)
    assert len(train) + len(val) == 3000 and len(val) == pytest.approx(300, abs=2)


# ----------------------------------------------------------------------------- user sources


def write_user_data(root: Path) -> None:
    (root / "notes.txt").write_text("some notes about routers\n" * 200)
    (root / "docs" / "sub").mkdir(parents=True)
    (root / "docs" / "a.md").write_text("# A\nexperts and tokens\n" * 100)
    (root / "docs" / "sub" / "b.rst").write_text("B section\n=========\n" * 100)
    (root / "docs" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")  # skipped in folders
    (root / "docs" / ".hidden").write_text("never read\n")
    (root / "logs").mkdir()
    for i in range(3):
        (root / "logs" / f"run{i}.log").write_text(f"log {i} step loss\n" * 100)


def test_user_files_folders_and_globs(tmp_path: Path) -> None:
    """A file, a folder (recursive, text only) and a glob each become a domain named after it."""
    write_user_data(tmp_path)
    sources = (str(tmp_path / "notes.txt"), str(tmp_path / "docs"), str(tmp_path / "logs/*.log"))
    cfg = DataConfig(sources=sources, vocab_size=300, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg)
    assert corpus.domains == ["notes", "docs", "logs"]
    docs = corpus.decode(np.concatenate([corpus.train["docs"], corpus.val["docs"]]))
    assert "experts and tokens" in docs and "B section" in docs
    assert "never read" not in docs and "PNG" not in docs
    logs = corpus.decode(np.concatenate([corpus.train["logs"], corpus.val["logs"]]))
    assert all(f"log {i} step" in logs for i in range(3))


def test_builtin_mixes_with_user_file(tmp_path: Path) -> None:
    """``builtin other.txt`` gives the chosen builtin domains plus the user's domain."""
    (tmp_path / "other.txt").write_text(numbered_text(500))
    cfg = DataConfig(
        sources=("builtin", str(tmp_path / "other.txt")),
        domains=("literary_kjv",),
        vocab_size=300,
        max_chars_per_domain=20_000,
        cache_dir=str(tmp_path),
    )
    assert load_corpus(cfg).domains == ["literary_kjv", "other"]


def bad_inputs(root: Path) -> list[tuple[str, str]]:
    (root / "empty.txt").write_text("")
    (root / "nul.bin").write_bytes(b"abc\0def" * 10)
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    (root / "emptydir").mkdir()
    (root / "bindir").mkdir()
    (root / "bindir" / "x.bin").write_bytes(b"\0\1\2")
    return [
        (str(root / "missing.txt"), r"does not exist; give a text file, folder or glob"),
        (str(root / "empty.txt"), r"is empty; give a non-empty text file"),
        (str(root / "nul.bin"), r"looks binary \(not UTF-8 text\); give text files"),
        (str(root / "latin1.txt"), r"looks binary \(not UTF-8 text\); give text files"),
        (str(root / "emptydir"), r"has no non-empty text files"),
        (str(root / "bindir"), r"has no non-empty text files"),
        (str(root / "*.nothing"), r"matches no files; check the pattern"),
    ]


@pytest.mark.parametrize("case", range(7))
def test_bad_user_paths_raise_clear_errors(tmp_path: Path, case: int) -> None:
    """Missing, empty, binary or non-matching paths raise a one-line ValueError saying the fix."""
    spec, message = bad_inputs(tmp_path)[case]
    with pytest.raises(ValueError, match=message) as info:
        load_corpus(DataConfig(sources=(spec,), cache_dir=str(tmp_path / "cache")))
    assert "\n" not in str(info.value) and repr(spec) in str(info.value)


def test_duplicate_domain_names_rejected(tmp_path: Path) -> None:
    """Two sources with the same stem would merge silently; instead the user is told to rename."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "text.txt").write_text("hello\n")
    sources = (str(tmp_path / "a" / "text.txt"), str(tmp_path / "b" / "text.txt"))
    with pytest.raises(ValueError, match=r"both named 'text'.*rename one"):
        load_corpus(DataConfig(sources=sources, cache_dir=str(tmp_path)))


def test_holdout_must_name_a_loaded_domain(tmp_path: Path) -> None:
    """With user sources, holdout names are checked at load time against the real domains."""
    (tmp_path / "a.txt").write_text("hello\n" * 10)
    cfg = DataConfig(sources=(str(tmp_path / "a.txt"),), holdout_domains=("b",))
    with pytest.raises(ValueError, match=r"data.holdout_domains='b' is not allowed"):
        load_corpus(cfg)


# ----------------------------------------------------------------------------- cache


def test_cache_hit_skips_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second load reads the cached tokenizer and ids: no training, no rewrite, no tmp files."""
    (tmp_path / "a.txt").write_text(numbered_text(2000))
    cfg = DataConfig(sources=(str(tmp_path / "a.txt"),), vocab_size=300, cache_dir=str(tmp_path))
    first = load_corpus(cfg)
    files = sorted(cache_root(cfg).rglob("*"))
    mtimes = [f.stat().st_mtime_ns for f in files]

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("tokenizer retrained on a cache hit")

    monkeypatch.setattr(data, "train_tokenizer", no_training)
    second = load_corpus(cfg)
    assert [f.stat().st_mtime_ns for f in sorted(cache_root(cfg).rglob("*"))] == mtimes
    assert not any(f.name.endswith(".tmp") for f in files)
    assert np.array_equal(first.train["a"], second.train["a"])
    (tmp_path / "a.txt").write_text(numbered_text(2001))  # new content -> new key -> retrain
    with pytest.raises(AssertionError, match="retrained"):
        load_corpus(cfg)


# ----------------------------------------------------------------------------- batching


def test_batches_are_deterministic_and_resume_exactly(builtin: Corpus) -> None:
    """Same seed, same batches; a batcher restored from state_dict continues identically."""
    a = Batcher(builtin, batch_size=4, seq_len=32, seed=7)
    b = Batcher(builtin, batch_size=4, seq_len=32, seed=7)
    batches = [a.next() for _ in range(5)]
    for x in batches:
        assert torch.equal(x.tokens, b.next().tokens)
    state = a.state_dict()
    resumed = Batcher(builtin, batch_size=4, seq_len=32, seed=7)
    resumed.load_state_dict(state)
    for _ in range(3):
        x, y = a.next(), resumed.next()
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.domains, y.domains)
    other = Batcher(builtin, batch_size=4, seq_len=32, seed=8)
    assert not torch.equal(other.next().tokens, batches[0].tokens)
    with pytest.raises(ValueError, match="seed=7"):
        other.load_state_dict(state)


@pytest.mark.parametrize("mode", ["mixed", "single_domain", "grouped"])
def test_batch_shapes_targets_and_labels(builtin: Corpus, mode: str) -> None:
    """Targets are inputs shifted by one and every window comes from its labelled domain;
    grouped mode gives each run of ``group`` sequences one domain."""
    batcher = Batcher(builtin, batch_size=6, seq_len=16, mode=mode, seed=0, group=3)
    for _ in range(3):
        batch = batcher.next()
        assert batch.tokens.shape == batch.targets.shape == (6, 16)
        assert batch.tokens.dtype == batch.targets.dtype == batch.domains.dtype == torch.int64
        assert torch.equal(batch.tokens[:, 1:], batch.targets[:, :-1])
        if mode == "single_domain":
            assert batch.domains.unique().numel() == 1
        if mode == "grouped":
            assert all(g.unique().numel() == 1 for g in batch.domains.split(3))
        for row in range(6):
            window = torch.cat([batch.tokens[row], batch.targets[row, -1:]]).numpy()
            name = builtin.domains[int(batch.domains[row])]
            assert contains_window(builtin.train[name].astype(np.int64), window)


def test_grouped_micro_batches_are_single_domain_and_the_batch_mixed(builtin: Corpus) -> None:
    """batch_mode='grouped' with domain_group = micro-batch size: every micro-batch of the
    split holds one domain, while the global batches still mix domains."""
    batcher = Batcher(builtin, batch_size=16, seq_len=8, mode="grouped", seed=1, group=4)
    mixed = 0
    for _ in range(20):
        batch = batcher.next()
        assert all(m.domains.unique().numel() == 1 for m in batch.split(4))
        mixed += batch.domains.unique().numel() > 1
    assert mixed >= 10


def test_mixed_mode_draws_domains_by_size(builtin: Corpus) -> None:
    """In mixed mode domain frequencies follow the domains' shares of training tokens."""
    batcher = Batcher(builtin, batch_size=64, seq_len=4, seed=0)
    labels = torch.cat([batcher.next().domains for _ in range(50)])
    freq = torch.bincount(labels, minlength=4).double() / len(labels)
    sizes = torch.tensor([len(builtin.train[n]) for n in builtin.domains], dtype=torch.float64)
    assert torch.allclose(freq, sizes / sizes.sum(), atol=0.03)


def test_split_and_shard_cover_the_batch_once(builtin: Corpus) -> None:
    """Micro-batches and data-parallel shards concatenate back to exactly the global batch."""
    batch = Batcher(builtin, batch_size=12, seq_len=8, seed=3).next()
    for parts in (batch.split(3), [batch.shard(r, 4) for r in range(4)]):
        for field in ("tokens", "targets", "domains"):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(batch, field))
    assert len(batch.shard(1, 2)) == 6 and torch.equal(batch.shard(1, 2).tokens, batch.tokens[6:])
    with pytest.raises(ValueError, match="divisor of 12"):
        batch.split(5)
    with pytest.raises(ValueError, match="rank=4"):
        batch.shard(4, 4)


def test_val_batches_cover_each_split_once(builtin: Corpus) -> None:
    """Validation windows are consecutive and non-overlapping; only a partial tail is dropped."""
    L = 32
    batches = list(val_batches(builtin, batch_size=16, seq_len=L))
    assert all(len(b) == 16 for b in batches[:-1]) and 0 < len(batches[-1]) <= 16
    tokens = torch.cat([b.tokens for b in batches])
    targets = torch.cat([b.targets for b in batches])
    labels = torch.cat([b.domains for b in batches])
    for d, name in enumerate(builtin.domains):
        ids = torch.from_numpy(builtin.val[name].astype(np.int64))
        n = (len(ids) - 1) // L
        assert int((labels == d).sum()) == n
        assert torch.equal(tokens[labels == d].flatten(), ids[: n * L])
        assert torch.equal(targets[labels == d].flatten(), ids[1 : n * L + 1])
    only = list(val_batches(builtin, batch_size=8, seq_len=L, domains=["literary_kjv"]))
    assert set(torch.cat([b.domains for b in only]).tolist()) == {1}


def test_holdout_domain_is_never_trained_on(tmp_path: Path) -> None:
    """A held-out domain is absent from training batches and the tokenizer, but fully in val."""
    cfg = DataConfig(
        holdout_domains=("literary_kjv",),
        vocab_size=300,
        max_chars_per_domain=30_000,
        cache_dir=str(tmp_path),
    )
    corpus = load_corpus(cfg)
    kjv = corpus.domains.index("literary_kjv")
    assert "literary_kjv" not in corpus.train and corpus.holdout == ("literary_kjv",)
    assert len(corpus.decode(corpus.val["literary_kjv"])) > 25_000  # all its text is validation
    for mode in ("mixed", "single_domain"):
        batcher = Batcher(corpus, batch_size=8, seq_len=16, mode=mode, seed=0)
        assert all(kjv not in batcher.next().domains.tolist() for _ in range(20))
    labels = torch.cat([b.domains for b in val_batches(corpus, batch_size=32, seq_len=16)])
    assert (labels == kjv).any()


def test_batcher_rejects_too_short_domains(tmp_path: Path) -> None:
    """A domain shorter than one window gives an error that names it and suggests a fix."""
    (tmp_path / "tiny.txt").write_text("a few words only\n")
    corpus = load_corpus(DataConfig(sources=(str(tmp_path / "tiny.txt"),), cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"domain 'tiny' has \d+ training tokens.*lower seq_len"):
        Batcher(corpus, batch_size=2, seq_len=64)
    with pytest.raises(ValueError, match="data.batch_mode='both'"):
        Batcher(corpus, batch_size=2, seq_len=2, mode="both")


def test_batch_to_device_keeps_contents(builtin: Corpus) -> None:
    """Batch.to moves all three tensors."""
    batch = Batcher(builtin, batch_size=2, seq_len=4).next()
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tokens, batch.tokens)


def test_synthetic_uniform_domain_is_iid_text_with_a_known_entropy(tmp_path) -> None:
    """`synthetic_uniform` is deterministic text of lines of SYNTHETIC_LINE characters drawn
    uniformly from SYNTHETIC_ALPHABET; its entropy bound is (63/64)·ln 32 nats per character;
    it is chosen by name only and loads like any domain."""
    import math

    from moelab import data

    text = data.synthetic_text(64 * 500)
    assert text == data.synthetic_text(64 * 500)
    lines = text.split("\n")[:-1]
    assert len(lines) == 500 and {len(x) for x in lines} == {data.SYNTHETIC_LINE}
    freq = np.unique(list("".join(lines)), return_counts=True)
    assert set(freq[0]) == set(data.SYNTHETIC_ALPHABET)
    assert freq[1].min() > 0.7 * freq[1].mean()
    assert data.SYNTHETIC_NATS_PER_CHAR == pytest.approx(63 / 64 * math.log(32))
    assert "synthetic_uniform" not in data.BUILTIN_DOMAINS
    cfg = DataConfig(domains=("literary_kjv", "synthetic_uniform"), vocab_size=300,
                     max_chars_per_domain=20000, seq_len=16, cache_dir=str(tmp_path))  # fmt: skip
    corpus = data.load_corpus(cfg)
    assert set(corpus.decode(corpus.val["synthetic_uniform"])) <= set(
        data.SYNTHETIC_ALPHABET + "\n"
    )


def test_a_damaged_cache_entry_is_rebuilt_with_a_note(tmp_path: Path, capsys) -> None:
    """A torn tokenizer.json, a truncated ids file and an ids file of the wrong dtype are each
    rebuilt with a note naming the file, giving the same token ids as the intact cache."""
    (tmp_path / "notes.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    cfg = DataConfig(sources=(str(tmp_path / "notes.txt"),), vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))  # fmt: skip
    first = load_corpus(cfg)
    folder = next((tmp_path / "cache" / "data").iterdir())
    (folder / "tokenizer.json").write_text('{"torn')
    train_ids, val_ids = sorted(folder.glob("ids-*.npy"))
    train_ids.write_bytes(train_ids.read_bytes()[:100])
    np.save(val_ids, np.arange(10, dtype=np.float32))
    capsys.readouterr()
    again = load_corpus(cfg)
    err = capsys.readouterr().err
    for path in (folder / "tokenizer.json", train_ids, val_ids):
        assert f"data cache entry {str(path)!r} is damaged" in err and "rebuilding it" in err
    assert all(np.array_equal(first.train[n], again.train[n]) for n in first.train)
    assert all(np.array_equal(first.val[n], again.val[n]) for n in first.val)
    load_corpus(cfg)
    assert "damaged" not in capsys.readouterr().err
