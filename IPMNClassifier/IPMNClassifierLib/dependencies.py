"""The engine's Python packages: checked without importing them, installed only when the user runs something.

* PyTorch is installed the way the PyTorch extension (SlicerPyTorch) does it, with light-the-torch, which
  picks the build that matches the GPU driver (a plain ``pip install torch`` gives the wrong CUDA build, or a
  CPU build on a GPU machine), but in a child process: torch is never imported into Slicer's own process.
* The rest (timm, monai, ...) comes from ``Resources/requirements.txt`` (``>=`` minimums) through
  ``slicer.packaging.pip_ensure`` on Slicer >= 5.12, ``slicer.util.pip_install`` before.
* numpy, SimpleITK and pydicom are Slicer's own: they are pinned to the installed versions with a constraints
  file, so a dependency can never replace them (a PyPI SimpleITK breaks Slicer's ITK IO; a newer pydicom
  can break Slicer's DICOM plugins). highdicom's requirement is fitted to the pydicom found
  (:func:`adaptRequirements`): 0.22.x for Slicer 5.10's pydicom 2.4, >= 0.25 with pydicom 3 (Slicer 5.12
  ships highdicom 0.27 itself, which then satisfies it and is left alone).
* One confirmation dialog lists everything; a restart is offered when an already imported package changed.

Functions that only check (``missingRequirements``, ``torchMissing``) are pure Python and tested here; the
installing function needs the Slicer application.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
import sys
import tempfile
from pathlib import Path

from ipmn.errors import IPMNError

TORCH_REQUIREMENT = ">=2.2"
TORCHVISION_REQUIREMENT = ">=0.17"
PROTECTED = ("numpy", "SimpleITK", "pydicom")  # shipped with Slicer: never upgraded, downgraded or replaced
NEVER_IN_REQUIREMENTS = ("numpy", "simpleitk", "torch", "torchvision")
# Distribution name -> importable module name, where they differ.
_IMPORT_NAMES = {"scikit-learn": "sklearn", "pyyaml": "yaml", "pillow": "PIL"}


def readRequirements(path) -> list:
    """Requirement lines of a requirements.txt (comments, blank lines and pip options skipped)."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def _requirementClass():
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return None
    return Requirement


def _splitRequirement(text: str):
    """(name, specifier object or None, specifier text)."""
    requirement = _requirementClass()
    if requirement is not None:
        req = requirement(text)
        return req.name, req.specifier, str(req.specifier)
    match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", text)
    return match.group(1), None, match.group(2).strip()


def _installedVersion(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirementSatisfied(text: str) -> bool:
    name, specifier, _ = _splitRequirement(text)
    version = _installedVersion(name)
    if version is None:
        return False
    module = _IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))
    try:
        if importlib.util.find_spec(module) is None:
            return False
    except (ImportError, ValueError):
        return False
    if specifier is None:
        return True
    return specifier.contains(version, prereleases=True)


def adaptRequirements(requirements, pydicomVersion: str | None = None) -> list:
    """The requirements with highdicom's line replaced by the release that works with this pydicom.

    ``pydicomVersion`` None: the installed one (Slicer's; never replaced). No highdicom fits (pydicom < 2.3
    or 2.4.0): highdicom is left out, and only ``--dicom-out`` is unavailable.
    """
    from ipmn.dicom_compat import highdicom_requirement

    if pydicomVersion is None:
        pydicomVersion = _installedVersion("pydicom")
    adapted = []
    for line in requirements:
        if _splitRequirement(line)[0].lower() == "highdicom":
            fitting = highdicom_requirement(pydicomVersion)
            if fitting is None:
                logging.info(f"IPMN: no highdicom release works with pydicom {pydicomVersion}: DICOM out unavailable")
                continue
            line = fitting
        adapted.append(line)
    return adapted


def missingRequirements(requirements) -> list:
    """The requirement strings that are not installed in a suitable version (nothing is imported)."""
    return [r for r in requirements if not requirementSatisfied(r)]


def torchMissing() -> bool:
    """True when PyTorch (with torchvision, which timm imports) is missing or too old. Does not import torch."""
    return bool(missingRequirements([f"torch{TORCH_REQUIREMENT}", f"torchvision{TORCHVISION_REQUIREMENT}"]))


def writeProtectionConstraints(folder=None, extra=()) -> Path:
    """A pip constraints file pinning Slicer's numpy and SimpleITK (and torch once installed) to their versions."""
    lines = []
    for name in (*PROTECTED, *extra):
        version = _installedVersion(name)
        if version:
            lines.append(f"{name}=={version}")
    folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="IPMN-pip-"))
    path = folder / "ipmn-constraints.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def checkRequirementsFile(path) -> list:
    """Problems with a requirements file (packages Slicer ships, or torch, must not be listed; no pins)."""
    problems = []
    for line in readRequirements(path):
        name, _, spec = _splitRequirement(line)
        if name.lower() in NEVER_IN_REQUIREMENTS:
            problems.append(f"{name} must not be in requirements.txt")
        if "==" in spec:
            problems.append(f"{line}: use a >= minimum, not an exact pin")
    return problems


def platformProblem(system: str | None = None, machine: str | None = None, numpyVersion: str | None = None):
    """Why PyTorch cannot work in this Slicer, or None.

    PyTorch 2.2 is the last release for Intel Macs (macOS x86_64) and is built against numpy 1.x; Slicer
    ships numpy 2.x, which this module never replaces (SlicerTotalSegmentator downgrades numpy instead,
    which can break Slicer itself and other extensions).
    """
    import platform

    system = system if system is not None else platform.system()
    machine = (machine if machine is not None else platform.machine()).lower()
    numpyVersion = numpyVersion if numpyVersion is not None else (_installedVersion("numpy") or "0")
    major = int(re.match(r"\d+", numpyVersion).group(0)) if re.match(r"\d+", numpyVersion) else 0
    if system == "Darwin" and machine in ("x86_64", "amd64", "i386") and major >= 2:
        return (f"PyTorch no longer supports Intel Macs: its last build for them (2.2) needs numpy 1.x, and this "
                f"Slicer uses numpy {numpyVersion}, which the module does not replace (that could break Slicer). "
                "Use Slicer for Apple silicon (arm64), Windows or Linux, or run the command-line engine "
                "(ipmn predict) in a separate Python environment with numpy<2.")
    return None


def torchInstallArgs() -> list:
    """Arguments of ``python -m light_the_torch`` as the PyTorch extension uses them (torch matching the driver)."""
    return ["install", f"torch{TORCH_REQUIREMENT}", f"torchvision{TORCHVISION_REQUIREMENT}"]


def installTorch(python: str, pipInstall, run=None) -> None:
    """Install PyTorch with light-the-torch in a child process, as the PyTorch extension does, but without
    importing torch into Slicer's own process (``PyTorchUtilsLogic.installTorch`` imports it and raises
    CalledProcessError on failure). Raises IPMNError with the installer's last lines on failure."""
    import subprocess

    run = run or subprocess.run
    try:
        if _installedVersion("light-the-torch") is None:
            pipInstall("light-the-torch>=0.5")
        proc = run([python, "-m", "light_the_torch", *torchInstallArgs()], stdout=subprocess.PIPE,
                   stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
    except (OSError, subprocess.SubprocessError) as exc:
        raise IPMNError(f"installing PyTorch failed: {exc}. Check the network or proxy settings, or install it "
                        "with the PyTorch Utils module.") from exc
    importlib.invalidate_caches()  # the new packages are found by the checks that follow
    if proc.returncode != 0:
        tail = " | ".join(line.strip() for line in (proc.stdout or "").splitlines()[-3:] if line.strip())
        raise IPMNError(f"installing PyTorch failed (exit code {proc.returncode}){': ' + tail if tail else ''}. "
                        "Check the network or proxy settings, or install it with the PyTorch Utils module.")


def ensureDependencies(requirementsPath, requester: str = "IPMN") -> None:
    """Install what is missing, after one confirmation. Raises IPMNError when the user declines or it fails."""
    import slicer

    requirements = adaptRequirements(readRequirements(requirementsPath))
    missing = missingRequirements(requirements)
    needTorch = torchMissing()
    if not missing and not needTorch:
        return
    problem = platformProblem() if needTorch else None
    if problem:
        raise IPMNError(problem)
    wanted = ([f"torch{TORCH_REQUIREMENT} and torchvision (with light-the-torch, as the PyTorch extension does: the build matching your GPU driver)"]
              if needTorch else []) + missing
    if slicer.app.testingEnabled():
        raise IPMNError("missing Python packages (not installed in testing mode): " + ", ".join(wanted))
    message = (f"{requester} needs these Python packages, which are not installed yet:\n\n- " + "\n- ".join(wanted)
               + "\n\nThey will be downloaded and installed into Slicer's Python (this can take several minutes; "
                 "PyTorch is large). Slicer's own numpy and SimpleITK are kept as they are. Continue?")
    if not slicer.util.confirmOkCancelDisplay(message, f"{requester}: install Python packages"):
        raise IPMNError("the required Python packages are not installed (installation declined)")

    importedBefore = set(sys.modules)
    if needTorch:
        from IPMNClassifierLib.engine import python_slicer_executable

        installTorch(python_slicer_executable(), slicer.util.pip_install)
        if torchMissing():
            raise IPMNError("PyTorch was not installed: use the PyTorch Utils module to install it, then try again")
    if missing:
        constraints = writeProtectionConstraints(extra=("torch", "torchvision"))
        try:
            packaging = None
            try:
                import slicer.packaging as packaging
            except ImportError:
                packaging = None
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                packaging.pip_ensure(missing, constraints=str(constraints), prompt_install=False,
                                     prompt_restart=True, requester=requester)
            else:
                slicer.util.pip_install([*missing, "-c", str(constraints)])
                _offerRestart(missing, importedBefore, requester)
        except Exception as exc:  # pip failures come as CalledProcessError / RuntimeError
            raise IPMNError(f"installing {', '.join(missing)} failed: {exc}. Check the network or proxy "
                            "settings, or install the packages manually (see the module help).") from exc
    still = missingRequirements(requirements)
    if still:
        raise IPMNError("these packages are still missing after installation: " + ", ".join(still)
                        + ". Restart Slicer and try again.")


def _offerRestart(installed, importedBefore, requester: str) -> None:
    import slicer

    names = {_splitRequirement(r)[0].lower().replace("-", "_") for r in installed}
    names |= {_IMPORT_NAMES.get(n, n) for n in names}
    loaded = sorted(n for n in names if n in importedBefore)
    if loaded:
        logging.info(f"{requester}: updated packages already imported: {loaded}")
        if slicer.util.confirmYesNoDisplay(
            "Some updated Python packages were already loaded (" + ", ".join(loaded) + ") and may not work until "
            "Slicer is restarted. Restart now?", f"{requester}: restart recommended"):
            slicer.util.restart()
