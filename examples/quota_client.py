#!/usr/bin/env python3
"""A QuotaService client: budget a model call made outside Envoy (README "Direct gRPC use").

    pip install grpcio grpcio-tools
    TOKENBUDGET_QUOTA_TOKEN=tb_... python examples/quota_client.py \\
        --target 127.0.0.1:9002 --principal alice@example.com --group data-science \\
        --model gpt-4o-mini --input-tokens 1200 --max-output-tokens 300 --usage 1180,240

It reserves the call's estimate, "makes the call" (here: --usage stands for what the model
reported), commits the actual usage — twice, as a retry would, to show that the second commit
charges nothing — and prints the principal's balances. Output: one JSON object on stdout.
Exit status 2 when the budget refuses the call.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import uuid

import grpc
import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent.parent / "proto"


def load_stubs():
    """Generates the Python stubs from proto/ (a real client would check them in)."""
    out = tempfile.mkdtemp(prefix="tokenbudget-stubs-")
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(PROTO_ROOT / "tokenbudget/v1/quota.proto"),
        ]
    )
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, out)
    from tokenbudget.v1 import quota_pb2, quota_pb2_grpc

    return quota_pb2, quota_pb2_grpc


def balance_dict(b):
    return {
        "budget": b.budget,
        "unit": b.unit,
        "limit": b.limit,
        "used": b.used,
        "reserved": b.reserved,
        "remaining": b.remaining,
        "resets_at_unix_ms": b.resets_at_unix_ms,
        "window": b.window,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="127.0.0.1:9002")
    ap.add_argument("--principal", required=True)
    ap.add_argument("--group", action="append", default=[])
    ap.add_argument("--model", required=True)
    ap.add_argument("--input-tokens", type=int, required=True, help="the prompt's estimate")
    ap.add_argument("--max-output-tokens", type=int, required=True)
    ap.add_argument("--usage", required=True, help="INPUT,OUTPUT tokens the model reported")
    ap.add_argument("--request-id", default=None)
    args = ap.parse_args()
    token = os.environ.get("TOKENBUDGET_QUOTA_TOKEN")
    if not token:
        sys.exit("set TOKENBUDGET_QUOTA_TOKEN to a [[quota.tokens]] token")
    used_in, used_out = (int(x) for x in args.usage.split(","))

    pb, pb_grpc = load_stubs()
    auth = (("authorization", f"Bearer {token}"),)
    with grpc.insecure_channel(args.target) as channel:
        quota = pb_grpc.QuotaServiceStub(channel)
        who = pb.Principal(principal=args.principal, groups=args.group)

        reserved = quota.Reserve(
            pb.ReserveRequest(
                principal=who,
                model=args.model,
                input_tokens=args.input_tokens,
                max_output_tokens=args.max_output_tokens,
            ),
            metadata=auth,
            timeout=5,
        )
        if reserved.verdict.decision != pb.ALLOW:
            print(
                json.dumps(
                    {
                        "decision": "deny",
                        "reason": reserved.verdict.reason,
                        "message": reserved.verdict.message,
                        "retry_after_seconds": reserved.verdict.retry_after_seconds,
                    }
                )
            )
            return 2

        # ... call the model here, with the same request id in your logs ...
        request_id = args.request_id or f"job-{uuid.uuid4()}"
        usage = pb.Usage(input_tokens=used_in, output_tokens=used_out)
        commit = pb.CommitRequest(
            reservation_id=reserved.reservation_id, request_id=request_id, usage=usage
        )
        first = quota.Commit(commit, metadata=auth, timeout=5)
        retried = quota.Commit(commit, metadata=auth, timeout=5)

        balances = quota.GetBalance(
            pb.GetBalanceRequest(principal=who, model=args.model), metadata=auth, timeout=5
        )
        print(
            json.dumps(
                {
                    "decision": "allow",
                    "reservation_id": reserved.reservation_id,
                    "request_id": request_id,
                    "charged": first.charged,
                    "retry_charged": retried.charged,
                    "cost_nano_usd": first.cost_nano_usd,
                    "balances": [balance_dict(b) for b in balances.balances],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
