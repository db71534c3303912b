"""The DALI decoding of ``dali-ba data verify``, in a child process that may crash or leak.

Why a child: a DALI 2.4 pipeline is dead after a decode error and destroying it can crash the
process, so a failed pipeline is kept alive (``abandon_pipeline``) with its threads and buffers; and
the CPU decoder sometimes crashes the process (segmentation fault) on corrupt data in a batch. The
parent (``DecodeWorker``) sends the files' bytes and gets back None or DALI's message per request.
It replaces the child after ``MAX_ABANDONED`` abandoned pipelines or ``RSS_BUDGET`` bytes of growth,
so memory stays bounded; a child that dies or hangs is replaced and the request reported as failed.
The parent never imports DALI.
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

# A child is replaced after MAX_ABANDONED failed pipelines (each keeps 2-3 threads and its batch's
# decoded buffers) or, once it holds one, RSS_BUDGET bytes of growth since start-up (large images).
# Chosen by measurement: docs/reliability.md.
MAX_ABANDONED = 32
RSS_BUDGET = 512 << 20
START_TIMEOUT_S = 120.0  # interpreter start + `import nvidia.dali`, on a loaded machine
DECODE_TIMEOUT_S = 300.0  # per request, plus DECODE_TIMEOUT_S_PER_MB of encoded bytes
DECODE_TIMEOUT_S_PER_MB = 10.0
MAX_FAILED_STARTS = 3  # in a row: then DALI cannot run here at all


@dataclass(frozen=True)
class Failure:
    """Why a request failed: DALI's message (``kind`` "error"), or the child died ("crash") or
    did not answer in time ("timeout")."""

    message: str
    kind: str


class WorkerError(RuntimeError):
    """The decode process cannot be started (e.g. DALI is not installed)."""


# ----------------------------------------------------------------------------- child side
@contextlib.contextmanager
def _native_stderr_captured():
    """Yield a list that receives what C++ code wrote to file descriptor 2 meanwhile.

    DALI's codecs log every failed decode there (``[ERROR] [libjpeg_turbo_decoder] ... Premature end
    of JPEG data``): expected noise here, and the last line is often a better reason than DALI's
    exception ("Failed to decode sample").
    """
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode(errors="replace"))


def codec_message(native_log: str) -> str | None:
    """The last codec error line of ``native_log``, without colour codes and logger tags."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in native_log.splitlines() if "[ERROR]" in line]
    if not lines:
        return None
    return re.sub(r"^(\s*\[[^\]]*\]\s*)+", "", lines[-1]).strip() or None


def dali_message(error: str, native_log: str = "") -> str:
    """The meaningful line of a DALI error (the first lines are 'Critical error in pipeline'),
    followed by the codec's own message when it logged one."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if "encountered:" in lines:
        lines = lines[lines.index("encountered:") + 1:]
    lines = [line for line in lines if not line.startswith(("Current pipeline object",
                                                            "Critical error in pipeline"))]
    msg = lines[0] if lines else "unknown DALI error"
    # The sample index refers to the batch we decoded: noise for the user.
    msg = re.sub(r"\s*sample #\d+\s*:?\s*$", " sample", msg).rstrip(" :")
    codec = codec_message(native_log)
    return f"{msg}: {codec}" if codec else msg


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux-style KiB; the peak


def _serve(conn: Connection) -> None:
    """The child's loop: ``(samples, batch_size, num_threads)`` in, ``("done", message, abandoned, rss)``
    out (message None when every sample decoded); EOF or None ends it."""
    from nvidia.dali import fn, pipeline_def, types

    from dali_ba.pipeline import abandon_pipeline

    def build(batch_size: int, num_threads: int):
        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=None,
                      prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
        def decode_pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)

        pipe = decode_pipe()
        pipe.build()
        return pipe

    pipes: dict[tuple[int, int], object] = {}
    abandoned = 0
    conn.send(("ready", os.getpid(), _rss_bytes()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        samples, batch_size, num_threads = request
        key = (batch_size, num_threads)
        message = None
        captured: list[str] = []
        try:
            with _native_stderr_captured() as captured:
                if key not in pipes:
                    pipes[key] = build(batch_size, num_threads)
                pipes[key].feed_input("encoded", samples)
                pipes[key].run()
        except Exception as exc:  # noqa: BLE001 - DALI raises RuntimeError; any error fails the request
            message = dali_message(str(exc), "".join(captured)) if str(exc).strip() else type(exc).__name__
            pipe = pipes.pop(key, None)
            if pipe is not None:  # dead after any error; destroying it can crash DALI 2.4
                abandon_pipeline(pipe)
                abandoned += 1
        conn.send(("done", message, abandoned, _rss_bytes()))


def _child_main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; EOF ends us
    conn = Connection(fd)
    try:
        _serve(conn)
    except BaseException as exc:  # noqa: BLE001 - tell the parent why, e.g. DALI is not installed
        with contextlib.suppress(OSError):
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown: DALI's exit hooks have nothing to do for us and may crash


# ----------------------------------------------------------------------------- parent side
_EOF, _TIMEOUT = ("eof",), ("timeout",)  # what _receive returns instead of a message


def _exit_description(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


class DecodeWorker:
    """Parent-side handle of the decode child: started at once, replaced as needed, ``close()``d.

    ``pid`` is the current child's process id (None between children).
    """

    def __init__(self):
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._start_rss = 0
        self._failed_starts = 0
        self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        parent_end, child_end = socket.socketpair()
        # This very dali_ba, whatever the child's working directory and sys.path would pick.
        package_root = str(Path(__file__).resolve().parents[2])
        code = (f"import sys; sys.path.insert(0, {package_root!r}); "
                f"from dali_ba.data.decode_worker import _child_main; _child_main({child_end.fileno()})")
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, pass_fds=(child_end.fileno(),))
        finally:
            child_end.close()
        self._conn = Connection(parent_end.detach())
        self._ready = False

    def _stop(self, kill: bool) -> int | None:
        """End the current child (politely unless ``kill``); return its exit status."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()  # the child reads EOF and exits
        if proc is None:
            return None
        if kill:
            with contextlib.suppress(OSError):
                proc.kill()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def _receive(self, timeout: float):
        """The child's next message; ``_EOF`` if it died, ``_TIMEOUT`` if it said nothing in ``timeout``."""
        try:
            if not self._conn.poll(timeout):
                return _TIMEOUT
            return self._conn.recv()
        except (EOFError, OSError):
            return _EOF

    def _ensure_ready(self) -> None:
        while True:
            if self._proc is None:
                self._start()
            if self._ready:
                return
            hello = self._receive(START_TIMEOUT_S)
            if hello[0] == "ready":
                self._ready, self._start_rss, self._failed_starts = True, hello[2], 0
                return
            status = self._stop(kill=True)
            self._failed_starts += 1
            if hello[0] == "failed":
                raise WorkerError(f"the DALI decode process failed to start: {hello[1]}")
            if self._failed_starts >= MAX_FAILED_STARTS:
                last = "no answer" if hello is _TIMEOUT else _exit_description(status)
                raise WorkerError(f"the DALI decode process failed to start {self._failed_starts} times in a row "
                                  f"(last: {last})")

    def decode(self, samples: list[np.ndarray], batch_size: int, num_threads: int) -> Failure | None:
        """Decode ``samples`` (at most ``batch_size``) in the child; None if all of them decode."""
        self._ensure_ready()
        timeout = DECODE_TIMEOUT_S + DECODE_TIMEOUT_S_PER_MB * sum(s.nbytes for s in samples) / 1e6
        try:
            self._conn.send((samples, batch_size, num_threads))
            reply = self._receive(timeout)
        except OSError:  # it died before reading the request
            reply = _EOF
        if reply is _TIMEOUT:
            self._stop(kill=True)
            return Failure(f"DALI did not finish decoding it within {timeout:.0f} s (stopped)", "timeout")
        if reply is _EOF:
            status = self._stop(kill=False)  # it is exiting: its status says how it died
            return Failure(f"DALI crashed while decoding it (decode process {_exit_description(status)})", "crash")
        if reply[0] != "done":  # the child's loop itself failed (it sent why and exited)
            self._stop(kill=True)
            return Failure(f"the decode process failed: {reply[1]}", "crash")
        _, message, abandoned, rss = reply
        if abandoned >= MAX_ABANDONED or (abandoned and rss - self._start_rss > RSS_BUDGET):
            self._stop(kill=False)
            self._start()  # the replacement imports DALI while we carry on
        return None if message is None else Failure(message, "error")

    def close(self) -> None:
        self._stop(kill=False)

    def __enter__(self) -> DecodeWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
