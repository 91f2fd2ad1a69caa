"""Speed-up vs accuracy of each method on real pretrained models, no fine-tuning (the tool's use case).

    python benchmarks/real_models_eval.py --json benchmarks/results/real_eval.json \\
        [--models yolov8n,open-nsfw,mnist,efficientnet-lite0,mtcnn-pnet,mtcnn-rnet,mtcnn-onet] \\
        [--settings nd@r1,dwd@r1,dwd-comp@r1,refit@r1,channel@r1] [--append]
    python benchmarks/real_models_eval.py --show benchmarks/results/real_eval.json   # Markdown tables

A setting is METHOD@rK (`--method METHOD --rank K`), METHOD@xS
(`--method METHOD --target-speedup S`) or METHOD@eE (`--method METHOD
--max-error E`), the last two the budgeted per-layer selection; any other
flags for every run go after `--`. With --append the rows
are merged into an existing JSON (same model and setting: replaced), so
budget rows can be added later by re-running with only those settings.

For each model and setting: `onnx-dwd optimize` on the model's calibration
folder, `onnx-dwd bench ORIGINAL OPTIMIZED --threads 1` for the speed-up
(median of per-block ratios and its IQR), then the original and the
optimized model are run in onnxruntime (1 thread) on an evaluation set that
shares no image with the calibration set, and compared:

  yolov8n            detections (conf >= 0.25, class-agnostic NMS at IoU 0.45,
                     NudeNet's own thresholds) matched to the original's:
                     same class and IoU >= 0.5; recall = matched / original's
                     boxes, precision = matched / optimized model's boxes
  open-nsfw          class agreement and |p_nsfw - p_nsfw original| (mean, max)
  mnist              accuracy against labels (MNIST 5k: 1,000 calibrate, 4,000 evaluate)
  efficientnet-lite0 top-1 against labels on the held-out foolbox ImageNet photos,
                     top-1 agreement with the original on every test image
  mtcnn-*            face-probability decision agreement with the original
                     (P-Net: every output position, threshold 0.6 as MTCNN's
                     first stage; R/O-Net: argmax) and mean |delta p_face|;
                     R/O-Net also face / non-face accuracy on the LFW crops

Images come from tools/make_eval_sets.py (run tools/install_models.py
first): photo-split/calib (14 photos + 7 crops each + 32 mosaics of LFW faces
0-49) to calibrate, photo-split/test (the 13 other photos + 7 crops each + 32
mosaics of faces 50-99) to evaluate; MTCNN R/O-Net: lfw/calib and lfw/test
(25x25 real faces and non-faces, disjoint halves).
Preprocessing is each model's own (see SPECS); images are resized straight to
the model's input size unless a resize is given (the same code as
`onnx-dwd optimize --calib`, onnx_dwd.calib.load_image).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from real_models import cache_dir, input_shape, model_path  # noqa: E402

from onnx_dwd.calib import ImageLayout, Preprocess, list_images, load_image  # noqa: E402

DEFAULT_MODELS = ["yolov8n", "open-nsfw", "mnist", "efficientnet-lite0", "mtcnn-pnet", "mtcnn-rnet", "mtcnn-onet"]
DEFAULT_SETTINGS = ["nd@r1", "dwd@r1", "dwd-comp@r1", "refit@r1", "channel@r1"]
PHOTO_CALIB, PHOTO_TEST = "photo-split/calib", "photo-split/test"
YOLO_CONF, YOLO_NMS_IOU, MATCH_IOU = 0.25, 0.45, 0.5
PNET_FACE = 0.6


@dataclass(frozen=True)
class Spec:
    """How a model is calibrated and evaluated."""

    kind: str                      # detector | binary | classifier | mtcnn
    calib: str                     # folder under CACHE/eval
    test: str
    flags: Tuple[str, ...] = ()    # preprocessing flags for optimize
    pre: Preprocess = field(default_factory=Preprocess)
    calib_images: Optional[int] = None
    test_skip: int = 0             # skip the first N test images (they calibrate)
    labels: Optional[str] = None   # labels file in the test folder
    max_test: Optional[int] = None


SPECS: Dict[str, Spec] = {
    "yolov8n": Spec("detector", PHOTO_CALIB, PHOTO_TEST),
    "open-nsfw": Spec("binary", PHOTO_CALIB, PHOTO_TEST,
                      ("--resize", "256", "--scale", "1", "--mean", "104,117,123", "--channel-order", "bgr"),
                      Preprocess(resize=256, scale=1, mean=(104, 117, 123), channel_order="bgr")),
    "mnist": Spec("classifier", "mnist5k", "mnist5k", ("--scale", "1"), Preprocess(scale=1),
                  calib_images=1000, test_skip=1000, labels="labels.csv"),
    "efficientnet-lite0": Spec("classifier", PHOTO_CALIB, PHOTO_TEST,
                               ("--resize", "256", "--scale", "1", "--mean", "127", "--std", "128"),
                               Preprocess(resize=256, scale=1, mean=(127,), std=(128,)),
                               labels="imagenet_labels.csv"),
    "mtcnn-pnet": Spec("mtcnn", PHOTO_CALIB, PHOTO_TEST, ("--scale", "1", "--mean", "127.5", "--std", "128"),
                       Preprocess(scale=1, mean=(127.5,), std=(128,))),
    **{f"mtcnn-{n}": Spec("mtcnn", "lfw/calib", "lfw/test", ("--scale", "1", "--mean", "127.5", "--std", "128"),
                          Preprocess(scale=1, mean=(127.5,), std=(128,)), labels="face_labels.csv")
       for n in ("rnet", "onet")},
}


def setting_flags(setting: str) -> List[str]:
    """nd@r1 -> --method nd --rank 1; refit@x1.5 -> --target-speedup 1.5; refit@e0.05 -> --max-error 0.05."""
    method, _, arg = setting.partition("@")
    if arg.startswith("r"):
        return ["--method", method, "--rank", arg[1:]]
    if arg.startswith("x"):
        return ["--method", method, "--target-speedup", arg[1:]]
    if arg.startswith("e"):
        return ["--method", method, "--max-error", arg[1:]]
    raise SystemExit(f"setting {setting!r}: write METHOD@rK (rank), METHOD@xS (target speed-up) "
                     f"or METHOD@eE (max output error)")


# ---------------------------------------------------------------- running models


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def fixed_shape(sess: ort.InferenceSession, name: str) -> Tuple[int, ...]:
    shape = input_shape(name)
    if shape:
        return tuple(int(d) for d in shape.split(":")[1].split(","))
    return tuple(d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape)


def load_inputs(files: List[Path], shape: Tuple[int, ...], pre: Preprocess) -> List[np.ndarray]:
    """One [1, ...] float32 array per file, laid out as the model's input."""
    nhwc = shape[-1] in (1, 3) and shape[1] not in (1, 3)
    layout = ImageLayout(nhwc, shape[3] if nhwc else shape[1], shape[1] if nhwc else shape[2],
                         shape[2] if nhwc else shape[3])
    out = []
    for f in files:
        a = load_image(f, layout, pre)
        out.append((a if nhwc else a.transpose(2, 0, 1))[None].astype(np.float32))
    return out


def run_all(sess: ort.InferenceSession, inputs: List[np.ndarray]) -> List[List[np.ndarray]]:
    name = sess.get_inputs()[0].name
    return [sess.run(None, {name: x}) for x in inputs]


# ---------------------------------------------------------------- metrics


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [N, 4] and b [M, 4] (x1, y1, x2, y2) -> [N, M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2:] - x[:, :2], 0, None).prod(-1)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def yolo_detections(output0: np.ndarray, conf: float = YOLO_CONF, nms_iou: float = YOLO_NMS_IOU):
    """YOLOv8 output [1, 4 + classes, anchors] -> (boxes [K, 4] x1y1x2y2, classes [K], scores [K])."""
    out = output0[0].T
    scores_all = out[:, 4:]
    cls = scores_all.argmax(1)
    score = scores_all.max(1)
    keep = score >= conf
    xywh, cls, score = out[keep, :4], cls[keep], score[keep]
    boxes = np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    order = np.argsort(-score, kind="stable")
    chosen = []
    while order.size:
        i = order[0]
        chosen.append(i)
        order = order[1:][iou(boxes[i:i + 1], boxes[order[1:]])[0] <= nms_iou]
    chosen = np.array(chosen, dtype=int)
    return boxes[chosen], cls[chosen], score[chosen]


def match_boxes(ref_boxes, ref_cls, boxes, cls, scores, threshold: float = MATCH_IOU) -> int:
    """Greedy one-to-one matching (highest score first): same class and IoU >= threshold. Returns matches."""
    if len(ref_boxes) == 0 or len(boxes) == 0:
        return 0
    overlaps = iou(boxes, ref_boxes)
    used = np.zeros(len(ref_boxes), bool)
    matched = 0
    for i in np.argsort(-scores, kind="stable"):
        candidates = np.where((~used) & (ref_cls == cls[i]) & (overlaps[i] >= threshold))[0]
        if candidates.size:
            used[candidates[np.argmax(overlaps[i, candidates])]] = True
            matched += 1
    return matched


def detector_metrics(ref_outs, outs) -> dict:
    n_ref = n_opt = matched = 0
    for r, o in zip(ref_outs, outs):
        rb, rc, _ = yolo_detections(r[0])
        ob, oc, os_ = yolo_detections(o[0])
        n_ref, n_opt = n_ref + len(rb), n_opt + len(ob)
        matched += match_boxes(rb, rc, ob, oc, os_)
    return {"boxes_original": n_ref, "boxes_optimized": n_opt, "matched": matched,
            "recall": matched / n_ref if n_ref else None, "precision": matched / n_opt if n_opt else None}


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def binary_metrics(ref_outs, outs) -> dict:
    p_ref = np.array([r[0].reshape(-1)[-1] for r in ref_outs])  # open_nsfw: [sfw, nsfw] probabilities
    p = np.array([o[0].reshape(-1)[-1] for o in outs])
    err = np.abs(p - p_ref)
    return {"agreement": float(np.mean((p >= 0.5) == (p_ref >= 0.5))), "prob_abs_error_mean": float(err.mean()),
            "prob_abs_error_max": float(err.max()), "nsfw_original": int((p_ref >= 0.5).sum())}


def classifier_metrics(ref_outs, outs, labels: Optional[Dict[int, int]]) -> dict:
    ref = np.array([r[0].reshape(-1).argmax() for r in ref_outs])
    got = np.array([o[0].reshape(-1).argmax() for o in outs])
    m = {"top1_agreement": float(np.mean(ref == got))}
    if labels:
        idx = np.array(sorted(labels))
        y = np.array([labels[i] for i in idx])
        m.update(labelled=len(idx), accuracy_original=float(np.mean(ref[idx] == y)),
                 accuracy=float(np.mean(got[idx] == y)))
    return m


def mtcnn_metrics(name: str, ref_outs, outs, labels: Optional[Dict[int, int]] = None) -> dict:
    """Face probability: the output whose channel axis has 2 entries [non-face, face]; labels: 1 face, 0 not."""
    def face(outputs):
        prob = [a for a in outputs if a.ndim >= 2 and a.shape[1] == 2][-1]
        return prob[:, 1].reshape(-1)
    p_ref = np.concatenate([face(r) for r in ref_outs])
    p = np.concatenate([face(o) for o in outs])
    threshold = PNET_FACE if name == "mtcnn-pnet" else 0.5
    m = {"face_decision_agreement": float(np.mean((p >= threshold) == (p_ref >= threshold))),
         "face_prob_abs_error_mean": float(np.abs(p - p_ref).mean()),
         "faces_original": int((p_ref >= threshold).sum()), "decisions": int(p_ref.size)}
    if labels and p.size == len(ref_outs):  # one decision per image
        idx = np.array(sorted(labels))
        y = np.array([labels[i] for i in idx])
        m.update(labelled=len(idx), accuracy_original=float(np.mean((p_ref[idx] >= threshold) == y)),
                 accuracy=float(np.mean((p[idx] >= threshold) == y)))
    return m


def output_errors(ref_outs, outs) -> Dict[str, float]:
    """Relative error |Y - Y_ref| / |Y_ref| of each output over the whole evaluation set."""
    errs = {}
    for k in range(len(ref_outs[0])):
        r = np.concatenate([x[k].reshape(-1) for x in ref_outs])
        o = np.concatenate([x[k].reshape(-1) for x in outs])
        errs[str(k)] = float(np.linalg.norm(o - r) / max(np.linalg.norm(r), 1e-12))
    return errs


# ---------------------------------------------------------------- one model


def test_files(spec: Spec, root: Path) -> Tuple[List[Path], Optional[Dict[int, int]]]:
    folder = root / spec.test
    files = list_images(folder)[spec.test_skip:]
    files = files[:spec.max_test] if spec.max_test else files
    labels = None
    if spec.labels:
        with open(folder / spec.labels, newline="") as f:
            by_name = {r["file"]: int(r["label"]) for r in csv.DictReader(f)}
        labels = {i: by_name[p.relative_to(folder).as_posix()] for i, p in enumerate(files)
                  if p.relative_to(folder).as_posix() in by_name}
    return files, labels


def metrics_for(name: str, spec: Spec, ref_outs, outs, labels) -> dict:
    if spec.kind == "detector":
        m = detector_metrics(ref_outs, outs)
    elif spec.kind == "binary":
        m = binary_metrics(ref_outs, outs)
    elif spec.kind == "classifier":
        m = classifier_metrics(ref_outs, outs, labels)
    else:
        m = mtcnn_metrics(name, ref_outs, outs, labels)
    m["output_rel_error"] = output_errors(ref_outs, outs)
    return m


def onnx_dwd(*args: str) -> None:
    proc = subprocess.run(["onnx-dwd", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"onnx-dwd {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")


def evaluate_model(name: str, settings: List[str], extra: List[str], root: Path, work: Path, log) -> List[dict]:
    spec = SPECS[name]
    original = model_path(name)
    ref_sess = session(original)
    shape = fixed_shape(ref_sess, name)
    files, labels = test_files(spec, root)
    inputs = load_inputs(files, shape, spec.pre)
    ref_outs = run_all(ref_sess, inputs)
    base = metrics_for(name, spec, ref_outs, ref_outs, labels)
    shape_flags = ["--input-shape", input_shape(name)] if input_shape(name) else []
    rows = [{"model": name, "setting": "original", "test_images": len(files), **base}]
    log(f"{name}: {len(files)} test images; original: " + json.dumps({k: v for k, v in base.items()
                                                                       if k != "output_rel_error"}))
    for setting in settings:
        out, rep, bench = work / f"{name}_{setting}.onnx", work / f"{name}_{setting}.json", work / "bench.json"
        cmd = ["optimize", str(original), str(out), "--calib", str(root / spec.calib), *setting_flags(setting),
               *spec.flags, *shape_flags, "--report", str(rep), "-q", *extra]
        if spec.calib_images:
            cmd += ["--max-images", str(spec.calib_images)]
        started, cpu0 = time.perf_counter(), _cpu()
        try:
            onnx_dwd(*cmd)
        except RuntimeError as exc:
            log(f"{name} {setting}: FAILED {exc}")
            rows.append({"model": name, "setting": setting, "error": str(exc)[-2000:]})
            continue
        seconds, cpu_s = time.perf_counter() - started, _cpu() - cpu0
        report = json.loads(rep.read_text())["model"]
        onnx_dwd("bench", str(original), str(out), "--threads", "1", "--json", str(bench), "-q", *shape_flags)
        b = json.loads(bench.read_text())["rows"][0]
        outs = run_all(session(out), inputs)
        m = metrics_for(name, spec, ref_outs, outs, labels)
        row = {"model": name, "setting": setting, "flags": setting_flags(setting) + extra,
               "decomposed": report.get("decomposed"), "macs_before": report["macs_before"],
               "macs_after": report["macs_after"], "mac_reduction": report["macs_before"] / report["macs_after"],
               "speedup": b["speedup"], "speedup_iqr": b["speedup_iqr"], "before_ms": b["before_ms"],
               "after_ms": b["after_ms"], "optimize_s": round(seconds, 1), "optimize_cpu_s": round(cpu_s, 1),
               "test_images": len(files), **m}
        if report.get("selection"):  # a budgeted run: did the tool's own measurement meet the budget?
            row["budget_met"] = report["selection"].get("met")
            row["tool_speedup"] = (report.get("latency") or {}).get("speedup")
        rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items() if k != "output_rel_error"}
        log(f"{name} {setting}: MACs /{row['mac_reduction']:.2f}, speed-up {b['speedup']:.2f}x, "
            f"{json.dumps(shown)}, output rel. error {json.dumps({k: round(v, 4) for k, v in m['output_rel_error'].items()})}"
            f" ({seconds:.0f} s)")
    return rows


def _cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def quality(row: dict) -> str:
    """The accuracy columns of a row, per model kind."""
    kind = SPECS[row["model"]].kind
    if kind == "detector":
        return (f"recall {_pct(row['recall'])}, precision {_pct(row['precision'])} "
                f"({row['matched']}/{row['boxes_original']} boxes; optimized finds {row['boxes_optimized']})")
    if kind == "binary":
        return (f"agreement {_pct(row['agreement'])}, mean / max abs. prob. error "
                f"{row['prob_abs_error_mean']:.4f} / {row['prob_abs_error_max']:.3f}")
    if kind == "classifier":
        acc = f"accuracy {_pct(row['accuracy'])} of {row['labelled']} labelled, " if "accuracy" in row else ""
        return acc + f"top-1 agreement {_pct(row['top1_agreement'])}"
    acc = f"face accuracy {_pct(row['accuracy'])}, " if "accuracy" in row else ""
    return (acc + f"decision agreement {_pct(row['face_decision_agreement'])}, "
            f"mean abs. prob. error {row['face_prob_abs_error_mean']:.3f}")


def markdown(result: dict) -> str:
    """One table per model: setting, MACs, speed-up (IQR), accuracy, output error, optimize time."""
    out = []
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    for model in models:
        rows = [r for r in result["rows"] if r["model"] == model]
        out += [f"**{model}** ({rows[0]['test_images']} test images)", "",
                "| setting | conv MACs | speed-up, 1 thread (IQR) | vs original | output rel. error | optimize s |",
                "|---|---|---|---|---|---|"]
        for r in rows:
            if r["setting"] == "original":
                out.append(f"| original | | | {quality(r)} | | |")
            elif "error" in r:
                out.append(f"| {r['setting']} | failed | | {r['error'].splitlines()[-1][:120]} | | |")
            else:
                errs = ", ".join(f"{v:.3f}" for v in r["output_rel_error"].values())
                lo, hi = r["speedup_iqr"]
                label = r["setting"]
                if "budget_met" in r:  # the tool's own verdict on its budget, and the speed-up it measured
                    label += f" ({'met' if r['budget_met'] else 'not met'}, tool {r['tool_speedup']:.2f}x)"
                out.append(f"| {label} | /{r['mac_reduction']:.2f} | {r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | "
                           f"{quality(r)} | {errs} | {r['optimize_s']:.0f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--show":  # print the Markdown tables of a result JSON
        print(markdown(json.loads(Path(sys.argv[2]).read_text())))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    parser.add_argument("--append", action="store_true", help="merge into an existing --json")
    parser.add_argument("--cache", type=Path, default=None, help="default: $ONNX_DWD_CACHE or ~/.cache/onnx-dwd")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    root = (args.cache or cache_dir()) / "eval"
    if not (root / PHOTO_TEST).is_dir():
        sys.exit(f"{root / PHOTO_TEST} is missing: run `python tools/install_models.py`")
    models, settings = args.models.split(","), args.settings.split(",")
    for m in models:
        if m not in SPECS:
            sys.exit(f"--models {m}: not one of {', '.join(SPECS)}")
    for s in settings:
        setting_flags(s)
    started = time.perf_counter()
    previous = json.loads(args.json.read_text()) if args.append and args.json.is_file() else {"rows": [], "runs": []}
    rows = previous["rows"]
    run = {"command": "python benchmarks/real_models_eval.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "date": datetime.date.today().isoformat(), "python": platform.python_version(),
           "machine": platform.machine(), "onnxruntime": ort.__version__, "threads": 1}
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            new = evaluate_model(name, settings, extra, root, Path(tmp), log)
            keys = {(r["model"], r["setting"]) for r in new}
            rows = [r for r in rows if (r["model"], r["setting"]) not in keys] + new
            run["wall_s"] = round(time.perf_counter() - started, 1)
            args.json.write_text(json.dumps({"runs": previous["runs"] + [run], "rows": rows}, indent=2) + "\n")
    log(f"done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
