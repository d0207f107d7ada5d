"""`kvtier bench`: measure this machine's disk, codecs, copies and remote server; save what kvtier
reads."""

from __future__ import annotations

import json
import sys

import click

from kvtier.cli.common import config_options, load_cli_config, table_lines
from kvtier.sizes import format_size, parse_size


@click.command()
@config_options
@click.option(
    "--size",
    default=None,
    help="Bytes written to and read back from the store path (default 256MiB) and the remote "
    "server (default 64MiB).",
)
@click.option("--no-save", is_flag=True, help="Measure and print only; keep the saved results.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as one JSON object.")
def bench(
    config_path: str | None, sets: tuple[str, ...], size: str | None, no_save: bool, as_json: bool
) -> None:
    """Measure what kvtier's choices depend on, at the store path (disk.path): disk write+fsync
    and read, codec ratio and speed on KV-like data, and copies by size (pinned / pageable with
    a GPU, memory copies without); with a [remote] url, saving and loading blocks on that
    server (scratch values, deleted afterwards). Saves the results, which `codec = "auto"`,
    `kvtier plan` and the load-or-recompute choice read instead of assumed figures.

    \b
    Examples:
      kvtier bench
      kvtier bench --set disk.path=/nvme/kv --size 1GiB
      kvtier bench --set remote.url=valkey://cache.internal:6379
    """
    from tqdm import tqdm

    from kvtier.bench import run_bench
    from kvtier.measured import write_bench

    cfg = load_cli_config(config_path, sets)
    total = None if size is None else parse_size(size, key="--size")
    remote = cfg.remote.spec
    parts = 3 if remote is None else 4
    bar = tqdm(total=parts, desc="kvtier bench", unit="part", file=sys.stderr, leave=False)

    def progress(what: str) -> None:
        bar.set_postfix_str(f"{what} done")
        bar.update()

    try:
        results = run_bench(
            cfg.disk.path,
            disk_bytes=total or 256 << 20,
            remote=remote,
            remote_bytes=total or 64 << 20,
            progress=progress,
        )
    finally:
        bar.close()
    saved = None if no_save else write_bench(results)
    if as_json:
        click.echo(json.dumps(results, indent=2))
        return
    for line in bench_lines(results):
        click.echo(line)
    if saved is not None:
        click.echo(
            f'saved to {saved} (codec = "auto", kvtier plan and the load-or-recompute choice read it)'
        )


def bench_lines(results: dict) -> list[str]:
    """The measurements as a table: disk, codecs, copies by size, the remote server (a warning
    line instead when it could not be measured)."""
    (disk,) = results["disk"]
    cuda = results["cuda"] or "no CUDA"
    lines = [
        f"kvtier bench at {disk['path']}: {results['cpu_threads']} CPU threads, {cuda}",
        "",
    ]
    files = f"{disk['files']} x {format_size(disk['file_bytes'])}"
    rows = [
        ("WHAT", "SIZE", "GB/S", "HOW"),
        ("disk write+fsync", files, f"{disk['write_gbps']:.2f}", "temp, fsync, rename, fsync dir"),
        ("disk read", files, f"{disk['read_gbps']:.2f}", "cached pages dropped first"),
        ("disk read, cached", files, f"{disk['cached_read_gbps']:.2f}", "from the page cache"),
        (
            f"disk read x{disk['read_threads']}",
            files,
            f"{disk['parallel_read_gbps']:.2f}",
            f"cold, {disk['read_threads']} threads at once (prefix loads)",
        ),
    ]
    codec = results["codec"]
    sample = format_size(codec["sample_bytes"])
    for name in ("raw", "lz4", "shuffle+lz4"):
        numbers = codec[name]
        encode = "view" if name == "raw" else f"{numbers['encode_gbps']:.2f}"  # raw: no copy
        speeds = f"{encode} / {numbers['decode_gbps']:.2f}"
        rows.append(
            (f"codec {name}", sample, speeds, f"encode / decode, ratio {numbers['ratio']:.2f}")
        )
    for copy in results["copies"]:
        what = copy["kind"].replace("_", " ")
        rows.append((what, format_size(copy["bytes"]), f"{copy['gbps']:.2f}", "best of 5"))
    for server in results.get("remote", []):
        if "error" in server:
            rows.append(("remote", "-", "-", f"warning: not measured, {server['error']}"))
            continue
        blocks = f"{server['blocks']} x {format_size(server['block_bytes'])}"
        speeds = f"{server['save_gbps']:.2f} / {server['load_gbps']:.2f}"
        rows.append(("remote", blocks, speeds, "save / load, block checks included"))
    lines += table_lines(rows, right=(2,))
    lines += ["", f'codec = "auto" would choose {codec["auto_choice"]} for this disk']
    lines += [f"remote: {server['url']}" for server in results.get("remote", [])]
    return lines
