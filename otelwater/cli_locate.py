"""`otelwater locate BINARY`: show what the Go read sampler would attach to in a Go binary.

Prints the Go version, whether the binary is stripped/PIE, net.(*conn).Read's address, file
offset, size and return sites, and the struct offsets with their source (DWARF or the
per-version table); `--json` prints GoBinaryInfo.to_json(). Bad input raises BinaryError,
which cli.py turns into one line and exit code 4.
"""

from __future__ import annotations

import json

import click

from otelwater.probes.goelf import locate

EPILOG = """\b
Examples:
  otelwater locate ./server          # where the Go read probes would go
  otelwater locate /proc/1234/exe    # the binary of a running process
  otelwater locate --json ./server | jq .offsets
"""


def render(info) -> str:
    yn = lambda b: "yes" if b else "no"  # noqa: E731
    lines = [
        f"binary:   {info.path}",
        f"go:       {info.go_version}   stripped: {yn(info.stripped)}   pie: {yn(info.pie)}",
    ]
    for f in info.functions.values():
        rets = ", ".join(f"+{o} ({o:#x})" for o in f.return_offsets)
        lines += [
            f"function: {f.name}",
            f"  address {f.address:#x}   file offset {f.file_offset:#x}   size {f.size}",
            f"  ret at  {rets} from the start",
        ]
    lines.append(f"offsets (from {'DWARF' if info.offsets_source == 'dwarf' else 'the Go version table'}):")
    width = max(map(len, info.offsets))
    lines += [f"  {k:<{width}}  {v}" for k, v in info.offsets.items()]
    return "\n".join(lines)


@click.command("locate", epilog=EPILOG)
@click.argument("binary", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of the summary")
def locate_command(binary: str, as_json: bool) -> None:
    """Find net.(*conn).Read, its return sites and the struct offsets in a Go x86-64 BINARY."""
    info = locate(binary)
    click.echo(json.dumps(info.to_json(), indent=2) if as_json else render(info))
