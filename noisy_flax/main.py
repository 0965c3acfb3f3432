"""Entry point: ``python -m noisy_flax.main --config configs/X.py[:args] --workdir DIR``.

Any config value can be overridden with ``--config.key=value``. JAX's
distributed runtime is started, and finds its peers itself, inside a SLURM
srun step of several tasks, on a GKE TPU slice of several workers, and
wherever NOISY_FLAX_DISTRIBUTED=1 (launch/tpu/run.sh sets it on Cloud TPU
VMs); on other clusters pass ``--coordinator_address``, ``--num_processes``
and ``--process_id`` (or the NOISY_FLAX_* environment variables).
"""
from __future__ import annotations

if __name__ == "__main__":  # first, before heavy imports: see noisy_flax.cpu_tuning
    from noisy_flax import cpu_tuning
    cpu_tuning.reexec_with_fast_malloc()

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from noisy_flax.cli import (EXIT_USER_ERROR, add_config_roots, config_value, fail, first_line,
                            flags_parser, start)

# The repository root holds configs/; make `from configs import common` work
# however and wherever the module is started.
add_config_roots(sys.argv)

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and plots go.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", os.environ.get("NOISY_FLAX_COORDINATOR"),
                                   "host:port of process 0, for clusters JAX does not detect.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
flags.mark_flags_as_required(["config", "workdir"])


def _env_int(name: str):
    """An integer environment variable; anything else is a one-line user error."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        fail(f"{name}={value!r} must be a whole number")


def initialize_distributed() -> None:
    """Starts JAX's distributed runtime when this is one of several processes.

    Checked before JAX is called: a bad value is one line and exit status 2,
    not a traceback from inside jax.distributed.
    """
    # The environment is read here, like the other two, not only at import.
    coordinator = _COORDINATOR.value or os.environ.get("NOISY_FLAX_COORDINATOR")
    num_processes = _NUM_PROCESSES.value if _NUM_PROCESSES.value is not None else \
        _env_int("NOISY_FLAX_NUM_PROCESSES")
    process_id = _PROCESS_ID.value if _PROCESS_ID.value is not None else \
        _env_int("NOISY_FLAX_PROCESS_ID")
    if coordinator:
        _check_explicit_cluster(coordinator, num_processes, process_id)
    elif num_processes is not None or process_id is not None:
        # Without a coordinator they would be ignored without a word.
        fail("--num_processes and --process_id need --coordinator_address HOST:PORT "
             "(or NOISY_FLAX_COORDINATOR) of process 0")
    auto = not coordinator and (_asked_for_auto_detection() or _in_multitask_slurm_step()
                                or _is_multiworker_gke_tpu())

    import jax
    if coordinator:
        jax.distributed.initialize(coordinator_address=coordinator,
                                   num_processes=num_processes, process_id=process_id)
    elif auto:
        try:
            jax.distributed.initialize()  # JAX detects SLURM, GKE and Cloud TPU VMs itself
        except ValueError as error:  # it found no cluster in this environment
            fail(f"JAX's distributed runtime could not find the other processes "
                 f"({first_line(error)}); on a cluster JAX does not detect, pass "
                 "--coordinator_address, --num_processes and --process_id")


def _check_explicit_cluster(coordinator: str, num_processes, process_id) -> None:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        fail(f"--coordinator_address {coordinator!r} must be HOST:PORT of process 0, "
             "e.g. 10.0.0.1:1234")
    if num_processes is None or process_id is None:
        fail("--coordinator_address needs --num_processes N and --process_id I as well "
             "(or NOISY_FLAX_NUM_PROCESSES and NOISY_FLAX_PROCESS_ID)")
    if num_processes < 1:
        fail(f"--num_processes {num_processes} must be at least 1")
    if not 0 <= process_id < num_processes:
        fail(f"--process_id {process_id} must be from 0 to {num_processes - 1} "
             f"(--num_processes {num_processes})")


def _asked_for_auto_detection() -> bool:
    """NOISY_FLAX_DISTRIBUTED=1, which launch/tpu/run.sh sets: on a Cloud TPU
    VM the workers are known only to the metadata server, which JAX reads."""
    value = os.environ.get("NOISY_FLAX_DISTRIBUTED", "").strip()
    if value not in ("", "0", "1"):
        fail(f"NOISY_FLAX_DISTRIBUTED={value!r} must be 1 (start JAX's distributed runtime "
             "and let it find the other workers) or 0")
    return value == "1"


def _in_multitask_slurm_step() -> bool:
    """Inside an srun step of several tasks. SLURM_NTASKS alone is also set in
    an salloc shell and in the batch script itself, where this is the only
    process and would wait for peers that never come."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    return tasks.isdigit() and int(tasks) > 1


def _is_multiworker_gke_tpu() -> bool:
    hostnames = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hostnames.split(",") if h]) > 1


USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def run(config, workdir: str) -> int:
    """Trains; a user error prints one line and returns exit status 2."""
    from noisy_flax import train  # heavy imports after flag parsing

    if "study" in config:  # it would train one plain run and ignore every study setting
        print("error: this is a study config (it has config.study); run it with python -m "
              "noisy_flax.study --config ... --workdir ...", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
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
