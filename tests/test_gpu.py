"""The same graphs with device="mixed" decode and GPU ops. Skipped without CUDA."""
from __future__ import annotations

import itertools

import pytest
import torch

from dali_ba import BatchAugmentLoader, EvalLoader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("augment", ["imagenet", "cifar"])
def test_gpu_views_are_cuda_tensors_and_differ(image_folder, augment):
    loader = BatchAugmentLoader(image_folder, batch_size=4, num_views=4, image_size=32, augment=augment,
                                device="cuda", layout="grouped", hw_decoder_load=0.5)
    images, labels = next(iter(loader))
    assert images.is_cuda and labels.is_cuda
    assert images.shape == (4, 4, 3, 32, 32)
    for b in range(4):
        for i, j in itertools.combinations(range(4), 2):
            assert not torch.equal(images[b, i], images[b, j])


def test_gpu_flat_fp16_channels_last_and_eval(image_folder):
    loader = BatchAugmentLoader(
        image_folder,
        batch_size=4,
        num_views=2,
        image_size=32,
        device="cuda",
        dtype="float16",
        channels_last=True,
        preallocate_width_hint=100,
        preallocate_height_hint=100,
    )
    images, labels = next(iter(loader))
    assert images.is_cuda and images.dtype == torch.float16 and images.shape == (8, 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(labels, labels[::2].repeat_interleave(2))
    count = sum(len(y) for _, y in EvalLoader(image_folder, batch_size=5, image_size=32, device="cuda"))
    assert count == 48
