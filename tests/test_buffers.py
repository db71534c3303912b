"""The loader copies batches into recycled memory only when the caller has let go of it."""
from __future__ import annotations

import pytest
import torch

from dali_ba import BatchAugmentLoader
from dali_ba.buffers import ReusedBuffers

SMALL = dict(batch_size=4, image_size=24, num_views=2, num_threads=1, device="cpu", seed=3)


def test_batches_the_caller_keeps_are_never_overwritten(image_folder):
    """Keep every batch of an epoch (more than the pool holds): each equals a copy taken at once."""
    kept, snapshots = [], []
    for layout in ("flat", "grouped"):
        for images, labels in BatchAugmentLoader(image_folder, layout=layout, **SMALL):
            kept.append((images, labels))
            snapshots.append((images.clone(), labels.clone()))
    assert len(kept) > ReusedBuffers().capacity
    for (images, labels), (images0, labels0) in zip(kept, snapshots):
        assert torch.equal(images, images0) and torch.equal(labels, labels0)
    assert len({images.untyped_storage().data_ptr() for images, _ in kept}) == len(kept)


def test_dropped_batches_are_recycled_and_equal_a_fresh_copy(image_folder):
    seen = []
    for images, _ in BatchAugmentLoader(image_folder, **SMALL):
        seen.append((images.untyped_storage().data_ptr(), images.clone()))
        del images  # the usual training loop: nothing outlives the step
    pointers = [p for p, _ in seen]
    assert len(set(pointers)) < len(pointers), "no buffer was reused"
    # Same seed, batches kept this time (fresh memory each): the same values.
    again = [images for images, _ in BatchAugmentLoader(image_folder, **SMALL)]
    assert all(torch.equal(a, b) for (_, a), b in zip(seen, again))


def test_a_view_of_a_batch_keeps_its_buffer_busy():
    pool = ReusedBuffers(capacity=1)
    first = pool.stack([torch.arange(6.0)]).view(2, 3)[1]  # only a view of the batch is kept
    second = pool.stack([torch.full((6,), 7.0)])
    assert first.tolist() == [3.0, 4.0, 5.0] and second.tolist() == [[7.0]] * 6
    busy = first.untyped_storage().data_ptr()
    assert second.untyped_storage().data_ptr() != busy
    del first  # now idle: the next batch goes there
    assert pool.stack([torch.zeros(6)]).untyped_storage().data_ptr() == busy


@pytest.mark.parametrize("capacity", [0, 2])
def test_stack_equals_torch_stack_for_every_shape_and_dtype(capacity):
    pool = ReusedBuffers(capacity=capacity)
    cases = [((2, 3), torch.float32, 3), ((5,), torch.float16, 1), ((2, 3), torch.float32, 3), ((4, 2), torch.uint8, 2),
             ((3, 2), torch.bfloat16, 2)]  # bfloat16: numpy has none, torch copies it
    for shape, dtype, m in cases:
        views = [torch.randn(shape).mul(50).to(dtype) for _ in range(m)]
        out = pool.stack(views)
        assert out.dtype == dtype and torch.equal(out, torch.stack(views, dim=1))
