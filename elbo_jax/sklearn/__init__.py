"""scikit-learn estimators on elbo_jax's models (``pip install 'elbo_jax[sklearn]'``).

Importing this package imports scikit-learn; ``import elbo_jax`` never does.
"""
