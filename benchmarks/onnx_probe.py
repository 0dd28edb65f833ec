"""Probe: can jax2onnx convert the AnoCLIP path and bank scoring (issue 16, item 5)? Prints what blocks it.

    pip install jax2onnx onnx onnxruntime && pip install orbax-checkpoint==0.12.8
    PYTHONPATH=. python benchmarks/onnx_probe.py

(jax2onnx 0.17.1 pins orbax-checkpoint<0.11.37 and downgrades it; this project needs >=0.12, hence the second
install: the probe runs with 0.12.8, but no `[onnx]` extra can hold both pins.)

Found (jax2onnx 0.17.1, onnxruntime 1.32.0, jax 0.10.2):
  * `platform_index`, the primitive of `jax.lax.platform_dependent` in clip/attention.py `attend` (the CPU
    kernel chosen per platform), has no jax2onnx lowering: it blocks every path through the CLIP towers;
  * AnoCLIP's 3x3 replicate mean filter (postprocess.mean_filter, `jnp.pad(mode="edge")`) converts to a graph
    onnxruntime refuses (Concat shape inference: declared dim 2, inferred 4);
  * a symbolic batch: jax2onnx's `jnp.full` calls int() on the symbolic dimension (methods/anoclip.py,
    `jnp.full(valid.shape, -1)`); a fixed batch gets past it.

Tiny random CLIP at 32 px, batch 2 (random weights: the numbers only compare ONNX with JAX, they mean nothing).
Each case is converted as the library computes it; where that fails, the probe names the operation, then
tries again with the blocker stepped around *in this script only* (attention's platform-dependent CPU kernel
replaced by its portable formula; AnoCLIP's 3x3 mean filter switched off) to show what else would block.
"""

from __future__ import annotations

import dataclasses
import glob
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import fiseclip_jax as fj
import fiseclip_jax.clip.attention as attention
from fiseclip_jax import methods
from fiseclip_jax.data import load_image
from fiseclip_jax.export.program import build_program

jax.config.update("jax_default_matmul_precision", "float32")
S, B = 32, 2


def case(name, method, bank=None):
    params, cfg, _ = fj.resolve_weights("random:tiny")
    text = fj.text_features_full(params, cfg, "bottle", method.prompts)
    prog, args, state = build_program(params, cfg, method, S, text, bank)

    def fn(pixels):
        scores, maps, _, _ = prog(args, pixels, jnp.ones(pixels.shape[0], bool), state)
        return scores, maps

    return name, fn


def convert(name, fn, shape):
    from jax2onnx import to_onnx
    import onnxruntime as ort

    px = np.random.RandomState(0).randn(B, S, S, 3).astype(np.float32)
    ref = [np.asarray(a) for a in jax.jit(fn)(px)]  # before conversion: jax2onnx patches flax modules
    try:
        model = to_onnx(fn, [shape])
        sess = ort.InferenceSession(model.SerializeToString())
        out = sess.run(None, {sess.get_inputs()[0].name: px})
        diff = [float(np.abs(np.asarray(a) - b).max()) for a, b in zip(out, ref)]
        print(f"{name} {shape}: converts; onnxruntime vs JAX max |diff| scores {diff[0]:.2e}, maps {diff[1]:.2e}")
    except Exception as err:  # noqa: BLE001 -- the probe reports whatever stops the conversion
        last = traceback.extract_tb(err.__traceback__)
        ours = [f for f in last if "/fiseclip_jax/" in f.filename]
        where = f" (at {ours[-1].filename.split('/fiseclip_jax/')[-1]}:{ours[-1].lineno})" if ours else ""
        print(f"{name} {shape}: BLOCKED {type(err).__name__}: {str(err).splitlines()[0][:240]}{where}")


def main():
    params, cfg, _ = fj.resolve_weights("random:tiny")
    fise = fj.FiSeCLIPConfig(fusion_norm="fixed", image_score="max", text_filter="share")
    goods = sorted(glob.glob("/work/shared/data/mvtec_ad/bottle/train/good/*.png"))[:4]
    pixels = fj.preprocess([load_image(p) for p in goods], S) if goods else \
        np.random.RandomState(1).randn(4, S, S, 3).astype(np.float32)
    bank = fj.build_bank(params, cfg, pixels, fj.text_features_full(params, cfg, "bottle", fise.prompts), fise,
                         capacity=6)
    print("as the library computes it:")
    convert(*case("anoclip", methods.get("anoclip")), ("B", S, S, 3))
    convert(*case("anoclip", methods.get("anoclip")), (B, S, S, 3))
    convert(*case("bank (fiseclip)", fise, bank), (B, S, S, 3))
    print("with attention's lax.platform_dependent replaced by its portable branch (this script only):")
    attention.jax.lax.platform_dependent = lambda *a, default, **kw: default(*a)
    jax.clear_caches()  # jitted functions traced above keep the platform-dependent kernel otherwise
    convert(*case("anoclip", methods.get("anoclip")), (B, S, S, 3))
    convert(*case("anoclip, mean_filter=1", dataclasses.replace(methods.get("anoclip"), mean_filter=1)),
            (B, S, S, 3))
    convert(*case("bank (fiseclip)", fise, bank), (B, S, S, 3))


if __name__ == "__main__":
    main()
