"""One process of a multi-process test run: `kdjax.cli.main` with N fake CPU devices, recording
the parameters each training loop ends with.

  KDJAX_TEST_DEVICES=2 KDJAX_TEST_OUT=DIR [KDJAX_COORDINATOR=... ...] \
      python tests/multiprocess_driver.py distill --config ... --workdir ...

Writes DIR/params-LOOP-processI.npz (LOOP: the loop's description, e.g. train, distill) with the
final parameters as every process sees them, so a test can compare processes and runs.
"""

import os
import pathlib
import sys

import jax

# Before JAX creates its backend (the CLI then joins the cluster, also before any device use).
jax.config.update("jax_num_cpu_devices", int(os.environ["KDJAX_TEST_DEVICES"]))

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from kdjax import cli, distributed, train

_out = pathlib.Path(os.environ["KDJAX_TEST_OUT"])
_train_loop = train.train_loop


def _recording_train_loop(*args, **kwargs):
    run = _train_loop(*args, **kwargs)
    params = distributed.host_arrays(run.state.params)
    flat = {jax.tree_util.keystr(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    name = f"params-{kwargs.get('description', 'train')}-process{jax.process_index()}.npz"
    np.savez(_out / name, **flat)
    return run


train.train_loop = _recording_train_loop

if __name__ == "__main__":
    _out.mkdir(parents=True, exist_ok=True)
    sys.exit(cli.main(sys.argv[1:]))
