"""``ej.save`` / ``ej.load``: every built-in round-trips bit for bit in float32 and float64,
a user model through ``like=``, and every refusal with its message."""

import functools
import json
import pickle

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import elbo_jax as ej
from elbo_jax import models as M

CONFIG = "elbo_jax-config"


@functools.cache
def build(name, dtype):
    """A tiny built-in model (or prior) of the given float dtype, from its constructor
    (cached: models are immutable, and building them is most of this file's time)."""
    a = lambda x: np.asarray(x, dtype)
    w, trans = a([0.4, 0.6]), a([[0.9, 0.1], [0.2, 0.8]])
    builders = {
        "gmm_full": lambda: M.GaussianMixture(
            w, a([[0.0, 1.0], [2.0, 3.0]]), a([[[1.0, 0.3], [0.3, 2.0]], np.eye(2)]), "full"
        ),
        "gmm_diag": lambda: M.GaussianMixture(
            w, a([[0.0, 1.0], [2.0, 3.0]]), a([[1.0, 2.0], [3.0, 4.0]]), "diag", reg_covar=1e-3
        ),
        "bernoulli": lambda: M.BernoulliMixture(w, a([[0.2, 0.7, 0.5], [0.9, 0.1, 0.3]])),
        "poisson": lambda: M.PoissonMixture(w, a([[1.0, 5.0], [2.0, 0.5]]), min_rate=1e-4),
        "dirichlet_multinomial": lambda: M.DirichletMultinomialMixture(
            w, a([[1.0, 2.0, 3.0], [0.5, 0.5, 4.0]])
        ),
        "ppca": lambda: M.PPCA(a([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), a([0.0, 1.0, 2.0]), a(0.5)),
        "factor_analysis": lambda: M.FactorAnalysis(
            a([[1.0], [0.5], [2.0]]), a([0.0, 1.0, 2.0]), a([0.5, 1.0, 2.0])
        ),
        "gaussian_hmm_full": lambda: M.GaussianHMM(
            w, trans, a([[0.0], [3.0]]), a([[[1.0]], [[2.0]]]), "full"
        ),
        "gaussian_hmm_diag": lambda: M.GaussianHMM(
            w, trans, a([[0.0, 1.0], [3.0, 4.0]]), a([[1.0, 2.0], [2.0, 1.0]]), "diag", 1e-4
        ),
        "categorical_hmm": lambda: M.CategoricalHMM(
            w, trans, a([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
        ),
        "poisson_hmm": lambda: M.PoissonHMM(w, trans, a([[1.0, 2.0], [5.0, 0.5]])),
        "lgssm": lambda: M.LinearGaussianSSM(
            a([0.0]),
            a([[1.0]]),
            a([[0.9]]),
            a([[0.1]]),
            a([[1.0], [0.5]]),
            a(np.eye(2)),
            frozen=("initial_mean",),
            parallel_scan=False,
        ),
        "lda": lambda: M.LDA(
            a([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]), a([0.5, 0.5]), a(0.1), learn_alpha=True
        ),
        "vae_gaussian": lambda: M.VAE.initialize(
            jr.key(0), 3, 2, hidden=(4,), likelihood="gaussian", activation="relu", dtype=dtype
        ),
        "vae_bernoulli": lambda: M.VAE(  # a None field, a one-layer decoder
            build("vae_gaussian", dtype).encoder,
            M.MLP((build("vae_gaussian", dtype).decoder.layers[-1],), "softplus"),
            None,
            "bernoulli",
        ),
        "gaussian_mixture_prior": lambda: M.GaussianMixturePrior(mean=a([0.0, 1.0]), dof=a(3.0)),
        "hmm_prior": lambda: M.HMMPrior(2.0, a([1.0, 2.0])),
        "bernoulli_prior": lambda: M.BernoulliMixturePrior(concentration=2.0, a=3.0),
        "poisson_prior": lambda: M.PoissonMixturePrior(shape=1.5),
    }
    return builders[name]()


NAMES = [
    "gmm_full", "gmm_diag", "bernoulli", "poisson", "dirichlet_multinomial", "ppca",
    "factor_analysis", "gaussian_hmm_full", "gaussian_hmm_diag", "categorical_hmm",
    "poisson_hmm", "lgssm", "lda", "vae_gaussian", "vae_bernoulli", "gaussian_mixture_prior",
    "hmm_prior", "bernoulli_prior", "poisson_prior",
]  # fmt: skip


def assert_identical(loaded, original):
    """Same classes and static fields (the treedef), and every leaf of the same type, dtype,
    shape and bytes."""
    assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(original)
    for new, old in zip(
        jax.tree_util.tree_leaves(loaded), jax.tree_util.tree_leaves(original), strict=True
    ):
        assert type(new) is type(old)
        if isinstance(old, (jax.Array, np.ndarray)):
            assert (new.dtype, new.shape) == (old.dtype, old.shape)
            assert np.asarray(new).tobytes() == np.asarray(old).tobytes()
        else:
            assert new == old


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_builtin_round_trips_bit_for_bit(tmp_path, name, dtype):
    model = build(name, dtype)
    floats = [x.dtype for x in jax.tree_util.tree_leaves(model) if hasattr(x, "dtype")]
    assert all(d == dtype for d in floats)  # the float32 case really is float32
    path = tmp_path / "model.npz"
    ej.save(path, model)
    assert_identical(ej.load(path), model)
    assert_identical(ej.load(str(path), like=model), model)
    assert_identical(ej.load(path, like=eqx.filter_eval_shape(lambda: model)), model)


def test_loaded_model_gives_the_same_log_marginal(tmp_path):
    model = build("poisson", np.float64)
    x = np.array([[0.0, 3.0], [1.0, 2.0], [7.0, 0.0]])
    ej.save(tmp_path / "poisson.npz", model)
    loaded = ej.load(tmp_path / "poisson.npz")
    assert np.array_equal(loaded.log_marginal(x), model.log_marginal(x))


def test_bfloat16_model_round_trips(tmp_path):
    model = jax.tree.map(lambda a: a.astype(jnp.bfloat16), build("vae_gaussian", np.float32))
    ej.save(tmp_path / "vae.npz", model)
    assert_identical(ej.load(tmp_path / "vae.npz"), model)
    with np.load(tmp_path / "vae.npz", allow_pickle=False) as archive:  # raw bits in uint16
        assert archive["decoder.layers[0].weight"].dtype == np.uint16


# --------------------------------------------------------------------------- user models
class Special(ej.Model):
    """A user model holding what the format must keep bit for bit."""

    f32: jax.Array
    f64: jax.Array
    bf16: jax.Array
    ints: jax.Array
    flags: jax.Array
    table: np.ndarray
    count: int
    extra: tuple
    name: str = eqx.field(static=True)
    sizes: tuple = eqx.field(static=True)
    latent = ej.Discrete(2)

    def log_joint(self, x, z):
        return jnp.sum(self.f64) * x + z


def special(blank=False):
    """``blank``: all arrays zero (a skeleton)."""
    bits = np.array([0, 0x80000000, 0x7FC00001, 0xFF800000, 1, 0x3F800001], np.uint32)
    f32 = bits.view(np.float32)  # +-0, a NaN payload, -inf, the smallest subnormal, 1 + ulp
    f64 = np.array([np.pi, -0.0, np.nan, 5e-324, np.inf], np.float64)
    f32, f64 = (np.zeros_like(f32), np.zeros_like(f64)) if blank else (f32, f64)
    return Special(
        f32=jnp.asarray(f32),
        f64=jnp.asarray(f64),
        bf16=jnp.asarray([1.0, -0.0, 3.140625], jnp.bfloat16),
        ints=jnp.asarray([-(2**62), 7], jnp.int64),
        flags=jnp.asarray([True, False]),
        table=np.arange(6, dtype=np.int16).reshape(2, 3),
        count=3,
        extra=(None, [jnp.zeros((2,), jnp.float32)], {"a": 1.5}),
        name="special",
        sizes=(1, (2, "x"), None),
    )


def test_user_model_loads_through_like(tmp_path):
    model = special()
    path = tmp_path / "special"  # no suffix: written at exactly this name
    ej.save(path, model)
    assert [p.name for p in tmp_path.iterdir()] == ["special"]
    assert_identical(ej.load(path, like=special(blank=True)), model)
    skeleton = eqx.filter_eval_shape(special)
    assert isinstance(skeleton.f64, jax.ShapeDtypeStruct)
    loaded = ej.load(path, like=skeleton)
    assert_identical(loaded, model)
    with pytest.raises(ValueError, match=r"model is of the unknown class '.*Special'; pass like="):
        ej.load(path)


def test_the_file_is_an_npz_with_a_json_config(tmp_path):
    model = build("vae_gaussian", np.float32)
    ej.save(str(tmp_path / "vae.npz"), model)
    with np.load(tmp_path / "vae.npz", allow_pickle=False) as archive:
        config = json.loads(archive[CONFIG].tobytes().decode("utf-8"))
        weight = archive["encoder.network.layers[0].weight"]
    assert config["format"] == "elbo_jax.save" and config["format_version"] == 1
    assert config["elbo_jax_version"] == ej.__version__
    assert config["class"] == "elbo_jax.models.VAE"
    assert config["tree"]["static"] == {"likelihood": "gaussian"}
    mlp = config["tree"]["fields"]["decoder"]
    assert mlp["module"] == "elbo_jax.models.MLP" and mlp["static"] == {"activation": "relu"}
    assert config["arrays"]["encoder.network.layers[0].weight"] == {
        "dtype": "float32",
        "shape": [4, 3],
        "type": "jax",
    }
    assert np.array_equal(weight, model.encoder.network.layers[0].weight)


# --------------------------------------------------------------------------- refusals
def rewrite(path, edit):
    """Rewrite the saved file at ``path`` after ``edit(config, entries)`` changed them in
    place (or returned the raw bytes of a new config)."""
    with np.load(path, allow_pickle=False) as archive:
        entries = dict(archive)
    config = json.loads(entries[CONFIG].tobytes())
    raw = edit(config, entries)
    raw = raw if isinstance(raw, bytes) else json.dumps(config).encode()
    entries[CONFIG] = np.frombuffer(raw, np.uint8)
    with open(path, "wb") as file:
        np.savez(file, **entries)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "gmm.npz"
    ej.save(path, build("gmm_diag", np.float64))
    return path


def test_load_refuses_another_version(saved):
    rewrite(saved, lambda config, _: config.update(elbo_jax_version="0.0.1"))
    match = f"gmm.npz: saved by elbo_jax 0.0.1, this is {ej.__version__}"
    with pytest.raises(ValueError, match=match):
        ej.load(saved)


def test_load_refuses_the_wrong_class_for_like(saved):
    like = build("poisson", np.float64)
    match = "model is a elbo_jax.models.GaussianMixture in the file, but a elbo_jax.models.PoissonMixture in like"
    with pytest.raises(ValueError, match=match):
        ej.load(saved, like=like)
    with pytest.raises(
        ValueError,
        match=r"model is a elbo_jax.models.GaussianMixture in the file, but a \S*Special in like",
    ):
        ej.load(saved, like=special())


def test_load_refuses_a_like_of_another_shape_dtype_or_static_field(saved):
    with pytest.raises(
        ValueError,
        match=r"model.weight_logits is float64 \(2,\) in the file, but float32 \(2,\) in like",
    ):
        ej.load(saved, like=build("gmm_diag", np.float32))
    three = M.GaussianMixture(np.ones(3) / 3, np.zeros((3, 2)), np.ones((3, 2)), "diag", 1e-3)
    with pytest.raises(ValueError, match=r"weight_logits is float64 \(2,\) in the file, .* \(3,\)"):
        ej.load(saved, like=three)
    with pytest.raises(ValueError, match="model.covariance_type is 'diag' in the file, but 'full'"):
        ej.load(saved, like=build("gmm_full", np.float64))
    other = M.GaussianMixture(np.ones(2) / 2, np.zeros((2, 2)), np.ones((2, 2)), "diag")
    with pytest.raises(ValueError, match="model.reg_covar is 0.001 in the file, but 1e-06 in like"):
        ej.load(saved, like=other)


def test_load_refuses_an_array_edited_to_another_shape_or_dtype(saved):
    rewrite(saved, lambda _, entries: entries.update(loc=np.zeros((3, 2))))
    match = (
        r"array 'loc' has dtype float64 and shape \(3, 2\), but the config says float64 \(2, 2\)"
    )
    with pytest.raises(ValueError, match=match):
        ej.load(saved)
    rewrite(saved, lambda _, entries: entries.update(loc=np.zeros((2, 2), np.float32)))
    with pytest.raises(ValueError, match="array 'loc' has dtype float32"):
        ej.load(saved)


def test_load_refuses_a_consistent_edit_that_disagrees_with_like(saved):
    def grow(config, entries):
        config["arrays"]["loc"]["shape"] = [2, 5]
        entries["loc"] = np.zeros((2, 5))

    rewrite(saved, grow)
    with pytest.raises(ValueError, match=r"model.loc is float64 \(2, 5\) in the file, but"):
        ej.load(saved, like=build("gmm_diag", np.float64))


def test_load_refuses_missing_and_extra_arrays(saved):
    rewrite(saved, lambda _, entries: entries.pop("loc"))
    with pytest.raises(ValueError, match=r"arrays \['loc'\] are listed in the config but missing"):
        ej.load(saved)
    rewrite(saved, lambda config, entries: entries.update(loc=np.zeros((2, 2)), spare=np.ones(2)))
    with pytest.raises(ValueError, match=r"holds arrays \['spare'\] that the config does not list"):
        ej.load(saved)
    ej.save(saved, build("gmm_diag", np.float64))

    def add_spare(config, entries):
        config["arrays"]["spare"], entries["spare"] = config["arrays"]["loc"], entries["loc"]

    rewrite(saved, add_spare)
    with pytest.raises(ValueError, match=r"arrays \['spare'\] have no place in the tree"):
        ej.load(saved)


def test_load_refuses_an_unknown_or_swapped_class(saved):
    def rename(name):
        def edit(config, _):
            config["class"] = config["tree"]["module"] = name

        return edit

    rewrite(saved, rename("os.system"))
    with pytest.raises(ValueError, match="model is of the unknown class 'os.system'"):
        ej.load(saved)
    rewrite(saved, rename("elbo_jax.models.PoissonMixture"))
    with pytest.raises(ValueError, match="the static fields of model are not"):
        ej.load(saved)
    rewrite(saved, rename("elbo_jax.Model"))  # abstract: not in the allowlist
    with pytest.raises(ValueError, match="unknown class 'elbo_jax.Model'"):
        ej.load(saved)


def test_load_runs_the_classes_own_checks(tmp_path):
    path = tmp_path / "vae.npz"
    ej.save(path, build("vae_gaussian", np.float64))
    rewrite(path, lambda config, _: config["tree"]["static"].update(likelihood="poisson"))
    with pytest.raises(ValueError, match="the loaded model fails its checks: likelihood must be"):
        ej.load(path)


def test_load_refuses_files_that_are_not_elbo_jax_saves(tmp_path):
    with open(tmp_path / "model.pkl", "wb") as file:
        pickle.dump({"loc": np.zeros(2)}, file)
    with pytest.raises(
        ValueError, match=r"model.pkl: not an elbo_jax save \(This file contains pickled"
    ):
        ej.load(tmp_path / "model.pkl")
    np.savez(tmp_path / "objects.npz", **{CONFIG: np.array([{"format": 1}], dtype=object)})
    with pytest.raises(ValueError, match="objects.npz: not an elbo_jax save .*Object arrays"):
        ej.load(tmp_path / "objects.npz")
    np.savez(tmp_path / "plain.npz", loc=np.zeros(2))
    with pytest.raises(ValueError, match="plain.npz: not an elbo_jax save .*no uint8 entry"):
        ej.load(tmp_path / "plain.npz")
    np.save(tmp_path / "single.npy", np.zeros(2))
    with pytest.raises(ValueError, match="single.npy: not an elbo_jax save .*not an .npz"):
        ej.load(tmp_path / "single.npy")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.npz: not an elbo_jax save"):
        ej.load(tmp_path / "empty.npz")
    with pytest.raises(FileNotFoundError):
        ej.load(tmp_path / "absent.npz")


def test_load_refuses_a_malformed_config(saved):
    rewrite(saved, lambda config, _: b"{not json")
    with pytest.raises(ValueError, match="gmm.npz: malformed config: Expecting property name"):
        ej.load(saved)
    ej.save(saved, build("gmm_diag", np.float64))
    rewrite(saved, lambda config, _: json.dumps({"format": "something else"}).encode())
    with pytest.raises(ValueError, match="not an elbo_jax save .*no format 'elbo_jax.save'"):
        ej.load(saved)
    ej.save(saved, build("gmm_diag", np.float64))
    rewrite(saved, lambda config, _: config.pop("tree"))
    with pytest.raises(ValueError, match="malformed config: needs 'class', 'tree' and 'arrays'"):
        ej.load(saved)
    ej.save(saved, build("gmm_diag", np.float64))
    rewrite(saved, lambda config, _: config["arrays"]["loc"].update(dtype="object"))
    with pytest.raises(ValueError, match="malformed config: array 'loc' has the entry"):
        ej.load(saved)
    ej.save(saved, build("gmm_diag", np.float64))
    rewrite(
        saved, lambda config, _: config["tree"]["fields"].update(loc={"array": "weight_logits"})
    )
    with pytest.raises(ValueError, match="malformed config: model.loc is described as"):
        ej.load(saved)
    ej.save(saved, build("gmm_diag", np.float64))
    rewrite(saved, lambda config, _: config["tree"]["static"].update(reg_covar={"set": [1]}))
    with pytest.raises(ValueError, match="malformed config: model.reg_covar has the static value"):
        ej.load(saved)


def test_load_refuses_float64_arrays_without_x64(saved):
    with jax.enable_x64(False):
        with pytest.raises(
            ValueError,
            match="array 'weight_logits' is float64, which JAX would truncate: turn on 64-bit",
        ):
            ej.load(saved)


# --------------------------------------------------------------------------- save refusals
class Holder(ej.Model):
    value: object
    option: object = eqx.field(static=True, default=None)
    latent = ej.Discrete(2)

    def log_joint(self, x, z):
        return jnp.zeros(())


def test_save_refuses_what_it_cannot_store_faithfully(tmp_path):
    path = tmp_path / "model.npz"
    with pytest.raises(TypeError, match="model must be an ej.Model or a built-in prior, got dict"):
        ej.save(path, {"loc": jnp.zeros(2)})
    with pytest.raises(TypeError, match="got Linear"):
        ej.save(path, eqx.nn.Linear(2, 2, key=jr.key(0)))
    with pytest.raises(
        TypeError,
        match=r"model.option is a static PjitFunction \(.*\), which save cannot store as JSON",
    ):
        ej.save(path, Holder(jnp.zeros(2), option=jnp.tanh))
    with pytest.raises(TypeError, match=r"model.option\[0\] is a static complex"):
        ej.save(path, Holder(jnp.zeros(2), option=(1j,)))
    with pytest.raises(TypeError, match="model.value is a str, which save cannot store"):
        ej.save(path, Holder("text"))
    with pytest.raises(TypeError, match="model.value is an array of dtype object"):
        ej.save(path, Holder(np.array([None])))
    with pytest.raises(TypeError, match="model.value is a weakly typed array .* give it a dtype"):
        ej.save(path, Holder(jnp.asarray(0.5)))
    with pytest.raises(TypeError, match="model.value is a traced array: save a model outside jit"):
        jax.jit(lambda model: ej.save(path, model))(Holder(jnp.zeros(2)))
    assert not path.exists()
