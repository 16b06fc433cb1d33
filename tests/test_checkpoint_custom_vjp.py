"""ember.checkpoint (remat) and ember.custom_vjp under eager, jit, vmap, jvp and grad."""

import numpy as np
import pytest

import ember
import ember.numpy as enp
from ember import lax
from ember.transforms.linearize import linearize_flat

RNG = np.random.default_rng(1)
X = RNG.normal(size=3)
W = RNG.normal(size=(3, 3))


def mlp(x, w):
    for _ in range(3):
        x = enp.sin(w @ x)
    return enp.sum(x)


def residual_count(f, *args):
    return len(linearize_flat(lambda *a: [f(*a)], list(args))[1].consts)


# --- checkpoint ------------------------------------------------------------------------------

def test_checkpoint_same_values():
    # Its gradients, with every policy: test_every_policy_gives_the_gradients_of_the_plain_...
    cf = ember.checkpoint(mlp)
    np.testing.assert_allclose(cf(X, W), mlp(X, W))
    np.testing.assert_allclose(ember.jit(cf)(X, W), mlp(X, W))


def test_checkpoint_keeps_only_inputs_as_residuals():
    plain = residual_count(mlp, X, W)
    remat = residual_count(ember.checkpoint(mlp), X, W)
    assert remat == 2 < plain  # x and w only, versus every cos(.) and sin(.)


def test_checkpoint_recomputes_in_a_separate_equation_under_jit():
    # CSE must not merge the recomputation back into the forward pass: the forward remat has
    # the three sin, the backward remat recomputes the two its linear part needs.
    text = ember.jit(ember.value_and_grad(ember.checkpoint(mlp))).lower(X, W).as_text()
    assert text.count("remat[") == 2
    assert text.count("sin(") == 5
    assert ember.jit(ember.value_and_grad(mlp)).lower(X, W).as_text().count("sin(") == 3


def test_checkpoint_policy_saves_dots():
    saved = ember.checkpoint(mlp, policy=ember.checkpoint_policies.dots_saveable)
    _, lin = linearize_flat(lambda x, w: [saved(x, w)], [X, W])
    assert sum(np.shape(c) == (3, 1) for c in lin.consts) == 3  # the three products
    assert "dot_general" not in str(lin).split("body")[0]
    np.testing.assert_allclose(ember.grad(saved, argnums=1)(X, W),
                               ember.grad(mlp, argnums=1)(X, W), rtol=1e-12)
    nothing = ember.checkpoint(mlp, policy=ember.checkpoint_policies.nothing_saveable)
    assert residual_count(nothing, X, W) == 2


def saves_sin(prim, *avals, **params):
    return prim.name == "sin"


POLICIES = [None, ember.checkpoint_policies.nothing_saveable,
            ember.checkpoint_policies.everything_saveable,
            ember.checkpoint_policies.dots_saveable, saves_sin]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: getattr(p, "__name__", repr(p)))
def test_every_policy_gives_the_gradients_of_the_plain_function(policy):
    cf = ember.checkpoint(mlp, policy=policy)
    expected = ember.grad(mlp, argnums=(0, 1))(X, W)
    for g in (ember.grad(cf, argnums=(0, 1))(X, W),
              ember.jit(ember.grad(cf, argnums=(0, 1)))(X, W)):
        np.testing.assert_allclose(g[0], expected[0], rtol=1e-12)
        np.testing.assert_allclose(g[1], expected[1], rtol=1e-12)


def test_a_user_policy_saves_what_it_selects_and_prints_by_name():
    saved = ember.checkpoint(mlp, policy=saves_sin)
    _, lin = linearize_flat(lambda x, w: [saved(x, w)], [X, W])
    # The sines the backward pass needs (the last one only feeds the sum) are kept.
    assert sum(np.shape(c) == (3,) for c in lin.consts) == 1 + 2
    assert residual_count(saved, X, W) > residual_count(ember.checkpoint(mlp), X, W)
    text = ember.jit(ember.grad(saved)).lower(X, W).as_text()
    assert "policy=test_checkpoint_custom_vjp.saves_sin" in text
    assert "policy=dots_saveable" in ember.jit(ember.grad(ember.checkpoint(
        mlp, policy=ember.checkpoint_policies.dots_saveable))).lower(X, W).as_text()


def test_policies_are_values_named_once_per_function():
    from ember.transforms.checkpoint import as_policy

    assert as_policy(saves_sin) == as_policy(saves_sin)
    first, second = (lambda prim, *a, **p: False), (lambda prim, *a, **p: False)
    assert as_policy(first) != as_policy(second)
    assert as_policy(first).name.endswith("<lambda>")
    assert hash(as_policy(first)) == hash(as_policy(first))
    with pytest.raises(ember.EmberError, match="policy must be a function"):
        ember.checkpoint(mlp, policy="dots")
    with pytest.raises(ember.EmberError, match="no policy is registered as 'dots'"):
        ember.checkpoint(mlp, policy=type(as_policy(saves_sin))("dots"))


def test_checkpoint_decorator_grad_of_grad_jvp_vmap():
    @ember.checkpoint
    def f(a):
        return enp.sin(a) * a

    np.testing.assert_allclose(ember.grad(ember.grad(f))(0.3),
                               2 * np.cos(0.3) - 0.3 * np.sin(0.3))
    cf = ember.remat(mlp)
    np.testing.assert_allclose(ember.jvp(cf, (X, W), (X, W))[1], ember.jvp(mlp, (X, W), (X, W))[1])
    xs = RNG.normal(size=(2, 3))
    np.testing.assert_allclose(ember.vmap(ember.grad(cf), in_axes=(0, None))(xs, W),
                               ember.vmap(ember.grad(mlp), in_axes=(0, None))(xs, W))
    np.testing.assert_allclose(
        ember.grad(lambda w: enp.sum(ember.vmap(cf, in_axes=(0, None))(xs, w)))(W),
        ember.grad(lambda w: enp.sum(ember.vmap(mlp, in_axes=(0, None))(xs, w)))(W))


def test_checkpoint_of_scan_body():
    step = lambda h, x: (enp.tanh(W @ h + x), None)
    loss = lambda h, body: enp.sum(lax.scan(body, h, RNG_XS)[0])
    g1 = ember.grad(loss)(X, step)
    g2 = ember.grad(loss)(X, ember.checkpoint(step))
    np.testing.assert_allclose(g2, g1, rtol=1e-12)


RNG_XS = RNG.normal(size=(4, 3))


# --- custom_vjp ------------------------------------------------------------------------------

@ember.custom_vjp
def clip_gradient(x):
    return x


clip_gradient.defvjp(lambda x: (x, None), lambda _, g: (enp.clip(g, -1.0, 1.0),))


@ember.custom_vjp
def logsumexp(x):
    return enp.log(enp.sum(enp.exp(x)))


def _lse_fwd(x):
    m = enp.max(x)
    y = m + enp.log(enp.sum(enp.exp(x - m)))
    return y, (x, y)


def _lse_bwd(res, g):
    x, y = res
    return (g * enp.exp(x - y),)


logsumexp.defvjp(_lse_fwd, _lse_bwd)


def test_custom_vjp_without_differentiation_calls_fun():
    np.testing.assert_allclose(logsumexp(X), np.log(np.sum(np.exp(X))))
    np.testing.assert_allclose(ember.jit(logsumexp)(X), np.log(np.sum(np.exp(X))))
    np.testing.assert_allclose(ember.vmap(logsumexp)(np.stack([X, 2 * X])),
                               [np.log(np.sum(np.exp(X))), np.log(np.sum(np.exp(2 * X)))])


def test_custom_vjp_grad_uses_bwd():
    f = lambda x: enp.sum(clip_gradient(x) * 5.0)
    np.testing.assert_allclose(ember.grad(f)(X), np.ones(3))  # 5 clipped to 1
    np.testing.assert_allclose(ember.jit(ember.grad(f))(X), np.ones(3))
    # The stable backward gives finite gradients where exp overflows.
    g = ember.grad(logsumexp)(np.array([1000.0, 1000.0]))
    np.testing.assert_allclose(g, [0.5, 0.5])


def test_custom_vjp_grad_of_grad_and_vmap():
    f = lambda a: logsumexp(enp.stack([a, 2 * a]))
    softmax_w = lambda a: np.exp(2 * a) / (np.exp(a) + np.exp(2 * a))
    expected = (1 + softmax_w(0.3 + 1e-5) - 1 - softmax_w(0.3 - 1e-5)) / 2e-5
    np.testing.assert_allclose(ember.grad(ember.grad(f))(0.3), expected, rtol=1e-6)
    xs = np.stack([X, -X])
    sm = np.exp(xs) / np.exp(xs).sum(1, keepdims=True)
    np.testing.assert_allclose(ember.vmap(ember.grad(logsumexp))(xs), sm)
    np.testing.assert_allclose(
        ember.grad(lambda x: enp.sum(ember.vmap(logsumexp)(x)))(xs), sm)


def test_custom_vjp_pytree_args_and_none_cotangent():
    @ember.custom_vjp
    def f(params, scale):
        return params["w"] * scale

    f.defvjp(lambda p, s: (p["w"] * s, s), lambda s, g: ({"w": g * s * 100.0}, None))
    g = ember.grad(lambda w, s: enp.sum(f({"w": w}, s)), argnums=(0, 1))(X, 2.0)
    np.testing.assert_allclose(g[0], np.full(3, 200.0))
    np.testing.assert_allclose(g[1], 0.0)


def test_custom_vjp_errors():
    with pytest.raises(ember.UnsupportedError, match="forward-mode"):
        ember.jvp(logsumexp, (X,), (X,))

    @ember.custom_vjp
    def g(x):
        return x

    with pytest.raises(ember.EmberError, match="call .defvjp"):
        g(X)
    g.defvjp(lambda x: (x, None), lambda _, ct: (ct, ct))
    with pytest.raises(ember.EmberError, match="must return a tuple of 1 cotangents"):
        ember.grad(lambda x: enp.sum(g(x)))(X)
    g.defvjp(lambda x: (x, None), lambda _, ct: (ct[:2],))
    with pytest.raises(ember.ShapeError, match=r"cotangent of shape \(2,\)"):
        ember.grad(lambda x: enp.sum(g(x)))(X)


def test_custom_vjp_rules_that_close_over_arrays():
    scale = np.array([1.0, 2.0, 3.0])
    shift = np.array([0.5, 0.5, 0.5])

    @ember.custom_vjp
    def f(x):
        return x * scale

    f.defvjp(lambda x: (x * scale, x + shift), lambda r, g: (g * scale * 10.0 + 0.0 * r,))
    loss = lambda x: enp.sum(f(x))  # noqa: E731
    for g in (ember.grad(loss)(X), ember.jit(ember.grad(loss))(X)):
        np.testing.assert_allclose(g, 10.0 * scale)
    np.testing.assert_allclose(ember.jit(f)(X), X * scale)

    def closes_over(w):
        @ember.custom_vjp
        def h(x):
            return x * w

        h.defvjp(lambda x: (x * w, None), lambda _, g: (g * w,))
        return enp.sum(h(X))

    with pytest.raises(ember.UnsupportedError, match="closes over a value that is being "
                                                     "differentiated"):
        ember.grad(closes_over)(scale)
