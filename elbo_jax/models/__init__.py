"""Built-in models. Each is an ``ej.Model`` with fast-path hooks, fitted by the same ``ej.fit``."""
from ._linear_gaussian import FactorAnalysis as FactorAnalysis, PPCA as PPCA
