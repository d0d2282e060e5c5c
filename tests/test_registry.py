"""cpcli.registry and cpcli.devices in a fresh interpreter: what loading the node types costs `cp worker`."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

CHILD_TIMEOUT_S = 20.0  # the child takes ~0.2 s; generous for a loaded 2-core machine
BUILT_IN = {"audio_level", "camera", "discard", "face_detect", "grayscale", "microphone", "motion", "resize",
            "speaker", "test_audio", "test_video"}
HEAVY = ("numpy", "cv2")  # ~0.1 and ~0.2 CPU s to import: the node processes need them, a joining worker does not
# camera.devices() opens the cameras it finds with OpenCV (which imports numpy): on Linux only when
# /dev/video* exist, elsewhere always (no node tells which indexes exist).
CAMERAS_PROBED = not sys.platform.startswith("linux") or bool(glob.glob("/dev/video*"))

CHILD = f"""
import json, sys, typing
from cpcli.devices import list_devices
from cpcli.registry import load_registry

heavy = lambda: sorted(m for m in {HEAVY!r} if m in sys.modules)
registry = load_registry()
for node_type in registry.types.values():
    typing.get_type_hints(node_type.cls.__init__)  # what describe() and `cp validate` rely on
loaded = heavy()
list_devices(registry)
print(json.dumps({{"types": sorted(registry.types), "broken": registry.broken, "after_load": loaded,
                  "after_devices": heavy()}}))
"""


def test_loading_node_types_and_listing_devices_imports_neither_numpy_nor_cv2() -> None:
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert set(report["types"]) >= BUILT_IN, report["broken"]
    assert report["after_load"] == [], "node modules import these at the top; `from cpcli.lazy import numpy as np`"
    if not CAMERAS_PROBED:
        assert report["after_devices"] == [], "a devices() imported these with no camera to open"
