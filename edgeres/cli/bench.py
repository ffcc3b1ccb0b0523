"""Timing and comparison commands: `edgeres bench`, `edgeres compare`."""
from __future__ import annotations

import click

from edgeres.cli._common import DATA_DIR, emit, ints, json_option
from edgeres.cli.types import FiniteFloat
from edgeres.errors import ConfigError
from edgeres.memory import check_artifact
from edgeres.quantize import load_quantized
from edgeres.verify import format_layerwise, layerwise

BACKENDS = ("torch", "onnxruntime", "tensorrt", "openvino")
PROVIDERS = ("cpu", "cuda", "tensorrt")


@click.command()
@click.option("--engine", "path", required=True, type=click.Path(dir_okay=False),
              help="Artifact to time: .plan/.engine (TensorRT), .onnx (ONNX Runtime), .pt/.pth (PyTorch).")
@click.option("--batch", default="1", show_default=True, help="Batch size(s), comma-separated: 1,8,32.")
@click.option("--iterations", type=click.IntRange(1), default=None,
              help="Timed iterations (alone: exactly N; with --duration: at least N).")
@click.option("--duration", type=FiniteFloat(0, min_open=True), default=None,
              help="Seconds to time each batch size for, at least (default 3 s and 10 iterations, like trtexec).")
@click.option("--warmup", type=FiniteFloat(0), default=0.2, show_default=True,
              help="Warm-up seconds before timing (not recorded).")
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads (ONNX Runtime / torch).")
@click.option("--backend", type=click.Choice(BACKENDS), default=None,
              help="Run on this backend (chosen by suffix otherwise; an .onnx also runs on openvino).")
@click.option("--provider", "providers", type=click.Choice(PROVIDERS), multiple=True,
              help="ONNX Runtime execution provider(s), in order of preference (default cpu).")
@click.option("--device", default="cpu", show_default=True, help="For .pt/.pth checkpoints: cpu or cuda[:N].")
@click.option("--input-shape", default=None, help="C,H,W when the model does not say (dynamic ONNX sizes).")
@click.option("--samples", is_flag=True, help="With --json: include every latency sample.")
@json_option
def bench(path, batch, iterations, duration, warmup, threads, backend, providers, device, input_shape, samples,
          as_json) -> None:
    """Time an artifact the way trtexec does: throughput and latency percentiles per batch size."""
    from edgeres.bench import benchmark, format_bench

    shape = ints(input_shape, "--input-shape")
    if shape is not None and len(shape) != 3:
        raise click.BadParameter("expected C,H,W", param_hint="--input-shape")
    result = benchmark(path, batch_sizes=ints(batch, "--batch") or (1,), iterations=iterations,
                       duration_s=duration, warmup_s=warmup, threads=threads, input_shape=shape, backend=backend,
                       providers=providers or None, device=device)
    emit(result.to_dict(samples=samples), as_json, lambda: format_bench(result))


@click.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--dataset", default=None, help="Dataset to draw inputs from (preprocessed as artifact A says).")
@click.option("--data-dir", type=DATA_DIR, default=None, help="Where the dataset lives.")
@click.option("--split", default="test", show_default=True, help="Dataset split.")
@click.option("--limit", type=click.IntRange(1), default=None, help="At most this many samples.")
@click.option("--probe", type=click.Path(dir_okay=False), default=None,
              help="A .npz with x (float32 NCHW, preprocessed) and optionally y (labels).")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="CPU threads for each runner.")
@click.option("--layers", is_flag=True,
              help="A: an INT8 checkpoint (edgeres quantize), B: its INT8 ONNX. Compare every activation quantizer "
                   "(share of elements on a different INT8 step), on the first --limit inputs (default 8).")
@json_option
def compare(a, b, dataset, data_dir, split, limit, probe, batch_size, threads, layers, as_json) -> None:
    """Run artifacts A and B on the same inputs: |diff|, cosine similarity, top-1 agreement, accuracy.

    Inputs come from --probe, from --dataset, or else from the probe.npz of A's run folder.
    """
    from edgeres.compare import compare as run_compare
    from edgeres.compare import find_probe, format_compare, load_dataset_inputs, load_probe

    if probe and dataset:
        raise ConfigError("give either --probe or --dataset, not both")
    if dataset:
        x, y = load_dataset_inputs(a, dataset=dataset, data_dir=data_dir, split=split, limit=limit)
    else:
        probe = probe or find_probe(a)
        if probe is None:
            raise ConfigError("no inputs: give --probe FILE.npz or --dataset NAME (no probe.npz next to A)")
        x, y = load_probe(probe)
        if limit is not None:
            x, y = x[:limit], (y[:limit] if y is not None else None)
    if layers:
        if not str(b).lower().endswith(".onnx"):
            raise ConfigError("--layers compares an INT8 checkpoint (A) with its INT8 ONNX (B); B is not .onnx")
        check_artifact(a, batch=len(x[:limit or 8]))   # before the model is built
        rows = layerwise(load_quantized(a)[0], b, x[:limit or 8])
        if not rows:
            raise ConfigError(f"no activation quantizer of {a} matches a Q/DQ node of {b}: not its export?")
        emit({"a": a, "b": b, "samples": len(x[:limit or 8]), "layers": rows}, as_json,
             lambda: format_layerwise(rows))
        return
    result = run_compare(a, b, x, y, batch_size=batch_size, threads=threads)
    emit(result, as_json, lambda: format_compare(result))


COMMANDS = [bench, compare]
