"""MLServer's NumpyRequestCodec and PandasCodec round trips over gRPC; run by the MLServer venv's python.

argv: TARGET (host:port) IRIS_ROWS_JSON DIABETES_FEATURES_JSON DIABETES_ROWS_JSON. Each codec encodes rows into
a request, which MLServer's own converter turns into its gRPC message, as typed contents and as raw contents;
the server answers; the converter and the same codec decode the answer. Prints one JSON object with what was
decoded: iris's predict_proba (asked for by name) and the diabetes regressor's predict.

Numeric outputs only: MLServer's NumpyCodec reads a BYTES output that came over gRPC as the bytes of one
buffer, not as strings, whichever server sent it.
"""

import json
import sys

import grpc
import numpy as np
import pandas as pd
from mlserver.codecs import NumpyRequestCodec, PandasCodec
from mlserver.grpc import dataplane_pb2_grpc
from mlserver.grpc.converters import ModelInferRequestConverter, ModelInferResponseConverter
from mlserver.types import RequestOutput


def main(target: str, iris_rows: list[list[float]], features: list[str], diabetes_rows: list[list[float]]) -> dict:
    out: dict = {}
    with grpc.insecure_channel(target) as channel:
        stub = dataplane_pb2_grpc.GRPCInferenceServiceStub(channel)

        def infer(model: str, request, use_raw: bool):
            message = ModelInferRequestConverter.from_types(request, model_name=model, use_raw=use_raw)
            return ModelInferResponseConverter.to_types(stub.ModelInfer(message))

        for use_raw in (False, True):
            iris = NumpyRequestCodec.encode_request(np.array(iris_rows, dtype=np.float64))
            iris.outputs = [RequestOutput(name="predict_proba")]
            proba = NumpyRequestCodec.decode_response(infer("iris", iris, use_raw))
            X = np.array(diabetes_rows, dtype=np.float64)
            values = NumpyRequestCodec.decode_response(infer("diabetes", NumpyRequestCodec.encode_request(X), use_raw))
            frame = PandasCodec.decode_response(
                infer("diabetes", PandasCodec.encode_request(pd.DataFrame(X, columns=features)), use_raw))
            out["raw" if use_raw else "typed"] = {
                "iris_proba": {"shape": list(proba.shape), "values": proba.reshape(-1).tolist()},
                "diabetes_numpy": {"shape": list(values.shape), "values": values.reshape(-1).tolist()},
                "diabetes_pandas": {"columns": list(frame.columns), "values": frame.iloc[:, 0].tolist()},
            }
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps(main(args[0], json.loads(args[1]), json.loads(args[2]), json.loads(args[3]))))
