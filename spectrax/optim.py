"""The optimiser of the training loop: learning-rate schedules, AdamW (or SGD) with gradient
clipping and frozen subtrees, and :func:`apply_step`, the one optimiser step a training step
makes (clipping, AdamW and the non-finite guard in one pass over the parameters).

Why a hand-fused step: on SpecPT 'small' (63 M parameters, 60.6 M of them in one
7792 × 7781 kernel) the optimiser took 262 ms of a 561 ms CPU step with optax's chain
(``benchmarks.profile``, ops summed by name): the gradient norm was computed twice (once for
the log and the guard, once inside ``clip_by_global_norm``), each as a reduction that XLA:CPU
rewrites into a slow reduce-window (~115 ms apiece), and clipping, the moment updates, the
update and its application were four passes over the parameters. Here the norm is computed
once, with reductions XLA:CPU runs near memory bandwidth (:func:`global_norm`), and the rest is
one elementwise pass over the parameters (:func:`apply_step`).

XLA:CPU (jaxlib 0.10) emits that pass as three loop fusions per parameter (new first moment,
new second moment, new parameter), which read the gradient three times and the moments twice;
no formulation tried made it form one multi-output fusion. On a one-device CPU process the pass
is therefore the ``adamw`` kernel of :mod:`spectrax.kernels` (an XLA FFI custom call, built on
first use): one read of parameters, gradients and moments, one write of parameters and moments,
on XLA's intra-op threads, with the float32 arithmetic of the XLA path (which contracts
multiply-adds into FMAs where the kernel rounds each operation: they agree to an ulp,
tests/test_optim_kernel.py). Clipping + AdamW of 65 M parameters in SpecPT 'small''s shapes
(a 7792 × 7781 kernel among them), the norm included: 60.7 → 30.9 ms (2-core x86 VM,
2026-12-06, medians of 7, one process each way; XLA's three fusions measured 26 / 25 / 23 ms on
the big kernel alone in an earlier profile). Where the kernel cannot be built, on
accelerators, with several devices (a custom call has no sharding rule) and with
``SPECTRAX_CPU_KERNELS=0`` the XLA path runs.

The optimiser state keeps optax's layout (``build_optimizer`` returns an optax
``GradientTransformation`` whose ``init`` makes it), so checkpoints written before the fused step
still restore, and SGD or the plateau schedule run through optax's own update.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spectrax import kernels
from spectrax.checkpoint import path_str
from spectrax.models import is_under

Schedule = Callable[[Any], Any]


# ==============================================================================================
# Schedules
# ==============================================================================================
def cosine_warm_restarts(peak: float, period: int, eta_min: float, warmup: int = 0):
    """PyTorch's CosineAnnealingWarmRestarts with T_mult = 1 (SpectraFM's schedule), per step:
    lr = eta_min + ½ (peak − eta_min)(1 + cos(π · (t mod T) / T)), T = ``period`` steps, after
    an optional linear warm-up of ``warmup`` steps (t counts from its end)."""
    period = max(int(period), 1)

    def schedule(step):
        t = jnp.maximum(step - warmup, 0) % period
        lr = eta_min + 0.5 * (peak - eta_min) * (1.0 + jnp.cos(jnp.pi * t / period))
        if warmup:
            lr = jnp.where(step < warmup, peak * step / warmup, lr)
        return lr

    return schedule


def learning_rate(config, num_steps: int, steps_per_epoch: int = 1) -> Schedule | float:
    """``config.optim``'s schedule: ``cosine`` (one decay to 1 % over the run), ``constant``,
    ``plateau`` (constant here; :func:`build_optimizer` adds the plateau rule) and
    ``cosine_restarts`` (warm restarts every ``optim.t0_epochs`` epochs of ``steps_per_epoch``
    steps, down to ``optim.eta_min``), each after ``optim.warmup_steps`` linear warm-up steps."""
    o = config.optim
    warm = min(int(o.warmup_steps), max(num_steps - 1, 0))
    if o.schedule == "cosine_restarts":
        return cosine_warm_restarts(o.lr, o.t0_epochs * steps_per_epoch, o.eta_min, warm)
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, o.lr, warm, max(num_steps, warm + 1),
                                                  end_value=o.lr * 0.01)
    if o.schedule in ("constant", "plateau"):
        return optax.join_schedules([optax.linear_schedule(0.0, o.lr, warm),
                                     optax.constant_schedule(o.lr)], [warm]) if warm else o.lr
    raise ValueError(f"config.optim.schedule {o.schedule!r}: use cosine, cosine_restarts, "
                     "constant or plateau")


# ==============================================================================================
# The optimiser
# ==============================================================================================
@dataclasses.dataclass(frozen=True)
class Optimizer:
    """What the training loop needs of an optimiser.

    Attributes:
      tx: the optax transformation: ``tx.init(params)`` makes the state; SGD and the plateau
        schedule also update through it.
      learning_rate: the schedule (a function of the step) or a constant.
      adamw: (b1, b2, eps, weight_decay) when the step is the fused AdamW of
        :func:`apply_step`, else None.
      clip_norm: clip the global gradient norm of the trained parameters to this (0 = never).
      frozen: per-parameter labels ('train' / 'frozen', :func:`freeze_labels_for`) or None.
      uses_value: the update needs the loss (the plateau schedule).
    """

    tx: optax.GradientTransformation
    learning_rate: Schedule | float
    adamw: tuple[float, float, float, float] | None
    clip_norm: float
    frozen: Any
    uses_value: bool

    def init(self, params):
        return self.tx.init(params)

    def lr_at(self, step):
        """The learning rate at ``step``, float32 (for the log)."""
        lr = self.learning_rate(step) if callable(self.learning_rate) else self.learning_rate
        return jnp.asarray(lr, jnp.float32)


def build_optimizer(config, num_steps: int, freeze_labels=None,
                    steps_per_epoch: int = 1) -> Optimizer:
    """AdamW (or SGD, momentum 0.9) with warm-up + schedule (:func:`learning_rate`), gradient
    clipping (``optim.clip_norm``) and optional frozen subtrees (``freeze_labels``, from
    :func:`freeze_labels_for`): frozen parameters stay bitwise unchanged (no weight decay
    either) and get no optimiser moments."""
    o = config.optim
    lr = learning_rate(config, num_steps, steps_per_epoch)
    if o.name == "adamw":
        b1, b2, eps = 0.9, 0.999, 1e-8  # optax.adamw's defaults, spelled out for the fused step
        inner = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=o.weight_decay)
    elif o.name == "sgd":
        inner = optax.sgd(lr, momentum=0.9)
    else:
        raise ValueError(f"config.optim.name {o.name!r}: use adamw or sgd")
    parts = [optax.clip_by_global_norm(o.clip_norm)] if o.clip_norm else []
    parts.append(inner)
    if o.schedule == "plateau":
        # ReduceLROnPlateau as in the reference autoencoder; sees the loss via `value=`.
        parts.append(optax.contrib.reduce_on_plateau(patience=o.plateau_patience, factor=0.5))
    tx = optax.chain(*parts)
    if freeze_labels is not None:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, freeze_labels)
    fused = o.name == "adamw" and o.schedule != "plateau"
    return Optimizer(tx=tx, learning_rate=lr,
                     adamw=(b1, b2, eps, float(o.weight_decay)) if fused else None,
                     clip_norm=float(o.clip_norm or 0.0), frozen=freeze_labels,
                     uses_value=o.schedule == "plateau")


def freeze_labels_for(params, prefixes) -> Any:
    """'frozen' for parameters whose path starts with one of ``prefixes``, else 'train'."""
    def label(path, _):
        p = path_str(path)
        return "frozen" if any(is_under(p, f) for f in prefixes) else "train"

    return jax.tree_util.tree_map_with_path(label, params)


# ==============================================================================================
# Norms
# ==============================================================================================
def sum_of_squares(x) -> jax.Array:
    """Σ x² of one array, float32 scalar.

    On XLA:CPU a reduction over more than 32 elements is rewritten into a reduce-window plus a
    reduce, which runs at ~1-2 GB/s; a row reduction of 8 contiguous elements runs near memory
    bandwidth (SpecPT 'small''s 242 MB gradient kernel: ~115 ms as one ``jnp.sum``, 10-20 ms
    this way). So on CPU the squares are summed 8 at a time, repeatedly (a pairwise-like order,
    as accurate as the tree XLA would build); elsewhere it is one ``jnp.sum``.
    """
    x = jnp.asarray(x, jnp.float32)
    sq = jnp.square(x).reshape(-1)
    if jax.default_backend() != "cpu":
        return jnp.sum(sq)
    total = jnp.zeros((), jnp.float32)
    while sq.size > 256:
        whole = sq.size - sq.size % 8
        if whole < sq.size:  # the ragged tail apart: padding would copy the whole array
            total = total + jnp.sum(sq[whole:])
        sq = jnp.sum(sq[:whole].reshape(-1, 8), axis=1)
    return total + jnp.sum(sq)


def global_norm(tree) -> jax.Array:
    """√(Σ over every leaf of Σ x²), float32 scalar (optax.tree.norm, computed as in
    :func:`sum_of_squares`)."""
    leaves = jax.tree.leaves(tree)
    return jnp.sqrt(sum((sum_of_squares(x) for x in leaves), jnp.zeros((), jnp.float32)))


# ==============================================================================================
# The step
# ==============================================================================================
def apply_step(opt: Optimizer, params, state, grads, *, loss, guard_update: bool = False):
    """One optimiser step, guarded: a step whose loss or gradient norm is not finite changes
    nothing (parameters, moments and counts stay as they were).

    Args:
      opt: from :func:`build_optimizer`.
      params, state, grads: the trained parameters, ``opt.init(params)``'s state, the
        gradients (same structure as ``params``).
      loss: the step's scalar loss (the guard; the plateau schedule's value).
      guard_update: also keep the parameters when a finite gradient gives a non-finite update
        (an absurd learning rate); costs one more pass over the new parameters.

    Returns:
      (new params, new state, gradient norm over all parameters, applied: bool scalar).
    """
    with jax.named_scope("optimizer_step"):
        trained = _trained_mask(opt, params)
        squares = [sum_of_squares(g) for g in jax.tree.leaves(grads)]
        grad_norm = jnp.sqrt(sum(squares, jnp.zeros((), jnp.float32)))
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if opt.adamw is not None:
            train_sq = sum((s for s, t in zip(squares, trained) if t), jnp.zeros((), jnp.float32))
            new_params, new_state = _fused_adamw(opt, params, state, grads, jnp.sqrt(train_sq),
                                                 ok, trained)
        else:
            new_params, new_state = jax.lax.cond(
                ok, lambda: _optax_update(opt, params, state, grads, loss),
                lambda: (params, state))
        applied = ok
        if guard_update:
            finite = jnp.isfinite(global_norm(new_params))
            new_params = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                      new_params, params)
            applied = ok & finite
        return new_params, new_state, grad_norm, applied


def _trained_mask(opt: Optimizer, params) -> list[bool]:
    """Per leaf of ``params`` (flattened): True unless frozen."""
    if opt.frozen is None:
        return [True] * len(jax.tree.leaves(params))
    return [label == "train" for label in jax.tree.leaves(opt.frozen)]


def _optax_update(opt: Optimizer, params, state, grads, loss):
    extra = {"value": loss} if opt.uses_value else {}
    updates, new_state = opt.tx.update(grads, state, params, **extra)
    return optax.apply_updates(params, updates), new_state


_COUNTED = (optax.ScaleByAdamState, optax.ScaleByScheduleState)


def _fused_adamw(opt: Optimizer, params, state, grads, train_norm, ok, trained):
    """optax's chain(clip_by_global_norm, adamw) [inside multi_transform when frozen] as one
    elementwise pass per parameter, on the state that chain's ``init`` made.

    The arithmetic is optax's, in its order (moments ``(1−β)·g + β·m``, bias corrections
    ``m / (1 − β^t)``, ``u = m̂ / (√v̂ + ε) + λ·p``, ``p + (−lr)·u``); the clipping factor
    multiplies the gradient (optax divides by the norm, then multiplies by the limit: the
    results differ by an ulp). ``ok`` False keeps every value (selects in the same pass cost
    no extra memory traffic)."""
    b1, b2, eps, weight_decay = opt.adamw
    nodes = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _COUNTED))
             if isinstance(x, _COUNTED)]
    adam = [x for x in nodes if isinstance(x, optax.ScaleByAdamState)]
    if len(adam) != 1:
        raise ValueError("the fused AdamW step expects the state of build_optimizer's adamw")
    adam = adam[0]
    count = optax.safe_increment(adam.count)
    if callable(opt.learning_rate):
        sched = [x for x in nodes if isinstance(x, optax.ScaleByScheduleState)][0]
        lr = opt.learning_rate(sched.count)
    else:
        lr = opt.learning_rate
    neg_lr = -jnp.asarray(lr, jnp.float32)
    if opt.clip_norm:
        # optax: g if norm < limit else g / norm · limit.
        clip = jnp.where(train_norm < opt.clip_norm, 1.0, opt.clip_norm / train_norm)
    else:
        clip = jnp.ones((), jnp.float32)
    correction1 = 1 - b1 ** count.astype(jnp.float32)
    correction2 = 1 - b2 ** count.astype(jnp.float32)

    def leaf(p, g, m, v):
        g = g * clip.astype(g.dtype)
        m_new = jnp.where(ok, (1 - b1) * g + b1 * m, m).astype(m.dtype)
        v_new = jnp.where(ok, (1 - b2) * (g ** 2) + b2 * v, v).astype(v.dtype)
        # The new moments are written (in place: the state is donated) before the parameter
        # update reads them. Otherwise XLA recomputes them inside the parameter's fusion from
        # the old moments, which it must then copy first (2 × 242 MB on SpecPT 'small').
        m_new, v_new = jax.lax.optimization_barrier((m_new, v_new))
        u = (m_new / correction1.astype(m.dtype)) / (
            jnp.sqrt(v_new / correction2.astype(v.dtype)) + eps)
        if weight_decay:
            u = u + weight_decay * p
        p_new = jnp.asarray(p + neg_lr.astype(u.dtype) * u).astype(p.dtype)
        return jnp.where(ok, p_new, p), m_new, v_new

    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731 (a frozen leaf's moment)
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = jax.tree.leaves(grads)
    m_leaves, m_def = jax.tree.flatten(adam.mu, is_leaf=is_masked)
    v_leaves, v_def = jax.tree.flatten(adam.nu, is_leaf=is_masked)
    if not len(p_leaves) == len(g_leaves) == len(m_leaves) == len(v_leaves) == len(trained):
        raise ValueError("parameters, gradients and AdamW moments do not match leaf for leaf")
    new_p, new_m, new_v = list(p_leaves), list(m_leaves), list(v_leaves)
    by_kernel = []
    use_kernel = adamw_kernel_ready()
    for i, (p, g, m, v, t) in enumerate(zip(p_leaves, g_leaves, m_leaves, v_leaves, trained)):
        if not t:
            continue
        if use_kernel and all(x.dtype == jnp.float32 for x in (p, g, m, v)):
            by_kernel.append(i)
        else:
            new_p[i], new_m[i], new_v[i] = leaf(p, g, m, v)
    if by_kernel:
        step = jnp.stack([ok.astype(jnp.float32), clip.astype(jnp.float32), neg_lr,
                          correction1, correction2])
        out = _adamw_kernel([p_leaves[i] for i in by_kernel], [g_leaves[i] for i in by_kernel],
                            [m_leaves[i] for i in by_kernel], [v_leaves[i] for i in by_kernel],
                            step, b1, b2, eps, weight_decay)
        for i, (p, m, v) in zip(by_kernel, out):
            new_p[i], new_m[i], new_v[i] = p, m, v
    new_adam = adam._replace(count=jnp.where(ok, count, adam.count),
                             mu=jax.tree.unflatten(m_def, new_m),
                             nu=jax.tree.unflatten(v_def, new_v))

    def advance(x):
        if isinstance(x, optax.ScaleByAdamState):
            return new_adam
        if isinstance(x, optax.ScaleByScheduleState):
            return x._replace(count=jnp.where(ok, optax.safe_increment(x.count), x.count))
        return x

    new_state = jax.tree.map(advance, state, is_leaf=lambda x: isinstance(x, _COUNTED))
    return jax.tree.unflatten(treedef, new_p), new_state


# ==============================================================================================
# The CPU kernel of the AdamW pass
# ==============================================================================================
_ADAMW_TARGET = "spectrax_adamw_f32"


def adamw_kernel_ready() -> bool:
    """Whether :func:`apply_step` takes its AdamW pass with the CPU kernel (see the module
    docstring): the default backend is the CPU, the process has one device, and the kernel is
    built (:func:`spectrax.kernels.load`; ``SPECTRAX_CPU_KERNELS=0`` says no)."""
    return (jax.default_backend() == "cpu" and jax.device_count() == 1
            and kernels.load("adamw", (_ADAMW_TARGET,)))


def _adamw_kernel(p, g, m, v, step, b1, b2, eps, weight_decay):
    """The AdamW pass of :func:`_fused_adamw` over float32 leaves ``p, g, m, v`` (lists of
    equal length) as one custom call updating parameters and moments in place (each result
    aliases its argument, so donated state is not copied). ``step``: float32[5], [apply,
    gradient scale, −learning rate, 1 − b1^t, 1 − b2^t]. Returns [(p', m', v')] per leaf."""
    n = len(p)
    args = [*p, *g, *m, *v]
    results = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (*p, *m, *v)]
    # Argument 0 is `step`; p_i is argument 1 + i, m_i 1 + 2n + i, v_i 1 + 3n + i.
    aliases = {1 + i: i for i in range(n)}
    aliases.update({1 + 2 * n + i: n + i for i in range(n)})
    aliases.update({1 + 3 * n + i: 2 * n + i for i in range(n)})
    f32 = np.float32   # the constants as the XLA path rounds them (Python floats -> float32)
    out = jax.ffi.ffi_call(_ADAMW_TARGET, results, input_output_aliases=aliases)(
        step, *args, b1=f32(b1), b2=f32(b2), one_minus_b1=f32(1 - b1), one_minus_b2=f32(1 - b2),
        eps=f32(eps), weight_decay=f32(weight_decay))
    return [(out[i], out[n + i], out[2 * n + i]) for i in range(n)]
