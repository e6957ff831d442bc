"""Regenerate minicaffe/proto/caffe_pb2.py from caffe.proto.

Needs the `grpcio-tools` package (it bundles protoc). The committed module was made with
`pip install grpcio-tools==1.71.0` (protobuf 5.29 gencode), which protobuf runtimes 5.29 to 7.x
all load; a newer protoc would raise the minimum protobuf version in pyproject.toml.
Run from the repository root:  python tools/gen_proto.py
tests/proto/test_schema.py fails when the committed module is stale.
"""
import pathlib
import sys

from grpc_tools import protoc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "minicaffe" / "proto"


def main():
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={PROTO_DIR}",
                      str(PROTO_DIR / "caffe.proto")])
    if rc != 0:
        sys.exit(f"protoc failed with exit status {rc}")
    print(f"wrote {PROTO_DIR / 'caffe_pb2.py'}")


if __name__ == "__main__":
    main()
