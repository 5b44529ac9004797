"""The human-readable report of `processors.model_check` (what `check-model` prints)."""

from __future__ import annotations

from processors.model_check import ModelCheck, TokenDiff


def format_report(check: ModelCheck) -> str:
    """The human-readable report (what `python -m streams check-model` prints)."""
    f = check.facts
    lines = [
        f"checkpoint       {f.model_path}",
        f"layout           {f.layout}",
        f"served by        {f.engine}",
        f"chat template    {f.template} (from {f.template_source})",
        f"system message   {f.system_message}",
        f"dtype            checkpoint {f.checkpoint_dtype}; exactness in float32",
        f"vocabulary       tokenizer {f.tokenizer_size}, model {f.model_vocab_size} "
        f"(padding {f.vocab_padding})",
        f"tiles            {f.image_size} px, {f.tokens_per_tile} tokens per tile; "
        f"trained {f.checkpoint_tiles}; served {f.served_tiles}",
        f"remote code      {'yes: ' + ', '.join(f.code_files) if f.remote_code else 'no'}",
    ]
    for run in check.runs:
        gate = "exactness check" if run.dtype == "float32" else "reported only"
        lines += ["", f"== {run.dtype} ({gate}): reference = {run.reference}; fast = {run.fast}"]
        for r in run.requests:
            prompt = "equal" if r.prompt_diff is None else _diff_text(r.prompt_diff)
            tokens = (
                f"equal ({r.fast_tokens} ids)" if r.token_diff is None else _diff_text(r.token_diff)
            )
            lines += [
                f"{r.name}: prompt {r.prompt_tokens} ids {prompt}; greedy {tokens}",
                f"  decision {'agrees' if r.decisions_agree else 'DIFFERS'}: "
                f"reference {r.reference_decision} | fast {r.fast_decision}",
                f"  time: reference {r.reference_s:.3f} s, fast {r.fast_s:.3f} s",
            ]
            if r.constrained_agrees is not None:
                same = "same text" if r.constrained_text_equal else "text differs"
                lines.append(
                    f"  constrained {'agrees' if r.constrained_agrees else 'DIFFERS'} "
                    f"({same}): {r.constrained_decision} ({r.constrained_s or 0.0:.3f} s)"
                )
            if r.forced_agrees is not None:
                same = "same text" if r.forced_text_equal else "text differs"
                lines.append(
                    f"  forced runs {'agree' if r.forced_agrees else 'DIFFER'} with stepping "
                    f"({same}): {r.forced_decision} ({r.forced_s or 0.0:.3f} s)"
                )
        lines.append(
            f"{run.dtype}: prompts {'equal' if run.prompts_equal else 'DIFFER'}, greedy ids "
            f"{'equal' if run.tokens_equal else 'DIVERGE'}, decisions "
            f"{'agree' if run.decisions_agree else 'DIFFER'}"
        )
        for subject, counts in (
            ("constrained and free greedy", run.constrained_agreement),
            (
                "forced runs (the slot engine) and stepping through the grammar",
                run.forced_agreement,
            ),
        ):
            if counts is not None:
                agree, identical, compared = counts
                lines.append(
                    f"{run.dtype}: {subject} give the same decision and answers on {agree} of "
                    f"{compared} requests, the same text on {identical}"
                )
    verdict = "PASS" if check.passed else "FAIL"
    lines += [
        "",
        f"{verdict}: float32 prompts and greedy ids "
        + ("are equal on both paths" if check.passed else "differ (see above)"),
    ]
    return "\n".join(lines)


def _diff_text(diff: TokenDiff) -> str:
    return f"DIFFER at {diff.position}: reference {diff.reference}, fast {diff.fast}"
