"""Solvers: each algorithm as a state plus ``init`` / ``step``, driven by one compiled loop."""

from ._base import HISTORY_SIZE as HISTORY_SIZE
from ._base import AbstractSolver as AbstractSolver
from ._base import LoopState as LoopState
from ._base import Status as Status
from ._base import run as run
from ._base import solve as solve
from ._coordinate_descent import CoordinateDescent as CoordinateDescent
from ._statistics_em import StatisticsEM as StatisticsEM
