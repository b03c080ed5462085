"""A model's confidence calibration: the file saved with it, and how a caption record applies it.

`avlabel calibrate` (avlabel/eval/calibration.py) fits, per closed-set field, a Platt scaling of the
probability of the chosen answer, p' = sigmoid(a * logit(p) + b), on held-out labeled clips, and saves
it as `calibration.json` in the model (or adapter) folder, beside `sampling_config.json`. `avlabel
caption` finds it there (or in a Hub repo) and writes calibrated `confidence` and `clip_confidence`,
keeping the model's own probabilities in `confidence_raw` and the parameters in `calibration`, so
review and the catalog read calibrated values without knowing about calibration.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .records import clip_confidence, short_probability
from .schema import FIELDS_BY_NAME

CALIBRATION_FILE = "calibration.json"  # in a model folder, beside sampling_config.json
METHOD = "platt"
# A caption record rounds p to 6 significant digits, so 1.0 is common: logit(1) is infinite.
# Clipped here, p = 1 counts as a little surer than the surest probability a record can write.
EPSILON = 1e-7


def logit(p: float) -> float:
    p = min(max(float(p), EPSILON), 1 - EPSILON)
    return math.log(p / (1 - p))


def platt(p: float, a: float, b: float) -> float:
    z = a * logit(p) + b
    return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


@dataclass
class Calibration:
    """Per closed-set field: the Platt parameters (a, b), and what they were fitted on."""

    fields: dict[str, dict[str, Any]]  # field -> {"a", "b", "clips", "ece_before", "ece_after"}
    method: str = METHOD
    bins: int = 10  # ECE bins (equal width) of the fit report
    fitted_on: dict[str, Any] = field(default_factory=dict)  # captions, labels, split

    def __post_init__(self):
        if self.method != METHOD:
            raise ValueError(f"method {self.method!r}: only {METHOD!r} is known")
        for name, params in self.fields.items():
            if name not in FIELDS_BY_NAME or not FIELDS_BY_NAME[name].closed:
                raise ValueError(f"{name!r} is not a closed-set field of the schema")
            if not all(isinstance(params.get(key), (int, float)) for key in ("a", "b")):
                raise ValueError(f"{name}: needs numbers a and b, got {params}")

    def apply(self, name: str, p: float) -> float:
        """The calibrated probability of field `name`'s answer (unchanged for a field without a fit)."""
        params = self.fields.get(name)
        return p if params is None else short_probability(platt(p, params["a"], params["b"]))

    def record_entry(self) -> dict[str, Any]:
        """What a caption record says about its calibration: the method and each field's (a, b)."""
        return {"method": self.method, "fields": {name: [params["a"], params["b"]] for name, params in self.fields.items()}}

    def calibrate(self, confidence: dict[str, Any]) -> dict[str, Any]:
        """A record's `confidence`, `text_mean_logprob` and `clip_confidence` (infer/confidence.py) with the
        probabilities calibrated, the model's own kept as `confidence_raw`."""
        calibrated = {name: self.apply(name, p) for name, p in confidence["confidence"].items()}
        return {**confidence, "confidence": calibrated, "confidence_raw": confidence["confidence"],
                "clip_confidence": clip_confidence(calibrated)}

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CALIBRATION_FILE
        path.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def for_model(cls, *sources: str | Path | None) -> Calibration | None:
        """The calibration saved with a model: the first of `sources` (model folders or Hub ids, an adapter
        before its base model) that holds `calibration.json`, or None."""
        from .loading import saved_with_model

        return saved_with_model(sources, CALIBRATION_FILE, "calibration", cls)
