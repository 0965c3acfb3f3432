"""One training process for the crash trials in test_reliability.py.

    python tests/crash_worker.py WORKDIR DATA_DIR IDX_DIR TOTAL_STEPS

Trains the tiny config and reports on stdout, flushed, what the parent
needs to time its kills: ``SAVING <step>`` just before an asynchronous
checkpoint starts, the trainer's own ``step k/N`` lines, then ``DONE``.
"""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

# Compiles in seconds; the uninterrupted reference runs this worker too, so
# both sides compile the same programs.
jax.config.update("jax_disable_most_optimizations", True)

import tiny_run  # noqa: E402  (sets up sys.path for configs/)
from noisy_flax import checkpointing, train  # noqa: E402


def report_saves() -> None:
    original = checkpointing.Checkpointer.save

    def save(self, step, state, **kwargs):
        print(f"SAVING {step}", flush=True)
        return original(self, step, state, **kwargs)

    checkpointing.Checkpointer.save = save


def main(workdir: str, data_dir: str, idx_dir: str, total_steps: str) -> None:
    config = tiny_run.crash_config(data_dir, idx_dir, int(total_steps))
    report_saves()
    train.train_and_evaluate(config, workdir)
    print("DONE", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
