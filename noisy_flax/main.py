"""Entry point: ``python -m noisy_flax.main --config configs/X.py[:args] --workdir DIR``.

Any config value can be overridden with ``--config.key=value``. On Cloud TPU
pods and under SLURM, JAX's distributed runtime is started automatically;
on other clusters pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or the NOISY_FLAX_* environment variables).
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before heavy imports: see noisy_flax.cpu_tuning
    from noisy_flax import cpu_tuning
    cpu_tuning.reexec_with_fast_malloc()

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from noisy_flax.cli import EXIT_USER_ERROR, config_value, first_line, flags_parser, start

# The repository root holds configs/; make `from configs import common` work
# however the module is started.
sys.path.insert(0, os.getcwd())

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and plots go.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("NOISY_FLAX_COORDINATOR"),
                                   "host:port of process 0, for clusters JAX does not detect.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _env_int(name: str):
    value = os.environ.get(name)
    return int(value) if value else None


def initialize_distributed() -> None:
    """Starts JAX's distributed runtime when this is one of several processes."""
    import jax

    # The environment is read here, like the other two, not only at import.
    coordinator = _COORDINATOR.value or os.environ.get("NOISY_FLAX_COORDINATOR")
    num_processes = _NUM_PROCESSES.value or _env_int("NOISY_FLAX_NUM_PROCESSES")
    process_id = _PROCESS_ID.value if _PROCESS_ID.value is not None else \
        _env_int("NOISY_FLAX_PROCESS_ID")
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or _is_multiworker_tpu():
        jax.distributed.initialize()  # detects SLURM and Cloud TPU pods itself


def _is_multiworker_tpu() -> bool:
    hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hostnames.split(",") if h]) > 1


USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def run(config, workdir: str) -> int:
    """Trains; a user error prints one line and returns exit status 2."""
    from noisy_flax import train  # heavy imports after flag parsing

    try:
        train.train_and_evaluate(config, workdir)
    except (*USER_ERRORS, train.TrainingError, train.checkpointing.CheckpointError) as error:
        logging.debug("user error", exc_info=True)
        print(f"error: {first_line(error)}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    return 0


def main(argv):
    start(argv)
    initialize_distributed()
    status = run(config_value(_CONFIG), _WORKDIR.value)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    app.run(main, flags_parser=flags_parser(_CONFIG))
