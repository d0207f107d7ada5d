"""`kvtier run MODEL`: generate from a prompt through the tiers, streaming the text."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import click

from kvtier.cli.common import config_options, load_cli_config
from kvtier.errors import KVTierError
from kvtier.sizes import format_size

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@click.command()
@click.argument("model")
@click.option("--prompt", default=None, help="The prompt text (after any --prompt-file).")
@click.option(
    "--prompt-file",
    "prompt_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Read the prompt from a file (repeatable: concatenated); else --prompt or stdin.",
)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option(
    "--temperature",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="0: greedy; above 0: sample.",
)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES),
    default="auto",
    show_default=True,
    help="Weights and KV; auto: bfloat16 with CUDA, float32 without.",
)
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option("--show-blocks", is_flag=True, help="End with a map of where each block lies.")
@click.option("--progress/--no-progress", default=True, help="The prefill bar on stderr.")
def run(model: str, **options: object) -> None:
    """Generate with MODEL from a prompt, its KV in GPU, host and disk tiers.

    MODEL is smollm2 (fetched on first use), a local Hugging Face model directory, or a hub
    id already in the local HF cache. Tokens stream to stdout; stderr shows a progress bar over
    the prefill chunks, then a table per tier and the timings. The context is planned before
    any weight is loaded: a job the budgets cannot hold is refused at once.

    \b
    Examples:
      kvtier run smollm2 --chat --prompt "Name three uses of a hash table."
      kvtier run smollm2 --chat --prompt-file long.txt --prompt "Summarize it." --show-blocks
      cat notes.txt | kvtier run ./my-model --set gpu.budget=2GiB --json
    """
    job = _prepare(model, options)
    result = _generate(job, options)
    if options["as_json"]:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo("")  # end the streamed text's line
    _echo_summary(result, show_blocks=bool(options["show_blocks"]))


def read_prompt(prompt: str | None, files: tuple[Path, ...]) -> str:
    """The files' text, then --prompt, joined by blank lines; stdin when neither is given."""
    parts = [path.read_text(encoding="utf-8") for path in files]
    if prompt is not None:
        parts.append(prompt)
    if not parts:
        stdin = sys.stdin  # looked up now: click's test runner swaps it
        if stdin.isatty():
            raise KVTierError("no prompt: give --prompt TEXT, --prompt-file FILE or pipe it in")
        parts.append(stdin.read())
    return "\n\n".join(part.rstrip("\n") for part in parts)


def _prepare(model: str, options: dict) -> dict:
    """Config, prompt ids and the plan, checked before the weights load."""
    from transformers import AutoTokenizer

    from kvtier import planner, runner, zoo
    from kvtier.controller import check_servers

    cfg = load_cli_config(options["config_path"], options["sets"])
    text = read_prompt(options["prompt"], options["prompt_files"])
    dtype = planner.DTYPES.get(options["dtype"]) or planner.default_dtype()
    path = zoo.resolve(model)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    prompt_ids = runner.encode_prompt(tokenizer, text, chat=bool(options["chat"]))
    tokens = prompt_ids.shape[1] + int(options["max_new_tokens"])
    chosen = planner.plan_model(model, cfg, tokens=tokens, dtype=dtype)
    planner.require(chosen)  # refused here, before the weights or a single prefill chunk
    check_servers(cfg)  # a wrong remote password or host too
    return {"model": model, "cfg": cfg, "dtype": dtype, "prompt_ids": prompt_ids, "plan": chosen}


def _generate(job: dict, options: dict) -> dict:
    from tqdm import tqdm

    from kvtier import runner, zoo
    from kvtier.hf.cache import TieredCache

    network, tokenizer = zoo.load(job["model"], dtype=job["dtype"])
    cache = TieredCache(network, job["cfg"])
    prompt_tokens = job["prompt_ids"].shape[1]
    bar = tqdm(
        total=prompt_tokens,
        desc="prefill",
        unit="tok",
        file=sys.stderr,
        disable=not options["progress"],
    )

    def on_prefill(done: int, total: int) -> None:
        bar.update(done - bar.n)
        bar.set_postfix_str(_tier_bytes(cache.stats()), refresh=False)
        if done >= total:
            bar.close()

    sampling = runner.Sampling(
        temperature=float(options["temperature"]),
        top_p=float(options["top_p"]),
        seed=int(options["seed"]),
    )
    stream = None if options["as_json"] else (lambda piece: click.echo(piece, nl=False))
    try:
        generation = runner.generate(
            network,
            tokenizer,
            job["prompt_ids"],
            cache=cache,
            max_new_tokens=int(options["max_new_tokens"]),
            sampling=sampling,
            on_text=stream,
            on_prefill=on_prefill,
        )
        stats, blocks = cache.stats(), runner.block_map(cache)
    finally:
        bar.close()
        cache.close()
    result = {"model": job["model"], **generation.to_dict(), "stats": stats}
    result |= {"plan": job["plan"].to_dict(), "sampling": asdict(sampling)}
    if options["show_blocks"]:
        result["block_map"] = blocks
    return result


def _tier_bytes(stats: dict) -> str:
    return ", ".join(
        f"{name} {format_size(stats.get(name, {}).get('bytes_used', 0))}"
        for name in ("gpu", "host", "disk")
    )


def _echo_summary(result: dict, *, show_blocks: bool) -> None:
    from kvtier.report import block_map_lines, summary_lines, tier_table

    stats = result["stats"]
    for line in ["", *tier_table(stats), "", *summary_lines(result, stats)]:
        click.echo(line, err=True)
    if show_blocks:
        block_tokens = stats.get("block_tokens", result["plan"]["block_tokens"])
        click.echo("", err=True)
        for line in block_map_lines(result["block_map"], block_tokens):
            click.echo(line, err=True)
