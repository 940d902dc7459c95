"""MLServer's own PandasCodec, run in MLServer's venv (scripts/harness/client_envs.py, made by `make venv`).

    body = pandas_codec_request(frame)  # the /v2 JSON body MLServer's clients send for this DataFrame

MLServer pins fastapi and pydantic versions the service does not run, so it lives in a venv of its own and
is called as a process: the frame goes in as JSON with its dtypes, the encoded request comes back as JSON.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

from scripts.harness.client_envs import client_python

_ENCODE = """
import json, sys
import pandas as pd
from mlserver.codecs import PandasCodec

given = json.load(sys.stdin)
frame = pd.DataFrame({name: pd.Series(values, dtype=given["dtypes"][name])
                      for name, values in given["columns"].items()})
print(PandasCodec.encode_request(frame).model_dump_json(exclude_none=True))
"""


def pandas_codec_request(frame: Any) -> dict[str, Any]:
    given = {
        "columns": {name: frame[name].tolist() for name in frame.columns},
        "dtypes": {name: str(frame[name].dtype) for name in frame.columns},
    }
    done = subprocess.run(
        [str(client_python("mlserver")), "-c", _ENCODE],
        input=json.dumps(given),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"MLServer's PandasCodec failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout)
