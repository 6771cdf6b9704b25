"""Linear layers: PyTorch's `F.linear` (MKL sgemm on a plain weight) beside oneDNN on a prepacked weight
(`engines.onednn`) and, for a decode step's few rows, the small-batch kernel on the plain weight
(`engines.small_linear`), on SmolLM2-135M's shapes, in the same process.

    .venv/bin/python benchmarks/bench_linear.py [--threads 2] [--rows 1 8 128 1000]

Prints, per row count: the 30 layers' 7 matmuls (weights streamed from memory, as in a decode step),
the 49k x 576 output head alone, and the ratios (F.linear / packed; packed / kernel, the kernel on the
path it takes here: AVX2 unless SKILLFOLD_SMALL_LINEAR=avx512). Where the CPU has AVX-512, a second
table times the kernel's two paths side by side (AVX2 / AVX-512, `small_linear.WIDE`). Random fp32
weights of the model's shapes; the numbers are timing only (the results agree to ~1e-6 relative;
tests/unit/test_onednn.py and test_small_linear.py check the outputs).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from engines import small_linear

HIDDEN, INTERMEDIATE, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN), (INTERMEDIATE, HIDDEN),
          (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]  # q, k, v, o, gate, up, down: (out, in)


def timed(call, repeats: int) -> float:
    for _ in range(2):
        call()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - started) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 128, 1000])
    parser.add_argument("--repeats", type=int, default=10)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    layers = [[torch.randn(shape) for shape in SHAPES] for _ in range(LAYERS)]
    head = torch.randn(VOCAB, HIDDEN)
    pack = torch.ops.mkldnn._reorder_linear_weight

    def packed_linear(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")

    packed_layers = [[pack(weight, 8) for weight in layer] for layer in layers]
    packed_head = pack(head, 8)
    kernel = small_linear.available()
    print(f"torch {torch.__version__}, {arguments.threads} threads, fp32, small-batch kernel: "
          f"{'built' if kernel else 'not available here'}")
    print("| rows | 30 layers F.linear ms | packed ms | ratio | kernel ms | packed/kernel "
          "| head F.linear ms | packed ms | ratio | kernel ms | packed/kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for rows in arguments.rows:
        narrow, wide = torch.randn(rows, HIDDEN), torch.randn(rows, INTERMEDIATE)

        def run(linear, weights, narrow=narrow, wide=wide):
            for layer in weights:
                for index, weight in enumerate(layer):
                    linear(wide if index == 6 else narrow, weight)

        plain = timed(lambda: run(F.linear, layers), arguments.repeats)
        packed = timed(lambda: run(packed_linear, packed_layers), arguments.repeats)
        head_plain = timed(lambda x=narrow: F.linear(x, head), arguments.repeats)
        head_packed = timed(lambda x=narrow: packed_linear(x, packed_head), arguments.repeats)
        if kernel and rows <= small_linear.ROWS:
            ours = timed(lambda: run(small_linear.linear, layers), arguments.repeats)
            head_ours = timed(lambda x=narrow: small_linear.linear(x, head), arguments.repeats)
            layers_kernel = f"{ours:.1f} | **{packed / ours:.2f}x**"
            head_kernel = f"{head_ours:.1f} | **{head_packed / head_ours:.2f}x**"
        else:
            layers_kernel = head_kernel = "- | -"
        print(f"| {rows} | {plain:.1f} | {packed:.1f} | **{plain / packed:.2f}x** | {layers_kernel} | "
              f"{head_plain:.1f} | {head_packed:.1f} | **{head_plain / head_packed:.2f}x** | {head_kernel} |")
    if kernel and small_linear.wide_available():
        chosen = small_linear.WIDE  # put back after each row count's pair of timings
        print("\nThe kernel's paths, same weights (`small_linear.WIDE` False: AVX2, True: AVX-512):")
        print("| rows | 30 layers AVX2 ms | AVX-512 ms | ratio | head AVX2 ms | AVX-512 ms | ratio |")
        print("|---|---|---|---|---|---|---|")
        for rows in [count for count in arguments.rows if count <= small_linear.ROWS]:
            narrow, wide = torch.randn(rows, HIDDEN), torch.randn(rows, INTERMEDIATE)
            times = {}
            for path in (False, True):  # interleaved per row count, so both see the same machine
                small_linear.WIDE = path
                times[path] = (timed(lambda n=narrow, w=wide: run(small_linear.linear, layers, n, w), arguments.repeats),
                               timed(lambda x=narrow: small_linear.linear(x, head), arguments.repeats))
            small_linear.WIDE = chosen
            (layers_avx2, head_avx2), (layers_avx512, head_avx512) = times[False], times[True]
            print(f"| {rows} | {layers_avx2:.1f} | {layers_avx512:.1f} | **{layers_avx2 / layers_avx512:.2f}x** | "
                  f"{head_avx2:.2f} | {head_avx512:.2f} | **{head_avx2 / head_avx512:.2f}x** |")


if __name__ == "__main__":
    main()
