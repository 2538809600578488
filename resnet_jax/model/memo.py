"""What is computed once per process from a model, an optimizer and shapes."""

from __future__ import annotations

import functools


def per_process(maxsize: int):
    """functools.lru_cache for what is computed from a model, an optimizer and shapes (a trace, a
    jitted function): once per process for the same arguments, so a notebook's next run and each
    seed of train_many reuse it. Arguments that cannot be hashed (a model with list fields) are
    computed afresh at each call."""

    def wrap(fn):
        cached = functools.lru_cache(maxsize=maxsize)(fn)

        @functools.wraps(fn)
        def call(*args):
            try:
                hash(args)
            except TypeError:
                return fn(*args)
            return cached(*args)

        return call

    return wrap
