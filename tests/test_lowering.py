"""The pallas_triton kernels lower to Triton for CUDA, on this machine without a GPU, for every mod of the library.

Lowering catches unsupported primitives, non-power-of-two values and dtype mismatches; it does not run Triton's own
compilation to PTX, which the gpu-marked tests exercise.
"""

import jax
import jax.numpy as jnp
import pytest

import flexattn_jax as fa
from flexattn_jax.backends import pallas_triton
from tests._helpers import MOD_CASES, random_qkv

_H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")


def _lower_for_cuda(q, k, v, mask_mod, score_mod, *, block_size=128, scale=0.125, kernel_options=None):
    """The StableHLO text of the forward lowered for CUDA."""
    mask_mod = mask_mod or fa.noop_mask
    score_mod = score_mod or fa.identity
    block_mask = fa.create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], BLOCK_SIZE=block_size)

    def forward(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices):
        return pallas_triton.attention(
            q,
            k,
            v,
            score_mod=score_mod,
            mask_mod=mask_mod,
            kv_num_blocks=kv_num_blocks,
            kv_indices=kv_indices,
            full_kv_num_blocks=full_kv_num_blocks,
            full_kv_indices=full_kv_indices,
            block_size=block_mask.BLOCK_SIZE,
            scale=scale,
            kernel_options=kernel_options,
        )

    args = (
        q,
        k,
        v,
        block_mask.kv_num_blocks,
        block_mask.kv_indices,
        block_mask.full_kv_num_blocks,
        block_mask.full_kv_indices,
    )
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=_H100)):
        lowered = jax.jit(forward).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert "__gpu$xla.gpu.triton" in text
    return text


@pytest.mark.parametrize("case", MOD_CASES, ids=repr)
def test_every_mod_lowers_for_cuda(case):
    # Realistic tiles (the bf16 defaults: 128 x 64) on a small problem.
    B, Hq, Hkv, L, S = 2, 4, 2, 256, 200
    q, k, v = random_qkv(0, B=B, Hq=Hq, Hkv=Hkv, L=L, S=S, E=64, Ev=64, dtype=jnp.bfloat16)
    mask_mod, score_mod = case.build(B, Hq, L, S, 0)
    _lower_for_cuda(q, k, v, mask_mod, score_mod)


@pytest.mark.parametrize(
    "dtype, head_dim, value_dim",
    [(jnp.float32, 128, 128), (jnp.float16, 256, 256), (jnp.bfloat16, 48, 80)],
    ids=["f32-128", "f16-256", "bf16-48-80"],
)
def test_dtypes_and_head_dims_lower_for_cuda(dtype, head_dim, value_dim):
    q, k, v = random_qkv(1, B=1, Hq=2, Hkv=1, L=256, S=256, E=head_dim, Ev=value_dim, dtype=dtype)
    _lower_for_cuda(q, k, v, fa.causal_mask, fa.tanh_softcap(20.0))


def test_dense_boolean_mask_lowers_for_cuda():
    # A captured boolean array (create_block_mask_from_dense's mask_mod reads it) reaches the kernel as a ref.
    q, k, v = random_qkv(2, B=1, Hq=2, Hkv=2, L=128, S=128, E=64, Ev=64, dtype=jnp.bfloat16)
    dense = jax.random.bernoulli(jax.random.key(3), 0.5, (128, 128))
    block_mask = fa.create_block_mask_from_dense(dense, BLOCK_SIZE=64)
    _lower_for_cuda(q, k, v, block_mask.mask_mod, None, block_size=64)
