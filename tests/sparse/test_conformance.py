"""The conformance suite: every registered sparse method, with its defaults and each of its
`conformance_variants`, goes through the same checks. A new method gets them by registering.

Each case is a tiny model (layer 0 dense, layer 1 the method, block size 16) in float32.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsetrain.attention.method import StepContext
from sparsetrain.attention.spec import METHODS, DenseOptions, method_options, options_class
from sparsetrain.checkpoint.model_def import ModelDef, flatten
from sparsetrain.configbase import ConfigError, apply_overrides
from sparsetrain.export import export_checkpoint
from sparsetrain.export.import_hf import read_hf
from sparsetrain.export.mapping import stack_layers
from sparsetrain.config import RunConfig
from tests.export.helpers import jax_outputs, random_params, save_run
from tests.fake_devices import run_script
from tests.sparse.helpers import TINY, inputs, layer, qkv, segment_positions, tiny, tokens
from tests.tolerances import assert_close_to_scale

BS = 16


def cases() -> list[tuple[str, str]]:
    """(method, variant name) for every registered method except dense."""
    out = []
    for method in sorted(METHODS):
        if method == "dense":
            continue
        out += [(method, "default")] + [(method, v) for v in options_class(method).conformance_variants]
    return out


CASES = cases()
IDS = [f"{m}-{v}" for m, v in CASES]
# The 8-device check (sharded_script.py) runs each method's default and the variants that take
# another sharding-relevant path: tile instead of token selections, SSA, Seer's sparse mode, DSA's
# gathers of selected keys.
SHARDED_CASES = [(m, v) for m, v in CASES
                 if v == "default" or (m, v) in {("infllm_v2", "tile"), ("moba", "tile"), ("local", "ssa"),
                                                 ("seer", "sparse"), ("dsa", "sparse")}]


def rule(method: str, variant: str):
    cls = options_class(method)
    overrides = {} if variant == "default" else cls.conformance_variants[variant]
    return method_options(method, block_size=BS, **{**cls.conformance_base, **overrides})


def model_config(options, **changes):
    """Layer 0 dense, layer 1 the method: one layer of each is all most checks need, and every
    layer more is compile time more (the scan check stacks two layers of the method)."""
    return tiny(options, num_layers=2, **changes)


def with_method_params(cfg, seed=0):
    """Random base weights (as exports test) plus the method's own freshly initialised ones, except
    that those initialised to all zeros (DMA's and NOSA's key-score scale A) get N(0, 1) values: at
    zero they would switch their path off and every check would pass without reading it."""
    params = flatten(random_params(cfg, seed))
    fresh = flatten(ModelDef.create(cfg).init(seed))
    rng = np.random.default_rng(seed)
    params.update({k: v if np.any(np.asarray(v)) else rng.standard_normal(v.shape).astype(np.float32)
                   for k, v in fresh.items() if "/attn/attend/" in k})
    return ModelDef.create(cfg).params_from_flat(params)


def apply(cfg, params, toks, *, op_by_op=False, **kw):
    """The model jitted once per config (compiling is most of these checks' time), or op by op:
    there the kernels' selection lists are concrete and so checked by value (range, order, counts:
    check_lists), and a program run once costs less than compiling it."""
    with jax.default_matmul_precision("highest"):
        if op_by_op:
            return ModelDef.create(cfg).apply(params, jnp.asarray(toks), **kw)
        return _jitted_apply(cfg)(params, jnp.asarray(toks), kw)


@functools.cache
def _jitted_apply(cfg):
    model = ModelDef.create(cfg)
    return jax.jit(lambda params, toks, kw: model.apply(params, toks, **kw))


@pytest.mark.parametrize("method,variant", CASES, ids=IDS)
def test_builds_jits_and_differentiates_with_finite_losses_and_densities(method, variant):
    cfg = model_config(rule(method, variant))
    model = ModelDef.create(cfg)
    params = model.init(0)
    toks = jnp.asarray(tokens(100))   # ragged: not a multiple of the block

    def loss(p):
        from sparsetrain.attention.method import StepContext
        logits, losses, metrics = model.apply(p, toks, ctx=StepContext(train=True, rng=jax.random.key(0)))
        ce = -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
        return ce + sum(losses.values(), 0.0), (losses, metrics)

    value_and_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (value, (losses, metrics)), grads = value_and_grad(params)
    assert np.isfinite(float(value))
    assert all(np.isfinite(float(v)) for v in losses.values()), losses
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # The method's parameters get a gradient, unless its param_policy freezes them ("base_only"),
    # and then none (the selection itself has no parameters and gets no gradient). At random
    # values (the same compiled program), where no path is switched off.
    _, grads = value_and_grad(with_method_params(cfg))
    own = {k: float(np.abs(np.asarray(g)).max()) for k, g in flatten(grads).items() if "/attn/attend/" in k}
    if cfg.attention[1].param_policy == "base_only":
        assert not any(own.values()), f"frozen method parameters with a gradient: {own}"
    else:
        assert all(own.values()), f"method parameters without gradient: {own}"
    densities = {k: float(v) for k, v in metrics.items() if k.startswith("density")}
    assert densities and all(0.0 <= d <= 1.0 for d in densities.values()), densities
    # Evaluation also reports recall, a share in [0, 1]; op by op, so selections are checked by value.
    _, _, eval_metrics = apply(cfg, params, toks, op_by_op=True)
    assert 0.0 <= float(eval_metrics["recall"]) <= 1.0 + 1e-6


@pytest.mark.parametrize("method,variant", CASES, ids=IDS)
def test_causal(method, variant):
    options = rule(method, variant)
    cfg = model_config(options)
    params = with_method_params(cfg)
    # "block" methods may read the whole block of a position; "token" ones only the past.
    cut = 3 * BS + (BS // 2 if options.causal_granularity == "token" else 0)
    a = tokens(96, seed=1)
    b = a.copy()
    b[:, cut:] = tokens(96 - cut, seed=2)
    la, _, _ = apply(cfg, params, a)
    lb, _, _ = apply(cfg, params, b)
    np.testing.assert_allclose(np.asarray(la[:, :cut]), np.asarray(lb[:, :cut]), atol=1e-5, rtol=1e-5)
    assert not np.allclose(np.asarray(la[:, cut:]), np.asarray(lb[:, cut:]))


def full_budget_cases() -> list[tuple[str, str, int]]:
    """Defaults at a block multiple and a ragged length; variants at the ragged one only, and only
    those whose full-budget options differ from every earlier case's (Seer's sparse variant is its
    default at full budget, NSA has none)."""
    out, seen = [], []
    for m, v in CASES:
        full = rule(m, v).full_budget()
        if v != "default" and full in seen:
            continue
        seen.append(full)
        out += [(m, v, seq) for seq in ((96, 100) if v == "default" else (100,))]
    return out


FULL_BUDGET = full_budget_cases()


@pytest.mark.parametrize("method,variant,seq", FULL_BUDGET, ids=[f"{m}-{v}-{t}" for m, v, t in FULL_BUDGET])
def test_full_budget_equals_dense(method, variant, seq):
    full = rule(method, variant).full_budget()
    if full is None:
        pytest.skip(f"{method}'s output is not plain attention at any budget (see its full_budget)")
    cfg = model_config(full)
    params = with_method_params(cfg)
    toks = tokens(seq, seed=3)
    logits, _, _ = apply(cfg, params, toks, op_by_op=True)
    dense_cfg = dataclasses.replace(cfg, attention=(DenseOptions(),))
    base = {k: v for k, v in flatten(params).items() if "/attn/attend/" not in k}
    dense, _, _ = apply(dense_cfg, ModelDef.create(dense_cfg).params_from_flat(base), toks, op_by_op=True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dense), atol=1e-4, rtol=1e-4)


# Packed documents aligned to the tiles and to the variants' routing blocks (32), then padding.
DOCS = (128, 64)
PACKED = 224
BOUNDS = np.cumsum((0,) + DOCS)


def packed_segments() -> jax.Array:
    """int32 [1, PACKED]: documents 1 and 2, then padding (0)."""
    seg = np.zeros(PACKED, np.int32)
    for i, (a, b) in enumerate(zip(BOUNDS[:-1], BOUNDS[1:])):
        seg[a:b] = i + 1
    return jnp.asarray(seg)[None]


@pytest.mark.parametrize("method,variant", CASES, ids=IDS)
def test_packed_documents_match_each_document_alone(method, variant):
    """A layer in a training step (SSA's full output included) with segment ids and per-document
    positions (the pipeline's default): each document of a packed row gets the output, and the
    q/k/v gradients, it gets alone."""
    options = rule(method, variant)
    attn = layer(options)
    q, k, v = qkv(PACKED, batch=1, seed=6)
    cot = jax.random.normal(jax.random.key(7), q.shape).at[:, BOUNDS[-1]:].set(0.0)  # no loss on padding

    @jax.jit
    def run(q, k, v, cot, segment_ids=None, positions=None):
        def loss(q, k, v):
            out = attn(inputs(q, k, v, train=True, segment_ids=segment_ids, positions=positions,
                              rng=jax.random.key(0)))
            return jnp.sum(out * cot), out
        with jax.default_matmul_precision("highest"):
            return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    seg = packed_segments()
    (_, packed), packed_grads = run(q, k, v, cot, seg, segment_positions(seg))
    for a, b in zip(BOUNDS[:-1], BOUNDS[1:]):
        (_, alone), grads = run(q[:, a:b], k[:, a:b], v[:, a:b], cot[:, a:b])
        assert_close_to_scale(packed[:, a:b], alone, 1e-5, err_msg=f"output of document [{a}, {b})")
        for name, g, g_alone in zip("qkv", packed_grads, grads):
            assert_close_to_scale(g[:, a:b], g_alone, 1e-5, err_msg=f"d{name} of document [{a}, {b})")


@pytest.mark.parametrize("method,variant", CASES, ids=IDS)
def test_packed_documents_do_not_see_each_other(method, variant):
    """The model (layer 0 dense, gates, block scores and SSA included): changing one packed
    document's tokens leaves the other documents' logits as they were."""
    cfg = model_config(rule(method, variant))
    params = with_method_params(cfg)
    seg = packed_segments()
    positions = segment_positions(seg)
    ctx = StepContext(train=True, rng=jax.random.key(0))
    toks = tokens(PACKED, batch=1, seed=6)
    base, _, _ = apply(cfg, params, toks, positions=positions, segment_ids=seg, ctx=ctx)
    for a, b in zip(BOUNDS[:-1], BOUNDS[1:]):
        changed = toks.copy()
        changed[:, a:b] = tokens(b - a, batch=1, seed=8)
        logits, _, _ = apply(cfg, params, changed, positions=positions, segment_ids=seg, ctx=ctx)
        others = np.r_[0:a, b:BOUNDS[-1]]
        assert_close_to_scale(logits[:, others], base[:, others], 1e-6,
                              err_msg=f"a change in [{a}, {b}) reached another document")
        assert not np.allclose(logits[:, a:b], base[:, a:b])


@pytest.mark.parametrize("method,variant", CASES, ids=IDS)
def test_scan_layers_matches_the_layer_list(method, variant):
    options = dataclasses.replace(rule(method, variant), layers="all")
    cfg = dataclasses.replace(TINY, num_layers=2, attention=(options,))
    params = with_method_params(cfg)
    scanned = dataclasses.replace(cfg, scan_layers=True)
    stacked = ModelDef.create(scanned).params_from_flat(
        {k: jnp.asarray(v) for k, v in stack_layers(flatten(params), 2).items()})
    toks = tokens(80, seed=4)
    plain_logits, _, plain_metrics = apply(cfg, params, toks)
    scan_logits, _, scan_metrics = apply(scanned, stacked, toks)
    # 1e-4: on the GPU the scanned and unrolled programs fuse and sum differently (5e-5 seen).
    np.testing.assert_allclose(np.asarray(scan_logits), np.asarray(plain_logits), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(float(scan_metrics["density"]), float(plain_metrics["density"]), rtol=1e-6)
    assert set(scan_metrics) == set(plain_metrics)   # per-layer names too


@pytest.mark.parametrize("method,variant", CASES, ids=IDS)
def test_a_bad_option_names_the_field(method, variant):
    with pytest.raises(ConfigError, match="block_size=48: choose one of"):
        dataclasses.replace(rule(method, variant), block_size=48)
    with pytest.raises(ConfigError, match=f"method '{method}' has no field"):
        method_options(method, no_such_field=1)
    base = RunConfig(model=model_config(rule(method, variant)))
    with pytest.raises(ConfigError, match=rf"unknown key 'model.attention.1.nope'; .* \(method '{method}'\) has: layers, method"):
        apply_overrides(base, ["model.attention.1.nope=1"])


SHARDED_PARTS = 2


@pytest.mark.slow
@pytest.mark.parametrize("part", range(SHARDED_PARTS))
def test_sharded_on_8_devices_matches_one_device(part):
    """SHARDED_CASES in two script runs, every other case each: the two pytest-xdist workers share
    the suite's longest check (~160 s in one run) for one extra process start-up."""
    stdout = run_script("tests/sparse/sharded_script.py", part, SHARDED_PARTS, timeout=900)
    errors = json.loads([line for line in stdout.splitlines() if line.startswith("RESULT ")][-1][7:])
    assert set(errors) == {f"{m}-{v}" for m, v in SHARDED_CASES[part::SHARDED_PARTS]}
    bad = {case: e for case, e in errors.items() if max(e.values()) >= 1e-4}  # float32 sums reordered
    assert not bad, bad


@pytest.mark.parametrize("method,variant", CASES, ids=IDS)
def test_export_round_trip_and_torch_parity(tmp_path, run_torch, method, variant):
    export_round_trip_and_torch_parity(tmp_path, run_torch, rule(method, variant))


def export_round_trip_and_torch_parity(tmp_path, run_torch, options):
    """The export of a tiny model with the rule `options` reads back bit for bit and its torch
    model matches ours (method test files call it for option sets the suite leaves out)."""
    from tests.export.test_torch_parity import SEQ, check_parity
    cfg = model_config(options, max_seq_len=512)
    params = with_method_params(cfg, seed=1)
    run = save_run(tmp_path, cfg, params)
    out = export_checkpoint(run, tmp_path / "hf", dtype="float32")
    # Round trip: the import reads back every tensor bit for bit, and the same rules.
    cfg_back, flat = read_hf(out)
    # The rules come back with every exported field (training-only options such as ssa are not).
    exported = lambda specs: [(s.method, {f: getattr(s, f) for f in s.export.fields}) for s in specs]
    assert exported(cfg_back.model.layer_specs) == exported(cfg.layer_specs)
    assert all(np.array_equal(flat[k], np.asarray(v)) for k, v in flatten(params).items())
    toks = tokens(SEQ, seed=5)
    np.savez(out / "jax_outputs.npz", **jax_outputs(cfg, params, toks))
    check_parity(run_torch("parity", out), "SparseLlamaForCausalLM")
