"""``ipmn demo``: the bundled sample phantom case through the bundled demo model (what ``make demo`` runs).

The sample case and the demo model live in the repository's ``Resources/`` (and inside the Slicer module
when installed as an extension). ``IPMN_RESOURCES`` points elsewhere if needed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ipmn.errors import IPMNError

SAMPLE_DIR = "SampleData"
MODEL_DIR = "DemoModel"


def resources_dir() -> Path:
    here = Path(__file__).resolve()
    candidates = [os.environ.get("IPMN_RESOURCES"), here.parents[2] / "Resources", here.parents[1] / "Resources"]
    for c in candidates:
        if c and (Path(c) / SAMPLE_DIR).is_dir():
            return Path(c)
    raise IPMNError("bundled resources not found (Resources/SampleData); set IPMN_RESOURCES to the folder holding them")


def sample_case() -> dict:
    root = resources_dir() / SAMPLE_DIR
    info = json.loads((root / "sample.json").read_text(encoding="utf-8"))
    return {"t1": root / info["t1"], "t2": root / info["t2"], "roi": root / info["roi"],
            "mask": root / info["mask"], "label": info["label"], "info": info}


def demo_model() -> Path:
    path = resources_dir() / MODEL_DIR
    if not (path / "config.json").is_file():
        raise IPMNError(f"demo model not found in {path}; build it with `make demo-model`")
    return path


def run_demo(out="ipmn-demo", device="auto", windows="all") -> int:
    from ipmn.predict import Predictor, summary_line

    t0 = time.perf_counter()
    case = sample_case()
    predictor = Predictor(demo_model(), device=device)
    result = predictor.predict(t1=case["t1"], t2=case["t2"], roi=case["roi"], out=out, windows=windows,
                               fidelity=True)
    print(summary_line(result))
    print(f"sample case: synthetic phantom, true label {case['label']!r} "
          f"({'; '.join(case['info'].get('findings', [])) or 'no findings'})")
    print(f"model card: {result['model']['card']}")
    print(f"outputs in {out}/: prediction.json attention.nii.gz attention_labels.nii.gz grid.png "
          f"({time.perf_counter() - t0:.1f} s in process)")
    return 0
