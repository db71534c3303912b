"""A small DDP ResNet trainer with the batch-augmentation recipe, the reference consumer of dali_ba.

Read it top to bottom, starting at ``trainers/loop.py`` (the training loop); the other modules
each hold one concern:

- ``train.py``      entry point: ``python -m trainers.train --config X [key=value ...]`` (or torchrun)
- ``config.py``     the schema: dali_ba's ``data:`` section composed with the trainer's sections
- ``engine.py``     the model side: network, optimizer, AMP, DDP, and the one training step
- ``mixing.py``     mixup and CutMix on the M·B batch; ``ema.py``: an EMA of the weights
- ``dist.py``       process group from torchrun's environment; rank 0 / world 1 without one
- ``models.py``     torchvision ResNet-18/34/50/101, CIFAR ResNet-20/44/56, ResNet-8, a small net
- ``schedule.py``   the learning rate as a pure function of the step (scaling rules, warmup, decay)
- ``optim.py``      SGD with optional no-weight-decay for BatchNorm and biases
- ``checkpoint.py`` atomic save, resume resolution, config compatibility
- ``saver.py``      the run's checkpoints, and the early stops (non-finite steps, a file that fails) that save one
- ``metrics.py``    metrics.jsonl (every key documented there), TensorBoard, accuracy
- ``diagnostics.py`` gradient-noise statistics that explain batch augmentation
- ``evaluate.py``   validation with one centre view or test-time averaging over views
- ``faults.py``     faults every rank must agree on (a file that fails to decode, a set-up step), lost peers
- ``signals.py``    SIGTERM/SIGUSR1 (pre-emption), SIGINT/SIGHUP (interrupted): checkpoint, then exit
- ``nonfinite.py``  steps with a NaN/inf loss, gradients or statistics: skipped, counted, bounded
- ``run_lock.py``   one run per ``train.out_dir`` (flock)
- ``outdir.py``     ``train.out_dir`` checked before any work, then taken
- ``host_memory.py`` keep freed host memory in the process (CPU steps stop page-faulting)
- ``resources.py``  memory: refused up front when it cannot fit, one line with a hint when it runs out

``dali_ba`` never imports this package.
"""
