"""The DALI graphs. All DALI graph code of dali-ba lives here and in ``augment.py``.

Train graph (one epoch of one rank): read this rank's files in the order ``sharding`` chose →
decode each image **once** (``mixed`` on GPU, ``cpu`` otherwise) → M independent view branches
(``augment.train_views``) → M outputs ``view0 … view{M-1}`` of ``[B, C, H, W]`` each, plus the
labels (``output_names``); the loader copies the M views into one ``[B, M, C, H, W]`` tensor. With
M=1 it is an ordinary DALI training pipeline. Eval graph: decode → the recipe's eval transform (or
``views`` random views for test-time averaging), the same outputs.

``build_train_pipeline(..., decode_per_view=True)`` is the *naive* graph the benchmarks compare
against: the same views, but each view decodes the image again with its own decoder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from dali_ba.augment import AugmentSpec, eval_view, prepare_shared, train_views

READER_NAME = "Reader"


def output_names(num_views: int) -> list:
    """The pipelines' outputs, in order: one per view, then the labels."""
    return [f"view{i}" for i in range(num_views)] + ["labels"]


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


def _read(files: Sequence[str], labels: Sequence[int], pad_last_batch: bool):
    from nvidia.dali import fn

    return fn.readers.file(
        files=list(files),
        labels=[int(x) for x in labels],
        random_shuffle=False,  # the order is chosen in sharding.py (global per-epoch permutation)
        pad_last_batch=pad_last_batch,
        name=READER_NAME,
    )


def _decode(encoded, decode: DecodeOptions, name: Optional[str] = None):
    """One image decoder. ``name`` (with ``preserve``) keeps DALI from merging it with an
    identical decoder on the same input (common-subexpression elimination)."""
    from nvidia.dali import fn, types

    unique = {"name": name, "preserve": True} if name else {}
    if decode.device == "cuda":
        return fn.decoders.image(
            encoded,
            device="mixed",
            output_type=types.RGB,
            hw_decoder_load=decode.hw_decoder_load,
            preallocate_width_hint=decode.preallocate_width_hint,
            preallocate_height_hint=decode.preallocate_height_hint,
            **unique,
        )
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB, **unique)


def _read_and_decode(files: Sequence[str], labels: Sequence[int], decode: DecodeOptions, pad_last_batch: bool):
    encoded, label = _read(files, labels, pad_last_batch)
    return _decode(encoded, decode), label


def _make(graph, batch_size: int, decode: DecodeOptions, seed: int, checkpoint, conditionals: bool,
          pipeline_options: Optional[dict] = None, **kwargs):
    from nvidia.dali import pipeline_def

    kwargs.update(pipeline_options or {})
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
    decode_per_view: bool = False,
    pipeline_options: Optional[dict] = None,
):
    """A built pipeline yielding ``(view 0 [B, C, H, W], …, view M-1, labels [B, 1])``.

    ``decode_per_view``: the naive baseline of the benchmarks: M decoders (named, preserved, so
    DALI cannot merge them), one per view; the same views otherwise. ``pipeline_options``: extra
    ``Pipeline`` keyword arguments (e.g. ``exec_dynamic=False`` for executor statistics).
    """

    def graph(files, labels):
        encoded, label = _read(files, labels, pad_last_batch=False)
        if decode_per_view:
            images = [_decode(encoded, decode, name=f"decode_view{i}") for i in range(num_views)]
            shared = [prepare_shared(image, spec) for image in images]
        else:
            images = [_decode(encoded, decode)] * num_views
            shared = [prepare_shared(images[0], spec)] * num_views  # done once, used by every view
        return (*train_views(images, spec, shared), label)

    return _make(graph, batch_size, decode, seed, checkpoint, spec.needs_conditionals, pipeline_options,
                 files=files, labels=labels)


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
        return (*train_views([images] * views, spec, [prepare_shared(images, spec)] * views), label)

    conditionals = spec.needs_conditionals and views > 1
    return _make(graph, batch_size, decode, seed, None, conditionals, files=files, labels=labels)


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


def abandon_pipeline(pipe) -> None:
    """Let go of a DALI pipeline that failed, without destroying it.

    A pipeline that raised is dead ("no longer valid") and DALI 2.4 now and then crashes the whole
    process with a segmentation fault while destroying one (``Pipeline._shutdown``), seen in 2 of 5
    test runs that decoded a truncated JPEG. Its C++ half is therefore kept alive, idle, until the
    process exits: a bounded leak (one pipeline per decode failure) instead of a crash that would lose
    the checkpoint we write after the error.
    """
    import ctypes

    backend = getattr(pipe, "_pipe", None)
    if backend is None:
        return
    # One reference that is never released: not even interpreter shutdown frees the object.
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(backend))
    pipe._pipe = None  # Pipeline._shutdown (from __del__ and DALI's atexit hook) now does nothing
