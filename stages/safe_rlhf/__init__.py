"""The `safe_rlhf@k` stage (and the `baseline_*` rounds): one round of PPO-Lagrangian.

    settings.py     the rounds' settings (`safe_rlhf:` in the config), typed
    round.py        the algorithm, step by step (the stage's `run`)
    roles.py        the round's Ray actors, and how a step calls them (retries in place)
    resources.py    which actors a round has, with their CPUs and GPUs
    checkpoints.py  the round's checkpoints (learners, the multiplier, the step)
    plots.py        the round's training curves
"""
