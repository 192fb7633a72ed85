"""The optimiser: Adam with the paper's step decay, or RMSprop with plateau reduction."""

import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict):
    """Paper: lr ÷10 every `decay_every` steps with a floor (staircase exponential decay)."""
    return optax.exponential_decay(
        init_value=optim.learning_rate,
        transition_steps=optim.decay_every,
        decay_rate=optim.decay_factor,
        staircase=True,
        end_value=optim.min_lr,
    )


def clipped(
    inner: optax.GradientTransformationExtraArgs, max_norm: float
) -> optax.GradientTransformationExtraArgs:
    """``inner`` applied to gradients clipped to global norm ``max_norm``, with ``inner``'s state.

    The clipping is stateless, so it is kept out of the optimiser state: the state's structure
    (and so a checkpoint) does not depend on whether clipping is on, and a run that diverged
    can resume with ``config.optim.grad_clip`` set.
    """
    clip = optax.clip_by_global_norm(max_norm)

    def update(updates, state, params=None, **extra):
        updates, _ = clip.update(updates, optax.EmptyState(), params)
        return inner.update(updates, state, params, **extra)

    return optax.GradientTransformationExtraArgs(inner.init, update)


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """Adam with the paper's step schedule, or RMSprop with plateau reduction (authors' code),
    on gradients clipped to global norm ``optim.grad_clip`` when it is > 0."""
    parts = []
    if optim.name == "adam":
        parts.append(optax.adam(learning_rate_schedule(optim)))
    else:
        parts.append(optax.rmsprop(optim.learning_rate))
        parts.append(
            optax.contrib.reduce_on_plateau(
                factor=optim.plateau_factor,
                patience=optim.plateau_patience,
                min_scale=optim.plateau_min_scale,
            )
        )
    chain = optax.chain(*parts)
    return clipped(chain, optim.grad_clip) if optim.grad_clip else chain
