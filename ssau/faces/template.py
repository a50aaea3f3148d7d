"""The canonical face: where the 68 iBUG landmarks of a mean face lie, and how a face flips.

``MEAN_68`` is the mean 68-point shape that OpenFace (Amos et al., CMU, ``align_dlib.py``) aligns to, in dlib's
iBUG order, rescaled here so that its points span [0, 1] on both axes (x: jaw side to jaw side, y: brow top to
chin). Alignment (``ssau.faces.align``) maps it into a ``size`` x ``size`` crop leaving ``margin`` of the side free
on every edge; a sample without landmarks borrows ``mean_landmarks`` of its image as fixed AU centres
(../shared/AU-DATA.md, "Where a corpus has no landmarks").

Coordinates are pixels with pixel centres at integers (OpenCV's and OpenFace's convention): a horizontal flip of a
``w``-wide image maps x to ``w - 1 - x``.
"""

from __future__ import annotations

import numpy as np

_OPENFACE_MEAN = np.array([
    (0.0792396913815, 0.339223741112), (0.0829219487236, 0.456955367943), (0.0967927109165, 0.575648016728),
    (0.122141515615, 0.691921601066), (0.168687863544, 0.800341263616), (0.239789390707, 0.895732504778),
    (0.325662452515, 0.977068762493), (0.422318282013, 1.04329000149), (0.531777802068, 1.06080371126),
    (0.641296298053, 1.03981924107), (0.738105872266, 0.972268833998), (0.824444363295, 0.889624082279),
    (0.894792677532, 0.792494155836), (0.939395486253, 0.681546643421), (0.96111933829, 0.562238253072),
    (0.970579841181, 0.441758925744), (0.971193274221, 0.322118743967), (0.163846223133, 0.249151738053),
    (0.21780354657, 0.204255863861), (0.291299351124, 0.192367318323), (0.367460241458, 0.203582210627),
    (0.4392945113, 0.233135599851), (0.586445962425, 0.228141644834), (0.660152671635, 0.195923841854),
    (0.737466449096, 0.182360984545), (0.813236546239, 0.192828009114), (0.8707571886, 0.235293377042),
    (0.51534533827, 0.31863546193), (0.516221448289, 0.396200446263), (0.517118861835, 0.473797687758),
    (0.51816430343, 0.553157797772), (0.433701156035, 0.604054457668), (0.475501237769, 0.62076344024),
    (0.520712933176, 0.634268222208), (0.565874114041, 0.618796581487), (0.607054002672, 0.60157671656),
    (0.252418718401, 0.331052263829), (0.298663015648, 0.302646354002), (0.355749724218, 0.303020650651),
    (0.403718978315, 0.33867711083), (0.352507175597, 0.349987615384), (0.296791759886, 0.350478978225),
    (0.631326076346, 0.334136672344), (0.679073381078, 0.29645404267), (0.73597236153, 0.294721285802),
    (0.782865376271, 0.321305281656), (0.740312274764, 0.341849376713), (0.68499850091, 0.343734332172),
    (0.353167761422, 0.746189164237), (0.414587777921, 0.719053835073), (0.477677654595, 0.706835892494),
    (0.522732900812, 0.717092275768), (0.569832064287, 0.705414478982), (0.635195811927, 0.71565572516),
    (0.69951672331, 0.739419187253), (0.639447159575, 0.805236879972), (0.576410514055, 0.835436670169),
    (0.525398405766, 0.841706377792), (0.47641545769, 0.837505914975), (0.41379548902, 0.810045601727),
    (0.380084785646, 0.749979603086), (0.477955996282, 0.74513234612), (0.523389793327, 0.748924302636),
    (0.571057789237, 0.74332894691), (0.672409137852, 0.744177032192), (0.572539621444, 0.776609286626),
    (0.5240106503, 0.783370783245), (0.477561227414, 0.778476346951)], dtype=np.float64)
MEAN_68 = (_OPENFACE_MEAN - _OPENFACE_MEAN.min(0)) / (_OPENFACE_MEAN.max(0) - _OPENFACE_MEAN.min(0))

N_LANDMARKS = 68
RIGHT_EYE, LEFT_EYE = range(36, 42), range(42, 48)  # the subject's right eye is on the image's left
NOSE_TIP, MOUTH_RIGHT, MOUTH_LEFT = 30, 48, 54
DEFAULT_MARGIN = 0.15

# Index i of a flipped face is point MIRROR_68[i] of the original: jaw reversed, brows, eyes, nostrils and lips
# swapped left for right; the points on the midline (nose bridge, lip centres) stay.
MIRROR_68 = np.array(
    list(range(16, -1, -1))  # jaw 0-16
    + list(range(26, 21, -1)) + list(range(21, 16, -1))  # brows 17-21 <-> 26-22
    + [27, 28, 29, 30] + [35, 34, 33, 32, 31]  # nose bridge, nostrils
    + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40]  # eyes 36-41 <-> 45-42 (corners and lids)
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lip 48-59
    + [64, 63, 62, 61, 60, 67, 66, 65])  # inner lip 60-67


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """The five points alignment uses from 68: eye centres, nose tip, mouth corners (image left to right)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([lm[list(RIGHT_EYE)].mean(0), lm[list(LEFT_EYE)].mean(0), lm[NOSE_TIP], lm[MOUTH_RIGHT],
                     lm[MOUTH_LEFT]])


MEAN_5 = five_points(MEAN_68)


def placed(points: np.ndarray, size: float, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """Unit-square template points placed into a ``size`` x ``size`` crop with ``margin`` (a fraction of the
    side) free on every edge."""
    return (margin + np.asarray(points, dtype=np.float64) * (1.0 - 2.0 * margin)) * (size - 1)


def mean_landmarks(width: int, height: int, margin: float = DEFAULT_MARGIN) -> np.ndarray:
    """[68, 2] float32: the template over a ``width`` x ``height`` image taken as an aligned face crop."""
    unit = margin + MEAN_68 * (1.0 - 2.0 * margin)
    return (unit * np.array([width - 1, height - 1])).astype(np.float32)


def flip_landmarks(landmarks: np.ndarray, width: int) -> np.ndarray:
    """The landmarks of the horizontally flipped image: x -> width - 1 - x, then the mirror permutation."""
    out = np.array(landmarks, dtype=np.float32, copy=True)
    out[:, 0] = (width - 1) - out[:, 0]
    return out[MIRROR_68]


def plausible(points: np.ndarray, width: int, height: int) -> bool:
    """Landmarks that can be the face in this image: finite, eyes apart, and mostly inside the frame."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or len(p) not in (5, 68) or not np.isfinite(p).all():
        return False
    five = p if len(p) == 5 else five_points(p)
    inside = ((p[:, 0] >= -0.5) & (p[:, 0] <= width - 0.5) & (p[:, 1] >= -0.5) & (p[:, 1] <= height - 0.5)).mean()
    return bool(np.linalg.norm(five[1] - five[0]) >= 3.0 and inside >= 0.5)
