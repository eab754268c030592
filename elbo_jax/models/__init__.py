"""Built-in models. Each is an ``ej.Model`` with fast-path hooks, fitted by the same ``ej.fit``."""
from ._bernoulli_mixture import BernoulliMixture as BernoulliMixture
from ._bernoulli_mixture import BernoulliMixturePrior as BernoulliMixturePrior
from ._poisson_mixture import PoissonMixture as PoissonMixture
from ._poisson_mixture import PoissonMixturePrior as PoissonMixturePrior
from ._gaussian_mixture import GaussianMixture as GaussianMixture, GaussianMixturePrior as GaussianMixturePrior
from ._linear_gaussian import FactorAnalysis as FactorAnalysis, PPCA as PPCA
