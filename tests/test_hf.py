"""moelab.hf on tiny random transformers MoE models (offline, CPU, built from configs).

Shape legend: T tokens, E experts, K top-k, B sequences, L sequence length.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moelab import balance as bal  # noqa: E402
from moelab.balancer import Balancer  # noqa: E402
from moelab.config import BalanceConfig  # noqa: E402
from moelab.hf import (  # noqa: E402
    STATE_FILE,
    NoMoERouterError,
    attach,
    find_routers,
    main,
    profile_model,
)
from moelab.hf.tiny import tiny_config as _tiny_config  # noqa: E402

E, K, V, L, B = 8, 2, 128, 16, 4


def tiny_config(kind: str):
    """2 MoE layers (DeepSeek-V3: plus a dense one), hidden 32, 8 experts, top-2, vocab 128."""
    return _tiny_config(kind, layers=2, hidden=32, experts=E, top_k=K, vocab=V, max_len=64)


MOE_KINDS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def tiny_model(kind: str, seed: int = 0, gate_std: float = 1.0):
    """A random model in eval mode; gate weights widened so routing is far from uniform."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("mlp.gate") and hasattr(module, "weight"):
                module.weight.normal_(0.0, gate_std)
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.normal_(0.0, 0.1)
    return model


def token_stream(n_seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (n_seq * L,), generator=torch.Generator().manual_seed(seed))


def count(experts_TK: torch.Tensor) -> torch.Tensor:
    return torch.bincount(experts_TK.flatten(), minlength=E)


def reference_counts(model, stream: torch.Tensor, selects: list) -> list[torch.Tensor]:
    """Counts per MoE layer from ``output_router_logits`` and an independent selection rule."""
    counts = None
    with torch.no_grad():
        for ids_BL in stream.view(-1, L).split(B):
            logits = model(input_ids=ids_BL, output_router_logits=True).router_logits
            ids = [count(f(lg)) for f, lg in zip(selects, logits, strict=True)]
            counts = ids if counts is None else [c + n for c, n in zip(counts, ids, strict=True)]
    return counts


def gate_input_logits(model, stream: torch.Tensor) -> list[list[torch.Tensor]]:
    """Router logits recomputed from each gate's input and weight in fp32, per batch and layer
    (no reliance on output_router_logits, which DeepSeek-V3 lacks in older transformers)."""
    sites, seen = find_routers(model), []
    hooks = [
        s.module.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 32)))
        for s in sites
    ]
    with torch.no_grad():
        for ids_BL in stream.view(-1, L).split(B):
            model(input_ids=ids_BL)
    for h in hooks:
        h.remove()
    n = len(sites)
    return [
        [seen[b + i].float() @ s.module.weight.float().T for i, s in enumerate(sites)]
        for b in range(0, len(seen), n)
    ]


def softmax_topk(logits_TE: torch.Tensor) -> torch.Tensor:
    return torch.topk(logits_TE.float().softmax(-1), K, dim=-1).indices


def deepseek_v3_select(gate):
    """DeepSeek-V3 selection written as a per-token loop from the gate's own parameters."""

    def select(logits_TE: torch.Tensor) -> torch.Tensor:
        s_TE = (logits_TE.float().sigmoid() + gate.e_score_correction_bias).detach()
        size, out = E // gate.num_group, []
        for s_E in s_TE:
            group_score = [sorted(g.tolist())[-2:] for g in s_E.split(size)]
            groups = sorted(range(gate.num_group), key=lambda g: -sum(group_score[g]))
            allowed = [
                e for g in groups[: gate.topk_group] for e in range(g * size, (g + 1) * size)
            ]
            out.append(sorted(allowed, key=lambda e: -float(s_E[e]))[:K])
        return torch.tensor(out)

    return select


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_profile_counts_match_router_logits(kind):
    """Counts captured by the hooks equal counts recomputed from output_router_logits (top-k of
    softmax; for DeepSeek-V3 an independent loop over its sigmoid + bias + group-limited rule)."""
    model = tiny_model(kind)
    streams = {"a": token_stream(8, seed=1), "b": token_stream(4, seed=2)}
    result, coact = profile_model(model, streams, seq_len=L, batch_size=B)
    sites = find_routers(model)
    if kind == "deepseek_v3":  # each layer has its own e_score_correction_bias
        selects = [deepseek_v3_select(s.module) for s in sites]
        ref = [torch.zeros(E, dtype=torch.long) for _ in sites]
        for name in streams:
            for logits in gate_input_logits(model, streams[name]):
                ref = [r + count(f(lg)) for r, f, lg in zip(ref, selects, logits, strict=True)]
    else:
        selects = [softmax_topk] * len(sites)
        ref = reference_counts(model, streams["a"], selects)
        more = reference_counts(model, streams["b"], selects)
        ref = [r + n for r, n in zip(ref, more, strict=True)]
    assert [lay["layer"] for lay in result["layers"]] == [s.layer for s in sites]
    assert [lay["counts"] for lay in result["layers"]] == [r.tolist() for r in ref]
    assert result["tokens"] == 12 * L and coact.shape == (len(sites), E, E)
    for lay, r in zip(result["layers"], ref, strict=True):
        assert lay["dead_experts"] == torch.nonzero(r == 0).flatten().tolist()
        assert lay["maxvio"] == pytest.approx(
            float((r.max() - r.float().mean()) / r.float().mean())
        )
        assert sum(sum(f) for f in lay["domain_expert_freq"].values()) == pytest.approx(2.0)


def test_profile_cli_writes_json_and_plots(tmp_path, capsys):
    """`python -m moelab.hf profile` on a saved folder with two text domains writes
    profile.json (required keys, counts = tokens·K) and the two plots."""
    tiny_model("qwen3_moe").save_pretrained(tmp_path / "model")
    (tmp_path / "code.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    (tmp_path / "prose").mkdir()
    (tmp_path / "prose" / "a.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "out"
    argv = ["profile", str(tmp_path / "model"), "--data", str(tmp_path / "code.txt")]
    argv += [str(tmp_path / "prose"), "--out", str(out), "--max-tokens", "300", "--seq-len", "32"]
    assert main(argv) == 0
    prof = json.loads((out / "profile.json").read_text())
    assert prof["tokens"] == 300 and set(prof["domains"]) == {"code", "prose"}
    assert prof["model"]["model_type"] == "qwen3_moe" and len(prof["layers"]) == 2
    for lay in prof["layers"]:
        assert {"layer", "counts", "maxvio", "dead_experts", "cv", "routing_entropy"} <= set(lay)
        assert sum(lay["counts"]) == 300 * K and "domain_expert_mi_bits" in lay
    assert (out / "load_heatmap.png").stat().st_size > 0
    assert (out / "dead_experts.png").stat().st_size > 0


def test_no_moe_model_is_a_clear_error(tmp_path, capsys):
    """A dense Llama: find_routers raises, the CLI prints one error line and returns 2."""
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(NoMoERouterError, match="no MoE router"):
        find_routers(model)
    model.save_pretrained(tmp_path / "llama")
    (tmp_path / "t.txt").write_text("hello")
    argv = ["profile", str(tmp_path / "llama"), "--data", str(tmp_path / "t.txt")]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and "'llama' has no MoE router" in err[0]


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_attach_with_zero_bias_is_the_model(kind):
    """Attached with zero bias, every router returns the model's own (logits, weights, experts)
    and the LM logits are unchanged; detach restores the class forward."""
    model = tiny_model(kind)
    ids_BL = token_stream(2).view(2, L)
    with torch.no_grad():
        before = model(input_ids=ids_BL).logits
        handle = attach(model, BalanceConfig())
        after = model(input_ids=ids_BL).logits
        handle.detach()
    assert torch.equal(before, after)
    assert all("forward" not in vars(s.module) for s in handle.sites)


@pytest.mark.parametrize("kind", ["mixtral", "deepseek_v3"])
def test_bias_changes_selection_not_weights(kind):
    """A large bias on one expert makes every token choose it, yet the gate weights of the
    chosen experts are the model's unbiased scores (renormalised as the model does)."""
    model = tiny_model(kind)
    gate = find_routers(model)[0].module
    h_TD = torch.randn(64, 32)
    with torch.no_grad():
        _, _, plain_TK = gate(h_TD)
        handle = attach(model, BalanceConfig())
        handle.bias[0][5] = 10.0
        logits_TE, weights_TK, experts_TK = gate(h_TD)
    assert (experts_TK == 5).any(-1).all() and not (plain_TK == 5).any(-1).all()
    if kind == "mixtral":
        ref_TK = logits_TE.softmax(-1).gather(1, experts_TK)
        ref_TK = ref_TK / ref_TK.sum(-1, keepdim=True)
    else:
        ref_TK = logits_TE.sigmoid().gather(1, experts_TK)
        ref_TK = ref_TK / ref_TK.sum(-1, keepdim=True) * gate.routed_scaling_factor
    torch.testing.assert_close(weights_TK, ref_TK)


def test_loss_free_bias_balances_a_skewed_router():
    """Expert 0's gate row points along the mean hidden state, so it takes most tokens; the
    sign rule (Wang et al. 2024 Alg. 1, u=0.05) halves MaxVio in 30 steps, pushing its bias down."""
    model = tiny_model("qwen3_moe", gate_std=0.3).train()
    sites = find_routers(model)
    ids_BL = token_stream(16).view(16, L)
    seen = {}
    hooks = [
        s.module.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, args[0]))
        for i, s in enumerate(sites)
    ]
    with torch.no_grad():
        model(input_ids=ids_BL)
        for i, site in enumerate(sites):
            mean_D = seen[i].reshape(-1, 32).mean(0)
            site.module.weight[0] = 2.5 * mean_D / mean_D.norm() ** 2
    for h in hooks:
        h.remove()
    handle = attach(model, BalanceConfig(bias_rate=0.05))
    maxvio = []
    with torch.no_grad():
        for _ in range(30):
            model(input_ids=ids_BL)
            maxvio.append(handle.end_step().maxvio)
    assert maxvio[0] > 1.0
    assert sum(maxvio[-10:]) / 10 < 0.5 * maxvio[0]
    assert all(int(b.argmin()) == 0 for b in handle.bias)  # the overloaded expert went down


def test_aux_and_z_loss_values_and_global_counts():
    """aux_loss = mean over layers of coef·Switch loss (counts accumulated over the step's
    micro-batches, probs of this micro-batch) + coef·z-loss, recomputed from router_logits;
    end_step resets the counts."""
    model = tiny_model("olmoe").train()
    handle = attach(model, BalanceConfig(aux_coef=0.1, aux_scope="global", z_coef=0.01))
    micro = [token_stream(2, seed=s).view(2, L) for s in (1, 2)]
    total = [torch.zeros(E, dtype=torch.long) for _ in handle.sites]
    for ids_BL in micro:
        logits = model(input_ids=ids_BL, output_router_logits=True).router_logits
        aux = handle.aux_loss()
        total = [t + count(softmax_topk(lg)) for t, lg in zip(total, logits, strict=True)]
        switch = [
            bal.switch_loss_from_stats(counts=t, probs=lg.softmax(-1).mean(0))
            for t, lg in zip(total, logits, strict=True)
        ]
        z = [bal.z_loss(lg) for lg in logits]
        expected = 0.1 * torch.stack(switch).mean() + 0.01 * torch.stack(z).mean()
        torch.testing.assert_close(aux, expected)
    assert [c.tolist() for c in handle.step_counts] == [t.tolist() for t in total]
    aux.backward()
    assert handle.sites[0].module.weight.grad.abs().sum() > 0
    handle.end_step()
    assert all(int(c.sum()) == 0 for c in handle.step_counts)


def test_save_load_round_trip(tmp_path):
    """handle.save + save_pretrained, then from_pretrained + attach(from_folder) restores the
    biases, counts, step and config, and routes the same tokens to the same experts."""
    model = tiny_model("mixtral").train()
    cfg = BalanceConfig(bias_rate=0.01, aux_coef=0.01, aux_scope="global")
    handle = attach(model, cfg)
    with torch.no_grad():
        for s in range(3):
            model(input_ids=token_stream(2, seed=s).view(2, L))
            handle.end_step()
        model(input_ids=token_stream(2, seed=9).view(2, L))  # counts pending in this step
    model.save_pretrained(tmp_path)
    handle.save(tmp_path)
    assert (tmp_path / STATE_FILE).is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).train()
    again = attach(loaded, from_folder=tmp_path)
    assert again.cfg == cfg and again.steps == 3
    for a, b in zip(handle.bias, again.bias, strict=True):
        assert torch.equal(a, b) and a.abs().sum() > 0
    assert [c.tolist() for c in again.step_counts] == [c.tolist() for c in handle.step_counts]
    h_TD = torch.randn(32, 32)
    with torch.no_grad():
        assert torch.equal(handle.sites[1].module(h_TD)[2], again.sites[1].module(h_TD)[2])


def test_finetune_cli_logs_saves_and_freezes_router(tmp_path):
    """`finetune --freeze-router --set ...` logs loss + MaxVio per step, saves model + balance
    state, leaves the router weights untouched and trains the rest."""
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "model")
    (tmp_path / "t.txt").write_text("abcdefghij klmnop qrstuv wxyz " * 40)
    out = tmp_path / "ft"
    argv = ["finetune", str(tmp_path / "model"), "--data", str(tmp_path / "t.txt"), "--out"]
    argv += [str(out), "--steps", "3", "--lr", "1e-3", "--batch-size", "2", "--seq-len", "16"]
    argv += ["--freeze-router", "--grad-accum", "2", "--set", "balance.bias_rate=0.01"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all({"loss", "maxvio", "aux_loss"} <= set(r) for r in rows)
    tuned = transformers.AutoModelForCausalLM.from_pretrained(out)
    state = torch.load(out / STATE_FILE, weights_only=True)
    assert state["steps"] == 3 and state["balance"]["bias_rate"] == 0.01
    old, new = model.state_dict(), tuned.state_dict()
    gate = "model.layers.0.mlp.gate.weight"
    assert torch.equal(old[gate], new[gate])
    assert not torch.equal(
        old["model.layers.0.self_attn.q_proj.weight"], new["model.layers.0.self_attn.q_proj.weight"]
    )
    assert tuned.config.output_router_logits is False


def test_attach_rejects_unsupported_balance_terms():
    """Terms that need expert placement or capacity are refused with the field's name."""
    with pytest.raises(ValueError, match="balance.device_coef"):
        attach(tiny_model("olmoe"), BalanceConfig(device_coef=0.1))


def test_attach_runs_a_moelab_balancer_per_layer():
    """attach gives every router a moelab Balancer; adaptive λ is per layer from that layer's
    MaxVio (the LM rule), not one coefficient from the mean."""
    model = tiny_model("olmoe").train()
    cfg = BalanceConfig(aux_coef=0.01, adaptive_target=0.5, adaptive_rate=1.0)
    handle = attach(model, cfg)
    assert all(isinstance(b, Balancer) for b in handle.balancers)
    with torch.no_grad():
        handle.step_counts[0].copy_(torch.tensor([40] + [1] * (E - 1)))  # MaxVio > target
        handle.step_counts[1].fill_(5)  # balanced
    stats = handle.end_step()
    assert stats.aux_coef_layers == pytest.approx([0.02, 0.005])
    assert handle.state_dict()["aux_coef_layers"] == pytest.approx([0.02, 0.005])


def _checkpointed_steps(mode: str, steps: int = 2) -> list[tuple[float, torch.Tensor, list]]:
    """Two training steps of tiny Qwen3-MoE with moelab's global aux loss and loss-free bias,
    gradient checkpointing ``mode`` (off / non_reentrant / reentrant): per step the aux loss,
    layer 0's router gradient and the step's counts per layer."""
    model = tiny_model("qwen3_moe").train()
    if mode != "off":
        kw = {"use_reentrant": mode == "reentrant"}
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    handle = attach(model, BalanceConfig(aux_coef=1e-2, aux_scope="global", bias_rate=1e-3))
    ids_BL = token_stream(B).view(B, L)
    out = []
    for _ in range(steps):
        loss = model(input_ids=ids_BL, labels=ids_BL, use_cache=False).loss
        aux = handle.aux_loss()
        (loss + aux).backward()
        grad = model.model.layers[0].mlp.gate.weight.grad.clone()
        counts = [b.step_counts.clone() for b in handle.balancers]
        model.zero_grad()
        handle.end_step()
        out.append((aux.item(), grad, counts))
    return out


def test_gradient_checkpointing_keeps_the_balance_losses_and_counts_once():
    """transformers' non-reentrant gradient checkpointing changes nothing moelab computes: the
    aux loss, the router gradient and the step counts (each token counted once, not again in
    the backward's recompute) equal those without checkpointing, over two steps (the second
    under the bias the first set). Reentrant checkpointing, whose first forward runs without
    autograd (the aux loss would be a silent 0), is refused with one line naming the fix."""
    plain, checkpointed = _checkpointed_steps("off"), _checkpointed_steps("non_reentrant")
    for a, b in zip(plain, checkpointed, strict=True):
        (aux_a, grad_a, counts_a), (aux_b, grad_b, counts_b) = a, b
        assert aux_a > 0 and aux_b == pytest.approx(aux_a, rel=1e-6)
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-5, atol=1e-8)
        for ca, cb in zip(counts_a, counts_b, strict=True):
            assert torch.equal(ca, cb) and int(ca.sum()) == B * L * K
    with pytest.raises(ValueError, match="use_reentrant=True.*'use_reentrant': False") as err:
        _checkpointed_steps("reentrant", steps=1)
    assert "\n" not in str(err.value)
