"""Write docs/report.schema.json, the JSON Schema of the --report file, generated from mixq_onnx.report's dataclasses.

    python tools/gen_report_schema.py

tests/test_report_schema.py fails when the committed file and the code disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mixq_onnx.report import json_schema  # noqa: E402

OUT = ROOT / "docs" / "report.schema.json"


def render() -> str:
    return json.dumps(json_schema(), indent=1) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
