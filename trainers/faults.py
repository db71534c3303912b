"""Faults every rank must agree on, and the one-line messages for the faults a run cannot survive.

- A file that fails to decode (``dali_ba.errors.DecodeError``) is met by one rank; the others are
  told through a collective the trainer runs anyway (see ``loop.py``), all ranks save the same
  checkpoint and stop with the same :class:`DataFailure` (printed once, by rank 0).
- Set-up that may fail on some ranks (a resume that does not fit, a folder another run holds,
  rank 0's out_dir) is followed by :func:`agreed`: one gather, and every rank stops with the same
  message (printed once), instead of some ranks waiting forever in the next collective.
- A rank that dies or hangs makes the others' collectives fail (a closed connection at once, a
  hung peer after ``train.dist_timeout_s``): :func:`lost_peer` recognises those errors so that
  ``trainers.train`` prints one line instead of a traceback.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Optional

from dali_ba.errors import UserError
from trainers import dist as tdist


class DataFailure(UserError):
    """A file could not be decoded on some rank: every rank stops with this message."""

    all_ranks = True  # the same message on every rank: only rank 0 prints it


class SetupFailure(UserError):
    """A set-up step failed on some rank: every rank stops with this message."""

    all_ranks = True


@contextmanager
def agreed(env: tdist.DistEnv) -> Iterator[None]:
    """Collective after the block: if a UserError left it on any rank, every rank raises (rank 0
    prints the message once; ``rank r: ...`` for each when they differ). One process: the error as is."""
    error: Optional[UserError] = None
    try:
        yield
    except UserError as exc:
        if not env.distributed:
            raise
        error = exc
    if not env.distributed:
        return
    messages = tdist.gather_objects(env, None if error is None else str(error))
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if failed:
        text = failed[0][1] if len({m for _, m in failed}) == 1 else " | ".join(f"rank {r}: {m}" for r, m in failed)
        raise SetupFailure(text)


def gather_failure(env: tdist.DistEnv, error: Optional[BaseException]) -> str:
    """Collective: the failing ranks' messages, as one line (``rank r: ...`` when distributed)."""
    messages = tdist.gather_objects(env, None if error is None else str(error))
    failed = [(rank, m) for rank, m in enumerate(messages) if m is not None]
    if not env.distributed:
        return failed[0][1] if failed else "a file failed to decode"
    return " | ".join(f"rank {rank}: {m}" for rank, m in failed) or "a file failed to decode on another rank"


# What gloo / NCCL / the TCP store say when a peer is gone or silent (torch raises plain
# RuntimeErrors from gloo, DistError subclasses from the rest).
_PEER_PATTERNS = re.compile(
    r"gloo|nccl|connection (reset|closed|refused)|broken pipe|timed out", re.IGNORECASE)


def lost_peer(exc: BaseException) -> bool:
    """Is ``exc`` a collective that failed because another rank died, hung or left?"""
    try:
        import torch.distributed as dist

        if isinstance(exc, getattr(dist, "DistError", ())):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(exc, RuntimeError) and bool(_PEER_PATTERNS.search(str(exc)))


def lost_peer_message(exc: BaseException) -> str:
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)  # gloo's "[.../pair.cc:545]" source prefix
    if len(first) > 200:
        first = first[:200] + "..."
    return (f"lost contact with another rank ({type(exc).__name__}: {first}); another rank died or hung, "
            "see its log; run again to resume from the last checkpoint (train.resume=auto)")
