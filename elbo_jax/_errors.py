"""Warning categories that elbo_jax emits (errors are plain ``ValueError``/``TypeError``)."""


class ConvergenceWarning(UserWarning):
    """A fit stopped at ``max_iters`` before the free energy settled to within ``tol``.

    ``ej.fit`` warns with it when a fit with ``tol > 0`` ends by reaching ``max_iters``
    (``tol=0`` asks for exactly ``max_iters`` iterations, and does not warn). The fitted
    model is still returned; ``result.status`` is ``Status.MAX_ITERS``. To silence it::

        import warnings
        warnings.filterwarnings("ignore", category=ej.ConvergenceWarning)

    (or ``warnings.catch_warnings()`` around one fit).
    """
