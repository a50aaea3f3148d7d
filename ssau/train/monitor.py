"""The collapse monitor: a method that assigns images to classes or clusters reports the largest one's share.

A step metric named ``largest_share`` (or ``<name>/largest_share``) is the largest class or cluster's share of the
global batch's assignments that step (large margin's pseudo-emotions), the same on every rank. One step's share is
noisy (a batch of 32 images: a healthy 45 % share wanders by about 9 points) and an untrained network's first steps
put most images in one class, so the monitor judges the mean over the last ``train.collapse_window`` steps (50),
once that many have run. Above ``train.collapse_share`` the run is told once, not stopped: a self-labelling method
can pull every image into one class (issue 22: large margin's automatic balance put 65-80 % of the images in one
pseudo-class), and a warning in the log and on the MLflow run is what makes that visible beside an F1 that merely
looks poor.
"""

from __future__ import annotations

import sys
from collections import defaultdict, deque

from tqdm import tqdm


class CollapseMonitor:
    def __init__(self, limit: float, window: int, method: str, main: bool):
        self.limit, self.window, self.method, self.main = limit, window, method, main
        self.recent: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))
        self.warned = False  # once per run (a resumed run is a new process: it may say so once more)

    def check(self, state: dict[str, float], step: int, tracker=None) -> tuple[str, float] | None:
        """The first ``*largest_share`` of ``state`` whose mean over the last ``window`` steps is above the limit, the
        first time one is (else None): one line on stderr and the MLflow tag ``collapse_warning`` on rank 0.
        ``step``: the step the metric is logged at."""
        over = []
        for key, value in state.items():
            if key.endswith("largest_share"):
                self.recent[key].append(value)
                mean = sum(self.recent[key]) / len(self.recent[key])
                if len(self.recent[key]) == self.window and mean > self.limit:
                    over.append((key, mean))
        if self.warned or not over:
            return None
        self.warned, (key, share) = True, over[0]
        if self.main:
            tqdm.write(f"collapse warning: {self.method}'s train/state/{key} averages {share:.3f} over the "
                       f"{self.window} steps to step {step}, above train.collapse_share {self.limit:g}", file=sys.stderr)
            if tracker is not None:
                tracker.log_tags({"collapse_warning": f"{key}={share:.3f} over steps {step - self.window + 1}-{step}"})
        return key, share
