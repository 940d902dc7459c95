"""The KServe SDK's REST client against a server, V1 and V2; run by the KServe client venv's python.

argv: BASE_URL MODEL ROWS_JSON. Prints one JSON object: what each call answered, errors included.
"""

import asyncio
import json
import sys

import httpx
import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(base_url: str, model: str, rows: list[list[float]]) -> dict:
    X = np.array(rows, dtype=np.float32)
    out: dict = {}
    v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
    v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
    try:
        out["v1_live"] = await v1.is_server_live(base_url)
        out["v1_model_ready"] = await v1.is_model_ready(base_url, model)
        out["v1_predictions"] = (await v1.infer(base_url, {"instances": rows}, model_name=model))["predictions"]
        try:
            await v1.infer(base_url, {"instances": [row[:-1] for row in rows]}, model_name=model)
        except httpx.HTTPStatusError as exc:
            out["v1_error"] = {"status": exc.response.status_code, "message": str(exc)}
        out["v2_live"] = await v2.is_server_live(base_url)
        out["v2_ready"] = await v2.is_server_ready(base_url)
        out["v2_model_ready"] = await v2.is_model_ready(base_url, model)
        for binary in (False, True):
            tensor = InferInput("input-0", list(X.shape), "FP32")
            tensor.set_data_from_numpy(X, binary_data=binary)
            request = InferRequest(model_name=model, infer_inputs=[tensor], request_id=f"kserve-{binary}")
            response = await v2.infer(base_url, request, model_name=model)
            (output,) = response.outputs
            out[f"v2_binary_{binary}"] = {
                "id": response.id, "name": output.name, "shape": list(output.shape), "datatype": output.datatype,
                "data": [v.decode() if isinstance(v, bytes) else v for v in output.as_numpy().reshape(-1).tolist()],
            }
        wrong = InferInput("input-0", [len(rows), 3], "FP32")
        wrong.set_data_from_numpy(X[:, :3].copy(), binary_data=True)
        try:
            await v2.infer(base_url, InferRequest(model_name=model, infer_inputs=[wrong]), model_name=model)
        except httpx.HTTPStatusError as exc:
            out["v2_error"] = {"status": exc.response.status_code, "message": str(exc)}
    finally:
        await v1.close()
        await v2.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))))
