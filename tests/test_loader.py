"""BatchAugmentLoader / EvalLoader on real JPEG files decoded by DALI on the CPU."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import index_of, write_indexed_folder

from dali_ba import BatchAugmentLoader, EvalLoader
from dali_ba.errors import DatasetError

SMALL = dict(batch_size=4, image_size=24, num_threads=1, device="cpu")


def first_batch(root, **kwargs):
    return next(iter(BatchAugmentLoader(root, **{**SMALL, **kwargs})))


def test_flat_layout_shapes_and_repeated_labels(image_folder):
    loader = BatchAugmentLoader(image_folder, num_views=3, **SMALL)
    assert len(loader) == 48 // 4
    assert loader.classes == ["class_0", "class_1", "class_2"]
    images, labels = next(iter(loader))
    assert images.shape == (12, 3, 24, 24) and images.dtype == torch.float32
    assert labels.shape == (12,) and labels.dtype == torch.long
    # image-major: each image's M views are adjacent and share the label
    assert torch.equal(labels, labels[::3].repeat_interleave(3))


def test_every_pair_of_views_differs(image_folder):
    for augment in ("imagenet", "cifar"):
        images, _ = first_batch(image_folder, num_views=4, layout="grouped", augment=augment)
        assert images.shape == (4, 4, 3, 24, 24)
        for b in range(4):
            for i, j in itertools.combinations(range(4), 2):
                assert not torch.equal(images[b, i], images[b, j]), (augment, b, i, j)


def test_grouped_layout_matches_flat(image_folder):
    flat, flat_labels = first_batch(image_folder, num_views=2, seed=5)
    grouped, labels = first_batch(image_folder, num_views=2, seed=5, layout="grouped")
    assert torch.equal(grouped.flatten(0, 1), flat)
    assert torch.equal(labels.repeat_interleave(2), flat_labels)


def test_same_seed_same_batch_other_seed_or_rank_differs(image_folder):
    base = dict(num_views=2, shard_id=0, num_shards=2)
    a, la = first_batch(image_folder, seed=3, **base)
    b, lb = first_batch(image_folder, seed=3, **base)
    assert torch.equal(a, b) and torch.equal(la, lb)
    other_seed, _ = first_batch(image_folder, seed=4, **base)
    assert not torch.equal(a, other_seed)
    other_rank, _ = first_batch(image_folder, seed=3, num_views=2, shard_id=1, num_shards=2)
    assert not torch.equal(a, other_rank)


def test_ranks_read_disjoint_shards_that_change_every_epoch(tmp_path):
    root = write_indexed_folder(tmp_path, 24)
    seen = {}
    for rank in range(3):
        loader = BatchAugmentLoader(
            root,
            batch_size=2,
            num_views=1,
            image_size=16,
            augment="cifar",
            pad=0,
            shard_id=rank,
            num_shards=3,
            mean=(0, 0, 0),
            std=(1, 1, 1),
            num_threads=1,
            device="cpu",
        )
        assert len(loader) == 4
        seen[rank] = [index_of(img) for images, _ in loader for img in images]
        seen[(rank, 1)] = [index_of(img) for images, _ in loader for img in images]  # epoch 1
    for epoch in (0, 1):
        shards = [seen[r] if epoch == 0 else seen[(r, 1)] for r in range(3)]
        union = [i for s in shards for i in s]
        assert sorted(union) == list(range(24))  # disjoint and complete
    assert seen[0] != seen[(0, 1)]  # a new shuffle each epoch


def test_resume_after_k_batches_gives_the_same_next_batch(image_folder):
    opts = dict(num_views=3, seed=11, augment="imagenet", color_jitter=0.3)
    loader = BatchAugmentLoader(image_folder, **SMALL, **opts)
    for k, (images, labels) in enumerate(loader):
        if k == 2:
            state = loader.state_dict()
        if k == 3:
            expected = images, labels
            break
    resumed = BatchAugmentLoader(image_folder, **SMALL, **opts)
    resumed.load_state_dict(state)
    images, labels = next(iter(resumed))
    assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])


def test_resume_after_break_and_across_epoch_boundary(image_folder):
    loader = BatchAugmentLoader(image_folder, num_views=2, seed=2, **SMALL)
    for k, _ in enumerate(loader):
        if k == 4:
            break  # the state is kept when the loop is left early
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (0, 5)
    straight = list(itertools.islice(iter(loader), 2))
    again = BatchAugmentLoader(image_folder, num_views=2, seed=2, **SMALL)
    again.load_state_dict(state)
    for (a, la), (b, lb) in zip(straight, itertools.islice(iter(again), 2)):
        assert torch.equal(a, b) and torch.equal(la, lb)
    # a finished epoch resumes at the start of the next one
    full = BatchAugmentLoader(image_folder, num_views=1, seed=2, **SMALL)
    for _ in full:
        pass
    assert full.state_dict()["epoch"] == 1 and full.state_dict()["step"] == 0


def test_load_state_dict_refuses_another_configuration(image_folder):
    state = BatchAugmentLoader(image_folder, num_views=2, **SMALL).state_dict()
    other = BatchAugmentLoader(image_folder, num_views=4, **SMALL)
    with pytest.raises(ValueError, match="num_views: saved 2, now 4"):
        other.load_state_dict(state)


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_eval_sees_every_image_exactly_once(tmp_path, num_shards):
    root = write_indexed_folder(tmp_path, 29, classes=3)
    seen = []
    for shard in range(num_shards):
        loader = EvalLoader(
            root,
            batch_size=4,
            image_size=16,
            augment="cifar",
            shard_id=shard,
            num_shards=num_shards,
            mean=(0, 0, 0),
            std=(1, 1, 1),
            num_threads=1,
            device="cpu",
        )
        for images, labels in loader:
            assert images.shape[1:] == (3, 16, 16) and len(images) == len(labels)
            seen.extend(index_of(img) for img in images)
    assert sorted(seen) == list(range(29))


def test_eval_imagenet_centre_crop_and_tta_views(image_folder):
    loader = EvalLoader(image_folder, batch_size=5, image_size=24, num_threads=1, device="cpu")
    images, labels = next(iter(loader))
    assert images.shape == (5, 3, 24, 24)
    again, _ = next(iter(loader))
    assert torch.equal(images, again)  # deterministic
    tta = EvalLoader(image_folder, batch_size=5, image_size=24, views=3, num_threads=1, device="cpu")
    views, _ = next(iter(tta))
    assert views.shape == (5, 3, 3, 24, 24) and not torch.equal(views[:, 0], views[:, 1])


def test_float16_and_channels_last_outputs(image_folder):
    images, _ = first_batch(image_folder, num_views=2, dtype="float16", channels_last=True)
    assert images.dtype == torch.float16 and images.shape == (8, 3, 24, 24)
    assert images.is_contiguous(memory_format=torch.channels_last)
    reference, _ = first_batch(image_folder, num_views=2)
    assert torch.allclose(images.float(), reference, atol=0.02)


def test_m1_is_an_ordinary_dali_training_pipeline(image_folder):
    """M=1 gives exactly what a hand-written single-view DALI pipeline gives on the same files."""
    from nvidia.dali import fn, pipeline_def, types

    loader = BatchAugmentLoader(image_folder, num_views=1, seed=7, **SMALL)
    images, labels = next(iter(loader))
    from dali_ba.sharding import augment_seed

    indices = loader.batch_indices(0, 0)

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=augment_seed(7, 0, 0, 0))
    def ordinary():
        jpegs = fn.io.file.read(fn.external_source(name="paths"))
        decoded = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
        crop = fn.random_resized_crop(
            decoded, size=(24, 24), random_area=(0.08, 1.0), random_aspect_ratio=(3 / 4, 4 / 3)
        )
        flip = fn.random.coin_flip()
        out = fn.crop_mirror_normalize(
            crop,
            mirror=flip,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[0.485 * 255, 0.456 * 255, 0.406 * 255],
            std=[0.229 * 255, 0.224 * 255, 0.225 * 255],
        )
        return out

    pipe = ordinary()
    pipe.build()
    pipe.feed_input("paths", [np.frombuffer(loader.dataset.files[i].encode(), np.uint8) for i in indices])
    (out,) = pipe.run()
    assert torch.equal(images, torch.from_numpy(np.array(out.as_tensor())))
    assert torch.equal(labels, torch.from_numpy(loader.dataset.labels[indices]).long())


def test_batch_larger_than_shard_is_a_clear_error(image_folder):
    with pytest.raises(DatasetError, match="needs at least 64 images"):
        BatchAugmentLoader(image_folder, batch_size=32, num_shards=2, shard_id=0, device="cpu")


def test_trivial_augment_and_colour_jitter_per_view(image_folder):
    """Per-view automatic augmentation (DALI conditionals) still gives M distinct views."""
    images, _ = first_batch(image_folder, num_views=3, layout="grouped", trivial_augment=True, color_jitter=0.4)
    assert images.shape == (4, 3, 3, 24, 24) and torch.isfinite(images).all()
    for b in range(4):
        for i, j in itertools.combinations(range(3), 2):
            assert not torch.equal(images[b, i], images[b, j])


def test_one_pipeline_per_loader_over_three_epochs_and_two_evaluations(image_folder, monkeypatch):
    """The train pipeline is built once and reset at each epoch's end; the eval pipeline once and
    reused: counted on DALI's own Pipeline.build, not only on the loader's counter."""
    from nvidia.dali.pipeline import Pipeline

    built = []
    original = Pipeline.build

    def counting_build(self, *args, **kwargs):
        if not self._built:
            built.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "build", counting_build)
    train = BatchAugmentLoader(image_folder, num_views=2, **SMALL)
    val = EvalLoader(image_folder, batch_size=5, image_size=24, num_threads=1, device="cpu", classes=train.classes)
    batches, evaluated = 0, []
    for _ in range(3):
        batches += sum(1 for _ in train)
        if len(evaluated) < 2:
            evaluated.append(sum(len(labels) for _, labels in val))
    assert batches == 3 * len(train) and evaluated == [48, 48]
    assert train.pipeline_builds == 1 and val.pipeline_builds == 1
    assert len(built) == 2


def test_resume_says_what_it_did(image_folder, tmp_path):
    """Exact; the file list changed (same step, new shuffle); other augmentation settings refused."""
    import shutil

    from dali_ba.errors import LoaderStateError

    opts = dict(num_views=2, seed=3, augment="imagenet", **SMALL)
    loader = BatchAugmentLoader(image_folder, **opts)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state, expected = loader.state_dict(), next(it)[0]
    again = BatchAugmentLoader(image_folder, **opts)
    resumed = again.resume(state)
    assert resumed.exact and resumed.message is None and torch.equal(next(iter(again))[0], expected)

    smaller = tmp_path / "smaller"
    shutil.copytree(image_folder, smaller)
    next((smaller / "class_1").iterdir()).unlink()
    other = BatchAugmentLoader(smaller, **opts)
    resumed = other.resume(state)
    assert not resumed.exact and "48 files then, 47 now" in resumed.message
    assert (other.epoch, other.step) == (0, 3)

    with pytest.raises(LoaderStateError, match="color_jitter: saved 0.0, now 0.2"):
        BatchAugmentLoader(image_folder, color_jitter=0.2, **opts).resume(state)
    with pytest.raises(LoaderStateError, match="num_views: saved 2, now 3"):
        BatchAugmentLoader(image_folder, **{**opts, "num_views": 3}).resume(state)


def test_batch_indices_name_the_images_of_each_step(tmp_path):
    root = write_indexed_folder(tmp_path, 24)
    loader = BatchAugmentLoader(root, batch_size=2, num_views=2, image_size=16, augment="cifar", pad=0,
                                shard_id=1, num_shards=3, mean=(0, 0, 0), std=(1, 1, 1), num_threads=1, device="cpu")
    for step, (images, _) in enumerate(loader):
        expected = [int(loader.dataset.files[i].split("/")[-1][:3]) for i in loader.batch_indices(0, step)]
        assert [index_of(img) for img in images[::2]] == expected


@pytest.mark.parametrize("explicit, local_rank, distributed, visible, current, expected", [
    (None, 3, True, 8, 0, 3),  # torchrun without set_device: LOCAL_RANK's GPU, not cuda:0
    (None, 3, False, 8, 0, 0),  # no process group: torch's current device
    (None, 3, True, 1, 0, 0),  # one GPU visible per process (SLURM binding)
    (5, 3, True, 8, 0, 5),  # explicit device_id wins
])
def test_the_loader_picks_the_gpu_of_its_rank(explicit, local_rank, distributed, visible, current, expected):
    from dali_ba.pipeline import pick_device_id

    assert pick_device_id(explicit, local_rank, distributed, visible, current) == expected


def test_a_device_id_that_does_not_exist_is_a_clear_error():
    from dali_ba.errors import ConfigError
    from dali_ba.pipeline import pick_device_id

    with pytest.raises(ConfigError, match="device_id: expected 0 <= device_id < 2"):
        pick_device_id(4, None, False, 2, 0)
