"""Specification of moelab.checkpoint beyond tests/test_reliability.py: a save that fails
(a full disk) leaves no partial file and the previous checkpoint loading."""

import errno
import os

import pytest
import torch

from moelab import checkpoint


def test_a_failed_save_removes_its_partial_tmp(tmp_path, monkeypatch):
    """An OSError while writing (ENOSPC from fsync) raises CheckpointError naming the folder,
    removes the partial ``.tmp`` and keeps the previous checkpoint as the one that loads."""
    state = {"model": {"w": torch.ones(3)}, "config": {}, "step": 1}
    checkpoint.save(tmp_path, state, 1)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match="cannot write a checkpoint"):
        checkpoint.save(tmp_path, {**state, "step": 2}, 2)
    monkeypatch.undo()
    assert not list(tmp_path.glob("*.tmp"))
    assert checkpoint.load(tmp_path)["step"] == 1


def test_keep_latest_only_leaves_the_checkpoint_the_pointer_names(tmp_path):
    """A finished run keeps one checkpoint: the one ``latest.json`` names, which still loads."""
    state = {k: {"w": torch.ones(2)} for k in checkpoint.REQUIRED}
    for step in (1, 2):
        checkpoint.save(tmp_path, state, step)
    assert len(list(tmp_path.glob("ckpt-*.pt"))) == 2
    checkpoint.keep_latest_only(tmp_path)
    assert [p.name for p in tmp_path.glob("ckpt-*.pt")] == ["ckpt-000002.pt"]
    assert torch.equal(checkpoint.load(tmp_path)["model"]["w"], torch.ones(2))
    checkpoint.keep_latest_only(tmp_path / "empty")  # no pointer: nothing to do
