"""Test set-up: CPU only, 8 fake devices so every sharding path runs, no network."""
import os
import tempfile

# Must happen before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ["NO_GCE_CHECK"] = "true"  # tfds/gcs must not probe the network

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")
# Tests compile many small programs and run each a few times: compiling
# without XLA's heavier passes roughly halves their CPU time.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session", autouse=True)
def _temp_folders_inside_pytests_own(tmp_path_factory):
  """Points tempfile (and child processes' $TMPDIR) into pytest's temp tree.

  tfds makes an empty folder in the temp directory for every builder of an
  unprepared dataset and never removes it; mock_data builds hundreds. Inside
  pytest's tree they go with its rotation instead of piling up in /tmp.
  """
  root = str(tmp_path_factory.mktemp("tempfile"))
  saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
  tempfile.tempdir, os.environ["TMPDIR"] = root, root
  yield
  tempfile.tempdir = saved_dir
  if saved_env is None:
    os.environ.pop("TMPDIR", None)
  else:
    os.environ["TMPDIR"] = saved_env
