"""Hyperparameter search over the continual loop (``dylora tune``) on Optuna.

``params``: dotted parameter names (``training.seed_lr``, ``system.expert.rank``) and how tuned values overlay a
stream; ``space``: the ``tune:`` section of a stream file (search space, objective, pruner) with its defaults;
``objective``: one trial = one pass of the stream, scored on held-out data; ``study``: the Optuna study in the
run's store; ``report``: ``tune-report.md``, plots and ``best.yaml``. Only ``params`` is imported by the rest of
the package (it needs no Optuna).
"""
