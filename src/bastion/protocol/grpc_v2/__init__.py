"""Generated protobuf/gRPC stubs of the Open Inference Protocol (package ``inference``).

``grpc_service.proto`` is the source; ``scripts/gen_grpc.sh`` regenerates the
``*_pb2*`` modules, which are committed so that serving needs no grpcio-tools.
The messages live in a private descriptor pool (see the script) so that this
package and ``tritonclient.grpc`` can be imported by the same process.
"""
