"""Fits over an ``ej.Stream``: the solver's loop with each pass read batch by batch.

In memory, one compiled ``lax.while_loop`` runs a whole fit. Over a stream the data live
on the host, so each pass is driven from here: the solver begins the pass (``start``: exact
EM's M-step), takes the batches one at a time (``update``: merge a batch's statistics, or
an online M-step), ends it (``finish``: F, or the pass's estimate of it), and the loop's
bookkeeping is the same compiled ``advance`` as in memory. Dispatch is asynchronous and the
reader prepares and copies the next batches to the device in a background thread, so the
host reads ahead while the device computes; the host waits for the device once per pass,
to decide whether to stop.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._data import Dataset, pad_rows, padded_size, row_weights
from ._solvers import HISTORY_SIZE, LoopState, Status
from ._solvers._base import advance, init
from ._solvers._online import OnlineEM
from ._stream import FIRST_PASS, BatchReader


@eqx.filter_jit
def _init(solver, model, q, like, key):
    loop = init(solver, model, q, like, key)
    state = loop.solver_state
    if getattr(state, "features", None) is not None:  # nothing is kept per datum of a stream
        loop = eqx.tree_at(
            lambda s: s.solver_state, loop, dataclasses.replace(state, features=None)
        )
    return loop


@eqx.filter_jit
def _start(solver, state, started, num_data):
    return solver.start(state, started, num_data)


@eqx.filter_jit
def _update(carry, solver, batch):
    return solver.update(carry, batch)


@eqx.filter_jit
def _finish(solver, carry, num_data):
    return solver.finish(carry, num_data)


@eqx.filter_jit
def _estimate(solver, state, batch):
    return solver.estimate(state, batch)


@eqx.filter_jit
def _advance(solver, loop, state, objective, num_data, tol, max_iters):
    return advance(solver, loop, state, objective, num_data, tol, max_iters)


@eqx.filter_jit
def _final_model(solver, state, num_data):
    return solver.final_model(state, num_data)


class StreamFit:
    """One fit's passes over a ``BatchReader``.

    ``num_data``: $N$ of a pass when known in advance (the stream's length, or the user's
    ``Stream(num_data=...)``); exact EM otherwise counts it in its first pass. An online
    fit needs a value from its first update: without a prior any constant gives the same
    fit (its batches' statistics are all scaled alike), so the batch size stands in.
    """

    def __init__(self, solver, reader: BatchReader, key, chunk_rows: int, num_data: Any):
        self.solver = solver
        self.reader = reader
        self.key = key
        self.dtype = reader.dtype
        self.rows, self.chunk = padded_size(reader.batch_size, chunk_rows)
        if num_data is None and isinstance(solver, OnlineEM):
            if solver.prior is not None:
                raise ValueError(
                    "an online fit with a prior weighs it by 1/N, and this stream does not say "
                    "how many data a pass holds: pass ej.Stream(..., num_data=N)"
                )
            num_data = reader.batch_size
        self.num_data = None if num_data is None else np.asarray(num_data, self.dtype)

    def _n(self) -> Any:
        return self.num_data if self.num_data is not None else np.asarray(1, self.dtype)

    def dataset(self, x: Any, rows: int) -> Dataset:
        """A batch padded to the fit's batch rows, weight 0 for the padding."""
        weights = jnp.asarray(row_weights(rows, self.rows, self.dtype))
        return Dataset(pad_rows(x, self.rows), weights, self._n(), chunk_size=self.chunk)

    def like(self) -> Dataset:
        return self.dataset(*self.reader.first(self.key))

    def one_pass(self, loop: LoopState, pass_index: int) -> tuple[Any, Any]:
        """The solver state after one pass over the stream, and the pass's F."""
        carry = _start(self.solver, loop.solver_state, loop.started, self._n())
        rows_read = 0
        for x, rows in self.reader.pass_batches(self.key, pass_index):
            carry = _update(carry, self.solver, self.dataset(x, rows))
            rows_read += rows
        if self.num_data is None:
            self.num_data = np.asarray(rows_read, self.dtype)
        return _finish(self.solver, carry, self.num_data)

    def run(self, loop: LoopState, tol: Any, max_iters: int, bar: Any = None):
        """Passes until the fit stops or has made ``max_iters`` iterations (one per pass),
        and the ELBO of each."""
        history = []
        limit = np.asarray(max_iters, np.int32)
        while int(loop.status) == Status.RUNNING and int(loop.iteration) < max_iters:
            started = bool(loop.started)
            if not started and isinstance(self.solver, OnlineEM):
                # The start's F is estimated on the first batch: a one-shot stream is read
                # once, so the start gets no pass of its own.
                state, objective = _estimate(self.solver, loop.solver_state, self.like())
            else:
                index = int(loop.iteration) if started else FIRST_PASS
                state, objective = self.one_pass(loop, index)
            done = int(loop.iteration)
            loop = _advance(self.solver, loop, state, objective, self._n(), tol, limit)
            if int(loop.iteration) > done:
                slot = done % HISTORY_SIZE
                history.append(np.asarray(loop.history)[slot : slot + 1])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(elbo=f"{-float(loop.objective):.6g}")
        return loop, history

    def final_model(self, loop: LoopState) -> Any:
        return _final_model(self.solver, loop.solver_state, self._n())


def fit_stream(
    solver,
    model,
    q,
    reader: BatchReader,
    *,
    key,
    tol,
    max_iters: int,
    chunk_rows: int,
    num_data: Any,
    previous: LoopState | None = None,
    progress: bool = False,
):
    """Run ``solver`` over the stream: ``(loop, history pieces, fitted model)``. With
    ``previous`` (a resumed fit's loop) it makes ``max_iters`` more passes."""
    driver = StreamFit(solver, reader, key, chunk_rows, num_data)
    loop = _init(solver, model, q, driver.like(), key) if previous is None else previous
    total = max_iters + int(loop.iteration)
    if progress:
        from tqdm.auto import tqdm

        with tqdm(total=max_iters, desc="elbo_jax.fit", unit="pass") as bar:
            loop, history = driver.run(loop, tol, total, bar)
    else:
        loop, history = driver.run(loop, tol, total)
    return loop, history, driver.final_model(loop)
