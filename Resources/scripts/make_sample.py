"""Write the bundled sample phantom case (Resources/SampleData). Reproducible: `make sample-data`.

The sample is a high-risk phantom whose only finding is an 8.3 mm enhancing mural nodule in a 22 mm cyst
(a cyst that size without the nodule is low risk), at the ROI's centre along the slices (inside the
central 9-slice window). ``sample.json`` records the
``make_case`` arguments, so that a test can rebuild the same phantom without its nodule (ablation).
"""

import hashlib
import json
import sys
from pathlib import Path

from ipmn.io import write_json
from ipmn.phantoms import make_case, write_case

SEED, LABEL = 20067, 2  # a high-risk phantom with an enhancing mural nodule
MAKE_CASE = {"seed": SEED, "label": LABEL, "t1_shape": [192, 192, 44], "t2_shape": [224, 224, 32],
             "t1_orientation": "LPS", "t2_orientation": "RAS"}


def main(out="Resources/SampleData"):
    out = Path(out)
    args = dict(MAKE_CASE, t1_shape=tuple(MAKE_CASE["t1_shape"]), t2_shape=tuple(MAKE_CASE["t2_shape"]))
    case = make_case(**args)
    for old in out.glob("sample_*"):
        old.unlink()
    paths = write_case(case, out, "sample")
    info = case["info"]
    findings = info["stigmata"] + info["worrisome"] + [f"cysts {info['cyst_diameters_mm']} mm"]
    write_json({"t1": paths["t1"].name, "t2": paths["t2"].name, "roi": paths["roi"].name,
                "mask": paths["mask"].name, "lesion": paths["lesion"].name, "label": info["label"], "seed": SEED,
                "make_case": MAKE_CASE, "findings": findings,
                "note": "synthetic phantom made by ipmn.phantoms; not patient data", "truth": info},
               out / "sample.json")
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(out.glob("sample_*")))
    (out / "SHA256SUMS").write_text(sums)
    print(json.dumps(info))


if __name__ == "__main__":
    main(*sys.argv[1:])
