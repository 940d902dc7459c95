"""MLServer's own PandasCodec, run in MLServer's venv (.venv/mlserver, made by `make venv`).

    body = pandas_codec_request(frame)  # the /v2 JSON body MLServer's clients send for this DataFrame

MLServer pins fastapi and pydantic versions the service does not run, so it lives in a venv of its own and
is called as a process: the frame goes in as JSON with its dtypes, the encoded request comes back as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

MLSERVER_PYTHON = Path(sys.prefix) / "mlserver" / "bin" / "python"

_ENCODE = """
import json, sys
import pandas as pd
from mlserver.codecs import PandasCodec

given = json.load(sys.stdin)
frame = pd.DataFrame({name: pd.Series(values, dtype=given["dtypes"][name]) for name, values in given["columns"].items()})
print(PandasCodec.encode_request(frame).model_dump_json(exclude_none=True))
"""


def pandas_codec_request(frame: Any) -> dict[str, Any]:
    if not MLSERVER_PYTHON.exists():
        raise RuntimeError(f"{MLSERVER_PYTHON} is missing: run `make venv` (it installs requirements-mlserver.txt)")
    given = {
        "columns": {name: frame[name].tolist() for name in frame.columns},
        "dtypes": {name: str(frame[name].dtype) for name in frame.columns},
    }
    done = subprocess.run(
        [str(MLSERVER_PYTHON), "-c", _ENCODE], input=json.dumps(given), capture_output=True, text=True,
        timeout=300, check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"MLServer's PandasCodec failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)
