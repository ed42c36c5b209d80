"""Train a small decoder-only transformer (Flax NNX) on packed documents with flex attention.

The data: synthetic documents ``[BOS, s1 .. sk, SEP, s1 .. sk]`` (copy the k symbols after the separator; k random)
packed back to back into fixed-length rows, so one row holds several documents and their boundaries fall anywhere.

The attention: causal within each document and nothing across documents (``and_masks(causal_mask,
document_mask(ids))``, a mask_mod that differs per batch row), plus a learned relative-position bias per head
(``relative_position_bias(table)`` with the table an ``nnx.Param``: the score_mod captures a traced array, and its
gradient reaches the table).

Run ``python examples/train_transformer.py --steps 200`` to watch the loss fall; ``train(steps, seed)`` returns the
losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

try:
    import flexattn_jax as fa
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import flexattn_jax as fa
from flexattn_jax.flax import FlexMultiHeadAttention

BOS, SEP = 1, 2  # token 0 is unused; symbols are FIRST_SYMBOL .. vocab_size - 1
FIRST_SYMBOL = 3


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 16
    seq_len: int = 64
    batch_size: int = 8
    min_symbols: int = 2  # k, the symbols each document copies, is drawn from [min_symbols, max_symbols]
    max_symbols: int = 8
    model_dim: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    num_layers: int = 2
    max_distance: int = 16  # the relative-position bias table covers distances 0 .. max_distance (and negatives)
    learning_rate: float = 3e-3


# ---------------------------------------------------------------------------------------------------- data


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["inputs", "targets", "document_ids", "weights"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class Batch:
    """One training batch, a pytree of arrays (so it passes through nnx.jit)."""

    inputs: np.ndarray  # int32 [B, T]: tokens
    targets: np.ndarray  # int32 [B, T]: the next token
    document_ids: np.ndarray  # int32 [B, T]: which packed document each input belongs to
    weights: np.ndarray  # float32 [B, T]: 1 where the target is in the input's document, else 0


def make_batch(rng: np.random.Generator, config: Config) -> Batch:
    """A batch of rows, each of seq_len + 1 tokens of packed copy documents, split into inputs and targets."""
    length = config.seq_len + 1
    tokens = np.zeros((config.batch_size, length), np.int32)
    documents = np.zeros((config.batch_size, length), np.int32)
    for row in range(config.batch_size):
        pieces, ids, document = [], [], 0
        while sum(len(p) for p in pieces) < length:
            k = rng.integers(config.min_symbols, config.max_symbols + 1)
            symbols = rng.integers(FIRST_SYMBOL, config.vocab_size, size=k)
            piece = np.concatenate([[BOS], symbols, [SEP], symbols])
            pieces.append(piece)
            ids.append(np.full(len(piece), document))
            document += 1
        tokens[row] = np.concatenate(pieces)[:length]
        documents[row] = np.concatenate(ids)[:length]
    same_document = documents[:, 1:] == documents[:, :-1]
    return Batch(tokens[:, :-1], tokens[:, 1:], documents[:, :-1], same_document.astype(np.float32))


# --------------------------------------------------------------------------------------------------- model


class Block(nnx.Module):
    """Pre-norm residual block: flex attention with a learned relative-position bias, then an MLP."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        dim = config.model_dim
        self.attention_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.attention = FlexMultiHeadAttention(
            dim,
            config.num_heads,
            num_kv_heads=config.num_kv_heads,
            mask_varies=("batch",),  # the document mask differs from row to row
            rngs=rngs,
        )
        self.relative_bias = nnx.Param(jnp.zeros((config.num_heads, 2 * config.max_distance + 1), jnp.float32))
        self.mlp_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.mlp_in = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.mlp_out = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask_mod) -> jax.Array:
        score_mod = fa.relative_position_bias(self.relative_bias[...])
        x = x + self.attention(self.attention_norm(x), score_mod=score_mod, mask_mod=mask_mod)
        return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.mlp_norm(x))))


class Transformer(nnx.Module):
    """Token embedding, num_layers blocks, and logits through the transposed embedding."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(config.vocab_size, config.model_dim, rngs=rngs)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
        self.final_norm = nnx.RMSNorm(config.model_dim, rngs=rngs)

    def __call__(self, tokens: jax.Array, document_ids: jax.Array) -> jax.Array:
        """tokens, document_ids int32 [B, T] -> logits float32 [B, T, vocab_size]."""
        mask_mod = fa.and_masks(fa.causal_mask, fa.document_mask(document_ids))
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, mask_mod)
        return self.embed.attend(self.final_norm(x))


# ------------------------------------------------------------------------------------------------ training


def loss_fn(model: Transformer, batch: Batch) -> jax.Array:
    """Mean next-token cross-entropy over the targets inside each input's document."""
    logits = model(jnp.asarray(batch.inputs), jnp.asarray(batch.document_ids))
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(batch.targets))
    weights = jnp.asarray(batch.weights)
    return jnp.sum(losses * weights) / jnp.sum(weights)


@nnx.jit
def train_step(model: Transformer, optimizer: nnx.Optimizer, batch: Batch) -> jax.Array:
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss


def train(steps: int = 100, seed: int = 0, config: Config = Config()) -> list[float]:
    """Trains a fresh model for `steps` steps on fresh batches; returns the loss of each step."""
    rng = np.random.default_rng(seed)
    model = Transformer(config, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(config.learning_rate), wrt=nnx.Param)
    return [float(train_step(model, optimizer, make_batch(rng, config))) for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    losses = train(args.steps, args.seed)
    for step in range(0, len(losses), 10):
        print(f"step {step:4d}  loss {np.mean(losses[step : step + 10]):.3f}")


if __name__ == "__main__":
    main()
