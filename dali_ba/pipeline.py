"""The DALI graphs. All DALI graph code of dali-ba lives here and in ``augment.py``.

Train graph (one epoch of one rank): read this rank's files in the order ``sharding`` chose →
decode each image **once** (``mixed`` on GPU, ``cpu`` otherwise) → M independent view branches
→ ``stack`` → ``[B, M, C, H, W]``. With M=1 there is no stack: it is an ordinary DALI training
pipeline. Eval graph: decode → the recipe's eval transform (or ``views`` random views for
test-time averaging).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from dali_ba.augment import AugmentSpec, eval_view, prepare_shared, train_view

READER_NAME = "Reader"


@dataclass(frozen=True)
class DecodeOptions:
    """Where and how to decode. GPU-only knobs are ignored on the CPU."""

    device: str = "cpu"  # "cpu" or "cuda"
    device_id: Optional[int] = None  # CUDA device; None for a CPU-only pipeline
    num_threads: int = 2
    prefetch: int = 2
    hw_decoder_load: float = 0.65
    preallocate_width_hint: int = 0
    preallocate_height_hint: int = 0


def _read_and_decode(files: Sequence[str], labels: Sequence[int], decode: DecodeOptions, pad_last_batch: bool):
    from nvidia.dali import fn, types

    encoded, label = fn.readers.file(
        files=list(files),
        labels=[int(x) for x in labels],
        random_shuffle=False,  # the order is chosen in sharding.py (global per-epoch permutation)
        pad_last_batch=pad_last_batch,
        name=READER_NAME,
    )
    if decode.device == "cuda":
        images = fn.decoders.image(
            encoded,
            device="mixed",
            output_type=types.RGB,
            hw_decoder_load=decode.hw_decoder_load,
            preallocate_width_hint=decode.preallocate_width_hint,
            preallocate_height_hint=decode.preallocate_height_hint,
        )
    else:
        images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
    return images, label


def _make(graph, batch_size: int, decode: DecodeOptions, seed: int, checkpoint, conditionals: bool, **kwargs):
    from nvidia.dali import pipeline_def

    pipe = pipeline_def(graph, enable_checkpointing=True, enable_conditionals=conditionals)(
        batch_size=batch_size,
        num_threads=decode.num_threads,
        device_id=decode.device_id if decode.device == "cuda" else None,
        seed=seed,
        prefetch_queue_depth=decode.prefetch,
        checkpoint=checkpoint,
        **kwargs,
    )
    pipe.build()
    return pipe


def build_train_pipeline(
    files: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int,
    num_views: int,
    spec: AugmentSpec,
    decode: DecodeOptions,
    seed: int,
    checkpoint: Optional[bytes] = None,
):
    """A built pipeline yielding ``(views [B,M,...] or [B,...] when M=1, labels [B,1])``."""

    def graph(files, labels):
        images, label = _read_and_decode(files, labels, decode, pad_last_batch=False)
        shared = prepare_shared(images, spec)
        views = [train_view(images, spec, shared) for _ in range(num_views)]
        return _stack(views), label

    return _make(graph, batch_size, decode, seed, checkpoint, spec.needs_conditionals, files=files, labels=labels)


def build_eval_pipeline(
    files: Sequence[str],
    labels: Sequence[int],
    *,
    batch_size: int,
    spec: AugmentSpec,
    decode: DecodeOptions,
    views: int = 1,
    seed: int = 0,
):
    """Eval pipeline: the centre view (``views=1``) or ``views`` random train views (TTA)."""

    def graph(files, labels):
        images, label = _read_and_decode(files, labels, decode, pad_last_batch=True)
        if views == 1:
            return eval_view(images, spec), label
        shared = prepare_shared(images, spec)
        return _stack([train_view(images, spec, shared) for _ in range(views)]), label

    conditionals = spec.needs_conditionals and views > 1
    return _make(graph, batch_size, decode, seed, None, conditionals, files=files, labels=labels)


def _stack(views):
    from nvidia.dali import fn

    return views[0] if len(views) == 1 else fn.stack(*views, axis=0)


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def resolve_device(device: str) -> str:
    """"auto" → "cuda" when a GPU is visible, else "cpu". "cuda" without a GPU is an error."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device == "cuda" and not cuda_available():
        from dali_ba.errors import UserError

        raise UserError("device='cuda' but no CUDA GPU is visible (use device='cpu' or 'auto')")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected auto, cpu or cuda; got {device!r}")
    return device
