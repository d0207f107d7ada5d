"""`kvtier plan MODEL --context N`: where a context would live, from the model's config alone."""

from __future__ import annotations

import json

import click

from kvtier.cli.common import config_options, load_cli_config, table_lines
from kvtier.sizes import format_size

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@click.command()
@click.argument("model")
@click.option(
    "--context",
    "tokens",
    type=click.IntRange(min=1),
    required=True,
    help="Tokens of context (prompt plus generated).",
)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES),
    default="auto",
    show_default=True,
    help="KV dtype; auto: bfloat16 with CUDA, float32 without (as `kvtier run`).",
)
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    default=None,
    help="Plan the layers split evenly over N GPUs (as device_map='auto' would); gpu.budget "
    "then applies to each GPU, [gpu.devices] overrides one. Default: one device.",
)
@config_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
def plan(
    model: str,
    tokens: int,
    batch: int,
    dtype: str,
    gpus: int | None,
    config_path: str | None,
    sets: tuple[str, ...],
    as_json: bool,
) -> None:
    """Plan a context of N tokens of MODEL under the configured budgets, reading only its
    config (a directory with config.json, a cached hub id, or smollm2): KV bytes per token,
    the smallest GPU budget that streams it, blocks and tokens per tier, bytes streamed per
    decode step and their time from `kvtier bench` speeds, and the largest context that fits.
    Exits 2 with the reason when the context cannot fit.

    \b
    Examples:
      kvtier plan smollm2 --context 8192
      kvtier plan ./my-model --context 200000 --set gpu.budget=4GiB --set host.budget=16GiB
      kvtier plan ./my-model --context 200000 --gpus 2 --set gpu.budget=4GiB
    """
    from kvtier.planner import DTYPES, plan_model, require

    cfg = load_cli_config(config_path, sets)
    chosen = plan_model(
        model, cfg, tokens=tokens, batch=batch, dtype=DTYPES.get(dtype), gpus=gpus or 0
    )
    if as_json:
        click.echo(json.dumps(chosen.to_dict(), indent=2))
    else:
        for line in plan_lines(chosen):
            click.echo(line)
    require(chosen)


def plan_lines(chosen) -> list[str]:
    """The plan as a person reads it: the model, the tiers, the decode step, the limit."""
    g, p, step = chosen.geometry, chosen.plan, chosen.step
    shape = chosen.shape
    dtype = str(g.dtype).removeprefix("torch.")
    lines = [
        f"kvtier plan {chosen.model}: {p.tokens} tokens, batch {g.batch}, {dtype} KV",
        f"model: {shape.model_type}, {len(shape.sliding_windows)} layers "
        f"({len(shape.tiered_layers)} tiered), {shape.kv_heads} KV heads x {shape.head_dim}",
        f"KV: {format_size(g.kv_bytes(1))} per token, {format_size(p.kv_bytes)} in all; "
        f"blocks of {g.block_tokens} tokens ({format_size(g.block_bytes)})",
        f"smallest GPU budget that streams it: {format_size(p.min_gpu_bytes)} "
        + (
            f"(staging for {chosen.buffers} layers + 1 block)"
            if g.single_device
            else f"per device (staging for {chosen.buffers} layers + its share of 1 block)"
        ),
        "",
    ]
    tokens = chosen.tier_tokens
    rows = [("TIER", "BUDGET", "BLOCKS", "TOKENS", "KV")]
    for name, blocks in (("gpu", p.gpu_blocks), ("host", p.host_blocks), ("disk", p.disk_blocks)):
        held = min(p.kv_bytes, blocks * g.block_bytes)
        budget = chosen.budgets[name]
        if name == "gpu" and not g.single_device:
            budget = sum(row.budget_bytes for row in p.devices)  # every device's together
        rows.append((name, format_size(budget), str(blocks), str(tokens[name]), _size(held)))
    lines += table_lines(rows, right=(1, 2, 3, 4))
    if not g.single_device:
        lines += ["", *device_lines(chosen)]
    lines.append("")
    if p.in_place:
        lines.append("in place: every block fits the GPU budget; nothing is streamed per step")
    else:
        lines += [
            f"staging: {format_size(p.staging_bytes)} of the GPU budget"
            + ("" if g.single_device else f" ({len(p.devices)} devices)"),
            f"per decode step: {format_size(p.streamed_bytes_per_step)} streamed "
            f"(host {format_size(step.host_bytes)}, disk {format_size(step.disk_bytes)}): "
            f"at least {step.seconds * 1e3:.1f} ms of copies, compute not included",
            f"  host->GPU {step.copy.gbps:.2f} GB/s, {step.copy.source}",
            f"  disk read {step.disk_read.gbps:.2f} GB/s, {step.disk_read.source}",
        ]
    if chosen.remote is not None:
        r = chosen.remote
        lines += [
            f"remote: {r.url}",
            "  a shared cache beside the tiers: never a block's only copy, so no room here",
            f"  a stored prefix of all {r.blocks} whole blocks would load in ~{r.load_s:.2f} s "
            f"at {r.gbps:.2f} GB/s ({r.source}; the tier measures the server once it loads)",
        ]
    lines.append(f"largest context under these budgets: {chosen.largest_tokens} tokens")
    return lines


def device_lines(chosen) -> list[str]:
    """One row per device of the GPU tier: the layers on it, its budget and what it holds."""
    rows = [("DEVICE", "LAYERS", "BUDGET", "STAGING", "SLOTS", "FREE", "MIN BUDGET")]
    for row in chosen.plan.devices:
        free = row.budget_bytes - row.staging_bytes - row.slot_bytes
        rows.append(
            (
                str(row.device),
                str(row.layers),
                format_size(row.budget_bytes),
                _size(row.staging_bytes),
                _size(row.slot_bytes),
                format_size(free) if free >= 0 else "over",
                format_size(row.min_bytes),
            )
        )
    note = "gpu budgets are per device; a block's GPU slot spans every device's layers"
    return [note, *table_lines(rows, right=(1, 2, 3, 4, 5, 6))]


def _size(num_bytes: int) -> str:
    return format_size(num_bytes) if num_bytes else "-"
