"""The option types and flags the commands share (cli.py and cli_record.py both use them):
numbers that refuse nan and inf and carry their fix, the bounds the kernel sets, --verbose."""

from __future__ import annotations

import math
import os

import click

MAX_BLOCKED_MS = 86_400_000          # a day; the kernel's threshold is u64 nanoseconds
MAX_HIGH_WATER = 2**32 - 1           # u32 in the kernel
VERBOSE = "otelwater.verbose"        # ctx.meta key (meta is shared by every context)


def debugging(ctx: click.Context | None) -> bool:
    return (os.environ.get("OTELWATER_DEBUG", "") not in ("", "0")
            or bool(ctx is not None and ctx.meta.get(VERBOSE)))


def _set_verbose(ctx, _param, value):
    if value:
        ctx.meta[VERBOSE] = True


def verbose_option(f):
    return click.option("-v", "--verbose", is_flag=True, expose_value=False, is_eager=True,
                        callback=_set_verbose,
                        help="On a failure, print the details: BCC's whole compiler/verifier "
                        "output and the cflags when a BPF program does not load, and the "
                        "traceback of an internal error (also: OTELWATER_DEBUG=1).")(f)


def _bad(message: str, fix: str | None, param, ctx) -> click.BadParameter:
    e = click.BadParameter(message, ctx=ctx, param=param)
    e.fix = fix
    return e


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and inf (nan compares False with every bound)."""

    def __init__(self, *args, fix: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.fix = fix

    def convert(self, value, param, ctx):
        try:
            rv = super().convert(value, param, ctx)
        except click.BadParameter as e:
            e.fix = self.fix
            raise
        if not math.isfinite(rv):
            raise _bad(f"{value!r} is not a finite number", self.fix, param, ctx)
        return rv


class IntRangeFix(click.IntRange):
    """An IntRange whose error carries a fix."""

    def __init__(self, *args, fix: str | None = None, **kw):
        super().__init__(*args, **kw)
        self.fix = fix

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter as e:
            e.fix = self.fix
            raise
