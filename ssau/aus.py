"""AU vocabulary shared by every part of ssau: names, the corpora's standard sets, folds, prototypes.

AUs are numeric ids internally and ``AU01``-style names in everything a user sees (OpenFace, py-feat).
Sources: ../shared/AU-DATA.md (ME-GraphAU fold lists, EMFACS prototypes).
"""

from __future__ import annotations

import re

# The AU sets the field evaluates on, per corpus.
STANDARD_AUS: dict[str, tuple[int, ...]] = {
    "bp4d": (1, 2, 4, 6, 7, 10, 12, 14, 15, 17, 23, 24),
    "disfa": (1, 2, 4, 6, 9, 12, 25, 26),
    "emotionet": (1, 2, 4, 5, 6, 9, 12, 17, 20, 25, 26, 43),
    "gft": (1, 2, 4, 6, 10, 12, 14, 15, 23, 24),
}

# Subject-independent 3-fold splits (ME-GraphAU). Fold k tests on part k and trains on the other two.
STANDARD_FOLDS: dict[str, tuple[tuple[str, ...], ...]] = {
    "bp4d": (
        ("F001", "M007", "F018", "F008", "F002", "M004", "F010", "F009", "M012", "M001", "F016", "M014", "F023", "M008"),
        ("M011", "F003", "M010", "M002", "F005", "F022", "M018", "M017", "F013", "M016", "F020", "F011", "M013", "M005"),
        ("F007", "F015", "F006", "F019", "M006", "M009", "F012", "M003", "F004", "F021", "F017", "M015", "F014"),
    ),
    "disfa": (
        ("SN002", "SN010", "SN001", "SN026", "SN027", "SN032", "SN030", "SN009", "SN016"),
        ("SN013", "SN018", "SN011", "SN028", "SN012", "SN006", "SN031", "SN021", "SN024"),
        ("SN003", "SN029", "SN023", "SN025", "SN008", "SN005", "SN007", "SN017", "SN004"),
    ),
}

# RAF-DB basic labels 1..7 in file order; ssau stores the 0-based index.
EXPRESSIONS: tuple[str, ...] = ("surprise", "fear", "disgust", "happiness", "sadness", "anger", "neutral")

# EMFACS prototypes (Friesen & Ekman 1983, as tabulated in AU-DATA.md). Fear includes AU7 here.
# Contempt is left out of EXPRESSIONS because RAF-DB's basic set has no contempt class.
PROTOTYPES: dict[str, tuple[int, ...]] = {
    "happiness": (6, 12),
    "sadness": (1, 4, 15),
    "surprise": (1, 2, 5, 26),
    "fear": (1, 2, 4, 5, 7, 20, 26),
    "anger": (4, 5, 7, 23),
    "disgust": (9, 15, 16),
    "neutral": (),
}

_AU_NAME = re.compile(r"^(?:AU)?0*(\d{1,2})(?:_[cr])?$", re.IGNORECASE)


def au_name(au: int) -> str:
    """``1 -> 'AU01'``."""
    return f"AU{au:02d}"


def parse_au(text: str) -> int | None:
    """``'AU1'``, ``'AU01'``, ``'au01_c'`` or ``'1'`` -> 1; anything else -> None."""
    m = _AU_NAME.match(text.strip())
    if m is None:
        return None
    au = int(m.group(1))
    return au if 1 <= au <= 99 else None


def parse_au_list(text: str) -> tuple[int, ...]:
    """A corpus name (``bp4d``) or a comma list (``1,2,AU04``) -> sorted AU ids; ValueError names the bad item."""
    key = text.strip().lower()
    if key in STANDARD_AUS:
        return STANDARD_AUS[key]
    aus = []
    for item in text.split(","):
        au = parse_au(item)
        if au is None:
            raise ValueError(f"not an AU: {item!r} (use AU01, 1 or a corpus name: {', '.join(STANDARD_AUS)})")
        aus.append(au)
    if len(set(aus)) != len(aus):
        raise ValueError(f"AU list repeats an AU: {text!r}")
    return tuple(sorted(aus))
