"""Worker of tests/test_multiprocess.py: where a process's local batch lands in the global batch.

    python tests/_mp_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID LOCAL_BATCH

Initialises jax.distributed with explicit arguments, builds kinetix's mesh (`make_mesh`) and
feeds `shard_batch` a local batch whose rows hold their intended global row numbers
(process i: i·B … i·B + B − 1), then gathers the global array on every process and prints one
JSON line: {"process": i, "device_processes": [process of each mesh device], "rows": [...]}.
"""

import json
import sys

import jax
import numpy as np


def main(coordinator: str, num_processes: int, process_id: int, local_batch: int) -> None:
    jax.distributed.initialize(
        coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
    )
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from kinetix import training

    mesh = training.make_mesh()
    first = process_id * local_batch
    rows = np.arange(first, first + local_batch, dtype=np.float32)
    batch = training.shard_batch(
        {k: rows for k in training.BATCH_KEYS}, NamedSharding(mesh, P("data"))
    )
    gathered = multihost_utils.process_allgather(batch["valid"], tiled=True)
    print(
        json.dumps(
            {
                "process": jax.process_index(),
                "device_processes": [d.process_index for d in mesh.devices.flat],
                "rows": np.asarray(gathered).astype(int).tolist(),
            }
        ),
        flush=True,
    )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
