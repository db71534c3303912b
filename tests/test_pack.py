"""``dali-ba data pack``: real JPEGs (and broken files) → WebDataset shards, read back with tarfile and with
DALI's own webdataset reader (CPU), locally and from a local S3 server (moto)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image_folder
from PIL import Image

from dali_ba import cli
from dali_ba.data import manifest as mf
from dali_ba.data.pack import pack, parse_size
from dali_ba.errors import UserError

REPO = Path(__file__).resolve().parents[1]
BAD = {"class_0/truncated.jpg": "decode failed", "class_1/text.jpg": "not a known image format",
       "class_2/empty.jpg": "empty file"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _add_broken_files(root: Path) -> None:
    good = (root / "class_0" / "000.jpg").read_bytes()
    (root / "class_0" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "class_1" / "text.jpg").write_text("this is not an image\n")
    (root / "class_2" / "empty.jpg").write_bytes(b"")


def _expected(root: Path) -> list[tuple[str, int]]:
    """(sha256 of the bytes, label) of every good image under ``root``, sorted."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    return sorted((_sha(p.read_bytes()), classes.index(p.parent.name)) for p in root.glob("*/*.jpg")
                  if str(p.relative_to(root)) not in BAD)


def _tar_samples(out: Path, split: str = "train") -> list[tuple[str, str, int]]:
    """(key, sha256 of .jpg, label) of every sample in the split's shards, read with Python's tarfile."""
    manifest = json.loads((out / mf.MANIFEST_NAME).read_text())
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["file"]) as tar:
            members = tar.getmembers()
            assert [m.name.split(".")[1] for m in members] == ["jpg", "cls", "lbl"] * (len(members) // 3)
            for jpg, cls, lbl in zip(members[::3], members[1::3], members[2::3]):
                key = jpg.name.split(".")[0]
                assert cls.name == f"{key}.cls"
                label = int(tar.extractfile(cls).read())
                assert lbl.name == f"{key}.lbl" and struct.unpack("<i", tar.extractfile(lbl).read()) == (label,)
                samples.append((key, _sha(tar.extractfile(jpg).read()), label))
    return samples


def _dali_samples(tars: list[str], indexes: list[str], count: int) -> list[tuple[str, int, tuple]]:
    """(sha256 of the bytes, label, decoded HWC shape) of every sample, read and decoded by DALI on the CPU."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=count, num_threads=1, device_id=None, prefetch_queue_depth=1)
    def read():
        jpg, cls = fn.readers.webdataset(paths=tars, index_paths=indexes, ext=["jpg", "cls"], name="r")
        return jpg, cls, fn.decoders.image(jpg, device="cpu", output_type=types.RGB)

    pipe = read()
    pipe.build()
    assert pipe.epoch_size("r") == count
    raw, labels, images = pipe.run()
    return sorted((_sha(np.asarray(raw.at(i)).tobytes()), int(bytes(np.asarray(labels.at(i)))),
                   tuple(np.asarray(images.at(i)).shape)) for i in range(count))


@pytest.fixture
def run_cli(monkeypatch):
    """``dali_ba.cli.main`` with only the data commands registered."""
    monkeypatch.setattr(cli, "_COMMANDS", [c for c in cli._COMMANDS if c[0][0] == "data"])
    return lambda *argv: cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """3 classes x 12 real JPEGs (40..160 px) plus a truncated JPEG, a text file and a 0-byte file."""
    root = write_image_folder(tmp_path_factory.mktemp("pack_src"), classes=3, per_class=12, size_range=(40, 160))
    _add_broken_files(root)
    return root


@pytest.fixture(scope="module")
def packed(src, tmp_path_factory):
    """``dali-ba data pack`` of ``src`` with 40 KB shards: (OUT, exit code, stdout, stderr)."""
    out = tmp_path_factory.mktemp("packed") / "out"
    done = subprocess.run([sys.executable, "-m", "dali_ba.cli", "data", "pack", str(src), str(out),
                           "--shard-size", "40KB", "--workers", "2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    return out, done.returncode, done.stdout, done.stderr


def test_pack_holds_every_good_image_once(src, packed):
    out, code, stdout, stderr = packed
    assert code == 0, stderr
    lines = stdout.splitlines()
    for rel, reason in BAD.items():  # every bad file named once, one line each, with its reason
        named = [line for line in lines if line.startswith(f"{src / rel}: ")]
        assert len(named) == 1 and reason in named[0], stdout
    assert f"warning: 3 of {36 + 3} files left out" in stdout
    expected = _expected(src)
    samples = _tar_samples(out)
    assert sorted((sha, label) for _, sha, label in samples) == expected  # each good image exactly once
    keys = [key for key, _, _ in samples]
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == 36
    # Shuffled before sharding: the first shard mixes classes, labels are not sorted.
    manifest = json.loads((out / "dataset.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]["samples"]
    assert len({label for _, _, label in samples[:first]}) > 1
    assert [label for _, _, label in samples] != sorted(label for _, _, label in samples)


def test_manifest_counts_sizes_and_checksums(src, packed):
    out, code, _, _ = packed
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["format"] == "dali-ba-webdataset" and manifest["format_version"] == 1
    assert manifest["classes"] == ["class_0", "class_1", "class_2"]
    train = manifest["splits"]["train"]
    shards = train["shards"]
    assert train["num_samples"] == 36 == sum(s["samples"] for s in shards)
    assert len(shards) >= 3
    assert [s["file"] for s in shards] == [f"train-{i:06d}.tar" for i in range(len(shards))]
    for shard in shards:
        data = (out / shard["file"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == _sha(data)
        assert len(data) <= 40_000 or shard["samples"] == 1  # the target, unless one sample alone exceeds it
        assert (out / shard["index"]).read_text().startswith(f"v1.2 {shard['samples']}\n")
    assert sorted(s["path"] for s in train["skipped"]) == sorted(BAD)
    assert train["options"] == {"shard_size": 40_000, "max_side": None, "quality": 90, "shuffle_seed": 0,
                                "max_pixels": 100_000_000}
    assert train["source"] == {"root": str(src.resolve()), "file_list": None}
    assert train["dali_ba_version"] and "git_commit" in train
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dataset.json"] + [s["file"] for s in shards] + [s["index"] for s in shards])  # no leftovers


def test_index_matches_dalis_wds2idx(packed, tmp_path):
    wds2idx = pytest.importorskip("wds2idx")  # installed with DALI
    out = packed[0]
    for tar in sorted(out.glob("*.tar")):
        with wds2idx.IndexCreator(str(tar), str(tmp_path / "ref.idx"), verbose=False) as creator:
            creator.create_index()
        assert (out / tar.name.replace(".tar", ".idx")).read_text() == (tmp_path / "ref.idx").read_text()


def test_dali_webdataset_reader_reads_and_decodes_every_sample(src, packed):
    out = packed[0]
    manifest = mf.load(str(out))
    tars, indexes = mf.shard_urls(str(out), manifest, "train")
    got = _dali_samples(tars, indexes, 36)
    assert sorted((sha, label) for sha, label, _ in got) == _expected(src)
    shapes = {}
    for path in src.glob("*/*.jpg"):
        if str(path.relative_to(src)) not in BAD:
            with Image.open(path) as im:
                shapes[_sha(path.read_bytes())] = (im.height, im.width, 3)
    assert all(shape == shapes[sha] for sha, _, shape in got)


def test_max_side_downscales_and_keeps_small_images_bytes(tmp_path):
    root = tmp_path / "src"
    sizes = {"a/wide.jpg": (300, 120), "a/small.jpg": (60, 50), "b/tall.jpg": (90, 250), "b/edge.jpg": (128, 40)}
    rng = np.random.default_rng(0)
    for rel, (w, h) in sizes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / rel, quality=95)
    # Stored 300x100 with EXIF orientation 6 (rotate 90): shown, and decoded by DALI, as 100x300.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.integers(0, 255, (100, 300, 3), dtype=np.uint8)).save(root / "b/rotated.jpg", exif=exif)
    result = pack(root, str(tmp_path / "out"), max_side=128, quality=80, progress=False)
    assert result.resized == 3 and not result.skipped
    tars, indexes = mf.shard_urls(str(tmp_path / "out"), mf.load(str(tmp_path / "out")), "train")
    decoded = {sha: shape for sha, _, shape in _dali_samples(tars, indexes, 5)}
    originals = {_sha((root / rel).read_bytes()) for rel in ("a/small.jpg", "b/edge.jpg")}
    assert originals <= set(decoded)  # within the limit: original bytes
    assert all(max(shape[:2]) <= 128 for shape in decoded.values())
    assert sorted(shape[:2] for shape in decoded.values()) == sorted(
        [(51, 128), (50, 60), (128, 46), (40, 128), (128, 43)])  # aspect kept; the rotated one upright
    assert result.entry["options"]["max_side"] == 128 and result.entry["options"]["quality"] == 80


def test_parse_size():
    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 2**30 and parse_size("1.5g") == 1_500_000_000
    assert parse_size("4096") == 4096 and parse_size("64 KiB") == 65536 and parse_size(10) == 10
    for bad in ("", "MB", "12XB", "-5MB", "0", "1e3"):
        with pytest.raises(UserError, match="--shard-size"):
            parse_size(bad)


def test_user_errors_are_one_line_exit_2(src, tmp_path, run_cli, capsys):
    (tmp_path / "file").write_text("x")
    cases = [((tmp_path / "nowhere", tmp_path / "o1"), str(tmp_path / "nowhere")),
             ((src, tmp_path / "file"), str(tmp_path / "file")),
             ((src, tmp_path / "o2", "--shard-size", "12XB"), "'12XB'"),
             ((src, "gs://bucket/x"), "gs://bucket/x"),
             ((src, src / "packed"), str(src / "packed")),
             ((src, tmp_path / "o3", "--split", "a.b"), "'a.b'")]
    for argv, named in cases:
        assert run_cli("data", "pack", *argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("dali-ba: error:") and named in err, err
    assert not (src / "packed").exists()


def test_disk_full_while_writing_is_one_line_exit_2(src, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) makes shard writes fail as a full disk does: one line naming the path."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))

    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "dali_ba.cli", "data", "pack", str(src), str(out), "--workers", "1"],
                          capture_output=True, text=True, timeout=300, cwd=REPO, preexec_fn=limit,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and str(out / ".train-000000.tar.partial") in done.stderr
    assert "File too large" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # the partial shard was removed, no manifest


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders: permissions cannot fail")
def test_unwritable_out_is_one_line_exit_2(src, tmp_path, run_cli, capsys):
    (tmp_path / "ro").mkdir(mode=0o555)
    assert run_cli("data", "pack", src, tmp_path / "ro" / "out") == 2
    assert str(tmp_path / "ro" / "out") in capsys.readouterr().err


def test_killed_pack_then_rerun_gives_a_complete_correct_out(tmp_path, run_cli, capsys):
    src = write_image_folder(tmp_path / "src", classes=3, per_class=100, size_range=(60, 100))
    out = tmp_path / "out"
    argv = ["data", "pack", str(src), str(out), "--shard-size", "16KB", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "dali_ba.cli", *argv], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 120
    while not (out / "train-000003.tar").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the pack ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert not (out / "dataset.json").exists()  # the manifest comes last: a killed pack is never complete
    # More leftovers: a partial shard and manifest, and a shard of an older, longer pack.
    (out / ".train-000042.tar.partial").write_bytes(b"half a shard")
    (out / ".dataset.json.partial").write_text("{")
    (out / "train-000999.tar").write_bytes(b"old")
    (out / "train-000999.idx").write_text("v1.2 1\n")
    assert run_cli(*argv) == 0
    capsys.readouterr()
    manifest = json.loads((out / "dataset.json").read_text())
    shards = manifest["splits"]["train"]["shards"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dataset.json"] + [s["file"] for s in shards] + [s["index"] for s in shards])
    assert all(_sha((out / s["file"]).read_bytes()) == s["sha256"] for s in shards)
    assert sorted((sha, label) for _, sha, label in _tar_samples(out)) == _expected(src)
    # Deterministic: a fresh pack of the same files gives the very same shards.
    fresh = pack(src, str(tmp_path / "fresh"), shard_size="16KB", workers=1, progress=False)
    assert [s["sha256"] for s in fresh.entry["shards"]] == [s["sha256"] for s in shards]


def test_file_list(src, tmp_path):
    listed = sorted(str(p.relative_to(src)) for p in src.glob("class_[12]/00[0-2].jpg"))
    (tmp_path / "list.txt").write_text("".join(f"{rel} {int(rel[6])}\n" for rel in listed) + "class_1/text.jpg 1\n")
    result = pack(src, str(tmp_path / "out"), file_list=tmp_path / "list.txt", progress=False)
    assert result.entry["num_samples"] == 6 and [b.path for b in result.skipped] == [str(src / "class_1/text.jpg")]
    assert result.entry["source"]["file_list"] == str(tmp_path / "list.txt")
    assert sorted(label for _, _, label in _tar_samples(tmp_path / "out")) == [1, 1, 1, 2, 2, 2]


def test_splits_share_out_and_labels(tmp_path, run_cli, capsys):
    train = write_image_folder(tmp_path / "train", classes=3, per_class=4, size_range=(30, 50))
    val = tmp_path / "val"
    write_image_folder(val, classes=3, per_class=2, seed=1, size_range=(30, 50))
    os.rename(val / "class_0", tmp_path / "val_class_0")  # val lacks class_0: its labels map to train's
    out = tmp_path / "out"
    assert run_cli("data", "pack", train, out) == 0
    assert run_cli("data", "pack", val, out, "--split", "val") == 0
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["classes"] == ["class_0", "class_1", "class_2"] and set(manifest["splits"]) == {"train", "val"}
    assert sorted(label for _, _, label in _tar_samples(out, "val")) == [1, 1, 2, 2]
    assert run_cli("data", "pack", train, out, "--shard-size", "2KB") == 0  # repacking train keeps val
    manifest = json.loads((out / "dataset.json").read_text())
    assert set(manifest["splits"]) == {"train", "val"} and len(manifest["splits"]["train"]["shards"]) == 12
    assert len(list(out.glob("val-*.tar"))) == 1
    (tmp_path / "other" / "zebra").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "other" / "zebra" / "z.jpg")
    capsys.readouterr()
    assert run_cli("data", "pack", tmp_path / "other", out, "--split", "test") == 2
    assert "['zebra']" in capsys.readouterr().err


# ----------------------------------------------------------------------------- object storage (moto)
def test_pack_to_s3_and_read_with_dali_from_s3(src, s3, run_cli, capsys):
    url = s3.url("imagenet/packed")
    # Leftovers of a killed run: an unfinished multipart upload, a shard of an older, longer pack.
    s3.client.create_multipart_upload(Bucket=s3.name, Key="imagenet/packed/train-000007.tar")
    s3.client.put_object(Bucket=s3.name, Key="imagenet/packed/train-000999.tar", Body=b"old")
    assert run_cli("data", "pack", src, url, "--shard-size", "40KB") == 0
    assert not s3.client.list_multipart_uploads(Bucket=s3.name).get("Uploads")
    assert f"at {url} as split 'train'" in capsys.readouterr().out
    manifest = mf.load(url)  # through dali_ba.storage
    shards = manifest["splits"]["train"]["shards"]
    assert s3.keys("imagenet/") == sorted(["imagenet/packed/dataset.json"] + [
        f"imagenet/packed/{name}" for s in shards for name in (s["file"], s["index"])])
    for shard in shards:
        data = s3.read(f"imagenet/packed/{shard['file']}")
        assert len(data) == shard["bytes"] and _sha(data) == shard["sha256"]
    from dali_ba import storage

    assert storage.exists(f"{url}/dataset.json") and not storage.exists(f"{url}/nothing.json")
    # DALI reads the shards and their indexes straight from s3:// (AWS_ENDPOINT_URL, path-style for an IP).
    tars, indexes = mf.shard_urls(url, manifest, "train")
    assert tars[0].startswith("s3://") and indexes[0].startswith("s3://")
    got = _dali_samples(tars, indexes, 36)
    assert sorted((sha, label) for sha, label, _ in got) == _expected(src)


def _timed_cli(run_cli, capsys, *argv) -> tuple[int, str, float]:
    started = time.monotonic()
    code = run_cli(*argv)
    return code, capsys.readouterr().err, time.monotonic() - started


def test_s3_missing_bucket_or_credentials_is_one_line_exit_2(src, s3, run_cli, capsys, monkeypatch):
    code, err, seconds = _timed_cli(run_cli, capsys, "data", "pack", src, "s3://no-such-bucket/x")
    assert code == 2 and err.count("\n") == 1 and "s3://no-such-bucket/" in err and "does not exist" in err, err
    assert seconds < 20
    from dali_ba import storage

    with pytest.raises(UserError, match="^s3://no-such-bucket/k: bucket does not exist"):  # boto3 wraps this one
        storage.upload_file(src / "class_0" / "000.jpg", "s3://no-such-bucket/k")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(src / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(src / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata look-up off this machine
    code, err, seconds = _timed_cli(run_cli, capsys, "data", "pack", src, s3.url("x"))
    assert code == 2 and err.count("\n") == 1 and "no AWS credentials" in err and seconds < 20, err


def test_storage_urls():
    from dali_ba import storage

    url = storage.parse_s3_url("s3://bucket/a/b/")
    assert (url.bucket, url.key, str(url.join("c.tar"))) == ("bucket", "a/b", "s3://bucket/a/b/c.tar")
    assert str(storage.parse_s3_url("s3://bucket").join("dataset.json")) == "s3://bucket/dataset.json"
    assert storage.is_url("s3://b/k") and not storage.is_url("/data/x")
    for bad, match in (("gs://b/k", "not supported"), ("ftp://b/k", "unsupported"), ("s3:///k", "no bucket")):
        with pytest.raises(UserError, match=match):
            storage.parse_s3_url(bad)


def test_s3_wrong_credentials_then_stopped_server(src, s3, run_cli, capsys, monkeypatch):
    from s3_server import S3Server

    strict = S3Server(env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()  # checks keys: ours are unknown
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict.endpoint)
        code, err, seconds = _timed_cli(run_cli, capsys, "data", "pack", src, "s3://bucket/x")
        assert code == 2 and err.count("\n") == 1 and "s3://bucket/" in err and "access denied" in err, err
        assert "AWS_ACCESS_KEY_ID" in err and seconds < 20
    finally:
        strict.stop()
    code, err, seconds = _timed_cli(run_cli, capsys, "data", "pack", src, "s3://bucket/x")
    assert code == 2 and err.count("\n") == 1 and "s3://bucket/" in err and "cannot reach" in err, err
    assert strict.endpoint in err and seconds < 30
