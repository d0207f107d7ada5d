"""`kvtier demo`: a real model through all three tiers next to DynamicCache (or --tiny)."""

from __future__ import annotations

from pathlib import Path

import click

from kvtier.errors import ConfigError


@click.command()
@click.option(
    "--tiny",
    is_flag=True,
    help="A tiny random Llama instead of SmolLM2: nothing to download, output not meant to read.",
)
@click.option(
    "--tokens",
    "prompt_tokens",
    type=click.IntRange(min=1),
    default=None,
    help="With --tiny: prompt length in tokens [default: 3000].",
)
@click.option(
    "--new-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Tokens to generate at most [default: 24; 32 with --tiny].",
)
@click.option("--seed", type=int, default=None, help="With --tiny: seed of the model and prompt.")
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Disk store directory [default: a temporary one, removed afterwards].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the result, stats included, as JSON to this file.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    tiny: bool,
    prompt_tokens: int | None,
    new_tokens: int | None,
    seed: int | None,
    store: Path | None,
    json_path: Path | None,
) -> None:
    """SmolLM2-135M-Instruct answers a question about a passphrase hidden in a 4,600-token
    handbook, its KV cache in GPU (CPU memory without CUDA), host and disk tiers, next to
    DynamicCache's answer: both answers, whether the tokens match, the tier table and timings.
    Fetches the model the first time (about a minute). Exits 1 if the tokens differ.

    \b
    Examples:
      kvtier demo
      kvtier demo --tiny --tokens 3000 --json demo.json
    """
    if tiny:
        from kvtier.demo import format_tiny_demo, run_tiny_demo

        result = run_tiny_demo(
            prompt_tokens=3000 if prompt_tokens is None else prompt_tokens,
            new_tokens=32 if new_tokens is None else new_tokens,
            seed=0 if seed is None else seed,
            store=store,  # None: a temporary store, removed afterwards
            json_path=json_path,
        )
        click.echo(format_tiny_demo(result))
        ctx.exit(0 if result.tokens_match else 1)
    if prompt_tokens is not None or seed is not None:
        raise ConfigError("--tokens and --seed shape the random model: add --tiny, or drop them")
    from kvtier.demo import format_demo, run_demo

    result = run_demo(
        new_tokens=24 if new_tokens is None else new_tokens, store=store, json_path=json_path
    )
    click.echo(format_demo(result))
    ctx.exit(0 if result.tokens_match else 1)
