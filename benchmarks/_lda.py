"""``python -m benchmarks lda [--quick]``: elbo_jax's LDA against scikit-learn's
``LatentDirichletAllocation`` (batch and online) and gensim's ``LdaModel`` (online) (issue
#11, item 5). Writes ``results_lda[_quick].json`` and ``.md`` beside the main benchmark's.

Two corpora: documents drawn from an LDA (``synthetic_corpus``) and gensim's bundled Lee
corpus (``lee_corpus``), each split into training and held-out documents. Every contender
fits the same K topics with the same fixed hyperparameters (``alpha = eta = 1/K``,
scikit-learn's defaults) from the same start $\\lambda_0$ ``(K, V)``
(``ej.models.LDA.initialize``: Gamma(100, 1/100) entries, as scikit-learn and gensim draw
their own), in float32:

- **batch VB**, ``iters`` iterations: elbo_jax ``ej.fit(lda0, docs, max_iters=T, tol=0)``
  on ``DocumentTerms``; scikit-learn ``learning_method="batch", max_iter=T``
  (``evaluate_every=-1``, so no perplexity is computed during the fit), with its default
  ``n_jobs=None`` (one process) and, as an extra row, ``n_jobs=2``.
- **online VB**, ``passes`` passes in minibatches of ``batch`` documents with
  $\\rho_t = (\\tau + t)^{-\\kappa}$, $\\kappa = 0.7$, $\\tau = 10$: elbo_jax
  ``m_step=ej.StepwiseMStep(kappa, tau), batch_size=B, max_iters=passes``; scikit-learn
  ``learning_method="online"``; gensim ``LdaModel(chunksize=B, update_every=1,
  decay=kappa, offset=tau)`` (its own schedule: see ``gensim_online``).

Local (per-document) fits stop at a mean absolute change of gamma below 1e-3 or after 100
sweeps for everyone (scikit-learn's ``mean_change_tol`` / ``max_doc_update_iter``, gensim's
``gamma_threshold`` / ``iterations``, elbo_jax's ``LDA(local_tol, local_max_iters)``).

**Speed**: documents per second = N_train x (iterations or passes) / the wall time of one
warm fit call (elbo_jax: after a first call with the same shapes compiled its program;
``block_until_ready``). Also by difference, N_train x (units - 1) / (T(units) - T(1)), which drops
each library's fixed costs (elbo_jax's whole-corpus evaluation at the start and posterior at
the end) but also the first unit, the slowest for everyone. **Quality**: every final
$\\lambda$ is scored by one evaluator in float64 (``held_out_scores``): the held-out
documents' ELBO per word, and scikit-learn's perplexity (which adds the topics' KL term);
scikit-learn's own ``perplexity`` of its models is recorded beside it as a check of the
evaluator.
"""

import functools
import time
from pathlib import Path

import numpy as np

from ._report import _f, _table
from ._vae import _best, _time, log

_VERSIONS = ("elbo_jax", "jax", "jaxlib", "numpy", "scipy", "scikit-learn", "gensim")
_LOCAL = {"tol": 1e-3, "max_iters": 100}  # every contender's per-document stopping rule
_ONLINE = {"kappa": 0.7, "tau": 10.0}
TARGET_BATCH_SPEEDUP = 2.0  # elbo_jax batch >= 2x scikit-learn's batch, docs/s
TARGET_REL_BOUND = 0.01  # held-out per-word bound within 1 % of the peer's


def settings(quick: bool, scale: float = 1.0, smoke: bool = False) -> dict:
    """Sizes of a run. Full: 10,000 synthetic training documents; ``quick``: 2,000. ``smoke``
    (for the test): the first 100 Lee documents for training (and the last 30 for testing),
    and a synthetic corpus of their shapes (100 / 30 documents, the Lee vocabulary, 10
    topics, padded to the same width), so the two share compiled programs; 3 iterations,
    2 passes."""
    if smoke:
        synth = {"n_train": 100, "n_test": 30, "vocab": None, "topics": 10, "mean_length": 60}
        synth |= {"iters": 3, "passes": 2, "batch": 32}
        lee = {"n_train": 100, "n_test": 30, "topics": 10, "iters": 3, "passes": 2, "batch": 32}
        # (scikit-learn's n_jobs=2 row is left out: its worker processes take seconds to start)
    else:
        n = max(500, round((2000 if quick else 10_000) * scale))
        synth = {"n_train": n, "n_test": 1000, "vocab": 2000, "topics": 20, "mean_length": 100}
        synth |= {"iters": 20, "passes": 2, "batch": 256}
        lee = {"n_test": 30, "topics": 10, "iters": 50, "passes": 10, "batch": 64}
    synth |= {"true_alpha": 0.1, "true_eta": 0.01}
    return {
        "mode": "smoke" if smoke else ("quick" if quick else "full"),
        "scale": scale,
        "seed": 0,
        "corpora": {"synthetic": synth, "lee": lee},
        "local": dict(_LOCAL),
        "online": dict(_ONLINE),
        "sklearn_two_jobs": not smoke,  # the extra batch row (its workers take seconds to start)
        "repeat_budget_s": 0.0 if smoke else 2.0,
        "rounds": 1 if smoke or quick else 2,
    }


# --------------------------------------------------------------------------- corpora
def synthetic_corpus(spec: dict, seed: int = 7) -> tuple:
    """Documents drawn from an LDA with NumPy: topics $\\beta_k \\sim \\mathrm{Dir}(\\eta_0
    1_V)$, proportions $\\theta_d \\sim \\mathrm{Dir}(\\alpha_0 1_K)$, lengths
    $1 + \\mathrm{Poisson}(\\ell)$ and counts $\\mathrm{Mult}(n_d, \\theta_d^\\top\\beta)$.
    ``(train CSR, test CSR, description)`` in float32."""
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n, k, v = spec["n_train"] + spec["n_test"], spec["topics"], spec["vocab"]
    beta = rng.dirichlet(np.full(v, spec["true_eta"]), k)
    theta = rng.dirichlet(np.full(k, spec["true_alpha"]), n)
    lengths = rng.poisson(spec["mean_length"], n) + 1
    counts = sp.csr_matrix(rng.multinomial(lengths, theta @ beta).astype(np.float32))
    what = (
        f"drawn from an LDA (V = {v:,}, K = {k}, true alpha {spec['true_alpha']}, true eta "
        f"{spec['true_eta']}, lengths 1 + Poisson({spec['mean_length']}); NumPy seed {seed})"
    )
    return counts[: spec["n_train"]], counts[spec["n_train"] :], what


@functools.cache
def _lee_documents() -> tuple:
    """gensim's ``lee_background.cor`` (300 news stories, one per line) as bags of words:
    ``simple_preprocess``, gensim's ``STOPWORDS`` removed, ``Dictionary.filter_extremes(
    no_below=2, no_above=0.5)``. ``(CSR float32, vocabulary size)``."""
    import scipy.sparse as sp
    from gensim.corpora import Dictionary
    from gensim.parsing.preprocessing import STOPWORDS
    from gensim.test.utils import datapath
    from gensim.utils import simple_preprocess

    with open(datapath("lee_background.cor"), encoding="utf-8", errors="replace") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    texts = [[w for w in simple_preprocess(line) if w not in STOPWORDS] for line in lines]
    dictionary = Dictionary(texts)
    dictionary.filter_extremes(no_below=2, no_above=0.5)
    bows = [dictionary.doc2bow(t) for t in texts]
    rows = np.repeat(np.arange(len(bows)), [len(b) for b in bows])
    cols = np.array([i for b in bows for i, _ in b], np.int64)
    vals = np.array([c for b in bows for _, c in b], np.float32)
    shape = (len(bows), len(dictionary))
    return sp.csr_matrix((vals, (rows, cols)), shape=shape), len(dictionary)


def lee_corpus(spec: dict) -> tuple:
    """The Lee corpus (``_lee_documents``): the last ``n_test`` documents held out, the
    others (or the first ``n_train``) for training."""
    counts, v = _lee_documents()
    n, n_test = counts.shape[0], spec["n_test"]
    n_train = spec.get("n_train") or n - n_test
    what = (
        f"gensim's lee_background.cor: simple_preprocess, STOPWORDS removed, "
        f"filter_extremes(no_below=2, no_above=0.5): V = {v:,}; train = the first "
        f"{n_train}, test = the last {n_test}"
    )
    return counts[:n_train], counts[n - n_test :], what


def _gensim_corpus(csr) -> list:
    """Rows of a CSR matrix as gensim bags of words, ``[(word id, count), ...]``."""
    return [
        list(
            zip(
                csr.indices[csr.indptr[i] : csr.indptr[i + 1]].tolist(),
                csr.data[csr.indptr[i] : csr.indptr[i + 1]].tolist(),
                strict=True,
            )
        )
        for i in range(csr.shape[0])
    ]


def document_terms(csr, width: int | None = None):
    """``ej.models.DocumentTerms.from_matrix(csr)``, its slots padded (count 0) to ``width``."""
    import jax.numpy as jnp

    import elbo_jax as ej

    docs = ej.models.DocumentTerms.from_matrix(csr)
    pad = 0 if width is None else width - docs.word_ids.shape[1]
    if pad <= 0:
        return docs
    ids = jnp.pad(docs.word_ids, ((0, 0), (0, pad)))
    return ej.models.DocumentTerms(ids, jnp.pad(docs.counts, ((0, 0), (0, pad))), docs.num_words)


# --------------------------------------------------------------------------- contenders
def elbo_jax_batch(lda0, docs, cfg: dict):
    """``train(iterations) -> (lambda, iterations run)``: batch VB by ``ej.fit``."""
    import jax

    import elbo_jax as ej

    def train(iters: int):
        res = ej.fit(lda0, docs, max_iters=iters, tol=0.0)
        lam = jax.block_until_ready(res.model.topic_word_concentration)
        return np.asarray(lam, np.float64), res.num_iters

    return train


def elbo_jax_online(lda0, docs, cfg: dict, spec: dict):
    """``train(passes) -> (lambda, passes run)``: online VB, ``ej.StepwiseMStep``."""
    import jax
    import jax.random as jr

    import elbo_jax as ej

    m_step = ej.StepwiseMStep(kappa=cfg["online"]["kappa"], tau=cfg["online"]["tau"])

    def train(passes: int):
        res = ej.fit(
            lda0,
            docs,
            m_step=m_step,
            batch_size=spec["batch"],
            max_iters=passes,
            tol=0.0,
            key=jr.key(cfg["seed"]),
        )
        lam = jax.block_until_ready(res.model.topic_word_concentration)
        return np.asarray(lam, np.float64), res.num_iters

    return train


@functools.cache
def _sklearn_class():
    """scikit-learn's LDA started from a given $\\lambda_0$: its private
    ``_init_latent_vars`` (which draws Gamma(100, 1/100)) is followed by setting
    ``components_`` and ``exp_dirichlet_component_`` to the shared start."""
    from scipy.special import digamma
    from sklearn.decomposition import LatentDirichletAllocation

    class SharedStartLDA(LatentDirichletAllocation):
        start = None  # (K, V), set on the instance

        def _init_latent_vars(self, n_features, dtype=np.float64):
            super()._init_latent_vars(n_features, dtype=dtype)
            if self.start is not None:
                lam = np.array(self.start, dtype)  # a copy: online VB updates it in place
                elog = digamma(lam) - digamma(lam.sum(axis=1, keepdims=True))
                self.components_ = lam
                self.exp_dirichlet_component_ = np.exp(elog).astype(dtype)

    return SharedStartLDA


def sklearn_lda(lam0: np.ndarray, x, cfg: dict, spec: dict, *, online: bool, n_jobs=None):
    """``train(units) -> (lambda, units run, fitted estimator)``: scikit-learn's
    ``LatentDirichletAllocation`` from ``lam0``; ``units`` = ``max_iter`` (batch) or passes
    (online: ``total_samples=N``, minibatches in the rows' order, the last one shorter)."""
    cls = _sklearn_class()
    k = lam0.shape[0]

    def train(units: int):
        kwargs = {}
        if online:
            kwargs = {
                "learning_method": "online",
                "learning_decay": cfg["online"]["kappa"],
                "learning_offset": cfg["online"]["tau"],
                "batch_size": spec["batch"],
                "total_samples": x.shape[0],
            }
        else:
            kwargs = {"learning_method": "batch"}
        est = cls(
            n_components=k,
            doc_topic_prior=1.0 / k,
            topic_word_prior=1.0 / k,
            max_iter=units,
            evaluate_every=-1,
            mean_change_tol=cfg["local"]["tol"],
            max_doc_update_iter=cfg["local"]["max_iters"],
            n_jobs=n_jobs,
            random_state=cfg["seed"],
            **kwargs,
        )
        est.start = lam0
        est.fit(x)
        return np.asarray(est.components_, np.float64), est.n_iter_, est

    return train


def gensim_online(lam0: np.ndarray, corpus: list, cfg: dict, spec: dict):
    """``train(passes) -> (lambda, passes run)``: gensim's ``LdaModel`` (float32) with
    ``alpha = [1/K] * K``, ``eta = 1/K``, ``chunksize=B, update_every=1, decay=kappa,
    offset=tau, iterations=100, gamma_threshold=1e-3, eval_every=None`` (no perplexity logged
    during the fit), its topics set to $\\lambda_0$ before ``update``. gensim's step is
    $\\rho = (\\tau + p + u / B)^{-\\kappa}$ with p the pass (from 0) and u the documents
    merged in the first pass so far: $(\\tau + t - 1)^{-\\kappa}$ for the t-th minibatch of
    the first pass, then a constant $(\\tau + p + N / B)^{-\\kappa}$ through pass p."""
    from gensim.models import LdaModel

    k, v = lam0.shape
    eta = 1.0 / k
    id2word = {i: str(i) for i in range(v)}

    def train(passes: int):
        model = LdaModel(
            num_topics=k,
            id2word=id2word,
            chunksize=spec["batch"],
            passes=passes,
            update_every=1,
            alpha=np.full(k, 1.0 / k, np.float32),
            eta=eta,
            decay=cfg["online"]["kappa"],
            offset=cfg["online"]["tau"],
            eval_every=None,
            iterations=cfg["local"]["max_iters"],
            gamma_threshold=cfg["local"]["tol"],
            random_state=cfg["seed"],
            dtype=np.float32,
        )
        model.state.sstats[...] = (lam0 - eta).astype(np.float32)  # lambda = eta + sstats
        model.sync_state()
        model.update(corpus)
        return np.asarray(model.state.get_lambda(), np.float64), passes

    return train


# --------------------------------------------------------------------------- evaluation
def held_out_scores(lam: np.ndarray, alpha: float, eta: float, test_docs) -> dict:
    """The held-out documents under topics $\\lambda$, in float64, by
    ``ej.models.LDA(lam, alpha, eta)``: ``bound_per_word``, the documents' ELBO
    $\\sum_d \\text{ELBO}_d / \\text{words}$ (``bound(test_docs, include_topics=False)``, each
    document's local factors fitted from a fresh start), and ``perplexity``, scikit-learn's
    $\\exp(-(\\sum_d \\text{ELBO}_d - \\sum_k \\mathrm{KL}(q(\\beta_k) \\| p(\\beta_k)))
    / \\text{words})$ (``perplexity(test_docs)``), whose topic term is the whole training
    posterior's, divided by the held-out word count."""
    import jax
    import jax.numpy as jnp

    import elbo_jax as ej

    with jax.enable_x64(True):
        model = ej.models.LDA(np.asarray(lam, np.float64), alpha, eta)
        documents = float(model.bound(test_docs, include_topics=False))
        topics = float(model.global_elbo())
        words = float(jnp.sum(test_docs.counts))
    return {
        "bound_per_word": documents / words,
        "perplexity": float(np.exp(-(documents + topics) / words)),
        "topics_term_per_word": topics / words,
    }


def sklearn_own_perplexity(est, x_test) -> float:
    """scikit-learn's ``perplexity`` of a fitted estimator, its topics in float64."""
    import copy

    from scipy.special import digamma

    est = copy.copy(est)
    lam = np.asarray(est.components_, np.float64)
    est.components_ = lam
    est.exp_dirichlet_component_ = np.exp(digamma(lam) - digamma(lam.sum(1, keepdims=True)))
    return float(est.perplexity(x_test.astype(np.float64)))


# --------------------------------------------------------------------------- timing
def _timed(trains: dict, units: int, cfg: dict) -> tuple[dict, dict]:
    """Each contender's first one-unit run (elbo_jax compiles), then ``cfg["rounds"]``
    interleaved rounds of warm runs of 1 unit (best of repeats within the budget) and of
    ``units`` units, the fastest of each kept, with the process's CPU time of the fastest.
    Timings per contender and each one's output of the last full run."""
    first = {name: _time(lambda t=train: t(1))[1] for name, train in trains.items()}
    t1 = dict.fromkeys(trains, float("inf"))
    tn = dict.fromkeys(trains, float("inf"))
    cpu = dict.fromkeys(trains, float("nan"))
    outputs = {}
    for _ in range(cfg["rounds"]):
        for name, train in trains.items():
            _, took = _best(lambda t=train: t(1), cfg["repeat_budget_s"])
            t1[name] = min(t1[name], took)
            c0 = time.process_time()
            outputs[name], took = _time(lambda t=train: t(units))
            if took < tn[name]:
                tn[name], cpu[name] = took, time.process_time() - c0
    timing = {
        name: {"first_s": first[name], "one_s": t1[name], "all_s": tn[name], "cpu_s": cpu[name]}
        for name in trains
    }
    return timing, outputs


def _rows(corpus: str, mode: str, trains: dict, units: int, n_train: int, cfg: dict) -> tuple:
    timing, outputs = _timed(trains, units, cfg)
    rows = []
    for name in trains:
        t = timing[name]
        marginal = t["all_s"] - t["one_s"]
        rows.append(
            {
                "corpus": corpus,
                "mode": mode,
                "library": name,
                "units": units,
                "units_run": int(outputs[name][1]),
                "docs": n_train * units,
                "wall_s": t["all_s"],
                "docs_per_s": n_train * units / t["all_s"],
                "docs_per_s_marginal": (
                    n_train * (units - 1) / marginal if units > 1 and marginal > 0 else None
                ),
                "compile_s": max(t["first_s"] - t["one_s"], 0.0),
                "first_s": t["first_s"],
                "one_unit_s": t["one_s"],
                "cpu_s": t["cpu_s"],
                "cores": t["cpu_s"] / t["all_s"],
                "status": "ok",
            }
        )
    return rows, outputs


# --------------------------------------------------------------------------- one corpus
def _corpus_rows(name: str, cfg: dict) -> tuple[list[dict], dict]:
    import jax
    import jax.random as jr

    import elbo_jax as ej

    spec = dict(cfg["corpora"][name])
    smoke = cfg["mode"] == "smoke"
    if name == "lee" or smoke:
        lee_train, lee_test, lee_what = lee_corpus(cfg["corpora"]["lee"])
    if name == "lee":
        x_train, x_test, what = lee_train, lee_test, lee_what
    else:
        if spec["vocab"] is None:  # smoke: the Lee corpus's vocabulary
            spec["vocab"] = lee_train.shape[1]
        x_train, x_test, what = synthetic_corpus(spec)
    k = spec["topics"]
    alpha = eta = 1.0 / k
    width = test_width = None
    if smoke:  # both corpora padded to one width: the same compiled programs
        width = max(int(np.diff(c.indptr).max()) for c in (lee_train, x_train))
        test_width = max(int(np.diff(c.indptr).max()) for c in (lee_test, x_test))
    docs = document_terms(x_train, width)
    with jax.enable_x64(True):
        test_docs = document_terms(x_test, test_width)
    lda0 = ej.models.LDA.initialize(
        jr.key(cfg["seed"]),
        docs,
        k,
        alpha=alpha,
        eta=eta,
        local_tol=cfg["local"]["tol"],
        local_max_iters=cfg["local"]["max_iters"],
    )
    lam0 = np.asarray(lda0.topic_word_concentration, np.float32)
    n = x_train.shape[0]
    info = dict(
        spec,
        what=what,
        n_train=n,
        n_test=x_test.shape[0],
        vocab=x_train.shape[1],
        train_words=float(x_train.sum()),
        test_words=float(x_test.sum()),
        width=int(docs.word_ids.shape[1]),
        batches_per_pass=-(-n // spec["batch"]),
        start=held_out_scores(lam0, alpha, eta, test_docs),
    )
    log(
        f"[lda] {name}: {n:,} train / {x_test.shape[0]:,} test documents, V = {info['vocab']:,}, "
        f"K = {k}; start: held-out bound/word {info['start']['bound_per_word']:.4f}"
    )
    batch = {
        "elbo_jax": elbo_jax_batch(lda0, docs, cfg),
        "scikit-learn": sklearn_lda(lam0, x_train, cfg, spec, online=False),
    }
    if cfg["sklearn_two_jobs"]:
        batch["scikit-learn (n_jobs=2)"] = sklearn_lda(
            lam0, x_train, cfg, spec, online=False, n_jobs=2
        )
    batch_rows, batch_out = _rows(name, "batch", batch, spec["iters"], n, cfg)
    online_rows, online_out = _rows(
        name,
        "online",
        {
            "elbo_jax": elbo_jax_online(lda0, docs, cfg, spec),
            "scikit-learn": sklearn_lda(lam0, x_train, cfg, spec, online=True),
            "gensim": gensim_online(lam0, _gensim_corpus(x_train), cfg, spec),
        },
        spec["passes"],
        n,
        cfg,
    )
    rows = batch_rows + online_rows
    outputs = {("batch", k_): v for k_, v in batch_out.items()}
    outputs |= {("online", k_): v for k_, v in online_out.items()}
    for row in rows:
        out = outputs[(row["mode"], row["library"])]
        row |= held_out_scores(out[0], alpha, eta, test_docs)
        row["sklearn_perplexity"] = (
            sklearn_own_perplexity(out[2], x_test) if row["library"].startswith("scikit") else None
        )
        log(
            f"[lda] {name} {row['mode']} {row['library']}: {row['docs_per_s']:,.0f} docs/s "
            f"(marginal {_f(row['docs_per_s_marginal'], ',.0f')}), compile "
            f"{row['compile_s']:.1f} s, {row['cores']:.2f} cores, held-out bound/word "
            f"{row['bound_per_word']:.4f}, perplexity {row['perplexity']:.2f}"
            + (
                ""
                if row["sklearn_perplexity"] is None
                else f" (scikit-learn's own: {row['sklearn_perplexity']:.2f})"
            )
        )
    for mode in ("batch", "online"):
        group = [r for r in rows if r["mode"] == mode]
        ours = group[0]
        for row in group:
            row["speed_ratio"] = ours["docs_per_s"] / row["docs_per_s"]
            row["bound_rel_diff"] = (ours["bound_per_word"] - row["bound_per_word"]) / abs(
                row["bound_per_word"]
            )
    return rows, info


def targets(results: dict) -> list[dict]:
    """Issue #11's LDA targets, per corpus: batch docs/s >= 2x scikit-learn's batch at a
    held-out bound within 1 %; online docs/s >= gensim's (its bound reported the same way)."""
    out = []
    for name in results["corpora"]:
        rows = {(r["mode"], r["library"]): r for r in results["rows"] if r["corpus"] == name}
        for mode, peer, goal in (
            ("batch", "scikit-learn", TARGET_BATCH_SPEEDUP),
            ("online", "gensim", 1.0),
        ):
            row = rows[(mode, peer)]
            out.append(
                {
                    "target": f"{name}: {mode} elbo_jax docs/s ÷ {peer} ({mode})",
                    "goal": f"≥ {goal:g}",
                    "value": row["speed_ratio"],
                    "met": row["speed_ratio"] >= goal,
                }
            )
            diff = row["bound_rel_diff"]
            out.append(
                {
                    "target": f"{name}: {mode} held-out bound per word, elbo_jax vs {peer}",
                    "goal": f"within ±{TARGET_REL_BOUND:.0%}",
                    "value": diff,
                    "met": abs(diff) <= TARGET_REL_BOUND,
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
            f"Run: `lda {cfg['mode']}` (scale {cfg['scale']}), {dev['date_utc']}, commit "
            f"`{dev['git_commit']}`, total wall time {results['wall_s']:.0f} s.",
            f"Machine: {dev['cpu_model']}, {dev['cpu_count']} cores; JAX device "
            f"`{dev['jax_device']}` (platform {dev['platform']}); training in float32 (all "
            "contenders), held-out scoring in float64.",
            f"Versions: {versions}.",
            f"Load average (1, 5, 15 min) at the start {results['load_average_start']}, "
            f"at the end {results['load_average_end']}.",
        ]
    )


def rows_md(results: dict) -> str:
    table = []
    for r in results["rows"]:
        unit = "iters" if r["mode"] == "batch" else "passes"
        table.append(
            [
                r["corpus"],
                r["mode"],
                r["library"],
                f"{r['units']} {unit}",
                _f(r["wall_s"], ".3g"),
                _f(r["docs_per_s"], ",.0f"),
                _f(r["docs_per_s_marginal"], ",.0f"),
                _f(r["compile_s"], ".1f"),
                _f(r["cores"], ".2f"),
                _f(r["bound_per_word"], ".4f"),
                _f(r["perplexity"], ".2f"),
                _f(r["sklearn_perplexity"], ".2f"),
                _f(r["speed_ratio"], ".2f"),
                _f(r["bound_rel_diff"], "+.2%"),
            ]
        )
    header = ["corpus", "mode", "library", "work", "wall s", "docs/s", "docs/s (marginal)"]
    header += ["compile s", "cores", "held-out bound/word", "perplexity (scikit-learn's)"]
    header += ["scikit-learn's own", "elbo_jax docs/s ÷ row", "bound: elbo_jax vs row"]
    return _table(header, table)


def corpora_md(results: dict) -> str:
    table = []
    for name, c in results["corpora"].items():
        table.append(
            [
                name,
                c["what"],
                f"{c['n_train']:,} / {c['n_test']:,}",
                f"{c['train_words'] / c['n_train']:.1f}",
                f"{c['vocab']:,}",
                c["topics"],
                c["iters"],
                f"{c['passes']} × {c['batches_per_pass']} of ≤ {c['batch']}",
                _f(c["start"]["bound_per_word"], ".4f"),
            ]
        )
    header = ["corpus", "documents", "train / test", "words/doc", "V", "K", "batch iters"]
    return _table([*header, "online passes × minibatches", "bound/word at the start"], table)


def markdown(results: dict) -> str:
    from ._report import targets_md

    cfg = results["settings"]
    parts = [
        header_md(results),
        "**Targets**\n\n" + targets_md(results),
        "**elbo_jax LDA against scikit-learn and gensim** (same start λ₀, alpha = eta = 1/K, "
        f"local fits to a mean change < {cfg['local']['tol']:g} or {cfg['local']['max_iters']} "
        f"sweeps; online kappa = {cfg['online']['kappa']}, tau = {cfg['online']['tau']:g}; "
        "docs/s = training documents × iterations (or passes) ÷ warm wall time of one fit "
        "call; marginal: by difference from a 1-unit fit; cores: this process's CPU time ÷ "
        "wall time (scikit-learn's n_jobs=2 workers are other processes); one float64 "
        "evaluator on the held-out documents: bound/word = their ELBO per word, perplexity = "
        "scikit-learn's definition (with the topics' KL term over the held-out word count), "
        "scikit-learn's own = its `perplexity` on its model; bound: relative difference of "
        "bound/word, positive = elbo_jax higher)\n\n" + rows_md(results),
        "**Corpora**\n\n" + corpora_md(results),
    ]
    return "\n\n".join(parts) + "\n"


def run(*, quick: bool, scale: float, out_dir: Path, smoke: bool = False) -> dict:
    """The whole run: training in float32 (JAX's 64-bit mode off for the run, whatever the
    caller's configuration), held-out scoring in float64; writes the JSON and markdown."""
    from . import _report

    return _report.run_comparison(
        "lda",
        settings(quick, scale, smoke),
        peer="gensim",
        versions=_VERSIONS,
        groups="corpora",
        group_rows=_corpus_rows,
        targets=targets,
        markdown=markdown,
        out_dir=out_dir,
    )
