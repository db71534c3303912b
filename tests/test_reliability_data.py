"""Reliability, bad images: every kind of broken or odd file met in real image folders.

Real files on disk, real DALI decodes on the CPU, the real `dali-ba` command line in subprocesses.
What test_data_tools.py / test_decode_and_errors.py already prove (each broken kind named by
`find_undecodable`, odd valid JPEGs decode, the loader names a broken file) is not repeated here;
this file proves the whole mixed folder at once through the CLI, the size policy, the permission
case as a real unprivileged reader, and that the loader's state after a decode error resumes there.
"""
from __future__ import annotations

import fcntl
import os
import pty
import shutil
import signal
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import index_of, write_indexed_folder
from PIL import Image

from benchmarks.processes import children as child_pids
from dali_ba import BatchAugmentLoader, EvalLoader
from dali_ba.data.verify import DEFAULT_MAX_PIXELS, verify_files
from dali_ba.errors import DatasetError, DecodeError

REPO = Path(__file__).resolve().parents[1]
# The real `dali-ba` main, with only the data commands registered (as test_data_tools.py does):
# the other commands' modules belong to other work in progress.
CLI = [sys.executable, "-c", "import sys; from dali_ba import cli; "
       "cli._COMMANDS = [c for c in cli._COMMANDS if c[0][0] == 'data']; sys.exit(cli.main())"]


def _rgb(seed: int, w: int = 40, h: int = 30) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _can_drop_read_override() -> bool:
    """As root, `setpriv` without CAP_DAC_OVERRIDE/READ_SEARCH makes mode-000 files unreadable."""
    if os.geteuid() != 0:
        return True
    if shutil.which("setpriv") is None:
        return False
    probe = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", "true"], capture_output=True)
    return probe.returncode == 0


def _unprivileged(cmd: list) -> list:
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def messy(tmp_path):
    """Every kind of bad input from the issue in one ImageFolder; returns (root, undecodable, ok)."""
    root = tmp_path / "messy"
    a, b, c = root / "a", root / "b", root / "c_empty"
    for d in (a, b, c):
        d.mkdir(parents=True)
    good = []
    for i in range(5):
        _rgb(i).save(a / f"good{i}.jpg", quality=90)
        good.append(a / f"good{i}.jpg")
    _rgb(9).convert("CMYK").save(b / "cmyk.jpg")
    _rgb(10).save(b / "png_saved_as.jpg", format="PNG")
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(b / "one_pixel.jpg")
    Image.fromarray(np.full((1, 1), 7, np.uint8)).save(b / "one_pixel_gray.png")
    good += [b / "cmyk.jpg", b / "png_saved_as.jpg", b / "one_pixel.jpg", b / "one_pixel_gray.png"]
    (a / "zero.jpg").write_bytes(b"")
    whole = good[0].read_bytes()
    (a / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (b / "text.jpg").write_text("I am a text file\n" * 30)
    (b / "random.jpg").write_bytes(np.random.default_rng(3).bytes(5000))
    unreadable = a / "unreadable.jpg"
    _rgb(11).save(unreadable, quality=90)
    unreadable.chmod(0)
    (a / "folder.jpg").mkdir()  # a directory named like an image (empty)
    (a / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1junk")
    (b / "README.txt").write_text("notes about class b")
    (c / "README.txt").write_text("this class has no images")  # an empty class folder
    bad = [a / "zero.jpg", a / "truncated.jpg", b / "text.jpg", b / "random.jpg", unreadable]
    yield root, sorted(map(str, bad)), sorted(map(str, good))
    unreadable.chmod(0o644)


@pytest.mark.skipif(not _can_drop_read_override(), reason="cannot make a file unreadable for this user")
def test_verify_cli_finds_exactly_the_undecodable_files_with_reasons_and_a_clean_list(messy, tmp_path):
    root, bad, good = messy
    clean = tmp_path / "clean.txt"
    done = subprocess.run(_unprivileged([*CLI, "data", "verify", str(root), "--threads", "2", "--batch-size", "4",
                                         "--write-clean-list", str(clean)]),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stdout.splitlines()
    named = sorted(
        line.split(": ", 1)[0] for line in lines if line.startswith(str(root)) and "class folder" not in line
    )
    assert named == bad  # every undecodable file, and only those
    reason = {Path(line.split(": ", 1)[0]).name: line.split(": ", 1)[1] for line in lines if line.startswith(str(root))}
    assert "0 bytes" in reason["zero.jpg"] and "permission denied" in reason["unreadable.jpg"]
    assert "JPEG" in reason["truncated.jpg"] and "not a known image format" in reason["text.jpg"]
    assert "DALI cannot decode it: content is not a known image format" in reason["random.jpg"]
    assert "class folder with no images" in reason["c_empty"]
    assert "5 of 14 files cannot be decoded" in done.stdout
    assert "ignored 4 hidden or non-image entries" in done.stdout  # .DS_Store, 2 × README.txt, folder.jpg/
    listed = sorted(str(root / line.rsplit(" ", 1)[0]) for line in clean.read_text().splitlines())
    assert listed == good
    labels = {
        line.rsplit(" ", 1)[0].split("/")[0]: int(line.rsplit(" ", 1)[1]) for line in clean.read_text().splitlines()
    }
    assert labels == {"a": 0, "b": 1}  # folder labels; the empty class c keeps index 2 for itself

    # The clean list trains: the loader reads it (classes = the 3 folders) and decodes every file.
    loader = BatchAugmentLoader(
        root, file_list=clean, batch_size=9, num_views=2, image_size=16, device="cpu", num_threads=1
    )
    assert loader.classes == ["a", "b", "c_empty"] and len(loader.dataset) == 9
    images, labels = next(iter(loader))
    assert images.shape == (18, 3, 16, 16) and torch.isfinite(images).all()
    # ... and the folder itself is refused, naming the empty class folder, as before.
    with pytest.raises(DatasetError, match="c_empty"):
        BatchAugmentLoader(root, batch_size=2, device="cpu")


def test_verify_shows_a_progress_bar_on_a_terminal(tmp_path):
    root = tmp_path / "few"
    (root / "k").mkdir(parents=True)
    for i in range(6):
        _rgb(i).save(root / "k" / f"{i}.jpg")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    proc = subprocess.Popen(
        [*CLI, "data", "verify", str(root), "--batch-size", "2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=slave,
        text=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(master)
    bar = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "verify" in bar and "6/6" in bar and "100%" in bar


def test_verify_never_hands_non_images_to_dali(tmp_path):
    """DALI 2.4's CPU decoder can crash the process (segfault) on unrecognised content inside a
    large batch (see dali_ba/data/verify.py); verify names such files from their first bytes
    instead. 150 of them among 70 good files, 64 per batch: before, this crashed now and then."""
    folder = tmp_path / "many" / "k"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    bad = []
    for i in range(150):
        path = folder / f"junk{i:03d}.jpg"
        path.write_bytes(rng.bytes(2000) if i % 2 else b"<html>not found</html>\n" * 10)
        bad.append(str(path))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "pic.gif")  # a real GIF: DALI has no GIF decoder
    gif = str(folder / "pic.gif.jpg")
    os.rename(folder / "pic.gif", gif)
    for i in range(70):
        _rgb(i, 24, 16).save(folder / f"ok{i:03d}.jpg")
    files = sorted(str(p) for p in folder.iterdir())
    report = verify_files(files, num_threads=2, batch_size=64, progress=False)
    assert [b.path for b in report.bad] == sorted(bad + [gif])
    reasons = {Path(b.path).name: b.reason for b in report.bad}
    assert "a GIF image" in reasons["pic.gif.jpg"] and "not a known image format" in reasons["junk000.jpg"]


def _write_huge(path: Path, side: int, mode: str = "RGB", fmt: str = "JPEG") -> None:
    """A side×side constant image, written in a child process (PIL holds it whole in memory)."""
    code = f"from PIL import Image; Image.new({mode!r}, ({side}, {side}), 120).save({str(path)!r}, {fmt!r}" + (
        ", quality=90)" if fmt == "JPEG" else ")"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_verify_reports_huge_images_from_their_header_without_decoding(tmp_path):
    """20000×20000 (400 MP) is over the default limit: listed as too large, not decoded, left out."""
    folder = tmp_path / "big" / "k"
    folder.mkdir(parents=True)
    _write_huge(folder / "huge.png", 20000, mode="1", fmt="PNG")  # 1-bit PNG: written in ~1 s, 50 MB in memory
    _rgb(0).save(folder / "small.jpg")
    start = time.perf_counter()
    report = verify_files(
        [str(folder / "huge.png"), str(folder / "small.jpg")], max_pixels=DEFAULT_MAX_PIXELS, progress=False
    )
    assert time.perf_counter() - start < 20  # a decode would take minutes here and ~1.5 GB
    assert report.bad == [] and [b.path for b in report.large] == [str(folder / "huge.png")]
    assert "20000x20000 = 400.0 MP > 100 MP" in report.large[0].reason
    clean = tmp_path / "clean.txt"
    done = subprocess.run(
        [*CLI, "data", "verify", str(tmp_path / "big"), "--write-clean-list", str(clean)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "too large to train on" in done.stdout
    assert clean.read_text().splitlines() == ["k/small.jpg 0"]
    bad_limit = subprocess.run(
        [*CLI, "data", "verify", str(tmp_path / "big"), "--max-pixels", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad_limit.returncode == 2 and bad_limit.stderr.strip().count("\n") == 0
    assert "--max-pixels" in bad_limit.stderr and "Traceback" not in bad_limit.stderr


# ----------------------------------------------------------------------------- verify's decode process
def _proc_status(pid: int) -> dict:
    """VmRSS (bytes) and the thread names of a live process; {} once it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        names = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names.append(f.read().strip())
    except OSError:
        return {}
    if "VmRSS" not in fields:
        return {}
    return {"rss": int(fields["VmRSS"].split()[0]) * 1024, "threads": names}


def _decode_workers(pid: int) -> list:
    """The decode processes among ``pid``'s children (other tests may leave e.g. an S3 server)."""
    found = []
    for child in child_pids(pid):
        try:
            if b"decode_worker" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            continue
    return found


def _dali_threads(status: dict) -> int:
    return sum(name.startswith("[DALI]") for name in status.get("threads", []))


def _noise_folder(root: Path, count: int, bad_every: int, w: int, h: int) -> tuple[list, list]:
    """``count`` noise JPEGs in two classes, every ``bad_every``-th cut in half; returns (bad, good)."""
    rng = np.random.default_rng(0)
    bad, good = [], []
    for i in range(count):
        path = root / f"c{i % 2}" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
        if i % bad_every == 2:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        (bad if i % bad_every == 2 else good).append(str(path))
    return bad, good


# The CLI, failing if the verifying process imported DALI itself.
CLI_NO_DALI = [sys.executable, "-c", "import sys; from dali_ba import cli; "
               "cli._COMMANDS = [c for c in cli._COMMANDS if c[0][0] == 'data']; rc = cli.main(); "
               "assert 'nvidia.dali' not in sys.modules, 'verify imported DALI'; sys.exit(rc)"]


def _run_sampled(cmd: list, on_sample=None, timeout: float = 300) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``cmd``, sampling it and its children every 20 ms: peak RSS of the tree, peak thread counts,
    the children seen. ``on_sample(children_status)`` may act on the children (e.g. kill one)."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"tree_rss": 0, "parent_threads": 0, "parent_dali_threads": 0, "child_dali_threads": 0, "children": set()}
    out: list = []
    reader = threading.Thread(target=lambda: out.extend(proc.communicate(timeout=timeout)))
    reader.start()
    while reader.is_alive():
        parent = _proc_status(proc.pid)
        children = {pid: _proc_status(pid) for pid in child_pids(proc.pid)}
        children = {pid: status for pid, status in children.items() if status}
        if parent:
            peak["tree_rss"] = max(peak["tree_rss"], parent["rss"] + sum(s["rss"] for s in children.values()))
            peak["parent_threads"] = max(peak["parent_threads"], len(parent["threads"]))
            peak["parent_dali_threads"] = max(peak["parent_dali_threads"], _dali_threads(parent))
        for status in children.values():
            peak["child_dali_threads"] = max(peak["child_dali_threads"], _dali_threads(status))
        peak["children"] |= set(children)
        if on_sample is not None:
            on_sample(children)
        time.sleep(0.02)
    reader.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, *out), peak


def _named(stdout: str, root: Path) -> list:
    return sorted(line.split(": ", 1)[0] for line in stdout.splitlines() if line.startswith(str(root)))


def test_verify_memory_and_threads_stay_bounded_with_many_bad_files(tmp_path):
    """40 truncated JPEGs among 200 (400×300): each named once; DALI runs only in the decode process,
    which is replaced before it holds more than MAX_ABANDONED failed pipelines, so threads and memory
    do not grow with the number of bad files. Keeping every failed pipeline in the verifying process
    exceeds both bounds (docs/reliability.md)."""
    from dali_ba.data.decode_worker import MAX_ABANDONED

    root = tmp_path / "many_bad"
    bad, good = _noise_folder(root, 200, bad_every=5, w=400, h=300)
    done, peak = _run_sampled([*CLI_NO_DALI, "data", "verify", str(root), "--threads", "2"])
    assert done.returncode == 1, done.stderr[-2000:]
    assert _named(done.stdout, root) == sorted(bad)  # every bad file exactly once, no good file
    assert "40 of 200 files cannot be decoded" in done.stdout and "Traceback" not in done.stderr
    assert peak["parent_dali_threads"] == 0 and peak["parent_threads"] <= 16
    # One failed batch + one failed single per bad file: more than one child's worth.
    assert 4 + len(bad) > MAX_ABANDONED and len(peak["children"]) >= 2
    # Each DALI pipeline has a thread per decode thread + an input thread; held: abandoned + 2 live ones.
    assert peak["child_dali_threads"] <= 3 * (MAX_ABANDONED + 2)
    peak_mb = peak["tree_rss"] / 2**20
    assert peak_mb < 450, f"peak RSS of verify and its decode process: {peak_mb:.0f} MB"


def test_verify_survives_its_decode_process_being_killed(tmp_path):
    """SIGKILL the decode process while it decodes its first batch: a new one takes over, the batch
    is decoded again file by file, and the result is exactly the bad files."""
    root = tmp_path / "killed"
    bad, good = _noise_folder(root, 48, bad_every=8, w=1200, h=900)
    killed: list = []

    def kill_first_decoder(children: dict) -> None:
        for pid, status in children.items():
            if not killed and _dali_threads(status):  # it built its pipeline: a request is in flight
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    done, peak = _run_sampled([*CLI_NO_DALI, "data", "verify", str(root), "--batch-size", "8", "--threads", "2"],
                              on_sample=kill_first_decoder)
    assert killed, "the decode process finished before the test could kill it"
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert _named(done.stdout, root) == sorted(bad)
    assert len(peak["children"] - set(killed)) >= 1  # a replacement decoded the rest


def test_a_file_whose_decode_kills_the_decode_process_twice_is_named(tmp_path):
    """A decode process that dies is replaced and the file retried once; dying again names the file
    (as a real DALI segmentation fault would), and no decode process is left behind."""
    from dali_ba.data.verify import decode_check_one

    path = tmp_path / "big.jpg"
    ramp = np.linspace(0, 255, 6000, dtype=np.float32)
    Image.fromarray(np.repeat((np.add.outer(ramp, ramp) / 2).astype(np.uint8)[:, :, None], 3, axis=2)).save(path)
    result: list = []
    worker = threading.Thread(target=lambda: result.append(decode_check_one(str(path))), daemon=True)
    killed: set = set()
    worker.start()
    while worker.is_alive():
        for pid in _decode_workers(os.getpid()):
            if pid not in killed and _dali_threads(_proc_status(pid)):  # decoding (36 MP: a few 100 ms)
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
        time.sleep(0.005)
    worker.join()
    assert len(killed) == 2, f"killed {len(killed)} decode processes"
    assert result[0].startswith("DALI crashed while decoding it") and "SIGKILL" in result[0], result
    assert decode_check_one(str(path)) is None  # a later check starts afresh
    assert not _decode_workers(os.getpid())


def test_a_decode_that_does_not_answer_in_time_is_stopped_and_named(tmp_path, monkeypatch):
    """A decode process that does not answer within the timeout is killed and the file named; the
    verifying process does not hang."""
    from dali_ba.data import decode_worker
    from dali_ba.data.verify import decode_check_one

    _rgb(0).save(tmp_path / "ok.jpg")
    monkeypatch.setattr(decode_worker, "DECODE_TIMEOUT_S", 0.0)
    monkeypatch.setattr(decode_worker, "DECODE_TIMEOUT_S_PER_MB", 0.0)
    reason = decode_check_one(str(tmp_path / "ok.jpg"))
    assert reason.startswith("DALI did not finish decoding it within 0 s"), reason
    assert not _decode_workers(os.getpid())


@pytest.mark.parametrize("augment", ["imagenet", "cifar"])
def test_one_pixel_images_train_and_evaluate(tmp_path, augment):
    """Policy for tiny images: accepted, upsampled by the crop/resize like any other image."""
    folder = tmp_path / "tiny" / "k"
    folder.mkdir(parents=True)
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(folder / "rgb.jpg")
    Image.fromarray(np.full((1, 1), 50, np.uint8)).save(folder / "gray.jpg")
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(folder / "png.png")
    Image.fromarray(np.full((1, 5, 3), 30, np.uint8)).save(folder / "row.jpg")
    plain = dict(mean=(0, 0, 0), std=(1, 1, 1), device="cpu", num_threads=1, augment=augment)
    images, _ = next(iter(BatchAugmentLoader(tmp_path / "tiny", batch_size=4, num_views=2, image_size=24, **plain)))
    assert images.shape == (8, 3, 24, 24) and torch.isfinite(images).all()
    evaluated = torch.cat([x for x, _ in EvalLoader(tmp_path / "tiny", batch_size=3, image_size=24, **plain)])
    assert evaluated.shape == (4, 3, 24, 24)
    means = sorted(round(float(x.mean()) * 255) for x in evaluated)
    assert means == [30, 50, 90, 200]  # a flat 1-pixel image stays its colour


@pytest.mark.slow
def test_a_20000_pixel_square_jpeg_trains_within_bounded_memory(tmp_path):
    """Policy for huge images the user did not filter out: decoded like any other (no crash).
    Measured in a child process: wall time and peak RSS of one batch holding the 400 MP image."""
    folder = tmp_path / "huge" / "k"
    folder.mkdir(parents=True)
    _write_huge(folder / "huge.jpg", 20000)
    for i in range(3):
        _rgb(i).save(folder / f"s{i}.jpg")
    code = textwrap.dedent(f"""
        import json, resource, time
        import torch
        from dali_ba import BatchAugmentLoader
        loader = BatchAugmentLoader({str(tmp_path / "huge")!r}, batch_size=4, num_views=2, image_size=64,
                                    augment="imagenet", device="cpu", num_threads=2)
        start = time.perf_counter()
        images, labels = next(iter(loader))
        assert images.shape == (8, 3, 64, 64) and bool(torch.isfinite(images).all())
        print(json.dumps({{"seconds": time.perf_counter() - start,
                          "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    measured = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\n400 MP JPEG in a training batch: {measured['seconds']:.1f} s, peak RSS {measured['peak_rss_gb']:.2f} GB")
    assert measured["peak_rss_gb"] < 8  # 1.2 GB decoded + the resize's buffers; ~4.4 GB measured


# ----------------------------------------------------------------------------- loader state
def _broken_at(root: Path, loader: BatchAugmentLoader, step: int) -> Path:
    """The file the loader reads first in batch ``step`` of epoch 0."""
    return Path(loader.dataset.files[loader.batch_indices(0, step)[0]])


def test_state_after_a_decode_error_resumes_exactly_at_the_failing_batch_once_fixed(tmp_path):
    root = write_indexed_folder(tmp_path / "d", 32, classes=2)
    opts = dict(
        batch_size=2,
        num_views=2,
        image_size=16,
        augment="imagenet",
        device="cpu",
        num_threads=1,
        seed=4,
        mean=(0, 0, 0),
        std=(1, 1, 1),
    )
    straight = [x for x, _ in BatchAugmentLoader(root, **opts)]
    loader = BatchAugmentLoader(root, **opts)
    victim = _broken_at(root, loader, 5)
    original = victim.read_bytes()
    victim.write_bytes(b"not an image at all" * 20)
    delivered = []
    with pytest.raises(DecodeError) as info:
        for images, _ in loader:
            delivered.append(images)
    assert info.value.bad_files == [str(victim)] and len(delivered) == 5
    state = loader.state_dict()
    assert (state["epoch"], state["step"]) == (0, 5) and state["dali"] is not None

    victim.write_bytes(original)  # fixed (same name, same content)
    resumed = BatchAugmentLoader(root, **opts)
    resumed.load_state_dict(state)
    rest = [x for x, _ in resumed]
    assert len(rest) == 16 - 5
    assert all(torch.equal(a, b) for a, b in zip(rest, straight[5:]))  # bit for bit

    # Left out instead: the state belongs to another file list, which the loader refuses...
    victim.unlink()
    smaller = BatchAugmentLoader(root, **opts)
    with pytest.raises(ValueError, match="32 files then, 31 now"):
        smaller.load_state_dict(state)
    # ... and set_epoch(epoch, step) continues at the same step of the new list's shuffle.
    smaller.set_epoch(0, step=5)
    seen = [index_of(img) for images, _ in smaller for img in images[::2]]
    assert len(seen) == (15 - 5) * 2 and len(set(seen)) == len(seen)
    order = [index_of(img) for img in (torch.cat([x for x, _ in BatchAugmentLoader(root, **opts)])[::2])]
    assert seen == order[5 * 2 :]  # the very batches an uninterrupted epoch of the new list reads from step 5


def test_resume_inside_an_epoch_entered_with_set_epoch_step_is_exact(tmp_path):
    root = write_indexed_folder(tmp_path / "d", 24, classes=3)
    opts = dict(batch_size=2, num_views=2, image_size=16, augment="cifar", device="cpu", num_threads=1, seed=1)
    a = BatchAugmentLoader(root, **opts)
    a.set_epoch(2, step=3)
    batches = iter(a)
    for _ in range(4):
        next(batches)
    state = a.state_dict()  # epoch 2, step 7, counted in a pipeline that started at step 3
    assert (state["epoch"], state["step"], state["origin"]) == (2, 7, [2, 3])
    expected = [x for x, _ in batches]
    b = BatchAugmentLoader(root, **opts)
    b.load_state_dict(state)
    got = [x for x, _ in b]
    assert len(got) == len(expected) == 12 - 7 and all(torch.equal(x, y) for x, y in zip(got, expected))
    with pytest.raises(ValueError, match="step"):
        b.set_epoch(0, step=12)
