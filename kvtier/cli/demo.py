"""`kvtier demo`: generate through all three tiers next to DynamicCache."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option(
    "--tokens",
    "prompt_tokens",
    type=click.IntRange(min=1),
    default=3000,
    show_default=True,
    help="Prompt length in tokens.",
)
@click.option(
    "--new-tokens",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Tokens to generate.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for the random model and prompt."
)
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
    help="Write the stats as JSON to this file.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    prompt_tokens: int,
    new_tokens: int,
    seed: int,
    store: Path | None,
    json_path: Path | None,
) -> None:
    """Generate with a tiny random model through all three tiers and check it against all-GPU.

    Prints a table of blocks, bytes and tok/s per tier; exits 1 if the tokens differ.
    """
    from kvtier.demo import format_demo, run_demo

    result = run_demo(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        seed=seed,
        store=store,  # None: run_demo uses a temporary store and removes it
        json_path=json_path,
    )
    click.echo(format_demo(result))
    ctx.exit(0 if result.tokens_match else 1)
