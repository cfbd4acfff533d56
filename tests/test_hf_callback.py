"""moelab.hf.MoEBalanceCallback in a real transformers.Trainer (offline, CPU, tiny models).

Shape legend: B sequences, L sequence length.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab.config import BalanceConfig  # noqa: E402
from moelab.hf import STATE_FILE, MoEBalanceCallback  # noqa: E402
from moelab.hf.tiny import family_model  # noqa: E402

L, N = 16, 8


pytestmark = pytest.mark.usefixtures("one_thread")


class Seen(transformers.TrainerCallback):
    """A logger after the balance callback: records what each on_log saw."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def dataset(vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (N, L), generator=gen)
    return [{"input_ids": row, "labels": row} for row in ids]


def trainer_for(model, tmp_path, steps: int = 3) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
        learning_rate=1e-3, logging_steps=1, save_strategy="steps", save_steps=steps,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return transformers.Trainer(model=model, args=args, train_dataset=dataset(128))


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3"])
def test_trainer_logs_routing_health_and_moves_the_bias(kind, tmp_path):
    """3 Trainer steps with the callback: every logged step carries moe/maxvio (mean and per
    layer), moe/dead_experts and moe/bias_range, a logger after the callback sees them, the
    bias moved (DeepSeek-V3: in its own e_score_correction_bias, so the checkpoint has it) and
    moelab_balance.pt is written beside the checkpoint."""
    model = family_model(kind).train()
    cb = MoEBalanceCallback(BalanceConfig(bias_rate=0.05, aux_coef=0.01, aux_scope="global"))
    trainer = trainer_for(model, tmp_path)
    seen = Seen()
    trainer.add_callback(cb)
    trainer.add_callback(seen)
    trainer.train()
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert len(steps) == 3
    for h in steps:
        assert {"moe/maxvio", "moe/dead_experts", "moe/bias_range", "moe/maxvio/0"} <= set(h)
    assert any("moe/maxvio" in logs for logs in seen.logs)
    assert steps[-1]["moe/bias_range"] > 0
    assert (tmp_path / "checkpoint-3" / STATE_FILE).is_file()
    if kind == "deepseek_v3":
        slot = cb.handle.sites[0].bias_slot()
        assert float(slot.abs().sum()) > 0  # the family's own slot holds the balanced bias
        saved = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-3")
        name = cb.handle.sites[0].name + ".e_score_correction_bias"
        assert torch.equal(saved.state_dict()[name], slot)


def test_install_puts_the_callback_first(tmp_path):
    """install() puts the callback before the report_to loggers, which then see its metrics."""
    trainer = trainer_for(family_model("olmoe").train(), tmp_path, steps=1)
    cb = MoEBalanceCallback().install(trainer)
    assert trainer.callback_handler.callbacks[0] is cb


def test_callback_adds_the_balance_loss(tmp_path):
    """With aux_coef > 0 the Trainer's loss includes the balance term (loss differs from the
    plain LM loss of the same batch by exactly handle.aux_loss())."""
    model = family_model("qwen3_moe").train()
    cb = MoEBalanceCallback(BalanceConfig(aux_coef=0.5, aux_scope="micro"))
    trainer = trainer_for(model, tmp_path, steps=1)
    trainer.add_callback(cb)
    cb.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)
    ids_BL = torch.stack([r["input_ids"] for r in dataset(128)[:2]])
    out = model(input_ids=ids_BL, labels=ids_BL)
    aux = cb.handle.aux_loss()
    cb.handle.detach()
    cb.on_train_end(trainer.args, trainer.state, trainer.control)
    plain = model(input_ids=ids_BL, labels=ids_BL).loss
    torch.testing.assert_close(out.loss, plain + aux)
    assert float(aux.detach()) > 0
