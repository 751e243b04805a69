"""Store a few CR/DX studies made from the shared test images in the local PACS (make pacs), over STOW-RS.

    python3 scripts/pacs_demo_upload.py [--images 8] [--pacs dicomweb://127.0.0.1:8042/dicom-web]

Three studies of synthetic patients: children's frontal radiographs, one adult's (out of scope by PatientAge) and one
lateral view (out of scope by ViewPosition), in several transfer syntaxes. Credentials: XRAY_PACS_USER /
XRAY_PACS_PASSWORD (the local defaults otherwise). Prints one JSON line: what was stored, by SOP Instance UID.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # the project, and its synthetic radiographs (fixtures/dicom_factory.py)

from xray.environment import use_project_environment  # noqa: E402 - the standard library only

use_project_environment(__file__, ("pydicom", "numpy", "requests"))

import pydicom  # noqa: E402

from fixtures.dicom_factory import radiograph  # noqa: E402
from xray.storage import dicomweb  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--pacs", default=f"dicomweb://127.0.0.1:{os.environ.get('XRAY_PACS_PORT', '8042')}/dicom-web")
    parser.add_argument("--archive", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray_mini.zip")
    args = parser.parse_args()
    client = dicomweb.Client(dicomweb.parse(args.pacs))
    studies = [pydicom.uid.generate_uid() for _ in range(3)]
    with zipfile.ZipFile(args.archive) as archive:
        names = sorted(n for n in archive.namelist() if n.startswith("chest_xray/test/") and n.endswith(".jpeg"))
        step = max(len(names) // args.images, 1)
        stored = {}
        for index, name in enumerate(names[::step][: args.images]):
            kind = "adult" if index == 1 else "lateral" if index == 2 else "child"
            data = radiograph(
                archive.read(name),
                bits=12,
                syntax=("explicit", "jpeg-ls", "jpeg2000-lossless")[index % 3],
                age="045Y" if kind == "adult" else "004Y",
                view="LL" if kind == "lateral" else "PA",
                StudyInstanceUID=studies[index % 3],
                PatientID=f"DEMO-{index % 3}",
                PatientName=f"Demo^Patient{index % 3}",
                AccessionNumber=f"DEMO{index % 3:04d}",
            )
            client.store([data])
            stored[pydicom.dcmread(io.BytesIO(data)).SOPInstanceUID] = {"from": name.rsplit("/", 1)[1], "kind": kind}
    print(json.dumps({"pacs": args.pacs, "studies": len(studies), "instances": stored}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
