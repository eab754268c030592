"""Everyday use: ConvergenceWarning, printing, the progress bar, NumPy scalars and lists,
``--version`` and the public namespace."""

import warnings

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import elbo_jax as ej
from elbo_jax.__main__ import main

GMM = ej.models.GaussianMixture


@pytest.fixture(scope="module")
def blobs():
    centres = np.array([[-1.5, 0.0], [1.5, 0.5]])
    rng = np.random.default_rng(0)
    return centres[rng.integers(0, 2, 200)] + rng.normal(size=(200, 2))


@pytest.fixture(scope="module")
def start(blobs):
    return GMM.initialize(jr.key(0), blobs, 2)


def _fit_quietly(*args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = ej.fit(*args, **kwargs)
    return res, [w for w in caught if issubclass(w.category, ej.ConvergenceWarning)]


# ---------------------------------------------------------------- ConvergenceWarning
def test_convergence_warning_exactly_when_a_fit_ends_at_max_iters(start, blobs):
    # the number of iterations this fit needs to converge, and one fewer
    converged, caught = _fit_quietly(start, blobs, max_iters=200, tol=1e-8)
    assert converged.status == ej.Status.CONVERGED and not caught
    n = converged.num_iters
    short, caught = _fit_quietly(start, blobs, max_iters=n - 1, tol=1e-8)
    assert short.status == ej.Status.MAX_ITERS and len(caught) == 1
    assert f"max_iters ({n - 1} iterations)" in str(caught[0].message) and "tol=1e-08" in str(
        caught[0].message
    )
    # exactly max_iters = the iterations it needs: converged at the last one, no warning
    exact, caught = _fit_quietly(start, blobs, max_iters=n, tol=1e-8)
    assert exact.status == ej.Status.CONVERGED and not caught
    # tol=0 asks for max_iters iterations: no warning
    fixed, caught = _fit_quietly(start, blobs, max_iters=3, tol=0)
    assert fixed.status == ej.Status.MAX_ITERS and not caught
    # a resumed fit that again ends at max_iters warns; one that converges does not
    _, caught = _fit_quietly(short, blobs, max_iters=1, tol=1e-8)
    assert not caught  # n - 1 + 1 = n: converged
    _, caught = _fit_quietly(fixed, blobs, max_iters=1, tol=1e-8)
    assert len(caught) == 1
    # the documented switch silences it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=ej.ConvergenceWarning)
        ej.fit(start, blobs, max_iters=n - 1, tol=1e-8)
    assert not caught
    assert issubclass(ej.ConvergenceWarning, UserWarning)


def test_convergence_warning_for_restarts_and_online_fits(start, blobs):
    init = lambda k: GMM.initialize(k, blobs, 2)
    res, caught = _fit_quietly(init, blobs, restarts=2, key=jr.key(1), max_iters=2, tol=1e-8)
    assert res.status == ej.Status.MAX_ITERS and len(caught) == 1
    res, caught = _fit_quietly(
        start, blobs, m_step=ej.StepwiseMStep(), batch_size=50, key=jr.key(2), max_iters=2, tol=1e-9
    )
    assert res.status == ej.Status.MAX_ITERS and len(caught) == 1


# ---------------------------------------------------------------- printing
def test_a_model_prints_its_constrained_parameters(start):
    text = repr(start)
    assert text.startswith("GaussianMixture(covariance_type='full', reg_covar=1e-06)")
    for name, value in [("weights", start.weights), ("means", start.means)]:
        shape = ",".join(map(str, value.shape))
        values = np.array2string(np.asarray(value), precision=4, suppress_small=True)
        assert f"{name}: f64[{shape}] =" in text
        assert values.replace("\n", "\n    ") in text  # the constrained values themselves
    assert "covariances: f64[2,2,2] =" in text
    assert "raw_precision_factor" not in text and "weight_logits" not in text
    # every built-in names its parameters; a model of one's own keeps equinox's field repr
    assert "transition_matrix: f64[3,3] =" in repr(
        ej.models.PoissonHMM(jnp.ones(3) / 3, jnp.full((3, 3), 1 / 3), jnp.ones((3, 2)))
    )


def test_a_model_prints_shapes_only_while_traced(start):
    seen = []
    jax.jit(lambda m: seen.append(repr(m)) or m.weight_logits)(start)
    assert "weights: f64[2]\n" in seen[0] and "=" not in seen[0].split("\n", 1)[1]


def test_a_fit_result_prints_status_iterations_and_elbo(start, blobs):
    res = ej.fit(start, blobs)
    head, model, q = repr(res).split("\n", 1)[0], repr(res).split("\n", 1)[1], repr(res)
    assert head == (
        f"FitResult(status=CONVERGED, num_iters={res.num_iters}, elbo={float(res.elbo):.6g}, "
        f"initial_elbo={float(res.initial_elbo):.6g})"
    )
    assert model.startswith("  model: GaussianMixture(") and q.endswith("\n  q: Categorical")


# ---------------------------------------------------------------- progress bar
def test_the_progress_bar_ends_where_the_fit_stopped(start, blobs, capsys):
    pytest.importorskip("tqdm")
    res = ej.fit(start, blobs, max_iters=500, progress=True)
    assert res.converged and res.num_iters < 500
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last and f" {res.num_iters}/{res.num_iters} " in last


# ---------------------------------------------------------------- NumPy scalars and lists
def test_numpy_scalars_and_nested_lists_are_accepted(start, blobs):
    reference = ej.fit(start, blobs, max_iters=4, tol=0)
    from_numpy = ej.fit(start, blobs.tolist(), max_iters=np.int64(4), tol=np.float32(0.0))
    np.testing.assert_array_equal(from_numpy.model.loc, reference.model.loc)
    assert ej.log_evidence(start, blobs.tolist()) == ej.log_evidence(start, blobs)
    init = lambda k: GMM.initialize(k, blobs.tolist(), np.int64(2))
    restarts = ej.fit(init, blobs, restarts=np.int32(2), key=jr.key(0), max_iters=3, tol=0)
    assert restarts.restart_elbos.shape == (2,)
    with pytest.raises(ValueError, match="max_iters must be a positive int"):
        ej.fit(start, blobs, max_iters=np.float64(3.0))


# ---------------------------------------------------------------- command line, namespace
def test_version_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"elbo_jax {ej.__version__}"


def test_only_public_names_in_dir():
    names = dir(ej)
    assert [n for n in names if n.startswith("_")] == ["__version__"]
    assert {"fit", "Model", "ConvergenceWarning", "models", "FitResult"} <= set(names)
    assert all(hasattr(ej, name) for name in names)
    assert not [n for n in dir(ej.models) if n.startswith("_")]
    assert {"GaussianMixture", "LDA", "VAE"} <= set(dir(ej.models))
