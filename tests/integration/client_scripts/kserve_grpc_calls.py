"""The KServe SDK's gRPC client against a server's gRPC port; run by the KServe client venv's python.

argv: TARGET (host:port) MODEL ROWS_JSON. Prints one JSON object: what each call answered, errors included.
"""

import asyncio
import json
import sys

import grpc
import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest


async def main(target: str, model: str, rows: list[list[float]]) -> dict:
    X = np.array(rows, dtype=np.float32)
    out: dict = {}
    client = InferenceGRPCClient(target, retries=0)
    try:
        out["live"] = await client.is_server_live()
        out["ready"] = await client.is_server_ready()
        out["model_ready"] = await client.is_model_ready(model)
        tensor = InferInput("input-0", list(X.shape), "FP32")
        tensor.set_data_from_numpy(X)
        response = await client.infer(InferRequest(model_name=model, infer_inputs=[tensor], request_id="kserve-grpc"))
        (output,) = response.outputs
        out["infer"] = {
            "id": response.id, "model": response.model_name, "name": output.name, "shape": list(output.shape),
            "datatype": output.datatype,
            "data": [v.decode() if isinstance(v, bytes) else v for v in output.as_numpy().reshape(-1).tolist()],
        }
        wrong = InferInput("input-0", [len(rows), 3], "FP32")
        wrong.set_data_from_numpy(X[:, :3].copy())
        try:
            await client.infer(InferRequest(model_name=model, infer_inputs=[wrong]))
        except grpc.aio.AioRpcError as exc:
            out["error"] = {"code": exc.code().name, "message": exc.details()}
    finally:
        await client.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))))
