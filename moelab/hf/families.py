"""The family registry: one table row per transformers MoE family.

A row says where a family keeps its MoE pieces and how its router selects experts:

- ``routers``: the router classes (the key moelab looks a router up by); the MoE block is the
  router's parent, its ``experts`` child the routed experts, ``shared`` its shared experts;
- ``rule``: the selection rule (:class:`moelab.hf.rules.Rule`), ``None`` where the selection
  is not a rule of the logits (hash routing, sparsemixer, capacity routing): profiled from
  the router's output, never re-selected;
- ``output``: what the router's forward returns, by position: ``logits``, ``probs`` (the
  recorded tensor is already probabilities), ``weights``, ``experts``, ``dense`` (a (T, E)
  weight matrix, zero off the chosen experts), ``mask`` (a one-hot dispatch mask under the
  router's ``expert_capacity``, Switch), ``plan`` (JetMoE's sorted dispatch plan: slot order,
  token index, gates, expert sizes), ``-`` (anything else);
- ``bias``: where the family keeps a selection-only bias (``router.NAME`` or ``block.NAME``):
  moelab writes its loss-free bias there, so ``save_pretrained`` carries it;
- ``args``: what the block passes to the router besides the hidden states;
- ``capture``: where the chosen experts are read: ``output`` (the router returns them),
  ``experts`` (the experts module's integer input), ``rule`` (re-selected from the logits);
- ``experts``: the block's child holding the routed experts; ``top_k``: k where the config
  has none (Switch: 1, NLLB-MoE: 2);
- ``static``: the selection is fixed (hash routing): profiled, never balanced;
- ``null``: null / identity experts: ``last`` (one extra score column, Zaya) or the config
  attribute counting them (LongCat's ``zero_expert_num``); they are counted apart.

A router class in no row is still profiled, and its rule inferred from its own forward on a
probe batch (:func:`moelab.hf.rules.infer_rule`). :func:`family_table` writes the table of
docs/hf.md from these rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from moelab.hf.rules import Rule

OUT3 = ("logits", "weights", "experts")


@dataclass(frozen=True)
class Family:
    """One MoE family of transformers (see the module docstring for every field)."""

    name: str
    routers: tuple[str, ...]
    rule: Rule | None
    output: tuple[str, ...] = OUT3
    bias: str | None = None
    args: tuple[str, ...] = ()
    null: str | None = None
    shared: str | None = None
    experts: str = "experts"
    top_k: int | None = None
    capture: str = "output"
    static: bool = False
    note: str = ""


# The rules families share (a rule is data; families differ in their layout fields).
SOFTMAX = Rule("softmax", normalize=True)  # Mixtral: softmax, top-k, renormalise (fp32)
SOFTMAX_OPT = Rule("softmax", normalize="norm_topk_prob", cast=True)  # Qwen/OLMoE
SOFTMAX_RAW = Rule("softmax", normalize=False, cast=True)  # Jamba: no renormalisation
TOPK_SOFTMAX = Rule("softmax", order="topk_score", normalize=False, cast=True)  # Granite
TOPK_SOFTMAX_LOGIT_BIAS = Rule("softmax", order="topk_score", normalize=False)  # GPT-OSS
V3 = Rule("sigmoid", normalize="norm_topk_prob", eps=1e-20, groups="top2_sum",
          scale="routed_scaling_factor", sorted=False)  # fmt: skip
SIGMOID_BIAS = Rule("sigmoid", normalize=True, sorted=False)  # MiniMax-M2, Step-3.7


FAMILIES: tuple[Family, ...] = (
    Family("mixtral", ("MixtralTopKRouter",), SOFTMAX),
    Family("qwen2_moe", ("Qwen2MoeTopKRouter",), SOFTMAX_OPT, shared="shared_expert"),
    Family("qwen3_moe", ("Qwen3MoeTopKRouter",), SOFTMAX_OPT),
    Family("olmoe", ("OlmoeTopKRouter",), SOFTMAX_OPT),
    Family("deepseek_v3", ("DeepseekV3TopkRouter",), V3, bias="router.e_score_correction_bias",
           shared="shared_experts"),
    Family("granitemoe", ("GraniteMoeTopKRouter",), TOPK_SOFTMAX),
    Family("jamba", ("JambaTopKRouter",), SOFTMAX_RAW),
    Family("minimax_m2", ("MiniMaxM2TopKRouter",), SIGMOID_BIAS,
           bias="block.e_score_correction_bias", args=("block.e_score_correction_bias",)),
    Family("hy_v3", ("HYV3TopKRouter",), Rule("sigmoid", eps=1e-20, scale="router_scaling_factor",
           sorted=False), bias="block.e_score_correction_bias",
           args=("block.e_score_correction_bias",), shared="shared_experts"),
    Family("lfm2_moe", ("Lfm2MoeTopKRouter",), Rule("sigmoid", normalize="norm_topk_prob",
           eps=1e-6, scale="routed_scaling_factor", fp32=False, cast=True),
           bias="block.expert_bias", args=("block.expert_bias",)),
    Family("afmoe", ("AfmoeTokenChoiceRouter",), Rule("sigmoid", eps=1e-20, scale="route_scale"),
           bias="block.expert_bias", args=("block.expert_bias",), shared="shared_experts"),
    Family("gemma4", ("Gemma4TextRouter", "DiffusionGemmaTextRouter"),
           Rule("logits", expert_scale="per_expert_scale"), output=("probs", "weights", "experts")),
    Family("llama4", ("Llama4Router",), Rule("sigmoid", order="topk_score", normalize=False,
           cast=True), output=("dense", "logits"), capture="rule", shared="shared_expert"),
    Family("inkling", ("InklingTopkRouter",), None, output=("logits", "weights", "experts", "-"),
           bias="router.e_score_correction_bias", shared="shared_experts",
           note="weights share a softmax with the shared experts' logits"),
    Family("zaya", ("ZayaRouter",), Rule("softmax", normalize=False, fp32=False),
           output=("logits", "weights", "experts", "-"), bias="router.balancing_biases",
           null="last", capture="rule"),
    Family("longcat_flash", ("LongcatFlashTopkRouter",), Rule("softmax", normalize=False,
           scale="routed_scaling_factor", sorted=False, cast=True),
           bias="router.e_score_correction_bias", null="zero_expert_num"),
    Family("deepseek_v4_hash", ("DeepseekV4HashRouter",), None, args=("input_ids",), static=True,
           note="hash routing: a fixed token → expert table"),
    Family("phimoe", ("PhimoeTopKRouter",), None, note="sparsemixer"),
    Family("jetmoe", ("JetMoeTopKGating",), TOPK_SOFTMAX, output=("plan", "-", "-", "-", "logits"),
           experts="input_linear", capture="rule"),
    Family("switch_transformers", ("SwitchTransformersTop1Router",),
           Rule("softmax", normalize=False), output=("mask", "weights", "logits"), top_k=1),
    Family("gpt_oss", ("GptOssTopKRouter",), TOPK_SOFTMAX_LOGIT_BIAS, note="a router logit bias"),
    Family("openai_privacy_filter", ("OpenAIPrivacyFilterTopKRouter",),
           Rule("softmax", order="topk_score", normalize=False, per_k=True)),
    Family("nllb-moe", ("NllbMoeTop2Router",), None, output=("experts", "probs", "logits"),
           top_k=2, note="top-2 with capacity and a random second-expert policy"),
)  # fmt: skip


def by_router() -> dict[str, Family]:
    """Router class name -> its family row."""
    return {cls: fam for fam in FAMILIES for cls in fam.routers}


def lookup(router_class: str) -> Family | None:
    """The row of a router class, or None for a class in no row."""
    return by_router().get(router_class)


def _cell(text: str | None) -> str:
    return f"`{text}`" if text else "—"


def family_table(coverage: dict[str, dict] | None = None) -> str:
    """The Markdown table of docs/hf.md, one line per row of :data:`FAMILIES`.

    coverage: family name -> {"profile": bool, "attach": bool} as measured by
    ``scripts/hf_coverage.py``; shown as two columns when given.
    """
    head = "| family | router class | selection rule | router output | bias slot | extra args |"
    rule = "| --- | --- | --- | --- | --- | --- |"
    if coverage is not None:
        head += " profile | attach |"
        rule += " --- | --- |"
    lines = [head, rule]
    for fam in sorted(FAMILIES, key=lambda f: f.name):
        rule_text = fam.rule.describe() if fam.rule else f"not a rule ({fam.note or 'fixed'})"
        if fam.null:
            rule_text += f"; null experts: {fam.null}"
        row = (
            f"| {fam.name} | {', '.join(f'`{r}`' for r in fam.routers)} | {rule_text} | "
            f"{', '.join(fam.output)} | {_cell(fam.bias)} | {_cell(', '.join(fam.args))} |"
        )
        if coverage is not None:
            got = coverage.get(fam.name, {})
            marks = ["yes" if got.get(k) else "no" for k in ("profile", "attach")]
            row += f" {marks[0]} | {marks[1]} |"
        lines.append(row)
    return "\n".join(lines) + "\n"
