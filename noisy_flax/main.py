"""Entry point: ``python -m noisy_flax.main --config configs/X.py[:args] --workdir DIR``.

Any config value can be overridden with ``--config.key=value``. On Cloud TPU
pods and under SLURM, JAX's distributed runtime is started automatically;
on other clusters pass ``--coordinator_address``, ``--num_processes`` and
``--process_id`` (or the NOISY_FLAX_* environment variables).
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

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

    coordinator = _COORDINATOR.value
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


def prepare_workdir(workdir: str) -> None:
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} is a file; give a directory")
    if "://" in workdir:  # gs:// and friends: orbax and clu write there directly
        return
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--workdir {workdir} cannot be created ({error.strerror}); "
                         "choose a writable directory") from None
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise ValueError(f"--workdir {workdir} is not writable; choose a writable directory")


USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and tfds log every step at INFO
    from noisy_flax import train  # heavy imports after flag parsing

    initialize_distributed()
    config, workdir = _CONFIG.value, _WORKDIR.value
    try:
        prepare_workdir(workdir)
        train.train_and_evaluate(config, workdir)
    except (*USER_ERRORS, train.TrainingError, train.checkpointing.CheckpointError) as error:
        logging.debug("user error", exc_info=True)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
