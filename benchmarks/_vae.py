"""``python -m benchmarks vae [--quick]``: elbo_jax's VAE against numpyro SVI (issue #11,
item 5). Writes ``results_vae[_quick].json`` and ``.md`` beside the main benchmark's.

Both sides train the same model from the same start: a Bernoulli VAE whose encoder
``D -> hidden -> 2L`` (mean and log-scale) and decoder ``L -> hidden -> D`` are tanh MLPs,
initialised once by ``ej.models.VAE.initialize`` and copied into numpyro's ``param`` sites.
Each minibatch step lowers the per-datum negative ELBO of its rows (1 Monte Carlo draw per
datum) with Adam at the same learning rate, over the same minibatches in the same order:
``elbo_jax._solvers._online.minibatches`` drawn from the fit's key chain, replayed for numpyro.

- **elbo_jax**: ``ej.fit(VAE, x, m_step=ej.GradientMStep(optax.adam(lr)), batch_size=B,
  max_iters=passes, tol=0, key=key)``; the whole fit is one compiled loop.
- **numpyro**: ``SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO())`` with
  ``jax.jit(svi.update)`` called once per minibatch from Python (numpyro's usual
  minibatch loop); the model's and guide's data sites sit in ``numpyro.plate`` under
  ``handlers.scale(1 / B_b)`` (and a mask for the padding rows of a short minibatch), so its
  loss is the same per-datum minibatch estimate elbo_jax lowers.
- **numpyro (scan)**: the same ``svi.update`` with one pass's minibatches in one jitted
  ``lax.scan`` (numpyro's best case: no Python between steps).

The two estimators differ only in the entropy term: elbo_jax uses q's exact Gaussian
entropy, Trace_ELBO the single-draw ``-log q(z)``; both are unbiased for the ELBO and its
gradient (elbo_jax's with less variance), so the trajectories differ by Monte Carlo noise.

Timing is warm and by difference, as in ``_online.py``: seconds per step =
``(T(passes) - T(1)) / ((passes - 1) * batches per pass)``; **compile s** = the first
one-pass run minus a warm one. Every final parameter set is scored by one evaluator:
the numpyro parameters copied into the elbo_jax ``VAE``, then ``ej.free_energy`` on the test
set with ``ej.Amortized(num_samples=S)`` (the ELBO) and ``importance_weighted=True, k=100``
(a tighter bound on log p(x)), with fixed keys, so all contenders see the same draws.
"""

import functools
import sys
import time
from pathlib import Path

import numpy as np

from ._report import _f, _table

_VERSIONS = ("elbo_jax", "jax", "jaxlib", "numpy", "equinox", "optax", "numpyro", "scikit-learn")
TARGET_REL_ELBO = 0.01  # test ELBO within 1 % of numpyro's


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def settings(quick: bool, scale: float = 1.0, smoke: bool = False) -> dict:
    """Sizes of a run. ``quick``: the synthetic set at 1/10, fewer passes. ``smoke`` (for the
    test): 300 training digits and a 64-pixel synthetic set of the same shape (300 / 297
    rows), networks of 32 hidden units, 3 passes."""
    if smoke:
        # the synthetic set has the digits' shapes, so the two share compiled programs
        digits = {"n_train": 300, "hidden": (32,), "latent": 4, "batch": 50, "passes": 3}
        synth = dict(digits, n_test=297, dim=64)
        evaluation = {"elbo_samples": 4, "iw_k": 10, "iw_rows": 100, "chunk": 300}
    else:
        digits = {"n_train": 1500, "hidden": (256,), "latent": 8, "batch": 100}
        digits["passes"] = 40 if quick else 200
        n = max(1000, round(50_000 * scale / (10 if quick else 1)))
        synth = {"n_train": n, "n_test": max(200, n // 5), "dim": 784, "hidden": (512,)}
        synth |= {"latent": 16, "batch": 100, "passes": 3 if quick else 6}
        evaluation = {"elbo_samples": 20, "iw_k": 100, "iw_rows": 2000, "chunk": 250}
    return {
        "mode": "smoke" if smoke else ("quick" if quick else "full"),
        "scale": scale,
        "learning_rate": 1e-3,
        "seed": 0,
        "datasets": {"digits": digits, "synthetic": synth},
        "evaluation": evaluation,
        "repeat_budget_s": 0.0 if smoke else 1.0,
        "rounds": 1 if smoke or quick else 2,
    }


# --------------------------------------------------------------------------- data
def digits_data(n_train: int) -> tuple[np.ndarray, np.ndarray, str]:
    """scikit-learn's ``load_digits()`` binarised (pixel > 7 of 16): the first ``n_train``
    images for training (at most 1,500) and images 1,500 onwards (297) for testing."""
    from sklearn.datasets import load_digits

    x = (load_digits().data > 7).astype(np.float32)
    what = f"scikit-learn load_digits() binarised (> 7): train = first {n_train}, test = last 297"
    return x[: min(n_train, 1500)], x[1500:], what


def synthetic_data(n_train: int, n_test: int, dim: int, seed: int = 11) -> tuple:
    """Binary images from a random tanh decoder: ``z ~ N(0, I_8)``, ``h = tanh(A z + a)``,
    ``x ~ Bernoulli(sigmoid(B h + b))`` with ``A ~ N(0, 1.5^2 / 8)``, ``B ~ N(0, 3^2 / 256)``
    and pixel offsets ``b ~ N(-1, 1)`` (sparse, structured images), drawn with NumPy."""
    rng = np.random.default_rng(seed)
    latent, hidden = 8, 256
    a_mat = rng.normal(0, 1.5 / np.sqrt(latent), (hidden, latent))
    a_off = rng.normal(0, 0.5, hidden)
    b_mat = rng.normal(0, 3.0 / np.sqrt(hidden), (dim, hidden))
    b_off = rng.normal(-1.0, 1.0, dim)
    z = rng.normal(size=(n_train + n_test, latent))
    logits = np.tanh(z @ a_mat.T + a_off) @ b_mat.T + b_off
    x = (rng.random(logits.shape) < 1 / (1 + np.exp(-logits))).astype(np.float32)
    what = (
        f"{n_train + n_test:,} x {dim} binary images from a random tanh decoder "
        f"(latent 8, hidden 256); train = first {n_train:,}, test = last {n_test:,}"
    )
    return x[:n_train], x[n_train:], what


# --------------------------------------------------------------------------- batches
@functools.cache
def pass_batches(n: int, size: int):
    """A jitted ``(key, passes) -> (index (nb, size), keep (nb, size), next key)``: the
    minibatches of one pass of ``ej.fit`` (``minibatches`` from the solver's key and the pass
    number) as row indices, and the key after the pass (the solver splits its key once per
    minibatch), so another library can visit the same rows in the same order."""
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    from elbo_jax._data import Dataset
    from elbo_jax._solvers._online import minibatches

    if not 1 <= size < n:
        raise ValueError(f"batch size must be in [1, {n}), got {size}")
    num_batches = -(-n // size)

    @jax.jit
    def fn(key, passes):
        rows = Dataset(
            jnp.arange(n, dtype=jnp.int32),
            jnp.ones((n,), jnp.float32),
            jnp.asarray(n, jnp.float32),
            chunk_size=n,
        )
        batch_fn, _ = minibatches(rows, size, key, passes)

        def one(i):
            batch = batch_fn(i)
            return batch.x, batch.weights > 0

        index, keep = jax.vmap(one)(jnp.arange(num_batches))
        next_key = jax.lax.fori_loop(0, num_batches, lambda _, k: jr.split(k)[0], key)
        return index, keep, next_key

    return fn, num_batches


# --------------------------------------------------------------------------- contenders
def _elbo_jax(vae0, x, cfg: dict, spec: dict):
    """``train(passes) -> (model, train ELBO per pass)``, by ``ej.fit``."""
    import jax
    import jax.random as jr
    import optax

    import elbo_jax as ej

    def train(passes: int):
        res = ej.fit(
            vae0,
            x,
            m_step=ej.GradientMStep(optax.adam(cfg["learning_rate"])),
            batch_size=spec["batch"],
            max_iters=passes,
            tol=0.0,
            key=jr.key(cfg["seed"]),
        )
        model = jax.block_until_ready(res.model)
        return model, np.asarray(res.history, np.float64)

    return train


def _vae_params(vae) -> dict:
    """The VAE's weights as numpyro ``param`` initial values (equinox's ``(out, in)`` layout)."""
    out = {}
    for prefix, layers in (("enc", vae.encoder.network.layers), ("dec", vae.decoder.layers)):
        for i, layer in enumerate(layers):
            out[f"{prefix}_w{i}"], out[f"{prefix}_b{i}"] = layer.weight, layer.bias
    return out


def _with_params(vae, params: dict):
    """``vae`` with the weights of a numpyro parameter dict (the inverse of ``_vae_params``)."""
    import equinox as eqx

    enc = vae.encoder.network.layers
    dec = vae.decoder.layers
    leaves = lambda m: [
        leaf
        for layers in (m.encoder.network.layers, m.decoder.layers)
        for layer in layers
        for leaf in (layer.weight, layer.bias)
    ]
    values = [params[f"enc_{w}{i}"] for i in range(len(enc)) for w in ("w", "b")]
    values += [params[f"dec_{w}{i}"] for i in range(len(dec)) for w in ("w", "b")]
    return eqx.tree_at(leaves, vae, values)


@functools.cache
def _numpyro_program(architecture: tuple, lr: float) -> tuple:
    """numpyro's model and guide for a tanh VAE of ``(data_dim, hidden, latent_dim)``, its
    ``SVI`` and the jitted update of one minibatch and of one pass (``lax.scan``). Cached by
    architecture, as ``ej.fit``'s compiled programs are by shape. ``x``: a minibatch (B, D);
    ``keep``: its real rows; the data sites are scaled by 1 / (real rows): the per-datum
    estimate ``ej.fit`` lowers."""
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist
    from numpyro import handlers
    from numpyro.infer import SVI, Trace_ELBO

    _, hidden, latent = architecture
    num_layers = len(hidden) + 1

    def mlp(prefix: str, h):
        for i in range(num_layers):
            h = h @ numpyro.param(f"{prefix}_w{i}").T + numpyro.param(f"{prefix}_b{i}")
            if i < num_layers - 1:
                h = jnp.tanh(h)
        return h

    def data_plate(x, keep):
        scale = 1.0 / jnp.maximum(jnp.sum(keep), 1).astype(x.dtype)
        return (
            numpyro.plate("data", x.shape[0]),
            handlers.scale(scale=scale),
            handlers.mask(mask=keep),
        )

    def model(x, keep):
        plate, scale, mask = data_plate(x, keep)
        with plate, scale, mask:
            z = numpyro.sample("z", dist.Normal(jnp.zeros(latent, x.dtype), 1.0).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=mlp("dec", z)).to_event(1), obs=x)

    def guide(x, keep):
        plate, scale, mask = data_plate(x, keep)
        out = mlp("enc", x)
        with plate, scale, mask:
            mean, log_scale = out[:, :latent], out[:, latent:]
            numpyro.sample("z", dist.Normal(mean, jnp.exp(log_scale)).to_event(1))

    svi = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO(num_particles=1))

    @jax.jit
    def step(state, x, index, keep):
        return svi.update(state, x[index], keep)

    @jax.jit
    def one_pass(state, x, index, keep):
        return jax.lax.scan(lambda s, b: svi.update(s, x[b[0]], b[1]), state, (index, keep))

    return svi, step, one_pass


def _numpyro(vae0, x, cfg: dict, spec: dict, scan: bool):
    """``train(passes) -> (model, train ELBO per pass)`` by numpyro SVI from ``vae0``'s
    weights over the fit's minibatches: ``jax.jit(svi.update)`` per minibatch from Python,
    or (``scan``) one jitted ``lax.scan`` of ``svi.update`` per pass."""
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    if vae0.decoder.activation != "tanh" or vae0.likelihood != "bernoulli":
        raise ValueError("the numpyro twin is written for tanh networks, Bernoulli pixels")
    hidden = tuple(layer.out_features for layer in vae0.decoder.layers[:-1])[::-1]
    svi, step, one_pass = _numpyro_program(
        (vae0.data_dim, hidden, vae0.latent_dim), cfg["learning_rate"]
    )
    n, size = x.shape[0], spec["batch"]
    batches, num_batches = pass_batches(n, size)
    x = jnp.asarray(x)
    index, keep, _ = batches(jr.key(cfg["seed"]), jnp.zeros((), jnp.int32))
    state0 = svi.init(
        jr.PRNGKey(cfg["seed"] + 1), x[index[0]], keep[0], init_params=_vae_params(vae0)
    )

    def train(passes: int):
        state, key, losses = state0, jr.key(cfg["seed"]), []
        for p in range(passes):
            index, keep, key = batches(key, jnp.asarray(p, jnp.int32))
            if scan:
                state, loss = one_pass(state, x, index, keep)
                losses.append(jnp.mean(loss))
            else:
                pass_losses = []
                for i in range(num_batches):
                    state, loss = step(state, x, index[i], keep[i])
                    pass_losses.append(loss)
                losses.append(jnp.mean(jnp.stack(pass_losses)))
        params = jax.block_until_ready(svi.get_params(state))
        return _with_params(vae0, params), -np.asarray(jnp.stack(losses), np.float64)

    return train


# --------------------------------------------------------------------------- evaluation
def evaluate(model, x: np.ndarray, *, num_samples: int, importance_weighted: bool, chunk: int):
    """The mean over the rows of ``x`` of the ELBO (or, ``importance_weighted``, the bound
    with k = ``num_samples``) under the model's own encoder: ``-ej.free_energy`` in chunks of
    ``chunk`` rows, chunk i with key ``fold_in(key(1234), i)`` (the same draws for every
    contender)."""
    import jax.random as jr

    import elbo_jax as ej

    q = ej.Amortized(num_samples=num_samples, importance_weighted=importance_weighted)
    total = 0.0
    for i, start in enumerate(range(0, x.shape[0], chunk)):
        rows = x[start : start + chunk]
        f = ej.free_energy(model, q, rows, key=jr.fold_in(jr.key(1234), i))
        total += float(f) * rows.shape[0]
    return -total / x.shape[0]


# --------------------------------------------------------------------------- timing
def _time(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _best(fn, budget_s: float, most: int = 5):
    result, best = _time(fn)
    spent, count = best, 1
    while spent < budget_s and count < most:
        result, took = _time(fn)
        best, spent, count = min(best, took), spent + took, count + 1
    return result, best


def _timed_rows(trains: dict, spec: dict, cfg: dict, num_batches: int) -> tuple[list, dict]:
    """Each contender's first one-pass run (it compiles), then ``cfg["rounds"]`` interleaved
    rounds of warm runs of 1 pass (the best of repeats within the budget) and of ``passes``
    passes, the fastest of each kept: a burst of load on the machine then hits one round of
    every contender, not all of one. Rows and each contender's final model."""
    passes = spec["passes"]
    first = {name: _time(lambda t=train: t(1))[1] for name, train in trains.items()}
    t1 = dict.fromkeys(trains, float("inf"))
    tp = dict.fromkeys(trains, float("inf"))
    models, histories = {}, {}
    for _ in range(cfg["rounds"]):
        for name, train in trains.items():
            _, took = _best(lambda t=train: t(1), cfg["repeat_budget_s"])
            t1[name] = min(t1[name], took)
            (models[name], histories[name]), took = _time(lambda t=train: t(passes))
            tp[name] = min(tp[name], took)
    rows = []
    for name in trains:
        per_step = (tp[name] - t1[name]) / ((passes - 1) * num_batches)
        rows.append(
            {
                "library": name,
                "passes": passes,
                "steps": passes * num_batches,
                "first_s": first[name],
                "one_pass_s": t1[name],
                "all_passes_s": tp[name],
                "s_per_step": per_step if per_step > 0 else None,
                "steps_per_s": 1 / per_step if per_step > 0 else None,
                "compile_s": max(first[name] - t1[name], 0.0),
                "train_elbo_last_pass": float(histories[name][-1]),
                "train_elbo": histories[name].tolist(),
                "status": "ok",
            }
        )
    return rows, models


def _dataset_rows(name: str, cfg: dict) -> tuple[list[dict], dict]:
    import jax.numpy as jnp
    import jax.random as jr

    import elbo_jax as ej

    spec = cfg["datasets"][name]
    if name == "digits":
        x_train, x_test, what = digits_data(spec["n_train"])
    else:
        x_train, x_test, what = synthetic_data(spec["n_train"], spec["n_test"], spec["dim"])
    info = dict(spec, what=what, n_train=x_train.shape[0], n_test=x_test.shape[0])
    info["dim"] = x_train.shape[1]
    vae0 = ej.models.VAE.initialize(
        jr.key(cfg["seed"]),
        x_train.shape[1],
        spec["latent"],
        hidden=spec["hidden"],
        likelihood="bernoulli",
        dtype=jnp.float32,
    )
    _, num_batches = pass_batches(x_train.shape[0], spec["batch"])
    info["batches_per_pass"] = num_batches
    trains = {
        "elbo_jax": _elbo_jax(vae0, x_train, cfg, spec),
        "numpyro": _numpyro(vae0, x_train, cfg, spec, scan=False),
        "numpyro (scan)": _numpyro(vae0, x_train, cfg, spec, scan=True),
    }
    rows, models = _timed_rows(trains, spec, cfg, num_batches)
    ev = cfg["evaluation"]
    iw_rows = x_test[: ev["iw_rows"]]
    info["iw_rows"] = iw_rows.shape[0]
    for row in rows:
        model = models[row["library"]]
        row["test_elbo"] = evaluate(
            model,
            x_test,
            num_samples=ev["elbo_samples"],
            importance_weighted=False,
            chunk=ev["chunk"],
        )
        row["test_iw_bound"] = evaluate(
            model, iw_rows, num_samples=ev["iw_k"], importance_weighted=True, chunk=ev["chunk"]
        )
        row["dataset"] = name
        log(
            f"[vae] {name} {row['library']}: {_f(row['steps_per_s'], '.1f')} steps/s, compile "
            f"{row['compile_s']:.2f} s, test ELBO {row['test_elbo']:.4f}, "
            f"IW({ev['iw_k']}) {row['test_iw_bound']:.4f}"
        )
    ours = rows[0]
    for row in rows:
        row["speed_ratio"] = (
            None
            if ours["steps_per_s"] is None or row["steps_per_s"] is None
            else ours["steps_per_s"] / row["steps_per_s"]
        )
        row["elbo_rel_diff"] = (ours["test_elbo"] - row["test_elbo"]) / abs(row["test_elbo"])
    return rows, info


def targets(results: dict) -> list[dict]:
    out = []
    for name in results["datasets"]:
        rows = {r["library"]: r for r in results["rows"] if r["dataset"] == name}
        for peer in ("numpyro", "numpyro (scan)"):
            ratio = rows[peer]["speed_ratio"]
            out.append(
                {
                    "target": f"{name}: elbo_jax steps/s ÷ {peer}",
                    "goal": "≥ 1",
                    "value": ratio,
                    "met": None if ratio is None else ratio >= 1,
                }
            )
        diff = rows["numpyro"]["elbo_rel_diff"]
        out.append(
            {
                "target": f"{name}: test ELBO, elbo_jax vs numpyro (relative)",
                "goal": f"within ±{TARGET_REL_ELBO:.0%}",
                "value": diff,
                "met": abs(diff) <= TARGET_REL_ELBO,
                "fmt": "+.2%",
            }
        )
    return out


# --------------------------------------------------------------------------- report
def header_md(results: dict) -> str:
    dev = results["device"]
    versions = ", ".join(f"{k} {v}" for k, v in dev["versions"].items() if v)
    cfg = results["settings"]
    return "\n".join(
        [
            f"Run: `vae {cfg['mode']}` (scale {cfg['scale']}), {dev['date_utc']}, commit "
            f"`{dev['git_commit']}`, total wall time {results['wall_s']:.0f} s.",
            f"Machine: {dev['cpu_model']}, {dev['cpu_count']} cores; JAX device "
            f"`{dev['jax_device']}` (platform {dev['platform']}); float32.",
            f"Versions: {versions}.",
            f"Load average (1, 5, 15 min) at the start {results['load_average_start']}, "
            f"at the end {results['load_average_end']}.",
        ]
    )


def rows_md(results: dict) -> str:
    table = []
    for r in results["rows"]:
        table.append(
            [
                r["dataset"],
                r["library"],
                f"{r['steps']:,}",
                _f(r["steps_per_s"], ".1f"),
                _f(r["compile_s"], ".2f"),
                _f(r["train_elbo_last_pass"], ".3f"),
                _f(r["test_elbo"], ".3f"),
                _f(r["test_iw_bound"], ".3f"),
                _f(r["speed_ratio"], ".2f"),
                _f(r["elbo_rel_diff"], "+.2%"),
            ]
        )
    header = ["dataset", "library", "steps", "steps/s", "compile s", "train ELBO (last pass)"]
    header += ["test ELBO", f"test IW bound (k={results['settings']['evaluation']['iw_k']})"]
    header += ["ratio (elbo_jax steps/s ÷ row)", "test ELBO: elbo_jax vs row"]
    return _table(header, table)


def datasets_md(results: dict) -> str:
    table = []
    for name, d in results["datasets"].items():
        table.append(
            [
                name,
                d["what"],
                f"{d['n_train']:,} / {d['n_test']:,}",
                d["dim"],
                d["latent"],
                str(tuple(d["hidden"])),
                d["batch"],
                d["batches_per_pass"],
                d["passes"],
            ]
        )
    header = ["dataset", "data", "train / test", "D", "latent", "hidden", "batch", "steps/pass"]
    return _table([*header, "passes"], table)


def markdown(results: dict) -> str:
    from ._report import targets_md

    cfg = results["settings"]
    ev = cfg["evaluation"]
    parts = [
        header_md(results),
        "**Targets**\n\n" + targets_md(results),
        f"**elbo_jax VAE against numpyro SVI** (same networks, start, Adam({cfg['learning_rate']}),"
        " minibatches and order; steps/s warm, by difference; ELBO per datum in nats; test ELBO "
        f"with {ev['elbo_samples']} draws per datum, IW bound on the first {ev['iw_rows']} test "
        "rows; one evaluator for all)\n\n" + rows_md(results),
        "**Datasets and networks** (tanh MLPs; encoder D → hidden → 2·latent, decoder latent →"
        " hidden → D; Bernoulli likelihood)\n\n" + datasets_md(results),
    ]
    return "\n\n".join(parts) + "\n"


def run(*, quick: bool, scale: float, out_dir: Path, smoke: bool = False) -> dict:
    """The whole run, in float32 with JAX's default promotion rules whatever the caller's
    configuration; writes the JSON and markdown and returns the results."""
    from . import _report

    return _report.run_comparison(
        "vae",
        settings(quick, scale, smoke),
        peer="numpyro",
        versions=_VERSIONS,
        groups="datasets",
        group_rows=_dataset_rows,
        targets=targets,
        markdown=markdown,
        out_dir=out_dir,
    )
