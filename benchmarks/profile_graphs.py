"""Where the fused pipeline's CPU time goes: alternative M-view DALI graphs, measured side by side.

    .venv/bin/python benchmarks/profile_graphs.py data/synth2k/train [--views 4] [--rounds 4]

A research script (not part of the package): it builds the graphs directly so the alternatives
we tried stay reproducible. Each graph is run for a few batches per round with ONE DALI thread;
reported: process CPU ms per image, min and median over interleaved rounds (min is the best
estimate of the uncontended cost on a shared machine). For the split by kernel, run a graph
under ``perf record -g`` and read ``perf report --no-children --sort symbol``.

Graphs (imagenet recipe, 224 px, decode once, M views):
- ``float_stack``: per view crop → normalise(+mirror) in float, then ``fn.stack`` of the floats
  (the first version of dali_ba).
- ``u8_stack``: per view crop → flip in uint8, ``fn.stack`` of the uint8 crops, one normalise.
- ``word_stack``: like ``u8_stack`` but the crops are stacked as 64-bit words (``reinterpret``
  there and back) — an earlier dali_ba graph (benchmarks/README.md).
- ``no_stack``: M separate float outputs (crop → normalise with mirror) — what dali_ba does now
  (``augment.train_views``; the loader's copy, which it makes anyway, assembles the M views).
- ``word_stack_noaa``: ``word_stack`` with ``antialias=False`` (the explicit approximation).
- ``word_stack_prescale256``: shorter side resized once to <= 256 before the M crops (an
  approximation we measured and did not keep: no gain at M=4).
"""
from __future__ import annotations

import argparse
import resource
import statistics
from pathlib import Path


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    ap = argparse.ArgumentParser()
    ap.add_argument("root")
    ap.add_argument("--views", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    files = sorted(str(p) for p in Path(args.root).rglob("*.jpg"))
    m, size, b = args.views, 224, args.batch_size
    mean, std = [0.485 * 255, 0.456 * 255, 0.406 * 255], [0.229 * 255, 0.224 * 255, 0.225 * 255]
    words = size * size * 3 // 8

    def rrc(x, **kw):
        return fn.random_resized_crop(x, size=(size, size), random_area=(0.08, 1.0),
                                      random_aspect_ratio=(3 / 4, 4 / 3), **kw)

    def cmn(x, layout="CHW", **kw):
        return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout=layout, mean=mean, std=std, **kw)

    def flipped(x):
        return fn.flip(x, horizontal=fn.random.coin_flip())

    def word_stack(d, **kw):
        views = [fn.reinterpret(flipped(rrc(d, **kw)), dtype=types.INT64, shape=[words]) for _ in range(m)]
        stacked = fn.reinterpret(fn.stack(*views), dtype=types.UINT8, shape=[m, size, size, 3], layout="FHWC")
        return cmn(stacked, "FCHW")

    def prescale(d, shorter=256.0):
        shape = d.shape(dtype=types.FLOAT)
        return fn.resize(d, resize_shorter=dmath.min(dmath.min(shape[0], shape[1]), shorter))

    graphs = {
        "float_stack": lambda d: fn.stack(*[cmn(rrc(d), mirror=fn.random.coin_flip()) for _ in range(m)]),
        "u8_stack": lambda d: cmn(fn.stack(*[flipped(rrc(d)) for _ in range(m)], axis_name="F"), "FCHW"),
        "word_stack": word_stack,
        "no_stack": lambda d: [cmn(rrc(d), mirror=fn.random.coin_flip()) for _ in range(m)],
        "word_stack_noaa": lambda d: word_stack(d, antialias=False),
        "word_stack_prescale256": lambda d: word_stack(prescale(d)),
    }
    results = {k: [] for k in graphs}
    for _ in range(args.rounds):
        for name, graph in graphs.items():
            @pipeline_def(batch_size=b, num_threads=1, device_id=None, seed=1)
            def pipe_def(graph=graph):
                encoded, label = fn.readers.file(files=files, random_shuffle=True, name="Reader")
                out = graph(fn.decoders.image(encoded, device="cpu", output_type=types.RGB))
                return tuple(out) if isinstance(out, list) else out

            pipe = pipe_def()
            pipe.build()
            pipe.run()
            c0 = _cpu()
            for _ in range(args.batches):
                pipe.run()
            results[name].append((_cpu() - c0) / (args.batches * b) * 1e3)
            del pipe
    print(f"| graph (M={m}) | CPU ms/img, min | median |\n|---|---:|---:|")
    for name, xs in results.items():
        print(f"| {name} | {min(xs):.2f} | {statistics.median(xs):.2f} |")


if __name__ == "__main__":
    main()
