"""The pallas_triton kernels lower to Triton for CUDA, on this machine without a GPU, for every mod of the library.

Lowering catches unsupported primitives, non-power-of-two values and dtype mismatches; it does not run Triton's own
compilation to PTX, which the gpu-marked tests exercise.
"""

import re

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


@pytest.mark.parametrize("L", [256, 1], ids=["prefill", "decode"])
def test_key_and_value_of_batch_one_lower_for_cuda_without_copies(L):
    """The forward kernels (prefill and decode) read key and value of batch 1 for every query batch: the lowered
    module takes them as they are and makes no [B, ...] copy."""
    q, _, _ = random_qkv(3, B=3, Hq=4, Hkv=2, L=L, S=200, E=64, Ev=64, dtype=jnp.bfloat16)
    _, k, v = random_qkv(4, B=1, Hq=4, Hkv=2, L=L, S=200, E=64, Ev=64, dtype=jnp.bfloat16)
    text = _lower_for_cuda(q, k, v, fa.causal_mask, None, block_size=(L, 128))
    assert not re.search(r"broadcast_in_dim.*-> tensor<3x2x200x64xbf16>", text)


def test_dense_boolean_mask_lowers_for_cuda():
    # A captured boolean array (create_block_mask_from_dense's mask_mod reads it) reaches the kernel as a ref.
    q, k, v = random_qkv(2, B=1, Hq=2, Hkv=2, L=128, S=128, E=64, Ev=64, dtype=jnp.bfloat16)
    dense = jax.random.bernoulli(jax.random.key(3), 0.5, (128, 128))
    block_mask = fa.create_block_mask_from_dense(dense, BLOCK_SIZE=64)
    _lower_for_cuda(q, k, v, block_mask.mask_mod, None, block_size=64)


def _loop_bodies(ttir: str) -> list[list[str]]:
    """The lines of each scf.for body in a Triton IR text (nested loops inside included in their parent's)."""
    lines = ttir.splitlines()
    bodies = []
    for n, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            end = next(m for m in range(n + 1, len(lines))
                       if lines[m].lstrip().startswith("}") and len(lines[m]) - len(lines[m].lstrip()) == indent)
            bodies.append(lines[n + 1 : end])
    return bodies


def _tile_loads_fed_by_scalar_loads(body: list[str]) -> list[str]:
    """The tensor loads of a loop body whose address derives from a scalar load of the same iteration."""
    defs = {}
    for line in body:
        match = re.match(r"\s*(%[\w]+)(?::\d+)? = (.*)", line)
        if match:
            defs[match.group(1)] = match.group(2)

    def from_scalar_load(value: str, seen: set) -> bool:
        if value in seen or value not in defs:  # defined outside the body: loop-invariant or carried
            return False
        seen.add(value)
        op = defs[value]
        if op.startswith("tt.load") and re.search(r": !tt\.ptr<", op):
            return True
        return any(from_scalar_load(v.split("#")[0], seen) for v in re.findall(r"%[\w#]+", op))

    return [op for op in defs.values() if op.startswith("tt.load") and ": tensor<" in op
            and from_scalar_load(re.findall(r"%[\w]+", op)[0], set())]


def _triton_modules(monkeypatch, fn, *args) -> dict[str, str]:
    """The Triton IR text of every kernel that lowering ``fn(*args)`` for an (abstract) H100 produces, by name."""
    from jax._src.pallas.triton import lowering

    captured = {}
    lower = lowering.lower_jaxpr_to_triton_module

    def recording(jaxpr, *lower_args, **kwargs):
        result = lower(jaxpr, *lower_args, **kwargs)
        captured[jaxpr.debug_info.func_name] = result.module.operation.get_asm()
        return result

    monkeypatch.setattr(lowering, "lower_jaxpr_to_triton_module", recording)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), (), abstract_device=_H100)):
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return captured


def _alibi_causal_grad(L=512):
    """jax.grad of a loss through the forward, dK/dV and dQ kernels (ALiBi, causal), and its arguments."""
    q, k, v = random_qkv(0, B=1, Hq=2, Hkv=2, L=L, S=L, E=64, Ev=64, dtype=jnp.bfloat16)
    block_mask = fa.create_block_mask(fa.causal_mask, None, None, L, L)

    def loss(q, k, v):
        out, _ = pallas_triton.attention(
            q, k, v, score_mod=fa.generate_alibi_bias(2), mask_mod=fa.causal_mask,
            kv_num_blocks=block_mask.kv_num_blocks, kv_indices=block_mask.kv_indices,
            full_kv_num_blocks=block_mask.full_kv_num_blocks, full_kv_indices=block_mask.full_kv_indices,
            block_size=block_mask.BLOCK_SIZE, scale=0.125,
        )
        return jnp.sum(out.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2)), (q, k, v)


def test_walks_address_their_tiles_by_a_carried_start(monkeypatch):
    """Triton's pipeliner overlaps a walk's tile loads with the compute only if their addresses do not come from a
    load of the same step (benchmarks/NOTES.md section 26): in the forward, dK/dV and dQ kernels, every tile load in
    a loop is addressed by a value carried from the step before (or invariant), never by this step's index load."""
    grad, args = _alibi_causal_grad()
    captured = _triton_modules(monkeypatch, grad, *args)
    assert {"flex_attention_forward", "flex_attention_dkdv", "flex_attention_dq"} <= set(captured)
    for name, ttir in captured.items():
        bodies = _loop_bodies(ttir)
        assert bodies and all(any(": tensor<" in line and "tt.load" in line for line in body) for body in bodies), name
        for body in bodies:
            assert _tile_loads_fed_by_scalar_loads(body) == [], name


def test_kernels_exponentiate_an_fma_with_the_flush_to_zero_instruction(monkeypatch):
    """Every exp2 of a tile in the forward, dK/dV, dQ and decoding kernels is PTX's ex2.approx.ftz.f32, never
    libdevice's __nv_exp2f, which XLA links without flush-to-zero (three more instructions per score; NOTES.md
    section 28); its argument, score * scale - shift, is PTX's fma.rn.f32, which XLA would not contract from a
    multiply and a subtract (section 29), and so is ALiBi's slope * distance + score in the forward."""
    grad, args = _alibi_causal_grad()
    captured = _triton_modules(monkeypatch, grad, *args)
    q, k, v = random_qkv(1, B=2, Hq=4, Hkv=2, L=1, S=512, E=64, Ev=64, dtype=jnp.bfloat16)
    bm = fa.create_block_mask(fa.noop_mask, None, None, 1, 512)

    def decode(q, k, v):  # one query: the split-KV decoding kernel
        return pallas_triton.attention(
            q, k, v, score_mod=fa.identity, mask_mod=fa.noop_mask, kv_num_blocks=bm.kv_num_blocks,
            kv_indices=bm.kv_indices, full_kv_num_blocks=bm.full_kv_num_blocks, full_kv_indices=bm.full_kv_indices,
            block_size=bm.BLOCK_SIZE, scale=0.125,
        )

    captured |= _triton_modules(monkeypatch, decode, q, k, v)
    assert {"flex_attention_forward", "flex_attention_dkdv", "flex_attention_dq"} <= set(captured)
    assert any("decode" in name for name in captured), sorted(captured)
    for name, ttir in captured.items():
        assert "ex2.approx.ftz.f32" in ttir, name
        # (ALiBi's own scalar exp2 of its slope stays the user's: only tiles are checked.)
        assert re.search(r'"__nv_exp2f"\} : \(tensor<', ttir) is None, name
        assert "fma.rn.f32" in ttir, name
    # The forward's two walks (partial and full blocks) have three each: the scores', the row sums' and ALiBi's
    # (its product of the slope and the distance, used by the sum alone); the correction is exp2 of a difference of
    # two stored shifts, no FMA (benchmarks/NOTES.md section 44). Decoding: two each.
    assert captured["flex_attention_forward"].count("fma.rn.f32") == 6
    assert [ttir.count("fma.rn.f32") for name, ttir in captured.items() if "decode" in name] == [4]
