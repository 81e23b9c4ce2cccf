"""What the Slicer Extensions Index checks (scripts/check_description_files.py of Slicer/ExtensionsIndex, read
2026-11-30): a LICENSE file at the root, an accepted category, the index entry JSON (build_dependencies,
project name = file name, repository named Slicer...), icon and screenshot URLs; plus no invented URLs or
people: unknown ones are marked TODO- placeholders."""

from __future__ import annotations

import json
import re

from conftest_slicer import CLASSIFIER_DIR, REPO, TRAINER_DIR

# ExtensionsIndex scripts/check_description_files.py: ACCEPTED_EXTENSION_CATEGORIES (2026-11-30)
ACCEPTED_CATEGORIES = {
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda", "Converters",
    "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation", "Filtering",
    "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT", "Informatics",
    "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning", "Otolaryngology",
    "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy", "Registration", "Remote",
    "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis", "Shape Regression", "Shape Visualization",
    "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging", "Supervisely", "Surface Models", "SurfaceLearner",
    "Tomographic Reconstruction", "Tracking", "Tractography", "Training", "Ultrasound", "Utilities",
    "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools", "Web System Tools", "Wizards",
}
SCHEMA_KEYS = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "tier"}
INDEX_ENTRY = REPO / "Resources" / "ExtensionsIndex" / "IPMN.json"


def _cmake() -> str:
    return (REPO / "CMakeLists.txt").read_text(encoding="utf-8")


def _cmake_value(name: str) -> str:
    text = _cmake()
    value = re.search(rf'set\({name} "([^"]*)"\)', text).group(1)
    for var, val in re.findall(r'set\((IPMN_\w+) "([^"]*)"\)', text):
        value = value.replace("${" + var + "}", val)
    return value


def test_license_file_at_the_root_matches_the_declared_license():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r'license\s*=\s*\{\s*text\s*=\s*"Apache-2.0"', pyproject)
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_category_is_accepted():
    category = _cmake_value("EXTENSION_CATEGORY")
    assert category in ACCEPTED_CATEGORIES and category != "Diagnosis"


def test_index_entry_template():
    entry = json.loads(INDEX_ENTRY.read_text(encoding="utf-8"))
    assert set(entry) <= SCHEMA_KEYS and {"$schema", "category", "scm_url"} <= set(entry)
    assert entry["build_dependencies"] == ["PyTorch"] == _cmake_value("EXTENSION_DEPENDS").split()
    assert entry["category"] == _cmake_value("EXTENSION_CATEGORY")
    project = re.search(r"project\(\s*([^\s)]+)", _cmake()).group(1)
    assert INDEX_ENTRY.stem == project and not project.lower().startswith("slicer")
    assert entry["scm_url"].rstrip("/").rsplit("/", 1)[1].startswith("Slicer")
    assert entry["scm_url"] == _cmake_value("EXTENSION_HOMEPAGE")


def test_no_invented_urls_or_people():
    files = [REPO / "CMakeLists.txt", INDEX_ENTRY, CLASSIFIER_DIR / "IPMNClassifier.py", TRAINER_DIR / "IPMNTrainer.py"]
    for path in files:
        text = path.read_text(encoding="utf-8")
        for owner in re.findall(r"(?:github\.com|githubusercontent\.com)/([\w.-]+)/", text):
            if owner == "Slicer":  # Slicer's own schema URL
                continue
            assert owner == "TODO-OWNER", f"{path.name}: repository owner {owner!r} is not known yet: use TODO-OWNER"
    assert _cmake_value("EXTENSION_CONTRIBUTORS").startswith("TODO-")
    for path in files[2:]:
        contributors = re.search(r"self\.parent\.contributors = \[(.*?)\]", path.read_text(encoding="utf-8")).group(1)
        assert "TODO-" in contributors


def test_icon_and_screenshots_come_from_the_repository():
    raw = dict(re.findall(r'set\((IPMN_\w+) "([^"]*)"\)', _cmake()))["IPMN_RAW_URL"]
    urls = [_cmake_value("EXTENSION_ICONURL"), *_cmake_value("EXTENSION_SCREENSHOTURLS").split()]
    assert len(urls) >= 3
    for url in urls:
        assert url.startswith(raw + "/"), url
        path = REPO / url[len(raw) + 1:]
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url
    shots = _cmake_value("EXTENSION_SCREENSHOTURLS")
    assert "slice-axial.png" in shots and "slice-coronal.png" in shots  # the composed slice views
