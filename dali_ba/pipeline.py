"""The DALI graphs. All DALI graph code of dali-ba lives here and in ``augment.py``.

One graph per loader for the whole run: a checkpointable ``fn.external_source`` calls a *batch
source* (``dali_ba.source``) with DALI's ``BatchInfo`` and gets this rank's file paths and labels
for that batch → ``fn.io.file.read`` → decode each image **once** (``mixed`` on the GPU, or on the
CPU) → M independent view branches (``augment.train_views``) → M outputs ``view0 … view{M-1}`` of
``[B, C, H, W]`` each, plus the labels (``output_names``; on the GPU the labels are moved there in
the graph). The source raises ``StopIteration`` at the end of an epoch and the pipeline is reset,
not rebuilt; DALI checkpoints record the epoch and iteration the source resumes from, and every
random operator's state. The eval graph is the same with the recipe's eval transform (or ``views``
random views for test-time averaging).

``decode_per_view`` gives the *naive* graphs the benchmarks compare against: the same views, but
each view decodes the image again, fully (``"full"``) or only its random crop (``"crop"``,
``decoders.image_random_crop``, imagenet recipe).
"""
from __future__ import annotations

from typing import Callable, Optional

from dali_ba.augment import eval_view, prepare_shared, train_view, train_views
from dali_ba.errors import ConfigError, UserError
from dali_ba.options import PipelineOptions

NAIVE_MODES = ("full", "crop")
# What DALI's ResNet-50 example gives the mixed decoder: room for large JPEGs up front, so its
# buffers are not reallocated (and the GPU synchronised) as ever larger images arrive.
DEVICE_MEMORY_PADDING = 211_025_920
HOST_MEMORY_PADDING = 140_544_512


def output_names(num_views: int) -> list:
    """The pipelines' outputs, in order: one per view, then the labels."""
    return [f"view{i}" for i in range(num_views)] + ["labels"]


def _decode(encoded, spec: PipelineOptions, name: Optional[str] = None):
    """One image decoder. ``name`` (with ``preserve``) keeps DALI from merging it with an
    identical decoder on the same input (common-subexpression elimination)."""
    from nvidia.dali import fn, types

    unique = {"name": name, "preserve": True} if name else {}
    if spec.gpu_decode:
        return fn.decoders.image(
            encoded, device="mixed", output_type=types.RGB, hw_decoder_load=spec.hw_decoder_load,
            preallocate_width_hint=spec.preallocate_width_hint, preallocate_height_hint=spec.preallocate_height_hint,
            device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING, **unique,
        )
    images = fn.decoders.image(encoded, device="cpu", output_type=types.RGB, **unique)
    return images.gpu() if spec.device == "cuda" else images


def _crop_decode(encoded, spec: PipelineOptions, name: str):
    """Decode only a random crop (ROI decode) and resize it: the start of one naive imagenet view."""
    from nvidia.dali import fn, types

    crop = dict(random_area=(spec.min_area, 1.0), random_aspect_ratio=(3 / 4, 4 / 3), name=name, preserve=True)
    if spec.gpu_decode:
        images = fn.decoders.image_random_crop(encoded, device="mixed", output_type=types.RGB,
                                               hw_decoder_load=spec.hw_decoder_load, **crop)
    else:
        images = fn.decoders.image_random_crop(encoded, device="cpu", output_type=types.RGB, **crop)
        images = images.gpu() if spec.device == "cuda" else images
    size = spec.image_size
    return fn.resize(images, size=(size, size), **({} if spec.antialias else {"antialias": False}))


def _naive_views(encoded, spec: PipelineOptions, num_views: int, mode: str) -> list:
    """M views, each from its own decoder: the baseline a DALI user would write without fusing."""
    from nvidia.dali import fn

    from dali_ba.augment import extras, has_extras, normalize, occlude

    if mode == "full":
        return [train_view(prepare_shared(_decode(encoded, spec, name=f"decode_view{i}"), spec), spec)
                for i in range(num_views)]
    if spec.augment != "imagenet":
        raise ConfigError("decode_per_view='crop' (a ROI decode per view) needs augment='imagenet'")
    views = []
    for i in range(num_views):
        view = _crop_decode(encoded, spec, name=f"crop_decode_view{i}")
        view = extras(view, spec) if has_extras(spec) else view
        views.append(occlude(normalize(view, spec, mirror=fn.random.coin_flip()), spec))
    return views


def build_pipeline(
    source: Callable,
    spec: PipelineOptions,
    *,
    num_views: int,
    seed: int,
    train: bool = True,
    checkpoint: Optional[bytes] = None,
    decode_per_view: Optional[str] = None,
    pipeline_options: Optional[dict] = None,
):
    """A built pipeline yielding ``(view 0 [B, C, H, W], …, view M-1, labels [B, 1])``.

    ``source(BatchInfo) -> (paths, labels)``: this rank's batch, or ``StopIteration`` at the end of
    an epoch; or an object whose ``read()`` makes DALI's own reader nodes (a packed dataset).
    ``spec``: the loader's options (batch size, recipe, decode settings).
    ``train=False``: the eval transform for ``num_views == 1``, else random train views.
    ``decode_per_view``: None, or the naive graphs ``"full"`` / ``"crop"``.
    ``pipeline_options``: extra ``Pipeline`` arguments (e.g. ``exec_dynamic=False`` for statistics).
    """
    from nvidia.dali import fn, pipeline_def

    if decode_per_view is not None and decode_per_view not in NAIVE_MODES:
        raise ConfigError(f"decode_per_view: expected None or one of {', '.join(NAIVE_MODES)}; got {decode_per_view!r}")

    def graph():
        if hasattr(source, "read"):  # a reader of its own (dali_ba.packed.PackedSource)
            encoded, labels = source.read()
        else:
            paths, labels = fn.external_source(source=source, batch=True, batch_info=True, num_outputs=2)
            encoded = fn.io.file.read(paths)
        if decode_per_view is not None:
            views = _naive_views(encoded, spec, num_views, decode_per_view)
        elif not train and num_views == 1:
            views = [eval_view(_decode(encoded, spec), spec)]
        else:  # train views; test-time views (not train) without occlusions
            views = train_views(prepare_shared(_decode(encoded, spec), spec), spec, num_views, occlusions=train)
        return (*views, labels.gpu() if spec.device == "cuda" else labels)

    conditionals = spec.needs_conditionals and (train or num_views > 1)
    pipe = pipeline_def(graph, enable_checkpointing=True, enable_conditionals=conditionals)(
        batch_size=spec.batch_size,
        num_threads=spec.num_threads,
        device_id=spec.device_id if spec.device == "cuda" else None,
        seed=seed,
        prefetch_queue_depth=spec.prefetch,
        checkpoint=checkpoint,
        **(pipeline_options or {}),
    )
    pipe.build()
    return pipe


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
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected auto, cpu or cuda; got {device!r}")
    if device == "cuda" and not cuda_available():
        raise UserError("device='cuda' but no CUDA GPU is visible (use device='cpu' or 'auto')")
    return device


def pick_device_id(device_id: Optional[int], local_rank: Optional[int], distributed: bool, visible: int,
                   current: int) -> int:
    """The CUDA device a loader uses: ``device_id`` when given; under an initialised
    torch.distributed, ``LOCAL_RANK`` (torchrun's GPU for this process, so a library user need not
    call ``torch.cuda.set_device``) unless fewer GPUs are visible (one GPU per process, e.g. SLURM
    binding); otherwise torch's current device."""
    if device_id is None:
        device_id = local_rank if distributed and local_rank is not None and local_rank < visible else current
    if not 0 <= int(device_id) < visible:
        raise ConfigError(f"device_id: expected 0 <= device_id < {visible} (the visible GPUs); got {device_id}")
    return int(device_id)


def resolve_device_id(device: str, device_id: Optional[int]) -> Optional[int]:
    """``pick_device_id`` for this process (None on the CPU)."""
    import os

    import torch

    if device != "cuda":
        return None
    local_rank = os.environ.get("LOCAL_RANK")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return pick_device_id(device_id, int(local_rank) if local_rank is not None else None, distributed,
                          torch.cuda.device_count(), torch.cuda.current_device())


def abandon_pipeline(pipe) -> None:
    """Let go of a DALI pipeline that failed, without destroying it.

    A pipeline that raised is dead ("no longer valid"), and DALI 2.4 can crash the process with a
    segmentation fault while destroying one (``Pipeline._shutdown``; docs/reliability.md). Its C++
    half is kept alive, idle, until the process exits: one pipeline per decode failure, and a
    training run stops at its first failure, instead of a crash that would lose the checkpoint
    written after the error.
    """
    import ctypes

    backend = getattr(pipe, "_pipe", None)
    if backend is None:
        return
    # One reference that is never released: not even interpreter shutdown frees the object.
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(backend))
    pipe._pipe = None  # Pipeline._shutdown (from __del__ and DALI's atexit hook) now does nothing
