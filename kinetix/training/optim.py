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


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """Adam with the paper's step schedule, or RMSprop with plateau reduction (authors' code)."""
    parts = []
    if optim.grad_clip:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
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
    return optax.chain(*parts)
