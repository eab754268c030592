r"""Coordinate descent on $F(q, \theta)$ with an explicit recognition distribution q.

Each iteration is an M-step on $\theta$ (q fixed), then an E-step on q ($\theta$ fixed),
then F at the new pair. Before the first iteration q is initialised and given one E-step,
so the first M-step sees a q fitted to the initial model (a uniform or zero-mean q would
make every component look alike).
"""

from typing import Any

import equinox as eqx
import jax.random as jr

from .._custom_types import Key
from .._data import Dataset
from .._latent import Discrete
from .._model import Model, is_finite_tree
from .._objective import _free_energy
from .._q import AbstractQ
from .._steps import AbstractEStep, AbstractMStep
from ._base import AbstractSolver


class CoordinateState(eqx.Module):
    model: Model
    q: AbstractQ
    e_state: Any
    m_state: Any
    key: Key


class CoordinateDescent(AbstractSolver):
    """E-steps and M-steps of any kind (exact, gradient, numerical) on one F."""

    e_step: AbstractEStep
    m_step: AbstractMStep
    prior: Any

    @property
    def monotone(self) -> bool:
        return self.e_step.exact and self.m_step.exact

    def _table(self, model: Model, data: Dataset):
        # The log-joint table of a Discrete latent is shared by the E-step and F.
        return model.log_joint_table(data.x) if isinstance(model.latent, Discrete) else None

    def init(self, model, q, data, key):
        key, init_key, e_key, f_key = jr.split(key, 4)
        q = q.initialize(model, data.x, key=init_key)
        table = self._table(model, data)
        e_state = self.e_step.init(q)
        q, e_state = self.e_step.step(model, q, e_state, data, key=e_key, table=table)
        objective = _free_energy(model, q, data, key=f_key, prior=self.prior, table=table)
        state = CoordinateState(model, q, e_state, self.m_step.init(model), key)
        return state, objective

    def step(self, state, data, started):
        del started  # init computes the start's F
        key, m_key, e_key, f_key = jr.split(state.key, 4)
        model, m_state = self.m_step.step(
            state.model, state.q, state.m_state, data, key=m_key, prior=self.prior
        )
        table = self._table(model, data)
        q, e_state = self.e_step.step(model, state.q, state.e_state, data, key=e_key, table=table)
        objective = _free_energy(model, q, data, key=f_key, prior=self.prior, table=table)
        return CoordinateState(model, q, e_state, m_state, key), objective

    def result(self, state, data):
        return state.model, state.q

    def is_finite(self, state):
        # q may put log-probability -inf on states the model rules out (log_joint = -inf
        # there); that is a valid q, and any other non-finite q makes F non-finite too.
        return is_finite_tree(state.model) & is_finite_tree(state.q, allow_minus_inf=True)
