"""dali-ba's benchmarks: one home for measuring speed, and one way to record what was measured.

Not part of the installed package: ``dali-ba bench`` runs them from a source checkout (the CLI
finds this folder beside ``dali_ba/``), and so does ``python -m benchmarks.cli``. Every record
carries the git commit it ran (``record.py``), so old results stay traceable without keeping
old code paths alive.
"""
