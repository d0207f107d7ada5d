"""`kvtier verify MODEL`: DynamicCache and kvtier through every tier, token for token."""

from __future__ import annotations

import json
from pathlib import Path

import click

from kvtier.cli.common import config_options, load_cli_config
from kvtier.cli.run import DTYPE_CHOICES, read_prompt

DEFAULT_PROMPT_TOKENS = 2048  # of the shipped handbook, when no prompt is given


@click.command()
@click.argument("model")
@click.option(
    "--prompt-file",
    "prompt_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The prompt (repeatable: concatenated) [default: 2048 tokens of kvtier's handbook].",
)
@click.option("--prompt", default=None, help="Prompt text (after any --prompt-file).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES),
    default="auto",
    show_default=True,
    help="auto: bfloat16 with CUDA, float32 without (logits then agree to ~1e-5).",
)
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@click.pass_context
def verify(ctx: click.Context, model: str, **options: object) -> None:
    """Check kvtier on MODEL: generate greedily with DynamicCache and with kvtier, its budgets,
    blocks and prefill chunks forced small enough that GPU, host and disk all hold blocks
    (policy, codec and disk.path stay yours), and report whether the tokens match and the
    largest logit difference. Exits 1 on a mismatch.

    \b
    Examples:
      kvtier verify smollm2
      kvtier verify ./my-model --prompt-file long.txt --config my.toml
    """
    from transformers import AutoTokenizer

    from kvtier import planner, zoo
    from kvtier.verify import verify as run_verify

    cfg = load_cli_config(options["config_path"], options["sets"])
    dtype = planner.DTYPES.get(options["dtype"]) or planner.default_dtype()
    path = zoo.resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prompt_ids = _prompt_ids(tokenizer, options)
    network, tokenizer = zoo.load(model, dtype=dtype)
    result = run_verify(
        network, tokenizer, prompt_ids, cfg, max_new_tokens=int(options["max_new_tokens"])
    )
    if options["as_json"]:
        click.echo(json.dumps({"model": model, **result.to_dict()}, indent=2))
    else:
        for line in verify_lines(model, result, dtype=str(dtype).removeprefix("torch.")):
            click.echo(line)
    ctx.exit(0 if result.tokens_match else 1)


def _prompt_ids(tokenizer, options: dict):
    from kvtier import runner
    from kvtier.data import needle_document

    if options["prompt_files"] or options["prompt"] is not None:
        text = read_prompt(options["prompt"], options["prompt_files"])
        return runner.encode_prompt(tokenizer, text, chat=bool(options["chat"]))
    ids = runner.encode_prompt(tokenizer, needle_document(), chat=bool(options["chat"]))
    return ids[:, :DEFAULT_PROMPT_TOKENS]


def verify_lines(model: str, result, *, dtype: str) -> list[str]:
    from kvtier.report import tier_table

    blocks = result.blocks
    verdict = (
        f"yes ({len(result.kvtier_ids)} of {len(result.reference_ids)})"
        if result.tokens_match
        else f"NO: first difference at new token {result.first_mismatch} "
        f"(DynamicCache {result.reference_ids[result.first_mismatch :][:1]}, "
        f"kvtier {result.kvtier_ids[result.first_mismatch :][:1]})"
    )
    return [
        f"kvtier verify {model}: {result.prompt_tokens} prompt tokens, "
        f"{len(result.reference_ids)} new, {dtype}; blocks of {result.block_tokens} tokens, "
        f"prefill chunks of {result.prefill_chunk_tokens}",
        f"planned: {blocks['gpu']} blocks on the GPU, {blocks['host']} on host, "
        f"{blocks['disk']} on disk",
        "",
        *tier_table(result.stats),
        "",
        f"tokens match DynamicCache: {verdict}",
        f"largest logit difference: {result.max_logit_diff:.3g} over {result.compared_steps} steps",
        f"every tier held blocks and disk was read back: "
        f"{'yes' if result.every_tier_used else 'no'}",
    ]
