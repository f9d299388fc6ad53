"""Every kind of record that flows from the sources to the sinks, and the one way to take them.

    kind       type                  made by
    snapshot   WaterSnapshot         the kernel probe (and the socket-table seed)
    read       ReadRecord            a Go read sampler
    lost       LostEvents            a probe whose ring buffer was full
    notice     Notice                a probe or the loop: something to say once
    process    ProcessInfo           a recording (who a traced process is)
    alert      AlertTransition       the alert stage
    verdict    Verdict               the correlator
    summary    Summary               the pipeline at the end (per socket, per reader, per file)

`RecordHandler` is the base of everything that takes records (every sink, the report): a class
says, for each kind, either `on_<kind>(self, record)` or that it ignores the kind (`ignores`).
That is checked when the class is defined, so a new kind added here makes every handler that
has not said what it does with it fail at import, not lose the records in silence; and a record
of a type that is not listed here is an error where it arrives (`UnknownRecord`), never skipped.
Dispatch is one dictionary lookup on the record's exact type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable

from otelwater.events.alert import AlertTransition
from otelwater.events.model import LostEvents, Notice, ReadRecord, VerdictCounts, WaterSnapshot
from otelwater.events.recording import ProcessInfo
from otelwater.events.verdict import Verdict


@dataclass(frozen=True, slots=True)
class Summary:
    """A summary made at the end of a run: `data["type"]` says which (socket_summary,
    reader_summary, correlation); its JSON is `data` as it is."""

    data: dict

    def to_json(self) -> dict:
        return self.data


KINDS: dict[type, str] = {
    WaterSnapshot: "snapshot",
    ReadRecord: "read",
    LostEvents: "lost",
    Notice: "notice",
    ProcessInfo: "process",
    VerdictCounts: "counts",
    AlertTransition: "alert",
    Verdict: "verdict",
    Summary: "summary",
}
KIND_NAMES: tuple[str, ...] = tuple(KINDS.values())
RAW_KINDS = frozenset({"snapshot", "read", "lost", "notice", "process", "counts"})  # before
#                                                                                 analysis


class UnknownRecord(TypeError):
    """A record whose type is not one of KINDS reached a handler: a bug, said at once."""


def kind_of(record) -> str:
    try:
        return KINDS[type(record)]
    except KeyError:
        raise UnknownRecord(f"{type(record).__name__} is not a record kind "
                            f"(otelwater.events.records.KINDS lists them)") from None


def record_ts(record) -> int:
    """A record's time: when a read returned, a verdict's read returned, else its ts_ns."""
    t = type(record)
    if t is ReadRecord:
        return record.ts_end_ns
    if t is Verdict:
        return record.read.ts_end_ns
    return getattr(record, "ts_ns", 0)


def _ignore(_self, _record) -> None:
    return None


class RecordHandler:
    """Takes records by kind. Subclasses define `on_<kind>` for the kinds they use and list
    the rest in `ignores`; `abstract=True` in the class statement defers the check to the
    subclasses (a base class that handles some kinds)."""

    ignores: ClassVar[frozenset[str]] = frozenset()
    _dispatch: ClassVar[dict[type, Callable]] = {}

    def __init_subclass__(cls, abstract: bool = False, **kw):
        super().__init_subclass__(**kw)
        unknown = set(cls.ignores) - set(KIND_NAMES)
        if unknown:
            raise TypeError(f"{cls.__name__} ignores {sorted(unknown)}: not record kinds "
                            f"({', '.join(KIND_NAMES)})")
        table: dict[type, Callable] = {}
        missing = []
        for typ, kind in KINDS.items():
            fn = getattr(cls, "on_" + kind, None)
            if fn is not None and kind in cls.ignores:
                raise TypeError(f"{cls.__name__} both handles and ignores {kind!r}")
            if fn is not None:
                table[typ] = fn
            elif kind in cls.ignores:
                table[typ] = _ignore
            else:
                missing.append(kind)
        if missing and not abstract:
            raise TypeError(f"{cls.__name__} neither handles (on_<kind>) nor ignores "
                            f"(ignores) the record kinds {missing}")
        cls._dispatch = table

    def handles(self, kind: str) -> bool:
        """Whether records of `kind` do anything here (not ignored)."""
        return kind not in self.ignores

    def handle(self, records: Iterable) -> None:
        table = self._dispatch
        for r in records:
            fn = table.get(type(r))
            if fn is None:
                kind_of(r)          # raises UnknownRecord with the type's name
                raise UnknownRecord(f"{type(self).__name__} was defined abstract and cannot "
                                    f"take {KINDS[type(r)]!r} records")
            fn(self, r)
