"""One experiment: train a model on a cohort, then evaluate it on the held-out subjects.

`train_and_evaluate` is what `python -m kinetix.train` calls: `kinetix.training.loop.train`
(resuming from the workdir's checkpoints), then `kinetix.evaluation.evaluate_run` on the test
split with the trained parameters (``config.eval.run_after_training``).
"""

import jax
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kinetix.evaluation import evaluate_run
from kinetix.inference import make_predict_fn
from kinetix.training.devices import local_copy
from kinetix.training.lock import workdir_lock
from kinetix.training.loop import TrainResult, check_trainable, train


def evaluate_trained(config: ml_collections.ConfigDict, workdir, trained: TrainResult) -> dict:
    """`evaluate_run` on the test split with the state `train` left (process 0 only).

    The evaluation reads every test slice on one host and writes files: process 0 runs it on its
    own devices (no collective, so the others need not feed batches) with a host copy of the
    replicated parameters; the other processes wait at a barrier until it is written.

    Returns:
      `evaluate_run`'s result on process 0, {} on the others.
    """
    result = {}
    if jax.process_index() == 0:
        local_mesh = jax.make_mesh(
            (jax.local_device_count(),),
            ("data",),
            axis_types=(jax.sharding.AxisType.Auto,),
            devices=jax.local_devices(),
        )
        params = jax.device_put(local_copy(trained.state["params"]), NamedSharding(local_mesh, P()))
        predict_fn = make_predict_fn(
            trained.eval_step, params, NamedSharding(local_mesh, P("data"))
        )
        result = evaluate_run(
            config,
            workdir,
            trained.cohort,
            trained.splits["test"],
            predict_fn,
            step=int(local_copy(trained.state["step"])),
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("kinetix: evaluation written")
    return result


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir, provenance_kw: dict | None = None
) -> dict:
    """Train (resuming from workdir if it holds a checkpoint), then evaluate held-out subjects.

    Args:
      config: the resolved config.
      workdir: the run directory.
      provenance_kw: passed to `kinetix.training.provenance.write` (e.g. `config_file` and
        `overrides` of the command line, so that `provenance.command_line` can rebuild it).

    Returns:
      {"history": the logged records, "final_step": int, "eval": `evaluate_run`'s result (when
      evaluated, on process 0)}, or {"preempted_at": step} when training stopped at a
      preemption notice.
    """
    check_trainable(config, workdir)
    with workdir_lock(workdir, "kinetix.train"):  # held from training through the evaluation
        trained = train(config, workdir, provenance_kw)
        if trained.preempted:
            return {"preempted_at": trained.final_step}
        result = {"history": trained.history, "final_step": trained.final_step}
        if config.eval.run_after_training:
            evaluation = evaluate_trained(config, workdir, trained)
            if evaluation:
                result["eval"] = evaluation
    return result
