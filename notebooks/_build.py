"""Writes the notebooks of this folder from the cell sources below, without outputs.

    python notebooks/_build.py           # rewrite every notebook
    python notebooks/_build.py --check   # exit 1 if a notebook differs from what this script writes

The notebooks are generated so that their code stays reviewable as Python and their cells stay in step with each
other (one install cell, one size switch). Edit the sources here, then rerun the script.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import textwrap

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
REPOSITORY = "flexattn-jax/flexattn_jax"
# The JAX release the package is developed and tested with; on a Colab GPU runtime it comes with its CUDA wheels.
JAX_VERSION = "0.11.2"


def colab_badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/{REPOSITORY}/blob/main/notebooks/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def md(text: str) -> nbformat.NotebookNode:
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str) -> nbformat.NotebookNode:
    """A code cell; a line `SIZE_SWITCH` in `text` becomes the size switch every notebook shares."""
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip().replace("SIZE_SWITCH", SIZE_SWITCH.strip()))


def install_cell(extras: str, needs_repository: bool = False) -> nbformat.NotebookNode:
    """On Colab, installs the package from GitHub with `extras`; elsewhere the environment already has it.

    With `needs_repository`, it also clones the repository and works in it, for files the package does not ship.
    """
    lines = [
        "# On Colab: install flexattn_jax from GitHub (and JAX's CUDA wheels on a GPU runtime). Elsewhere: nothing to do.",
        "import sys",
        "",
        'if "google.colab" in sys.modules:',
        "    import os, shutil, subprocess" if needs_repository else "    import shutil, subprocess",
        "",
        '    jax_wheels = "jax[cuda12]" if shutil.which("nvidia-smi") else "jax"',
        "    subprocess.run(",
        f'        [sys.executable, "-m", "pip", "install", "-q", f"{{jax_wheels}}=={JAX_VERSION}",',
        f'         "flexattn_jax[{extras}] @ git+https://github.com/{REPOSITORY}"],',
        "        check=True,",
        "    )",
    ]
    if needs_repository:
        lines += [
            "    # This notebook also reads files of the repository that the package does not ship.",
            '    if not os.path.isdir("flexattn_jax/.git"):',
            f'        subprocess.run(["git", "clone", "--depth", "1", "https://github.com/{REPOSITORY}"], check=True)',
            '    os.chdir("flexattn_jax")',
        ]
    return nbformat.v4.new_code_cell("\n".join(lines))


# The size switch every notebook starts with: small sizes on a CPU (CI runs the notebooks there), real ones on a GPU.
SIZE_SWITCH = """
GPU = jax.default_backend() == "gpu"
SMALL = not GPU  # small sizes on a CPU (and in CI), realistic ones on a GPU
"""

# ------------------------------------------------------------------------------------------------- 01 quickstart

QUICKSTART = [
    md(f"""
    # flexattn_jax quickstart

    {colab_badge("01_quickstart")}

    FlexAttention for JAX: an attention variant is a tiny Python function,

    ```python
    def score_mod(score, b, h, q_idx, kv_idx): ...   # returns a new score
    def mask_mod(b, h, q_idx, kv_idx): ...           # returns True where q_idx may attend to kv_idx
    ```

    and `flex_attention` runs it: as block-sparse Pallas kernels on a GPU, skipping the blocks the mask rules out,
    and as a dense reference elsewhere. This notebook runs four variants (causal, sliding window, causal within packed
    documents, and ALiBi), draws each mask and its block map, checks each result against the reference and, on a GPU,
    times it against `jax.nn.dot_product_attention`.

    On a CPU the notebook runs at small sizes in seconds; on a GPU runtime (Colab: *Runtime > Change runtime type*) it
    uses realistic ones.
    """),
    install_cell("notebooks"),
    code("""
    import time

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np

    import flexattn_jax as fa
    from flexattn_jax import viz

    SIZE_SWITCH
    if SMALL:
        B, H, L, D, BLOCK, DTYPE = 1, 4, 512, 32, 32, jnp.float32
    else:
        B, H, L, D, BLOCK, DTYPE = 1, 16, 4096, 64, 128, jnp.bfloat16
    print(f"flexattn_jax {fa.__version__}, JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    print(f"B={B}, H={H}, L=S={L}, D={D}, {jnp.dtype(DTYPE).name}, BLOCK_SIZE={BLOCK}")

    key_q, key_k, key_v = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(key_q, (B, H, L, D), DTYPE)
    k = jax.random.normal(key_k, (B, H, L, D), DTYPE)
    v = jax.random.normal(key_v, (B, H, L, D), DTYPE)
    """),
    md("""
    ## Four attention variants

    Each variant is a `mask_mod` (which positions attend) and optionally a `score_mod` (what is added to the scores).
    The document mask closes over an array of document ids, one per token, as when several documents are packed
    into one sequence; ALiBi adds `slope_h * (kv_idx - q_idx)` to every score.
    """),
    code("""
    def document_ids(length, proportions=(2, 6, 4, 8, 3, 5, 4)):
        # Seven packed documents whose lengths are in these proportions.
        bounds = np.round(np.cumsum((0,) + proportions) / sum(proportions) * length).astype(int)
        return jnp.asarray(np.repeat(np.arange(len(proportions)), np.diff(bounds)), jnp.int32)


    def variants(length):
        # name -> (mask_mod, score_mod) for sequences of `length` tokens.
        return {
            "causal": (fa.causal_mask, None),
            "sliding window": (fa.sliding_window_mask(length // 8), None),
            "document (causal)": (fa.and_masks(fa.causal_mask, fa.document_mask(document_ids(length))), None),
            "ALiBi (causal)": (fa.causal_mask, fa.generate_alibi_bias(H)),
        }
    """),
    md("""
    ## The masks and their block maps

    Top: each mask element by element (`fa.create_mask` at 64 positions, allowed positions dark). Bottom: the
    `BlockMask` that `fa.create_block_mask` builds at the full length: the kernels visit *full* blocks (black) without
    evaluating the mask, apply the mask inside *partial* blocks (grey) and skip the rest (white).
    """),
    code("""
    PICTURE = 64  # positions a side in the element pictures
    block_masks = {
        name: fa.create_block_mask(mask_mod, None, None, L, L, BLOCK_SIZE=BLOCK)
        for name, (mask_mod, _) in variants(L).items()
    }

    fig, axes = plt.subplots(2, 4, figsize=(15, 7.5))
    for column, (name, (mask_mod, _)) in enumerate(variants(PICTURE).items()):
        element_mask = fa.create_mask(mask_mod, None, None, PICTURE, PICTURE)[0, 0]
        viz.plot_mask(element_mask, ax=axes[0, column], title=f"{name}: {PICTURE} positions")
        block_mask = block_masks[name]
        viz.plot_block_mask(
            block_mask, ax=axes[1, column], title=f"L={L}: {block_mask.sparsity():.0f}% of blocks skipped"
        )
    fig.tight_layout()
    plt.show()
    """),
    md("""
    A `BlockMask` prints its block map as text too: `█` full, `▒` partial, `·` skipped. It is a pytree, so it can be
    passed to a jitted function and replaced by another of the same shape without recompiling.
    """),
    code("""
    print(block_masks["document (causal)"].to_string(grid_size=32, limit=1))
    """),
    md("""
    ALiBi is a `score_mod`: called on zero scores with index arrays, it draws the bias it adds. Every head has its own
    slope, so the heads see different distances.
    """),
    code("""
    alibi = fa.generate_alibi_bias(H)
    positions = jnp.arange(PICTURE, dtype=jnp.int32)
    causal_picture = fa.create_mask(fa.causal_mask, None, None, PICTURE, PICTURE)[0, 0]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, head in zip(axes, (0, H // 2, H - 1)):
        bias = alibi(jnp.zeros((PICTURE, PICTURE)), jnp.int32(0), jnp.int32(head), positions[:, None], positions[None, :])
        image = ax.imshow(np.where(causal_picture, bias, np.nan), cmap="viridis")
        ax.set(title=f"ALiBi bias, head {head}", xlabel="kv_idx", ylabel="q_idx")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    plt.show()
    """),
    md("""
    ## flex_attention, checked against the reference

    `flex_attention` takes the `score_mod` and the `BlockMask`. We compare its output with two others:
    `implementation="reference"`, the dense `vmap` reference that defines the semantics (on a CPU it is also the
    default, so there the two agree exactly), and a plain softmax attention written out below with the dense mask and
    bias arrays. The relative error is `||out - expected|| / ||expected||`.
    """),
    code("""
    flex = jax.jit(fa.flex_attention, static_argnames=("score_mod", "implementation"))


    def plain_attention(q, k, v, mask, bias=0.0):
        # softmax(q k^T / sqrt(D) + bias, where allowed) v, with the whole score matrix in memory, in float32.
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
        scores = jnp.einsum("bhld,bhsd->bhls", q, k, precision="highest") / np.sqrt(q.shape[-1]) + bias
        scores = jnp.where(mask, scores, -jnp.inf)
        return jnp.einsum("bhls,bhsd->bhld", jax.nn.softmax(scores, axis=-1), v, precision="highest")


    def relative_error(out, expected):
        out, expected = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (out, expected))
        return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))


    TOLERANCE = 2e-5 if DTYPE == jnp.float32 else 1e-2  # the library's error contract for the inputs' dtype
    index = jnp.arange(L, dtype=jnp.int32)
    dense_bias = {"ALiBi (causal)": fa.alibi_slopes(H)[:, None, None] * (index[None, :] - index[:, None]).astype(jnp.float32)}

    outputs = {}
    print(f"{'variant':<20} {'vs reference':>13} {'vs plain attention':>19}")
    for name, (mask_mod, score_mod) in variants(L).items():
        out = flex(q, k, v, score_mod=score_mod, block_mask=block_masks[name])
        reference = flex(q, k, v, score_mod=score_mod, block_mask=block_masks[name], implementation="reference")
        plain = plain_attention(q, k, v, fa.create_mask(mask_mod, None, None, L, L), dense_bias.get(name, 0.0))
        errors = relative_error(out, reference), relative_error(out, plain)
        print(f"{name:<20} {errors[0]:>13.1e} {errors[1]:>19.1e}")
        assert max(errors) < TOLERANCE, (name, errors)
        outputs[name] = out
    print(f"all within {TOLERANCE:.0e}")
    """),
    md("""
    ## Gradients

    `flex_attention` is differentiable, with respect to the inputs and to any array a `score_mod` closes over. Here
    the ALiBi slopes become a parameter (`fa.alibi_bias(slopes)`), and the gradient reaches them through the mod.
    """),
    code("""
    def loss(q, k, v, slopes, implementation=None):
        out = fa.flex_attention(
            q, k, v, score_mod=fa.alibi_bias(slopes), block_mask=block_masks["causal"], implementation=implementation
        )
        return jnp.mean(out.astype(jnp.float32) ** 2)


    slopes = fa.alibi_slopes(H)
    gradients = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, slopes)
    expected = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnames="implementation")(
        q, k, v, slopes, implementation="reference"
    )
    for name, gradient, reference in zip(("dq", "dk", "dv", "dslopes"), gradients, expected):
        error = relative_error(gradient, reference)
        print(f"{name:<8} shape {str(gradient.shape):<18} relative error {error:.1e}")
        assert error < TOLERANCE, (name, error)
    """),
    md("""
    ## Timing against `jax.nn.dot_product_attention`

    On a GPU, each variant is timed beside `jax.nn.dot_product_attention` given the same mask in the form it accepts
    (`is_causal`, `local_window_size`, or dense mask and bias arrays). Throughput counts only the allowed positions:
    `4·B·H·L·S·D·density` FLOPs.
    """),
    code("""
    def time_ms(fn, *args, repeats=20):
        jax.block_until_ready(fn(*args))  # compile and warm up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))


    def dot_product_attention(q, k, v, bias, mask, is_causal, window):
        # jax.nn takes [B, L, H, D]; flexattn_jax takes PyTorch's [B, H, L, D].
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, bias, mask, is_causal=is_causal, local_window_size=window)
        return out.transpose(0, 2, 1, 3)


    dot_product_attention = jax.jit(dot_product_attention, static_argnames=("is_causal", "window"))


    def benchmark():
        window = L // 8
        jax_nn_arguments = {  # (bias, mask, is_causal, window)
            "causal": (None, None, True, None),
            "sliding window": (None, None, True, (window - 1, 0)),
            "document (causal)": (None, fa.create_mask(variants(L)["document (causal)"][0], None, None, L, L), False, None),
            "ALiBi (causal)": (dense_bias["ALiBi (causal)"][None].astype(DTYPE), None, True, None),
        }
        print(f"{'variant':<20} {'density':>8} {'flex ms':>8} {'TFLOP/s':>8} {'jax.nn ms':>10} {'TFLOP/s':>8} {'difference':>11}")
        for name, (mask_mod, score_mod) in variants(L).items():
            density = float(jnp.mean(fa.create_mask(mask_mod, None, None, L, L)))
            flops = 4 * B * H * L * L * D * density
            flex_ms = time_ms(lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_masks[name]), q, k, v)
            bias, mask, is_causal, window_size = jax_nn_arguments[name]
            jax_nn_ms = time_ms(lambda q, k, v: dot_product_attention(q, k, v, bias, mask, is_causal, window_size), q, k, v)
            # The two compute the same attention: their outputs differ by rounding only.
            difference = relative_error(dot_product_attention(q, k, v, bias, mask, is_causal, window_size), outputs[name])
            print(f"{name:<20} {density:>8.3f} {flex_ms:>8.2f} {flops / flex_ms / 1e9:>8.1f} "
                  f"{jax_nn_ms:>10.2f} {flops / jax_nn_ms / 1e9:>8.1f} {difference:>11.1e}")


    if GPU:
        benchmark()
    else:
        print("No GPU: the timing is skipped (on a CPU both run dense XLA code, so it would say little).")
        print("Open this notebook on a GPU runtime to see it.")
    """),
    md("""
    ## Coming from `jax.nn.dot_product_attention`

    `fa.dot_product_attention` takes `jax.nn.dot_product_attention`'s arguments and its `[B, L, H, D]` layout, and
    runs them through `flex_attention`: `mask`, `is_causal`, `local_window_size` and the sequence lengths become one
    BlockMask (so the blocks they rule out are skipped), a `bias` becomes a score_mod. A model written against
    jax.nn swaps the function and keeps its arguments.
    """),
    code("""
    q_blhd, k_blhd, v_blhd = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    window = (L // 8 - 1, 0)
    ours = jax.jit(fa.dot_product_attention, static_argnames=("is_causal", "local_window_size"))(
        q_blhd, k_blhd, v_blhd, is_causal=True, local_window_size=window
    )
    theirs = jax.nn.dot_product_attention(
        *(x.astype(jnp.float32) for x in (q_blhd, k_blhd, v_blhd)), is_causal=True, local_window_size=window
    )
    error = relative_error(ours, theirs)
    print(f"sliding window through fa.dot_product_attention: relative error {error:.1e} against jax.nn's")
    assert error < TOLERANCE
    """),
    md("""
    ## Next

    * `02_gallery.ipynb`: every mod of the library, with its formula, picture and sparsity, and ways to combine them.
    * `03_training.ipynb`: a Flax transformer trained with document masking and a learned relative-position bias.
    * `04_performance.ipynb`: the benchmark results beside PyTorch FlexAttention and cuDNN.
    """),
]

# ---------------------------------------------------------------------------------------------------- 02 gallery

GALLERY = [
    md(f"""
    # The mod gallery

    {colab_badge("02_gallery")}

    Every mod of `flexattn_jax.mods`, with its formula (the first line of its docstring), a picture, and how many
    blocks a `BlockMask` of it skips. Then: combining masks with `and_masks` and `or_masks`, and a `BlockMask` built
    from a dense boolean mask and converted back.
    """),
    install_cell("notebooks"),
    code("""
    import inspect
    import textwrap

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    from IPython.display import Markdown, display

    import flexattn_jax as fa
    from flexattn_jax import mods, viz

    SIZE_SWITCH
    # L and BLOCK give the sparsity figures; the pictures show PICTURE positions a side.
    L, BLOCK = (1024, 64) if SMALL else (8192, 128)
    H, PICTURE = 4, 48
    print(f"sparsity at L=S={L} with blocks of {BLOCK}; pictures of {PICTURE} positions; H={H}")
    """),
    md("""
    ## Every mod

    Each entry names a mod of the library, an example use at length `n`, and what kind it is. The check after the
    table makes sure the gallery covers all of `flexattn_jax.mods.__all__`.
    """),
    code("""
    def document_ids(n, proportions=(2, 6, 4, 8, 3, 5, 4)):
        # Seven packed documents whose lengths are in these proportions.
        bounds = np.round(np.cumsum((0,) + proportions) / sum(proportions) * n).astype(int)
        return jnp.asarray(np.repeat(np.arange(len(proportions)), np.diff(bounds)), jnp.int32)


    relative_table = jax.random.normal(jax.random.key(0), (H, 2 * 8 + 1))  # distances up to 8

    # name in mods.__all__ -> (example at length n, its source text)
    MASK_MODS = {
        "noop_mask": (lambda n: fa.noop_mask, "noop_mask"),
        "causal_mask": (lambda n: fa.causal_mask, "causal_mask"),
        "sliding_window_mask": (lambda n: fa.sliding_window_mask(n // 8), "sliding_window_mask(n // 8)"),
        "prefix_lm_mask": (lambda n: fa.prefix_lm_mask(n // 4), "prefix_lm_mask(n // 4)"),
        "document_mask": (lambda n: fa.document_mask(document_ids(n)), "document_mask(ids), 7 documents"),
        "dilated_mask": (lambda n: fa.dilated_mask(3), "dilated_mask(3)"),
        "and_masks": (lambda n: fa.and_masks(fa.causal_mask, fa.dilated_mask(3)), "and_masks(causal_mask, dilated_mask(3))"),
        "or_masks": (  # the strided pattern of the Sparse Transformer (Child et al., 2019)
            lambda n: fa.or_masks(fa.sliding_window_mask(n // 8), fa.and_masks(fa.causal_mask, fa.dilated_mask(n // 8))),
            "or_masks(sliding_window_mask(n // 8), and_masks(causal_mask, dilated_mask(n // 8)))",
        ),
    }
    SCORE_MODS = {
        "identity": (fa.identity, "identity"),
        "causal": (fa.causal, "causal"),
        "rel_bias": (fa.rel_bias, "rel_bias"),
        "rel_causal": (fa.rel_causal, "rel_causal"),
        "generate_alibi_bias": (fa.generate_alibi_bias(H), "generate_alibi_bias(H)"),
        "alibi_slopes": (fa.alibi_bias(fa.alibi_slopes(H)), "alibi_bias(alibi_slopes(H))"),
        "alibi_bias": (fa.alibi_bias(jnp.linspace(1.0, 0.1, H)), "alibi_bias(slopes), slopes = linspace(1, 0.1, H)"),
        "tanh_softcap": (fa.tanh_softcap(4.0), "tanh_softcap(4.0)"),
        "relative_position_bias": (fa.relative_position_bias(relative_table), "relative_position_bias(table [H, 17])"),
        "compose": (fa.compose(fa.tanh_softcap(4.0), fa.rel_bias), "compose(tanh_softcap(4.0), rel_bias)"),
    }
    missing = set(mods.__all__) - set(MASK_MODS) - set(SCORE_MODS)
    assert not missing, f"the gallery lacks {sorted(missing)}"


    def formula(name):
        # The first line of the mod's docstring, as the cell of a Markdown table.
        return inspect.getdoc(getattr(mods, name)).splitlines()[0].replace("``", "`").replace("|", r"\\|")


    def title(ax, text):
        ax.set_title("\\n".join(textwrap.wrap(text, 40)), fontsize=9)
    """),
    md("""
    ### mask_mods

    Each picture is `fa.create_mask` at 48 positions (allowed positions dark). The table gives the fraction of
    positions allowed and the share of blocks a `BlockMask` at length `L` skips: the work the kernels save.
    """),
    code("""
    fig, axes = plt.subplots(2, 4, figsize=(15, 8))
    rows = []
    for ax, (name, (build, example)) in zip(axes.flat, MASK_MODS.items()):
        viz.plot_mask(fa.create_mask(build(PICTURE), None, None, PICTURE, PICTURE)[0, 0], ax=ax)
        title(ax, example)
        block_mask = fa.create_block_mask(build(L), None, None, L, L, BLOCK_SIZE=BLOCK)
        density = float(jnp.mean(fa.create_mask(build(L), None, None, L, L)))
        rows.append(f"| `{name}` | `{example}` | {formula(name)} | {density:.3f} | {block_mask.sparsity():.1f}% |")
    fig.tight_layout()
    plt.show()
    display(Markdown("| mod | example | formula | positions allowed | blocks skipped |\\n|---|---|---|---|---|\\n"
                     + "\\n".join(rows)))
    """),
    md("""
    ### score_mods

    A score_mod rewrites each score. Called on zero scores, an additive mod draws the bias it adds (head 0 here;
    white where it gives `-inf`). `tanh_softcap` does not add a bias but bounds the scores, so its picture is the
    curve `score -> cap·tanh(score/cap)`. A score_mod never lets the kernels skip a block: `causal` as a score_mod
    gives the same output as `causal_mask` but computes every block, where a causal `BlockMask` skips about half.
    """),
    code("""
    positions = jnp.arange(PICTURE, dtype=jnp.int32)
    fig, axes = plt.subplots(2, 5, figsize=(18, 7.5))
    rows = []
    for ax, (name, (score_mod, example)) in zip(axes.flat, SCORE_MODS.items()):
        if name == "tanh_softcap":
            scores = jnp.linspace(-12, 12, 200)
            ax.plot(scores, score_mod(scores, 0, 0, 0, 0), label="4·tanh(score/4)")
            ax.plot(scores, scores, "--", color="grey", label="score")
            ax.set(xlabel="score", ylim=(-12, 12))
            ax.legend()
        else:
            zeros = jnp.zeros((PICTURE, PICTURE))
            bias = score_mod(zeros, jnp.int32(0), jnp.int32(0), positions[:, None], positions[None, :])
            image = ax.imshow(np.where(np.isfinite(bias), bias, np.nan), cmap="viridis")
            fig.colorbar(image, ax=ax, shrink=0.7)
            ax.set(xlabel="kv_idx", ylabel="q_idx")
        title(ax, example)
        rows.append(f"| `{name}` | `{example}` | {formula(name)} |")
    fig.tight_layout()
    plt.show()
    display(Markdown("| mod | example | formula |\\n|---|---|---|\\n" + "\\n".join(rows)))
    """),
    md("""
    ## Combining masks

    `and_masks` allows a position when every mask allows it, `or_masks` when any does. Below: causal attention within
    documents (`and_masks(causal_mask, document_mask(ids))`), and a non-causal local window plus a few global tokens
    that see and are seen by everyone: `or_masks(sliding_window_mask(w, causal=False), global_tokens)`, where
    `global_tokens` is a mask_mod of our own, four lines of Python.
    """),
    code("""
    def global_tokens(b, h, q_idx, kv_idx):
        # The first four tokens attend everywhere and are attended from everywhere.
        del b, h
        return (q_idx < 4) | (kv_idx < 4)


    document = fa.document_mask(document_ids(PICTURE))
    window = fa.sliding_window_mask(PICTURE // 8, causal=False)
    combinations = [
        ("causal_mask", fa.causal_mask),
        ("document_mask(ids)", document),
        ("and_masks(causal, document)", fa.and_masks(fa.causal_mask, document)),
        ("sliding_window_mask(6, causal=False)", window),
        ("global_tokens", global_tokens),
        ("or_masks(window, global_tokens)", fa.or_masks(window, global_tokens)),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for ax, (name, mask_mod) in zip(axes.flat, combinations):
        viz.plot_mask(fa.create_mask(mask_mod, None, None, PICTURE, PICTURE)[0, 0], ax=ax, title=name)
    fig.tight_layout()
    plt.show()

    combined = fa.create_block_mask(
        fa.or_masks(fa.sliding_window_mask(L // 8, causal=False), global_tokens), None, None, L, L, BLOCK_SIZE=BLOCK
    )
    print(combined.to_string(grid_size=32, limit=1))
    """),
    md("""
    ## From a dense mask to a BlockMask, and back

    Some patterns come as a boolean array rather than a formula. `create_block_mask_from_dense` builds the `BlockMask`
    of one; its `mask_mod` reads the array, so attention is exactly the array's. Here: a local band, the first
    eight keys seen by every query, and a few random blocks, in the manner of BigBird. `convert_block_mask_to_mask`
    goes back from the block map to positions, each visited block expanded to its `BLOCK x BLOCK` positions: a
    superset of the mask.
    """),
    code("""
    DENSE_L, DENSE_BLOCK = (256, 32) if SMALL else (2048, 128)
    rng = np.random.default_rng(0)
    i, j = np.arange(DENSE_L)[:, None], np.arange(DENSE_L)[None, :]
    blocks = DENSE_L // DENSE_BLOCK
    random_blocks = rng.random((blocks, blocks)) < 0.15
    dense = (np.abs(i - j) < DENSE_BLOCK // 2) | (j < 8) | np.kron(random_blocks, np.ones((DENSE_BLOCK, DENSE_BLOCK), bool))
    dense = jnp.asarray(dense)

    block_mask = fa.create_block_mask_from_dense(dense, BLOCK_SIZE=DENSE_BLOCK)
    back = fa.convert_block_mask_to_mask(block_mask.to_dense().astype(bool), DENSE_BLOCK, DENSE_BLOCK)[0, 0, :DENSE_L, :DENSE_L]
    recovered = fa.create_mask(block_mask.mask_mod, None, None, DENSE_L, DENSE_L)[0, 0]

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.5))
    viz.plot_mask(dense, ax=axes[0], title="dense mask")
    viz.plot_block_mask(block_mask, ax=axes[1], title=f"its BlockMask: {block_mask.sparsity():.0f}% skipped")
    viz.plot_mask(back, ax=axes[2], title="back: visited blocks as positions")
    fig.tight_layout()
    plt.show()

    assert bool(jnp.all(recovered == dense)), "the BlockMask's mask_mod is the dense mask"
    assert bool(jnp.all(back | ~dense)), "every allowed position lies in a visited block"
    print(f"allowed positions: {float(dense.mean()):.3f}; positions in visited blocks: {float(back.mean()):.3f}")
    """),
    md("""
    Attention with this `BlockMask` equals attention with the dense mask applied to the scores:
    """),
    code("""
    key_q, key_k, key_v = jax.random.split(jax.random.key(1), 3)
    q, k, v = (jax.random.normal(key, (1, 2, DENSE_L, 32)) for key in (key_q, key_k, key_v))
    out = fa.flex_attention(q, k, v, block_mask=block_mask)
    scores = jnp.einsum("bhld,bhsd->bhls", q, k, precision="highest") / np.sqrt(32)
    expected = jnp.einsum("bhls,bhsd->bhld", jax.nn.softmax(jnp.where(dense, scores, -jnp.inf), axis=-1), v,
                          precision="highest")
    error = float(jnp.linalg.norm(out - expected) / jnp.linalg.norm(expected))
    print(f"relative error against dense masked attention: {error:.1e}")
    assert error < 2e-5
    """),
]

# ------------------------------------------------------------------------------------------------- 03 training

TRAINING = [
    md(f"""
    # Training a transformer with flex attention

    {colab_badge("03_training")}

    A small decoder-only transformer (Flax NNX, `flexattn_jax.flax.FlexMultiHeadAttention`) trained with optax on
    sequences that pack several documents back to back. Two things make its attention *flex*:

    * **document masking**: a token attends causally within its own document and never across a boundary,
      `and_masks(causal_mask, document_mask(ids))`, where `ids` differs from one batch row to the next;
    * **a learned relative-position bias**: every layer has a table `[heads, 2·max_distance + 1]`, an `nnx.Param`,
      and its score_mod `relative_position_bias(table)` adds `table[h, clip(q_idx - kv_idx)]` to each score. The
      score_mod captures a traced array, so the gradient of the loss flows through the attention into the table.

    The model, the data and the training step are those of `examples/train_transformer.py` in the repository; this
    notebook imports them, trains, plots the loss and looks at the gradient and the learned tables. On a CPU it
    trains a tiny model in seconds; on a GPU runtime a larger one.
    """),
    install_cell("notebooks", needs_repository=True),
    code("""
    import pathlib
    import sys

    import jax
    import jax.numpy as jnp
    import matplotlib.pyplot as plt
    import numpy as np
    import optax
    from flax import nnx

    import flexattn_jax as fa
    from flexattn_jax import viz

    # examples/ is not part of the package: find the repository around this notebook (or the clone the install cell
    # made) and import the example from it.
    ROOT = next(p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / "examples" / "train_transformer.py").is_file())
    sys.path.insert(0, str(ROOT / "examples"))
    import train_transformer as example

    SIZE_SWITCH
    if SMALL:
        config, STEPS = example.Config(), 500
    else:
        config, STEPS = example.Config(seq_len=512, batch_size=16, max_symbols=16, model_dim=256, num_heads=4,
                                       num_kv_heads=2, num_layers=4, max_distance=32), 1000
    print(f"flexattn_jax {fa.__version__}, JAX {jax.__version__} on {jax.devices()[0].device_kind}")
    print(config)
    """),
    md("""
    ## The data: copy documents, packed

    Each document is `[BOS, s1 .. sk, SEP, s1 .. sk]`: k random symbols, a separator, and the same symbols again.
    The first k symbols cannot be predicted; the copy after `SEP` can, by a model that looks back to the right place
    in its own document. Documents are packed into rows of `seq_len` tokens, so boundaries fall anywhere, and
    `document_ids` says which document each token belongs to. The loss counts only targets inside the input's
    document (`weights`).
    """),
    code("""
    batch = example.make_batch(np.random.default_rng(0), config)
    print("tokens      ", batch.inputs[0, :40])
    print("document ids", batch.document_ids[0, :40])
    print("weights     ", batch.weights[0, :40].astype(int))
    """),
    md("""
    The mask of the first two rows, element by element (first 64 positions) and as the `BlockMask` the attention
    layer builds at the full length. The layer builds one block map per batch row: it finds in the mask_mod's
    program that the mask reads `b` (the document ids differ from row to row); `mask_varies=("batch",)` would ask for
    the same explicitly.
    """),
    code("""
    ids = jnp.asarray(batch.document_ids)
    mask_mod = fa.and_masks(fa.causal_mask, fa.document_mask(ids))
    block_size = 16 if SMALL else 128  # the layer uses the default 128; smaller blocks draw a finer map of a short row
    block_mask = fa.create_block_mask(mask_mod, 2, None, config.seq_len, config.seq_len, BLOCK_SIZE=block_size)
    elements = fa.create_mask(mask_mod, 2, None, config.seq_len, config.seq_len)

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    for row in range(2):
        viz.plot_mask(elements[row, 0, :64, :64], ax=axes[2 * row], title=f"row {row}: first 64 positions")
        viz.plot_block_mask(block_mask, batch=row, ax=axes[2 * row + 1], title=f"row {row}: blocks of {block_size}")
    fig.tight_layout()
    plt.show()
    print(f"blocks skipped in these two rows: {block_mask.sparsity():.0f}%")
    """),
    md("""
    ## The gradient reaches the bias tables

    Before training, one gradient of the loss with respect to every parameter. The tables start at zero; their
    gradient is not: it comes through the score_mod, inside `flex_attention`. A finite difference of the loss along
    the gradient's direction confirms it.
    """),
    code("""
    model = example.Transformer(config, rngs=nnx.Rngs(0))
    loss, grads = nnx.jit(nnx.value_and_grad(example.loss_fn))(model, batch)
    table_grads = [np.asarray(grads["blocks"][layer]["relative_bias"][...]) for layer in range(config.num_layers)]
    for layer, table_grad in enumerate(table_grads):
        print(f"layer {layer}: d loss / d table has shape {table_grad.shape}, norm {np.linalg.norm(table_grad):.2e}")
        assert np.isfinite(table_grad).all() and np.abs(table_grad).max() > 0

    # The derivative of the loss along u = g / |g| is |g|: check it with a central difference in the first layer.
    g = jnp.asarray(table_grads[0])
    u = g / jnp.linalg.norm(g)
    table = model.blocks[0].relative_bias
    compiled_loss = nnx.jit(example.loss_fn)


    def loss_with_table(value):
        table[...] = value
        return float(compiled_loss(model, batch))


    eps = 1e-2
    original = table[...]
    finite_difference = (loss_with_table(original + eps * u) - loss_with_table(original - eps * u)) / (2 * eps)
    table[...] = original
    print(f"directional derivative: autodiff {float(jnp.linalg.norm(g)):.4e}, finite difference {finite_difference:.4e}")
    assert abs(finite_difference - float(jnp.linalg.norm(g))) < 0.05 * float(jnp.linalg.norm(g))
    """),
    md("""
    ## Training

    Adam on fresh batches, with `example.train_step` (an `nnx.jit`-compiled step: the loss, its gradient, the
    update).
    """),
    code("""
    import time

    rng = np.random.default_rng(1)
    model = example.Transformer(config, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(config.learning_rate), wrt=nnx.Param)
    losses = []
    start = time.perf_counter()
    for step in range(STEPS):
        losses.append(float(example.train_step(model, optimizer, example.make_batch(rng, config))))
        if step % (STEPS // 5) == 0 or step == STEPS - 1:
            print(f"step {step:5d}  loss {losses[-1]:.3f}")
    print(f"{STEPS} steps in {time.perf_counter() - start:.1f} s")
    """),
    md("""
    Two lines for scale: `ln(13)`, a uniform guess among the 13 symbols, and the floor no model can pass. A
    document of k symbols has 2k + 1 weighted targets, and the k symbols before `SEP` are random, so the best
    possible loss is about `E[k] / (2 E[k] + 1) · ln(13)` (a little more, since where `SEP` comes is random too).
    """),
    code("""
    window = max(1, STEPS // 50)
    smoothed = np.convolve(losses, np.ones(window) / window, mode="valid")
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(losses, alpha=0.3, label="loss per step")
    ax.plot(np.arange(window - 1, STEPS), smoothed, label=f"mean of {window} steps")
    uniform = np.log(config.vocab_size - example.FIRST_SYMBOL)
    mean_k = (config.min_symbols + config.max_symbols) / 2
    ax.axhline(uniform, color="grey", ls="--", label="uniform guess among the symbols")
    ax.axhline(mean_k / (2 * mean_k + 1) * uniform, color="grey", ls=":", label="floor: the random symbols")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="training loss")
    ax.legend()
    plt.show()
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.3, "the loss did not fall"
    """),
    md("""
    ## What the bias tables learned

    Each row is a head, each column a distance `q_idx - kv_idx` (0 is the token itself, positive the past,
    distances beyond `max_distance` share the end columns). The causal mask hides the future, so the negative
    columns get no gradient and keep their zero start. To copy, a token after `SEP` must look back k + 1
    positions, k between `min_symbols` and `max_symbols`: the heads learn to favour those distances.
    """),
    code("""
    distances = np.arange(-config.max_distance, config.max_distance + 1)
    fig, axes = plt.subplots(1, config.num_layers, figsize=(5 * config.num_layers, 3), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        table = np.asarray(model.blocks[layer].relative_bias[...])
        limit = np.abs(table).max()
        image = ax.imshow(table, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
                          extent=(distances[0] - 0.5, distances[-1] + 0.5, config.num_heads - 0.5, -0.5))
        ax.set(title=f"layer {layer}", xlabel="q_idx - kv_idx", ylabel="head")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    plt.show()
    """),
]

# ------------------------------------------------------------------------------------------------ 04 performance

PERFORMANCE = [
    md(f"""
    # Performance

    {colab_badge("04_performance")}

    How fast `flex_attention` runs on a GPU, beside PyTorch FlexAttention and cuDNN, in *density-adjusted* TFLOP/s:
    a mask that allows a fraction `density` of the (query, key) pairs is credited with `4·B·H·L·S·D·density` FLOPs
    forward, and 3.5 times that forward+backward (the backward counted as 2.5 forwards). Skipping masked blocks thus
    shows as speed: a kernel that computed every block of a 10%-dense mask would score a tenth of its full rate.

    The numbers come from the benchmark suite in `benchmarks/`, which runs each mask through flexattn_jax,
    PyTorch FlexAttention, PyTorch SDPA and `jax.nn.dot_product_attention` (cuDNN and XLA) in one process, checks
    every output against the first implementation that ran before its time counts, and saves everything in
    `results.json`. This notebook plots the GPU results kept in the repository as `benchmarks/results.json`, which
    keeps every run, each cell from the newest run that measured it; the last section says how to produce them again.
    """),
    install_cell("notebooks,benchmarks", needs_repository=True),
    code("""
    import json
    import os
    import pathlib
    import subprocess
    import sys
    import tempfile

    import jax
    import matplotlib.pyplot as plt
    import numpy as np
    from IPython.display import Markdown, display

    SIZE_SWITCH

    # The repository's root: the notebook's parent folder in a checkout, or the clone the install cell made.
    ROOT = next(p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents) if (p / "benchmarks" / "run.py").is_file())
    sys.path.insert(0, str(ROOT))
    from benchmarks import history
    from benchmarks import run as benchmark

    RESULTS_FILE = ROOT / "benchmarks" / "results.json"
    print(f"repository: {ROOT}; this runtime: {jax.devices()[0].device_kind}")


    def run_benchmark(*arguments):
        # python -m benchmarks.run in a process of its own, quietly; returns the results.json it writes.
        out = pathlib.Path(tempfile.mkdtemp())
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "benchmarks.run", *arguments, "--out", str(out)]
        finished = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        if finished.returncode != 0:
            raise RuntimeError(f"the benchmark failed:\\n{finished.stderr[-3000:]}")
        return json.loads((out / "results.json").read_text())
    """),
    md("""
    ## The saved results

    The cell below reads `benchmarks/results.json`. Where the repository has no saved results yet, it produces
    data of the same form on the spot: the benchmark's `--tiny` smoke run (B=1, H=2, L=S=128, D=16, a few seconds,
    only the implementations this runtime has), whose numbers show how the notebook reads the file and nothing
    about speed.
    """),
    code("""
    MASKS = ["noop", "causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap", "per_head"]

    if RESULTS_FILE.is_file():
        data = json.loads(RESULTS_FILE.read_text())
        source = f"saved results, {RESULTS_FILE.relative_to(ROOT)}"
    else:
        data = run_benchmark("--tiny", "--no-torch", "--suite", "prefill", "--cases", ",".join(MASKS))
        source = "no saved results: a --tiny run made just now, its numbers say nothing about speed"

    context, ceilings = data["context"], data["ceilings"]
    print(source)
    if "runs" in data:
        # The saved file keeps every run (benchmarks.history); each cell is shown from the newest run that measured it.
        results = history.latest(data)
        used = sorted({r["run"] for r in results})
        print(f"  {len(data['runs'])} runs kept; each cell from the newest run that measured it (runs {used}, "
              "as numbered in benchmarks/RESULTS.md); the newest run:")
    else:
        results = data["results"]
    for key in ("date", "device", "backend", "jax", "torch", "triton", "command", "dtype", "flop_model", "timing"):
        if key in context:
            print(f"  {key:<10} {context[key]}")
    print(f"  measured ceilings: bf16 matmul {ceilings['matmul_tflops']:.3g} TFLOP/s, copy {ceilings['copy_gbps']:.3g} GB/s")
    """),
    md("""
    The benchmark's own tables (`benchmark.markdown`, the same as its `results.md`): forward / forward+backward
    TFLOP/s per mask and implementation, with each output's relative error against the first implementation of its
    row in brackets.
    """),
    code("""
    display(Markdown(benchmark.markdown(results, context, ceilings)))
    """),
    md("""
    ## TFLOP/s per mask

    One chart per shape: a group of bars per mask, a bar per implementation (`flexattn_jax:pallas_triton` is the
    library's Triton kernel, `flexattn_jax:reference` the dense reference, `torch:flex_attention` PyTorch
    FlexAttention, `jax.nn:cudnn` cuDNN through `jax.nn.dot_product_attention` with dense mask and bias arrays where
    it cannot express the mask otherwise). A missing bar: the implementation cannot express that mask (cuDNN and
    soft-capping, SDPA and anything but noop and causal), failed, or was not run.
    """),
    code("""
    def label_of(implementation):
        return {
            "torch:flex_attention": "PyTorch FlexAttention",
            "torch:sdpa": "PyTorch SDPA",
            "jax.nn:cudnn": "jax.nn cuDNN",
            "jax.nn:xla": "jax.nn XLA",
        }.get(implementation, implementation)


    def plot_shape(rows, shape):
        cases = [c for c in MASKS if any(r["case"] == c for r in rows)] + sorted({r["case"] for r in rows} - set(MASKS))
        implementations = list(dict.fromkeys(r["implementation"] for r in rows if "implementation" in r))
        fig, axes = plt.subplots(1, 2, figsize=(16, 4.5), sharey=True)
        width = 0.8 / len(implementations)
        x = np.arange(len(cases))
        for ax, (key, direction) in zip(axes, (("forward_tflops", "forward"), ("fwd_bwd_tflops", "forward+backward"))):
            for number, implementation in enumerate(implementations):
                heights = [
                    next((r.get(key, np.nan) for r in rows if r["case"] == case and r.get("implementation") == implementation
                          and "error" not in r), np.nan)
                    for case in cases
                ]
                bars = ax.bar(x + (number - (len(implementations) - 1) / 2) * width, heights, width,
                              label=label_of(implementation))
                ax.bar_label(bars, fmt="%.3g", fontsize=6, rotation=90, padding=2)
            ax.set_xticks(x, cases, rotation=20)
            ax.set_title(direction)
            ax.margins(y=0.15)
        axes[0].set_ylabel("TFLOP/s (density-adjusted)")
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        B, H, L, D = shape
        fig.suptitle(f"B={B}, H={H}, L=S={L}, D={D}, {context['dtype']}, {context['device']}")
        fig.tight_layout()
        plt.show()


    prefill = [r for r in results if r["suite"] == "prefill"]
    for shape in sorted({tuple(r["shape"]) for r in prefill}, key=lambda s: (-s[2], -s[3])):
        plot_shape([r for r in prefill if tuple(r["shape"]) == shape], shape)
    """),
    md("""
    ## Against PyTorch FlexAttention

    The same numbers as a ratio: each flexattn_jax kernel's TFLOP/s over PyTorch FlexAttention's on the same mask,
    shape and GPU, in the same run. The dashed line is the project's first target, 0.85 on every mask; above 1,
    flexattn_jax is the faster.
    """),
    code("""
    kernels = sorted({r["implementation"] for r in prefill
                      if r.get("implementation", "").startswith("flexattn_jax:") and not r["implementation"].endswith("reference")})
    has_torch = any(r.get("implementation") == "torch:flex_attention" and "error" not in r for r in prefill)
    if not kernels or not has_torch:
        print("These results have no " + ("PyTorch FlexAttention rows" if kernels else "flexattn_jax kernel rows")
              + ": the ratios need a GPU run with torch installed (see the last section).")
    else:
        shapes = sorted({tuple(r["shape"]) for r in prefill}, key=lambda s: (-s[2], -s[3]))
        fig, axes = plt.subplots(1, 2, figsize=(16, 4.5), sharey=True)
        series = [(kernel, shape) for kernel in kernels for shape in shapes]
        width = 0.8 / len(series)
        x = np.arange(len(MASKS))
        for ax, (key, direction) in zip(axes, (("forward_tflops", "forward"), ("fwd_bwd_tflops", "forward+backward"))):
            for number, (kernel, shape) in enumerate(series):
                def value(case, implementation):
                    row = next((r for r in prefill if r["case"] == case and r.get("implementation") == implementation
                                and tuple(r["shape"]) == shape and "error" not in r), {})
                    return row.get(key, np.nan)

                ratios = [value(case, kernel) / value(case, "torch:flex_attention") for case in MASKS]
                ax.bar(x + (number - (len(series) - 1) / 2) * width, ratios, width,
                       label=f"{kernel.split(':')[1]}, B={shape[0]} L={shape[2]} D={shape[3]}")
            ax.axhline(0.85, color="grey", ls="--")
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks(x, MASKS, rotation=20)
            ax.set_title(direction)
        axes[0].set_ylabel("flexattn_jax / PyTorch FlexAttention")
        axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
        fig.tight_layout()
        plt.show()
    """),
    md("""
    ## The anchors

    For reference, the figures the project measures itself against, taken on one NVIDIA H100 80GB HBM3 on
    2026-11-24 (jax 0.11.2, torch 2.11.0, triton 3.6.0), bf16, B=2, H=16, L=S=8192, D=128: PyTorch FlexAttention
    (`torch.compile(flex_attention)` with `create_block_mask`) and cuDNN (`jax.nn.dot_product_attention(
    implementation="cudnn")`, with dense mask and bias arrays where the mask is not causal or local). cuDNN cannot
    express soft-capping.
    """),
    code("""
    ANCHOR_MASKS = ["noop", "causal", "sliding_window", "prefix_lm", "document", "alibi", "softcap"]
    # TFLOP/s, (forward, forward+backward), in the order of ANCHOR_MASKS.
    ANCHORS = {
        "PyTorch FlexAttention": [(481, 423), (393, 368), (306, 263), (397, 369), (276, 233), (447, 411), (192, 190)],
        "jax.nn cuDNN": [(569, 522), (461, 464), (245, 278), (158, 163), (24, 26), (237, 194), (None, None)],
    }
    fig, axes = plt.subplots(1, 2, figsize=(15, 4), sharey=True)
    x = np.arange(len(ANCHOR_MASKS))
    for ax, (column, direction) in zip(axes, enumerate(("forward", "forward+backward"))):
        for number, (label, values) in enumerate(ANCHORS.items()):
            heights = [np.nan if v[column] is None else v[column] for v in values]
            bars = ax.bar(x + (number - 0.5) * 0.4, heights, 0.4, label=label)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(x, ANCHOR_MASKS, rotation=20)
        ax.set_title(direction)
    axes[0].set_ylabel("TFLOP/s (density-adjusted)")
    axes[1].legend(fontsize=8)
    fig.suptitle("The anchors (not flexattn_jax): B=2, H=16, L=S=8192, D=128, bf16, H100")
    fig.tight_layout()
    plt.show()
    """),
    md("""
    ## Rerunning the benchmark on a GPU

    From a clone of the repository, on a machine with a CUDA GPU, JAX with its CUDA wheels and (for the PyTorch
    columns) torch and triton installed:

    ```bash
    pip install -e ".[benchmarks]"
    PYTHONPATH=. python3 -m benchmarks.run
    ```

    It takes about 7 minutes (`--budget-s` bounds the prefill part; `--shapes`, `--cases` and `--suite` select a
    part, `--help` lists the rest), prints its tables, and writes `results.json`, `results.md` and `tflops.png` to
    `$OUT` if set, else to `benchmarks/out/`. `python -m benchmarks.history benchmarks/results.json
    benchmarks/out/results.json` adds it to the repository's record as the newest run; rerun this notebook to plot
    it. On Colab (a GPU runtime; PyTorch comes preinstalled), the cell below does the same when `RERUN` is set to
    `True`; it then plots the new results in place of the saved ones.
    """),
    code("""
    RERUN = False  # set to True on a GPU runtime to measure this GPU
    if RERUN and GPU:
        data = run_benchmark()  # about 7 minutes, silent until it ends
        context, ceilings, results = data["context"], data["ceilings"], data["results"]
        prefill = [r for r in results if r["suite"] == "prefill"]
        display(Markdown(benchmark.markdown(results, context, ceilings)))
        for shape in sorted({tuple(r["shape"]) for r in prefill}, key=lambda s: (-s[2], -s[3])):
            plot_shape([r for r in prefill if tuple(r["shape"]) == shape], shape)
    elif RERUN:
        print("No GPU on this runtime: Runtime > Change runtime type > GPU, then run the notebook again.")
    """),
]

NOTEBOOKS = {
    "01_quickstart": QUICKSTART,
    "02_gallery": GALLERY,
    "03_training": TRAINING,
    "04_performance": PERFORMANCE,
}


def build(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        # Colab opens the notebook on a GPU runtime.
        "accelerator": "GPU",
        "colab": {"provenance": []},
    }
    for number, cell in enumerate(cells):
        cell = nbformat.from_dict(dict(cell))
        cell.id = f"cell-{number:02d}"  # stable ids, so rebuilding changes nothing that did not change
        notebook.cells.append(cell)
    return notebook


def render(cells) -> str:
    return nbformat.writes(build(cells)) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report notebooks that differ, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        text = render(cells)
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
    if stale:
        print(f"out of date (run python notebooks/_build.py): {', '.join(stale)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
