"""What a user sees comparing runs in the MLflow UI, as PNG screenshots from headless Chromium:
`python -m ssau.bench.ui_screenshots --uri sqlite:///mlflow.db --experiment ssau-demo --out screenshots`.

Starts ``ssau ui`` on a free loopback port, picks the experiment's two latest finished runs (or ``--runs ID,ID``) and
shoots, in the classic model-training view: the compare page of the two runs (params, metrics, the root artifacts
side by side), each run's ``f1_bar.png`` in its artifact view, and the experiment's run table. Needs Chromium (Debian:
``apt-get install chromium``); not part of the test suite (a browser start takes tens of seconds).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"ui_screenshots: the MLflow UI at {url} never answered")


def shoot(browser: str, url: str, png: Path, size: str = "1600,1200", budget_ms: int = 20000) -> None:
    """One page, rendered for ``budget_ms`` of virtual time (the UI is a React app that fetches after load)."""
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={size}",
           f"--virtual-time-budget={budget_ms}", f"--screenshot={png}", url]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=180)
    print(f"{png}: {url}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--uri", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="ssau-demo")
    ap.add_argument("--runs", help="two run ids, comma-separated (default: the two latest finished runs)")
    ap.add_argument("--out", default="screenshots")
    ap.add_argument("--browser", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    a = ap.parse_args(argv)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=a.uri)
    exp = client.get_experiment_by_name(a.experiment)
    if exp is None:
        raise SystemExit(f"ui_screenshots: no experiment {a.experiment!r} in {a.uri}")
    if a.runs:
        ids = a.runs.split(",")
    else:
        runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", order_by=["start_time DESC"],
                                  max_results=50)
        ids = [r.info.run_id for r in runs if "mlflow.loggedArtifacts" in r.data.tags][:2][::-1]
    if len(ids) != 2:
        raise SystemExit(f"ui_screenshots: need two finished runs with per-AU results in {a.experiment!r}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "ssau", "ui", "--uri", a.uri, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(base, proc)
        view = "workflowType=machine_learning"  # the classic model-training view (ssau ui prints it too)
        q = urllib.parse.urlencode({"runs": json.dumps(ids), "experiments": json.dumps([exp.experiment_id])})
        shoot(a.browser, f"{base}/#/compare-runs?{q}&{view}", out / "compare.png", size="1600,3600")
        for k, rid in enumerate(ids, 1):
            shoot(a.browser, f"{base}/#/experiments/{exp.experiment_id}/runs/{rid}/artifacts/f1_bar.png?{view}",
                  out / f"run{k}_f1_bar.png")
        shoot(a.browser, f"{base}/#/experiments/{exp.experiment_id}/runs?{view}", out / "runs.png")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
