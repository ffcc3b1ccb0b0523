"""INT8 quantization with NNCF, configured for TensorRT: post-training (PTQ) and quantization-aware (QAT).

The NNCF-for-TensorRT recipe:
- `nncf.quantize(..., preset=QuantizationPreset.PERFORMANCE)` (symmetric weights and activations), overflow fix
  off (that is a workaround for CPU VNNI kernels; TensorRT uses the full int8 range);
- afterwards every quantizer gets `signed = True`: NNCF makes post-ReLU activations unsigned (uint8), which
  TensorRT rejects; TensorRT accepts only int8 with zero-point 0;
- residual placement (a pass on the quantized model, after NNCF): NNCF quantizes *both* inputs of every
  residual Add. NVIDIA's placement wants a Q/DQ only on the shortcut input, none on the input coming
  straight from the conv branch, so that TensorRT fuses conv + add + relu. We delete that one quantizer
  hook from the NNCF model itself (not only from the ONNX file), so the fake-quant torch model, QAT and the
  exported ONNX compute the same thing.
- export in Q/DQ-pairs mode with the legacy (TorchScript) exporter: see edgeres.export.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from edgeres.checkpoint import load_weights, read_checkpoint, save_checkpoint
from edgeres.data import make_loader
from edgeres.device import describe as describe_device
from edgeres.device import is_cuda, resolve
from edgeres.dist import all_sum, init_dist, shard_of_global_batches
from edgeres.errors import BackendUnavailable, CheckpointError, ConfigError, DataError
from edgeres.fold import fold_batchnorm, has_batchnorm
from edgeres.io import atomic_write_json, rejected_path
from edgeres.loop import Step, sgd_steps
from edgeres.metrics import agreement_pct
from edgeres.nncf_kernels import prepare
from edgeres.nncf_patches import fast_calibration
from edgeres.progress import silenced
from edgeres.recipe import QuantCfg
from edgeres.records import StageRecord, StageResult, add_fp32_gates
from edgeres.settings import level_field, origins_field, read, recipe_default, setting

QUANT_FORMAT = "edgeres-nncf-int8-1"
MANIFEST_FORMAT = "edgeres-calibration-1"


class CalibMethod(str, Enum):
    """How activation ranges are estimated from the calibration images (NNCF range estimators)."""

    MINMAX = "minmax"              # global min / max (TensorRT's "max" calibrator)
    MEAN_MINMAX = "mean_minmax"    # mean over batches of the per-batch min / max
    PERCENTILE = "percentile"      # mean of per-batch quantiles (NNCF MEAN_QUANTILE), clips outliers
    HISTOGRAM = "histogram"        # MSE-style: range minimizing quantization error on a histogram

    @classmethod
    def parse(cls, value: str | CalibMethod) -> CalibMethod:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower().replace("-", "_"))
        except ValueError:
            raise ConfigError(f"unknown calibration method {value!r}; valid: "
                              f"{', '.join(m.value for m in cls)}") from None


# percentile (99.99th): on imagenette-mini its INT8 ONNX agreed with the fake-quant model more often than minmax
# (benchmarks/RESULTS.md); the recipe default and this one are the same value
DEFAULT_CALIB_METHOD = CalibMethod(QuantCfg.calib_method)


@dataclass(frozen=True)
class PTQResult:
    model: Any
    manifest: dict[str, Any]
    placement_changes: list[str] = field(default_factory=list)   # the residual-placement pass


@dataclass(frozen=True)
class QATResult:
    model: Any
    history: list[dict[str, float]]
    best_epoch: int = 0
    evaluation: Any = None     # EvalResult of the returned model on the evaluation set


def _nncf():
    os.environ.setdefault("NNCF_CI", "1")  # no telemetry
    try:
        import nncf
    except ImportError:
        raise BackendUnavailable("INT8 quantization needs NNCF: pip install 'edgeres[quant]'") from None
    import logging

    if logging.getLogger("nncf").level == logging.INFO:   # NNCF's default: its INFO chatter off (DEBUG is kept)
        nncf.set_log_level(logging.WARNING)

    prepare()   # its CPU kernels: edgeres's eager ones (NNCF's compiled C++ on request)
    return nncf



def _range_estimator(method: CalibMethod):
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet as R

    return {CalibMethod.MINMAX: R.MINMAX, CalibMethod.MEAN_MINMAX: R.MEAN_MINMAX,
            CalibMethod.PERCENTILE: R.MEAN_QUANTILE, CalibMethod.HISTOGRAM: R.HISTOGRAM}[method]


def fingerprint_dataset(dataset) -> str:
    """A cheap, stable id of a dataset: its length and a hash of a few of its samples."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(str(len(dataset)).encode())
    n = len(dataset)
    for i in sorted({0, n // 3, (2 * n) // 3, n - 1}) if n else []:
        x, y = dataset[i]
        h.update(np.asarray(x, dtype=np.float32).tobytes())
        h.update(str(int(y)).encode())
    return h.hexdigest()


def calibration_indices(n_available: int, subset_size: int, *, seed: int) -> list[int]:
    """`subset_size` distinct indices drawn with `seed` (sorted), or a DataError if there are too few."""
    if subset_size < 1:
        raise ConfigError(f"calibration subset size must be >= 1, got {subset_size}")
    if n_available < subset_size:
        raise DataError(f"calibration set has {n_available} images, asked {subset_size}")
    return sorted(random.Random(seed).sample(range(n_available), subset_size))


def _batches(dataset, indices: list[int], batch_size: int):
    import torch

    out = []
    for i in range(0, len(indices), batch_size):
        xs = [torch.as_tensor(dataset[j][0], dtype=torch.float32) for j in indices[i:i + batch_size]]
        out.append(torch.stack(xs))
    return out


def _nncf_version() -> str:
    try:
        import nncf

        return nncf.__version__
    except Exception:  # version lookup only, for the manifest
        return "unknown"


def quantizer_hooks(model) -> list[tuple[str, Any]]:
    """(hook name, quantizer module) for every NNCF hook in the model."""
    from nncf.torch.function_hook.wrapper import get_hook_storage

    return list(get_hook_storage(model).named_hooks(remove_duplicate=False))


def force_signed(model) -> int:
    """TensorRT takes only int8: make every quantizer signed (NNCF makes post-ReLU ones unsigned)."""
    n = 0
    for _, q in quantizer_hooks(model):
        if hasattr(q, "signed") and not q.signed:
            q.signed = True
            n += 1
    return n


def _residual_adds(graph):
    """(add node, conv-branch edge, shortcut edge) for each residual Add of an NNCF graph of the float model.
    The conv branch is the Add input with more convs on its path from the model input."""
    depth: dict[str, int] = {}
    out = []
    for node in graph.topological_sort():
        ins = graph.get_input_edges(node)
        d = max((depth.get(e.from_node.node_name, 0) for e in ins), default=0)
        depth[node.node_name] = d + (1 if node.node_type in ("conv2d", "conv1d", "conv3d") else 0)
        if node.metatype.__name__ != "PTAddMetatype":
            continue
        acts = [e for e in ins if "const" not in e.from_node.metatype.__name__.lower()]
        if len(acts) != 2:
            continue
        da, db = (depth.get(e.from_node.node_name, 0) for e in acts)
        if da == db:
            continue
        main, short = (acts[0], acts[1]) if da > db else (acts[1], acts[0])
        if main.from_node.node_type != "conv2d" or len(graph.get_output_edges(main.from_node)) != 1:
            continue
        out.append((node, main, short))
    return out


def _upstream_quantizer(graph, edge, by_key):
    """The nearest activation quantizer above `edge`, through single-input ops (slice, pad, ...)."""
    node, port = edge.from_node, edge.output_port_id
    for _ in range(16):
        q = by_key.get(("post_hooks", node.node_name, port))
        if q is not None:
            return q
        ins = [e for e in graph.get_input_edges(node) if "const" not in e.from_node.metatype.__name__.lower()]
        if len(ins) != 1:
            return None
        q = by_key.get(("pre_hooks", node.node_name, ins[0].input_port_id))
        if q is not None:
            return q
        node, port = ins[0].from_node, ins[0].output_port_id
    return None


def place_for_tensorrt(model, example_input) -> list[str]:
    """The residual pass on an NNCF-quantized model (NVIDIA's placement for residual Adds):
    remove the quantizer on the conv-branch input, and make sure the shortcut input has one (NNCF leaves
    none after a parameter-free slice+pad shortcut, where it reuses the quantizer above: we add a copy of
    that quantizer right at the Add, which is exact since slicing and zero-padding keep values on its grid).
    Returns a list of what was changed."""
    import copy

    from nncf.torch.function_hook.hook_storage import decode_hook_name
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph
    from nncf.torch.function_hook.wrapper import get_hook_storage

    storage = get_hook_storage(model)
    hooks = quantizer_hooks(model)
    # the graph of the model with its quantizers disabled = the float graph with the same op names
    saved = {name: q.enabled.clone() for name, q in hooks}
    for _, q in hooks:
        q.enabled[0] = 0
    try:
        graph = build_nncf_graph(model, example_input)
    finally:
        for name, q in hooks:
            q.enabled.copy_(saved[name])
    by_key = {decode_hook_name(name): q for name, q in hooks}
    names_by_key: dict[tuple, list[str]] = {}
    for name, _ in hooks:
        names_by_key.setdefault(decode_hook_name(name), []).append(name)
    changes = []
    for add, main, short in _residual_adds(graph):
        for key in (("post_hooks", main.from_node.node_name, main.output_port_id),
                    ("pre_hooks", add.node_name, main.input_port_id)):
            for name in names_by_key.get(key, []):
                storage.delete_hook(name)
                changes.append(f"removed {name}")
        has_short = ("post_hooks", short.from_node.node_name, short.output_port_id) in by_key or \
            ("pre_hooks", add.node_name, short.input_port_id) in by_key
        if not has_short:
            upstream = _upstream_quantizer(graph, short, by_key)
            if upstream is not None:
                storage.register_pre_function_hook(add.node_name, short.input_port_id, copy.deepcopy(upstream))
                changes.append(f"added pre_hooks.{add.node_name}__{short.input_port_id}")
    return changes


def quantize_ptq(model, calib_dataset, *, subset_size: int = QuantCfg.calib_size,
                 method: str | CalibMethod = DEFAULT_CALIB_METHOD,
                 seed: int = 0, batch_size: int = 32, manifest_path: str | Path | None = None,
                 dataset_fingerprint: str = "", fast_bias_correction: bool = True, quiet: bool = False,
                 fast: bool = True, device=None) -> PTQResult:
    """nncf.quantize (a copy of) the folded model with exactly `subset_size` calibration images, TensorRT-ready.

    `calib_dataset` yields (image tensor, label); images are taken at `calibration_indices(...)`. The manifest
    (dataset fingerprint, indices, method, seed, versions) is also written to `manifest_path` when given.
    `quiet` silences NNCF's own progress bars. `fast` (the default): NHWC statistics passes and the exact speed-ups
    of edgeres.nncf_patches; False runs NNCF exactly as it ships (benchmarks compare the two). `device`: where the
    statistics passes and bias correction run (edgeres.device.resolve; default the CPU here, as before).
    """
    method = CalibMethod.parse(method)
    indices = calibration_indices(len(calib_dataset), subset_size, seed=seed)
    nncf = _nncf()
    import copy

    import torch
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    dev = resolve(device or "cpu") if not isinstance(device, torch.device) else device
    batches = [b.to(dev) for b in _batches(calib_dataset, indices, batch_size)]
    model = copy.deepcopy(model).eval().to(dev)   # NNCF wraps the model in place: keep the caller's model intact
    if fast and batches and batches[0].ndim == 4:   # NHWC: oneDNN's (and cuDNN's) faster convolutions
        model = model.to(memory_format=torch.channels_last)
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.DISABLE,
        activations_range_estimator_params=_range_estimator(method),
        disable_bias_correction=not fast_bias_correction,
    )
    t0 = time.perf_counter()
    torch.manual_seed(seed)

    with silenced(quiet), fast_calibration() if fast else contextlib.nullcontext():
        qmodel = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                               preset=nncf.QuantizationPreset.PERFORMANCE, advanced_parameters=advanced)
    qmodel = qmodel.to(memory_format=torch.contiguous_format)   # checkpoints and exports as before
    changes = place_for_tensorrt(qmodel, batches[0][:1].contiguous())
    force_signed(qmodel)
    manifest = {
        "format": MANIFEST_FORMAT,
        "dataset_fingerprint": dataset_fingerprint or fingerprint_dataset(calib_dataset),
        "dataset_size": len(calib_dataset),
        "subset_size": subset_size,
        "indices": indices,
        "method": method.value,
        "seed": seed,
        "batch_size": batch_size,
        "preset": "performance",
        "fast_bias_correction": fast_bias_correction,
        "nncf_version": _nncf_version(),
        "torch_version": torch.__version__,
        "placement_changes": changes,
        "duration_s": round(time.perf_counter() - t0, 3),
        "device": str(dev),
    }

    if manifest_path is not None and init_dist().main:   # under torchrun every rank calibrates alike; rank 0 writes

        atomic_write_json(manifest_path, manifest)
    return PTQResult(model=qmodel.eval(), manifest=manifest, placement_changes=changes)


def _bar(it, desc: str, off: bool):
    if off:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="batch", leave=False)


QAT_LOSSES = ("kd", "kd+ce", "ce")


def qat_criterion(loss: str, temperature: float):
    """The QAT loss. kd: KL(teacher || student) of the softened distributions, x T^2 (the FP32 model's decisions are
    what QAT keeps); kd+ce: the mean of that and cross-entropy on the labels; ce: the labels only."""
    import torch
    import torch.nn.functional as F

    if loss not in QAT_LOSSES:
        raise ConfigError(f"unknown QAT loss {loss!r}; valid: {', '.join(QAT_LOSSES)}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ConfigError(f"QAT temperature must be a positive number, got {temperature}")
    ce = torch.nn.CrossEntropyLoss()
    t = float(temperature)

    def kd(logits, target):
        return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(target.float() / t, 1), reduction="batchmean",
                        log_target=True) * (t * t)

    if loss == "ce":
        return ce
    if loss == "kd":
        return lambda logits, labels, target: kd(logits, target)
    return lambda logits, labels, target: 0.5 * kd(logits, target) + 0.5 * ce(logits, labels)

def is_quantized_model(model) -> bool:
    """True for a model wrapped by NNCF with at least one quantizer (NNCF need not be imported otherwise)."""
    import sys

    if "nncf" not in sys.modules:
        return False
    from nncf.torch.function_hook.wrapper import is_wrapped

    return is_wrapped(model) and bool(quantizer_hooks(model))


def _kl(student, teacher) -> float:
    """Mean KL(teacher || student) at T=1 over rows (float64): the tie-break of QAT's selection."""
    import numpy as np

    def logp(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lt, ls = logp(teacher), logp(student)
    return float(np.mean(np.sum(np.exp(lt) * (lt - ls), 1))) if len(lt) else 0.0


@dataclass(frozen=True)
class _Selection:
    """How QAT judges an epoch on the held-out images: agreement with the FP32 teacher (then the KL to it), or
    without a teacher top-1 on the labels."""

    data: Any
    teacher_logits: Any = None

    def score(self, model) -> tuple[float, float, dict[str, float]]:
        from edgeres.evaluate import evaluate

        ev = evaluate(model, self.data, batch_size=256)
        if self.teacher_logits is None:
            return ev.top1, 0.0, {"holdout_top1": ev.top1}
        agree, kl = agreement_pct(ev.logits, self.teacher_logits), _kl(ev.logits, self.teacher_logits)
        return agree, -kl, {"holdout_top1": ev.top1, "holdout_agreement_pct": agree, "holdout_kl": kl}


def quantize_qat(ptq_model, train_dataset, select_dataset=None, *, epochs: int, lr: float = QuantCfg.qat_lr,
                 batch_size: int = 64, seed: int = 0, weight_decay: float = 0.0, teacher=None, loss: str | None = None,
                 temperature: float = 1.0, device=None, amp: bool = False, quiet: bool = False, log=None,
                 **_unused: Any) -> QATResult:
    """Fine-tune the fake-quant model (weights and quantizer scales learn), cosine LR, on `device`.

    `teacher` (the folded FP32 model) is distilled with `loss` (default: "kd" with a teacher, "ce" without).
    Selection on `select_dataset` (held-out TRAINING images, never the test split): epoch 0 is the PTQ model itself,
    and an epoch is kept only when its top-1 agreement with the teacher on those images is higher (ties: a lower KL
    to the teacher); without a teacher, holdout top-1. Without `select_dataset` the last epoch is kept.
    Under torchrun (WORLD_SIZE > 1) each process takes its share of every global batch of `batch_size`
    (`dist.shard_of_global_batches`): the same result as one process, up to float noise.
    """
    import copy

    import torch

    if epochs < 1:
        raise ConfigError(f"QAT needs epochs >= 1, got {epochs}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"QAT learning rate must be > 0, got {lr}")
    if len(train_dataset) == 0 or (select_dataset is not None and len(select_dataset) == 0):
        raise DataError("QAT needs a non-empty training set (and holdout, when one is given)")
    loss = loss or ("kd" if teacher is not None else "ce")
    if loss != "ce" and teacher is None:
        raise ConfigError(f"QAT loss {loss!r} distils the FP32 model: give its checkpoint (--teacher), or use ce")
    criterion = qat_criterion(loss, temperature)
    say = log or (lambda s: None if quiet else print(s, flush=True))
    dist = init_dist()
    dev = resolve(device) if not isinstance(device, torch.device) else device
    cuda = is_cuda(dev)
    model = copy.deepcopy(ptq_model).to(dev)   # the PTQ model stays as it is: the build keeps it as the ptq output
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    teach = None
    if teacher is not None:   # distilled (kd, kd+ce) and, whatever the loss, what selection agrees with
        teach = copy.deepcopy(teacher).to(dev).eval()
        for p in teach.parameters():
            p.requires_grad_(False)
    torch.manual_seed(seed)
    drop_last = len(train_dataset) > batch_size
    per_rank = batch_size // dist.world   # a batch that does not divide is refused by shard_of_global_batches

    def loader_for(epoch: int):
        # order and augmentation from (seed, epoch) alone, whatever epoch the dataset was last used at (training);
        # under torchrun this process's share of each global batch
        if dist.world == 1:
            return make_loader(train_dataset, batch_size=batch_size, shuffle=True, seed=seed, epoch=epoch,
                               drop_last=drop_last, device=dev)
        idx = shard_of_global_batches(len(train_dataset), batch_size, seed=seed, epoch=epoch, rank=dist.rank,
                                      world=dist.world, drop_last=drop_last)
        return make_loader(torch.utils.data.Subset(train_dataset, idx), batch_size=per_rank, shuffle=False,
                           epoch=epoch, device=dev)

    net = model
    if dist.world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if cuda else None)
    loader = loader_for(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    total = max(1, epochs * len(loader))

    def cosine(it: int) -> float:   # cosine annealing to 0 over every QAT step
        return lr * 0.5 * (1.0 + math.cos(math.pi * min(it, total) / total))

    def finite(step: Step) -> None:
        if not math.isfinite(step.loss.item()):
            raise DataError(f"QAT loss became {step.loss.item()} at step {step.iteration}; lower --lr")

    selection = None
    if select_dataset is not None:
        from edgeres.evaluate import evaluate

        ref = evaluate(teach, select_dataset, batch_size=256).logits if teach is not None else None
        selection = _Selection(select_dataset, ref)
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    best_epoch, best_key = 0, None
    history: list[dict[str, Any]] = [{"epoch": 0, "loss": None, "lr": lr}]
    if selection is not None:
        a, b, info = selection.score(model)
        best_key = (a, b)
        history[0].update(info)
        say(f"qat epoch 0 (ptq): {_describe(info)}")
    iteration = 0
    amp_on = bool(amp and cuda)
    for epoch in range(1, epochs + 1):
        loader = loader_for(epoch - 1)
        t0 = time.perf_counter()
        done = sgd_steps(net, _bar(loader, f"qat epoch {epoch}/{epochs}", quiet or log is not None or not dist.main),
                         opt, criterion=criterion, lr_at=cosine, iteration=iteration, on_step=finite, device=dev,
                         channels_last=cuda, amp=amp_on, amp_dtype=torch.bfloat16 if amp_on else None,
                         teacher=teach if loss != "ce" else None)
        seconds = time.perf_counter() - t0
        iteration += done.steps
        loss_sum, seen = all_sum([float(done.loss_sum), float(done.seen)], dev)
        row: dict[str, Any] = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "lr": cosine(iteration),
                               "images_per_s": round(seen / seconds, 1) if seconds > 0 else None}
        if selection is not None:
            a, b, info = selection.score(model)
            row.update(info)
            if (a, b) > best_key:
                best_key, best_epoch = (a, b), epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            best_epoch = epoch
        history.append(row)
        say(f"qat epoch {epoch}/{epochs}: loss {row['loss']:.4f} ({loss}) | {_describe(row)} | "
            f"{row['images_per_s'] or 0:.0f} img/s")
    if selection is not None:
        model.load_state_dict(best_state)
    model = model.to(memory_format=torch.contiguous_format)
    return QATResult(model=model.eval(), history=history, best_epoch=best_epoch)


def _describe(info: dict[str, Any]) -> str:
    parts = []
    if "holdout_agreement_pct" in info:
        parts.append(f"holdout agreement with FP32 {info['holdout_agreement_pct']:.2f}%")
    if "holdout_top1" in info:
        parts.append(f"holdout top1 {info['holdout_top1']:.2f}%")
    return ", ".join(parts) or "no holdout: the last epoch is kept"


VOLATILE_MANIFEST_KEYS = ("duration_s", "device")   # kept in calibration/manifest.json, not in the checkpoint


def save_quantized(path: str | Path, model, meta, *, mode: str | None = None,
                   manifest: dict[str, Any] | None = None) -> Path:
    """NNCF's supported mechanism: nncf.torch.get_config (where the quantizers sit) + the state_dict. The same
    model, mode and calibration manifest give the same bytes, whoever saves them (`build` or `edgeres quantize`)."""
    _nncf()
    from nncf.torch import get_config

    config = json.dumps(get_config(model), default=str)
    stable = {k: v for k, v in (manifest or {}).items() if k not in VOLATILE_MANIFEST_KEYS}
    info = {"format": QUANT_FORMAT, "nncf_config": config, "mode": mode,
            "manifest": json.dumps(stable, default=str, sort_keys=True)}
    return save_checkpoint(path, model.state_dict(), meta, quant=info)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The calibration manifest an INT8 checkpoint carries (without rebuilding the model)."""

    _, _, rest = read_checkpoint(path)
    return json.loads((rest.get("quant") or {}).get("manifest") or "{}")


def is_quantized_checkpoint(rest: dict[str, Any]) -> bool:
    return isinstance(rest.get("quant"), dict) and rest["quant"].get("format") == QUANT_FORMAT


def load_quantized(path: str | Path):
    """Rebuild: arch from ModelMeta -> same BN fold -> nncf.torch.load_from_config -> state_dict.

    Returns (model, meta, manifest dict)."""
    _nncf()
    from nncf.torch import load_from_config

    state, meta, rest = read_checkpoint(path)
    if not is_quantized_checkpoint(rest):
        raise CheckpointError(f"{path} is not an INT8 (NNCF) checkpoint (make one with `edgeres quantize --ptq`)")
    if meta is None:
        raise CheckpointError(f"{path} carries no model metadata")
    info = rest["quant"]
    model = meta.create_model().eval()
    if has_batchnorm(model):
        model = fold_batchnorm(model).model
    try:
        qmodel = load_from_config(model, json.loads(info["nncf_config"]))
    except Exception as e:  # NNCF raises its own and ValueError for a config that does not fit
        raise CheckpointError(f"{path}: NNCF quantizer config does not fit {meta.arch}: {e}") from None
    load_weights(qmodel, state, source=str(path))
    force_signed(qmodel)
    return qmodel.eval(), meta, json.loads(info.get("manifest") or "{}")


# ---------------------------------------------------------------------------------------------------- the stages

@dataclass(frozen=True)
class QuantInputs:
    model: Any                 # PTQ: the folded float model; QAT: the PTQ model
    meta: Any                  # its ModelMeta
    eval_data: Any             # the evaluation split: top-1 of the INT8 model and its drop vs the FP32 reference
    out: Path                  # the INT8 checkpoint, written only after its check passed
    reference_top1: float | None = None   # FP32 top-1 (%) on eval_data; None: the drop is not measured
    calib: Any = None          # PTQ: the split the calibration subset is drawn from
    dataset_fingerprint: str = ""
    manifest_path: Path | None = None     # calibration/manifest.json, written with the model once its gates pass
    train_data: Any = None     # QAT: the training split
    manifest: dict[str, Any] | None = None   # QAT: the PTQ manifest, carried into the QAT checkpoint
    evaluation: Any = None     # the INT8 model's EvalResult on eval_data, when already computed (PTQ: reused)
    reference_logits: Any = None   # the FP32 model's logits on eval_data: the agreement gate (None: not measured)
    teacher: Any = None        # QAT: the folded FP32 model it distils (quant.qat_loss kd / kd+ce)
    holdout: Any = None        # QAT: held-out training images that select its epoch (never eval_data)
    device: Any = None         # torch device of the statistics passes / QAT (None: the CPU)


@dataclass(frozen=True)
class PtqSettings:
    calib_size: int = setting("quant.calib_size", help="Calibration images (drawn from the training split, "
                                                           "eval transform; all of them when fewer).")
    method: str = setting("quant.calib_method", help="NNCF range estimator (histogram: MSE-style).",
                              flag="--calib-method")
    seed: int = setting("train.seed", help="Seed of the calibration subset and of QAT's order.")
    max_drop: float | None = None      # pp; None: the drop is recorded, not gated (PTQ before QAT)
    drop_source: str = "gates.max_drop_ptq"   # the recipe key max_drop comes from, for the message
    min_agreement_pct: float | None = None    # top-1 agreement with FP32 (%); None: recorded, not gated
    level: float = level_field()
    origins: dict = origins_field()

    @classmethod
    def from_recipe(cls, recipe, *, calib_available: int | None = None) -> PtqSettings:
        """PTQ as `build` runs it: gated (drop and agreement with FP32) only when it is the final INT8 model.
        `calib_available`: the calibration split's size, when fewer images than asked (all of them are used)."""
        return read(cls, recipe, calib_size=recipe.calib_count(calib_available),
                    **recipe.final_gates(gated=recipe.ptq_is_final))


@dataclass(frozen=True)
class QatSettings:
    epochs: int = setting("quant.qat_epochs", help="QAT epochs.", flag="--epochs")
    lr: float = setting("quant.qat_lr", help="QAT learning rate.", flag="--lr")
    batch_size: int = setting("quant.qat_batch_size", flag="--batch-size", default=recipe_default("data.batch_size"),
                              help="QAT's global batch (split across torchrun processes); the recipe's "
                                   "quant.qat_batch_size, else data.batch_size.")
    seed: int = setting("train.seed", help="Seed of the calibration subset and of QAT's order.")
    max_drop: float | None = None
    drop_source: str = "gates.max_drop_qat"
    loss: str = setting("quant.qat_loss", help="kd: distil the float model's logits (KL); kd+ce: half labels; "
                                                   "ce: labels only.")
    temperature: float = setting("quant.qat_temperature", help="Distillation temperature.",
                                     flag="--temperature")
    amp: bool = setting("quant.qat_amp", help="CUDA: bf16 autocast around the fake-quant model.")
    min_agreement_pct: float | None = None
    level: float = level_field()
    origins: dict = origins_field()

    @classmethod
    def from_recipe(cls, recipe) -> QatSettings:
        """QAT as `build` runs it: the final INT8 model, gated on its drop and its agreement with FP32."""
        return read(cls, recipe, batch_size=recipe.quant.qat_batch_size or recipe.data.batch_size,
                    **recipe.final_gates())


@dataclass(frozen=True)
class QuantOutput:
    model: Any                 # the fake-quant model
    meta: Any
    manifest: dict[str, Any]   # which images calibrated
    evaluation: Any = None     # EvalResult on eval_data (None when loaded from a checkpoint)

    @classmethod
    def load(cls, path: str | Path) -> QuantOutput:
        model, meta, manifest = load_quantized(path)
        return cls(model, meta, manifest)


def _finish(stage: str, model, inputs: QuantInputs, settings, metrics, manifest, quiet: bool, ev=None):
    """Evaluate, gate (drop and agreement with FP32), and only then write the checkpoint (and PTQ's calibration
    manifest). A failed gate keeps the rejected model beside the output as <name>.rejected.pt."""
    from edgeres.evaluate import evaluate

    if ev is None:
        ev = evaluate(model, inputs.eval_data, batch_size=256, progress=False if quiet else f"evaluating {stage}")
    rec = StageRecord(stage=stage, metrics={**metrics, "n_eval": ev.n})
    add_fp32_gates(rec, ev, inputs.reference_top1, inputs.reference_logits, settings)
    if inputs.device is not None:
        rec.environment.update(describe_device(inputs.device))
    if not init_dist().main:   # under torchrun only rank 0 writes
        return StageResult(rec, QuantOutput(model, inputs.meta, manifest, ev))
    out = Path(inputs.out)
    if rec.passed:
        save_quantized(out, model, inputs.meta, mode=stage, manifest=manifest)
        rec.set_artifact(out)
        if inputs.manifest_path is not None:   # the calibration manifest, beside the model it calibrated
            atomic_write_json(inputs.manifest_path, manifest)
            rec.extra_artifacts["calibration_manifest"] = str(inputs.manifest_path)
    else:
        rejected = save_quantized(rejected_path(out), model, inputs.meta, mode=stage, manifest=manifest)
        rec.extra_artifacts["rejected"] = str(rejected)
        rec.message += f"; {out.name} not written, the rejected model is {rejected}"
    return StageResult(rec, QuantOutput(model, inputs.meta, manifest, ev))


def run_ptq(inputs: QuantInputs, settings: PtqSettings = PtqSettings(), *, quiet: bool = False):
    """The PTQ stage: calibrate on `settings.calib_size` images drawn with `settings.seed` (`calibration_indices`),
    evaluate, gate when it is the final INT8 model, then write (checkpoint and manifest). -> StageResult[QuantOutput]"""
    res = quantize_ptq(inputs.model, inputs.calib, subset_size=settings.calib_size, method=settings.method,
                       seed=settings.seed, dataset_fingerprint=inputs.dataset_fingerprint, quiet=quiet,
                       device=inputs.device)
    return _finish("ptq", res.model, inputs, settings,
                   {"calib_size": settings.calib_size, "calib_method": CalibMethod.parse(settings.method).value},
                   res.manifest, quiet)


def run_qat(inputs: QuantInputs, settings: QatSettings = QatSettings(), *, quiet: bool = False, log=None):
    """The QAT stage: fine-tune the PTQ model distilling the FP32 teacher, keep the epoch that agrees best with it on
    the holdout, then evaluate on eval_data (read here only), gate, write. -> StageResult[QuantOutput]"""
    res = quantize_qat(inputs.model, inputs.train_data, inputs.holdout, epochs=settings.epochs, lr=settings.lr,
                       batch_size=settings.batch_size, seed=settings.seed, quiet=quiet, log=log,
                       teacher=inputs.teacher, loss=settings.loss,
                       temperature=settings.temperature, device=inputs.device, amp=settings.amp)
    # best_epoch 0: no QAT epoch beat the PTQ model on the holdout
    ev = inputs.evaluation if res.best_epoch == 0 and inputs.evaluation is not None else None
    return _finish("qat", res.model, inputs, settings,
                   {"epochs": settings.epochs, "history": res.history, "best_epoch": res.best_epoch,
                    "loss": settings.loss, "temperature": settings.temperature,
                    "holdout_size": len(inputs.holdout) if inputs.holdout is not None else 0},
                   inputs.manifest or {}, quiet, ev)
