"""Test set-up: CPU only, 8 fake devices so every sharding path runs, no network."""
import os

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ["NO_GCE_CHECK"] = "true"  # tfds/gcs must not probe the network

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
# Tests compile many small programs and run each a few times: compiling
# without XLA's heavier passes roughly halves their CPU time.
jax.config.update("jax_disable_most_optimizations", True)
