"""Fitted scikit-learn estimators saved and loaded without pickle (``estimator.save(path)``,
``Estimator.load(path)``, ``elbo_jax.sklearn.load(path)``)."""

import json
import pickle
import zipfile

import numpy as np
import pytest

pytest.importorskip("sklearn")

from sklearn.exceptions import NotFittedError  # noqa: E402

import elbo_jax.sklearn as ejs  # noqa: E402
from elbo_jax._serialise import CONFIG_KEY  # noqa: E402

LENGTHS = [20, 7, 13]
# Tiny fits stop at max_iter: the warning is not what these tests are about.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-2, 1, (30, 2)), rng.normal(2, 0.5, (30, 2))])
    counts = rng.poisson(2.0, (24, 10)).astype(float)
    return x, counts


def _fitted(name, data):
    x, counts = data
    if name == "GaussianMixture":
        return ejs.GaussianMixture(2, max_iter=5, tol=0.0, random_state=0).fit(x)
    if name == "FactorAnalysis":
        return ejs.FactorAnalysis(1, max_iter=5, random_state=0).fit(x)
    if name == "GaussianHMM":
        return ejs.GaussianHMM(2, n_iter=3, random_state=0).fit(x[:40], LENGTHS)
    return ejs.LatentDirichletAllocation(2, max_iter=3, random_state=0).fit(counts)


def _outputs(estimator, data):
    x, counts = data
    name = type(estimator).__name__
    if name == "GaussianMixture":
        return [estimator.predict_proba(x), estimator.score_samples(x), estimator.bic(x)]
    if name == "FactorAnalysis":
        return [estimator.transform(x), estimator.score_samples(x), estimator.get_covariance()]
    if name == "GaussianHMM":
        return [estimator.predict_proba(x[:40], LENGTHS), estimator.score(x[:40], LENGTHS)]
    return [estimator.transform(counts), estimator.score(counts), estimator.perplexity(counts)]


def _assert_same(a, b):
    """Equal, bit for bit, through lists, tuples, dicts, records and models."""
    if isinstance(a, np.ndarray) or hasattr(a, "dtype"):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == object:
            assert a.tolist() == b.tolist()
        else:
            assert a.tobytes() == b.tobytes()
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _assert_same(u, v)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif hasattr(a, "__dataclass_fields__"):
        assert type(a) is type(b)
        for k in vars(a) if hasattr(a, "__dict__") else a.__dataclass_fields__:
            _assert_same(getattr(a, k), getattr(b, k))
    else:
        assert type(a) is type(b)
        assert a == b or (a != a and b != b)


NAMES = ["GaussianMixture", "FactorAnalysis", "GaussianHMM", "LatentDirichletAllocation"]


@pytest.mark.parametrize("name", NAMES)
def test_round_trip(name, data, tmp_path):
    estimator = _fitted(name, data)
    path = tmp_path / "estimator.npz"
    estimator.save(path)
    again = type(estimator).load(path)
    assert type(again) is type(estimator)
    assert again.get_params() == estimator.get_params()
    assert vars(again).keys() == vars(estimator).keys()
    for key, value in vars(estimator).items():
        if key == "model_":
            import jax

            leaves = jax.tree_util.tree_leaves(value)
            again_leaves = jax.tree_util.tree_leaves(again.model_)
            assert jax.tree_util.tree_structure(value) == jax.tree_util.tree_structure(again.model_)
            for u, v in zip(leaves, again_leaves, strict=True):
                _assert_same(u, v)
        else:
            _assert_same(value, getattr(again, key))
    for got, want in zip(_outputs(again, data), _outputs(estimator, data), strict=True):
        _assert_same(got, want)
    # The package-level load dispatches on the saved class.
    assert type(ejs.load(path)) is type(estimator)


def _rewrite_config(path, change):
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w") as archive:
        for name, raw in members.items():
            if name == f"{CONFIG_KEY}.npy":
                import io

                config = json.loads(np.load(io.BytesIO(raw)).tobytes())
                change(config)
                out = io.BytesIO()
                np.save(out, np.frombuffer(json.dumps(config).encode(), np.uint8))
                raw = out.getvalue()
            archive.writestr(name, raw)


def test_refusals(data, tmp_path):
    estimator = _fitted("GaussianMixture", data)
    path = tmp_path / "gm.npz"
    estimator.save(path)
    with pytest.raises(ValueError, match="not a FactorAnalysis"):
        ejs.FactorAnalysis.load(path)
    _rewrite_config(path, lambda c: c.update(estimator="os.system"))
    with pytest.raises(ValueError, match="unknown estimator class 'os.system'"):
        ejs.load(path)
    with pytest.raises(NotFittedError):
        ejs.GaussianMixture(2).save(tmp_path / "unfitted.npz")
    with pytest.raises(TypeError, match="random_state"):
        estimator.set_params(random_state=np.random.RandomState(0)).save(tmp_path / "rs.npz")
    pickled = pickle.dumps(_fitted("GaussianMixture", data))
    unpickled = pickle.loads(pickled)
    np.testing.assert_array_equal(unpickled.predict(data[0]), estimator.predict(data[0]))
    with pytest.raises(ValueError, match="not an elbo_jax save"):
        ejs.load(_write_pickle(tmp_path / "p.npz", pickled))


def _write_pickle(path, raw):
    path.write_bytes(raw)
    return path
