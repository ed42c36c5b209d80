"""The end-to-end example: a small transformer with document masking and a learned relative-position bias trains."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
pytest.importorskip("optax")
from flax import nnx  # noqa: E402

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_transformer.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_transformer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_batches_pack_copy_documents(example):
    config = example.Config(batch_size=3, seq_len=40)
    batch = example.make_batch(np.random.default_rng(0), config)
    assert batch.inputs.shape == batch.targets.shape == batch.document_ids.shape == (3, 40)
    np.testing.assert_array_equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert (np.diff(batch.document_ids, axis=1) >= 0).all() and (batch.document_ids[:, -1] > 0).all()
    starts = np.flatnonzero(np.diff(batch.document_ids[0])) + 1
    assert (batch.inputs[0, starts] == example.BOS).all()
    # A target outside its input's document (the next document's BOS) carries no weight.
    assert (batch.weights[batch.targets == example.BOS] == 0).all() and batch.weights.sum() > 0


def test_gradients_reach_the_relative_bias_tables(example):
    config = example.Config(batch_size=2, seq_len=24, num_layers=1)
    model = example.Transformer(config, rngs=nnx.Rngs(0))
    batch = example.make_batch(np.random.default_rng(1), config)
    grads = nnx.jit(nnx.grad(example.loss_fn))(model, batch)
    table_grad = grads["blocks"][0]["relative_bias"][...]
    assert bool(jnp.isfinite(table_grad).all()) and float(jnp.abs(table_grad).max()) > 0


def test_loss_goes_down(example):
    # optax's Adam raises a Python float to an int32 step count, which strict promotion (conftest) refuses.
    with jax.numpy_dtype_promotion("standard"):
        losses = example.train(steps=40, seed=0)
    assert len(losses) == 40 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses


def test_runs_as_a_script():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "3"], check=True, timeout=300, capture_output=True, text=True,
        cwd=EXAMPLE.parent,
    )
    assert result.stdout.startswith("step    0  loss "), result.stdout
