"""The Open Inference Protocol over gRPC: the proto, its generated messages, the service."""
