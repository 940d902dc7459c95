"""MLServer's NumpyRequestCodec and PandasCodec round trips against a server; run by the MLServer venv's python.

argv: INFER_URL FEATURES_JSON ROWS_JSON. Each codec encodes the rows into a request, the server answers,
the same codec decodes the answer. Prints one JSON object with what each codec decoded.
"""

import json
import sys
import urllib.request

import numpy as np
import pandas as pd
from mlserver.codecs import NumpyRequestCodec, PandasCodec
from mlserver.types import InferenceRequest, InferenceResponse


def post(url: str, request: InferenceRequest) -> InferenceResponse:
    body = request.model_dump_json(exclude_none=True).encode()
    sent = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(sent, timeout=60) as answer:
        return InferenceResponse.model_validate_json(answer.read())


def plain(values: list) -> list:
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def main(url: str, features: list[str], rows: list[list[float]]) -> dict:
    X = np.array(rows, dtype=np.float64)
    numpy_answer = NumpyRequestCodec.decode_response(post(url, NumpyRequestCodec.encode_request(X)))
    frame = pd.DataFrame(X, columns=features)
    pandas_answer = PandasCodec.decode_response(post(url, PandasCodec.encode_request(frame)))
    return {
        "numpy": {"shape": list(numpy_answer.shape), "values": plain(numpy_answer.reshape(-1).tolist())},
        "pandas": {"columns": list(pandas_answer.columns), "rows": len(pandas_answer),
                   "values": plain(pandas_answer.iloc[:, 0].tolist())},
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))))
