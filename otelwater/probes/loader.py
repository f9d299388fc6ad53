"""What every otelwater BPF program needs to be built and loaded, in one place: the running
kernel's offsets as -D flags, the ring-buffer size check, and BCC's compile/load failures
turned into one-line ProbeLoadErrors. Used by the water probe and both Go read samplers."""

from __future__ import annotations

from otelwater.errors import ProbeLoadError, UsageError
from otelwater.events.layout import BPF_DIR
from otelwater.probes import host


def one_line(e: BaseException) -> str:
    """The first line of an exception's text (BCC puts whole compiler logs in them)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_ringbuf_pages(pages: int) -> None:
    if pages < 1 or pages & (pages - 1):
        raise UsageError(f"ring buffer pages must be a power of two, got {pages}",
                         "use 1, 2, 4, ... 1024")


def kernel_cflags(offsets: dict[str, int], ringbuf_pages: int) -> list[str]:
    """The include path, every BTF offset as -D, and the ring buffer size."""
    check_ringbuf_pages(ringbuf_pages)
    flags = [f"-I{BPF_DIR}"]
    flags += [f"-D{k}={v}" for k, v in sorted(offsets.items())]
    flags.append(f"-DOTW_RINGBUF_PAGES={ringbuf_pages}")
    return flags


def running_kernel_btf():
    """The running kernel's BTF (or OTELWATER_BTF's), after the host checks."""
    host.require_can_trace()
    from otelwater.probes.btf import Btf

    return Btf.load(host.btf_path())


def load_bpf(src: str, cflags: list[str], what: str):
    """Compile and load bpf/<src> with BCC; any failure is one ProbeLoadError line."""
    from bcc import BPF  # host.require_can_trace() has checked that it imports

    try:
        return BPF(src_file=str(BPF_DIR / src), cflags=cflags)
    except Exception as e:  # BCC raises bare Exception for compile and load failures
        raise ProbeLoadError(f"{what} did not load: {one_line(e)}",
                             "run 'otelwater doctor'") from e
