"""torchrun's own failure report, kept off the terminal when the ranks already said what went wrong.

When a worker exits with a non-zero status torchrun logs ``failed (exitcode: N)`` and prints a
``ChildFailedError`` traceback with a table of the failures; on Ctrl-C it logs ``Sending process N
closing signal SIGINT`` and ends with a ``SignalException`` traceback. For a user error (the ranks
exit 2, rank 0 printed one line) or a Ctrl-C the run saved (130) that is a page of noise after the
line that matters. ``ReportFilter`` passes the ranks' output (which shares torchrun's stderr)
through as it comes, line by line (a progress bar's partial line at once), and holds torchrun's own
log lines and its elastic traceback with what follows it. At the end the held part is dropped when
the run was interrupted or the failures' root cause is exit status 2 or 130; otherwise (a crash, a
killed rank) it is shown in full.
"""
from __future__ import annotations

import os
import re
import threading
from typing import BinaryIO, List, Optional

_TORCHRUN_LOG = re.compile(rb"^[IWE]\d{4} [\d:.]+ +\d+ \S*torch/distributed/")
_MAYBE_HELD = re.compile(rb"^([IWE]\d|T(r(a(c(e(b(a(c(k)?)?)?)?)?)?)?)?$)")  # could become one of the above
_EXIT_CODE = re.compile(rb"exitcode\s*:\s*(-?\d+)")
QUIET_CODES = (2, 130)  # a user error said in one line by rank 0; an interrupted run that saved


class ReportFilter:
    """Forward ``source`` to ``sink`` in a thread, holding back torchrun's own failure report."""

    def __init__(self, source: BinaryIO, sink: BinaryIO):
        self.source, self.sink = source, sink
        self.held: List[bytes] = []
        self._buffer = b""
        self._block: Optional[List[bytes]] = None  # a traceback, until its last line says whose it is
        self._after_report = False  # torchrun's traceback was seen: the rest is its report
        self._mid_line = False  # the start of the current line was already forwarded
        self._sink_lost = False
        self._thread = threading.Thread(target=self._pump, name="torchrun-stderr", daemon=True)
        self._thread.start()

    def _write(self, data: bytes) -> None:
        if data and not self._sink_lost:
            try:
                self.sink.write(data)
                self.sink.flush()
            except OSError:  # the terminal hung up: keep reading, or the ranks would block on a full pipe
                self._sink_lost = True

    def _pump(self) -> None:
        fd = self.source.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._feed(chunk)
        if self._buffer:
            self._line(self._buffer)
        if self._block:
            self._write(b"".join(self._block))

    def _feed(self, chunk: bytes) -> None:
        data = self._buffer + chunk
        start = 0
        for match in re.finditer(rb"[\r\n]", data):
            self._line(data[start:match.end()])
            start = match.end()
        self._buffer = data[start:]
        if self._buffer and (self._mid_line or (self._block is None and not self._after_report
                                                and not _MAYBE_HELD.match(self._buffer))):
            self._write(self._buffer)  # a progress bar's redraw, shown now
            self._buffer, self._mid_line = b"", True

    def _line(self, line: bytes) -> None:
        if self._mid_line:
            self._write(line)
            self._mid_line = False
        elif self._after_report:
            self.held.append(line)
        elif self._block is not None:
            self._block.append(line)
            if line.strip() and not line[:1].isspace():  # the exception line ends the traceback
                text, self._block = b"".join(self._block), None
                if b"torch.distributed.elastic" in line:
                    self.held.append(text)
                    self._after_report = True
                else:
                    self._write(text)
        elif line.startswith(b"Traceback (most recent call last)"):
            self._block = [line]
        elif _TORCHRUN_LOG.match(line):
            self.held.append(line)
        else:
            self._write(line)

    def finish(self, returncode: int, interrupted: int = 0) -> int:
        """Wait for the end of the output; the exit status to report (torchrun's, or the ranks').
        ``interrupted``: the signal (SIGINT, SIGHUP) this launcher saw, if any."""
        self._thread.join()
        report = b"".join(self.held)
        codes = [int(c) for c in _EXIT_CODE.findall(report.split(b"Root Cause", 1)[-1])]
        root = codes[0] if codes else None
        if returncode != 0 and interrupted:
            return 128 + interrupted
        if returncode != 0 and root in QUIET_CODES:
            return root
        self._write(report)
        return returncode
